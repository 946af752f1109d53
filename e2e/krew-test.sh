#!/usr/bin/env bash
# The plugin's krew distribution (`make krew`, image/krew.sh): the archive
# is reproducible; krew (built from e2e/tools/krew) installs the plugin from
# the manifest and the archive into a krew root of its own, the installed
# binary is the one built and kubectl finds it; a manifest whose sha256 does
# not match the archive is refused; uninstall removes it. Offline: krew is
# given the archive, it never fetches the manifest's URL nor its index.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/tools.sh
source "$ROOT/e2e/lib/tools.sh" >/dev/null
W=$(mktemp -d /tmp/yukumo-krew.XXXXXX)
trap 'rm -rf "$W"' EXIT
fail() { echo "krew-test: $*" >&2; exit 1; }
read -r manifest archive sum < <(OUT=$W/a "$ROOT/image/krew.sh")
read -r _ _ sum2 < <(OUT=$W/b "$ROOT/image/krew.sh")
[ "$sum" = "$sum2" ] || fail "two archives differ: $sum vs $sum2"
grep -q "sha256: $sum" "$manifest" || fail "the manifest does not name the archive's sha256"
echo "krew-test: reproducible archive, sha256 $sum, $(($(stat -c %s "$archive") / 1024)) KiB"
export KREW_ROOT=$W/krew HOME=$W/home
mkdir -p "$HOME"
krew() { "$YUKUMO_KREW" "$@"; }
# A tampered archive (one byte appended) is refused by its sha256.
cp "$archive" "$W/tampered.tar.gz"
printf 'x' >> "$W/tampered.tar.gz"
if out=$(krew install --manifest="$manifest" --archive="$W/tampered.tar.gz" 2>&1); then
  fail "krew installed an archive whose sha256 does not match: $out"
fi
echo "$out" | grep -qi "sha256\|checksum" || fail "refusal does not name the checksum: $out"
[ ! -e "$KREW_ROOT/bin/kubectl-yukumo" ] || fail "a refused install left a binary"
krew install --manifest="$manifest" --archive="$archive" >/dev/null 2>"$W/install.log" \
  || fail "krew install: $(cat "$W/install.log")"
[ -x "$KREW_ROOT/bin/kubectl-yukumo" ] || fail "no $KREW_ROOT/bin/kubectl-yukumo"
objcopy --strip-debug "$ROOT/target/release/kubectl-yukumo" "$W/built"
cmp -s "$W/built" "$(readlink -f "$KREW_ROOT/bin/kubectl-yukumo")" || fail "the installed binary is not the built one"
# krew's record of it.
grep -q "name: yukumo" "$KREW_ROOT/receipts/yukumo.yaml" || fail "no krew receipt for yukumo"
# kubectl finds it on the PATH as `kubectl yukumo`.
v=$(PATH="$KREW_ROOT/bin:$PATH" kubectl yukumo --version) || fail "kubectl yukumo --version"
echo "krew-test: installed by krew $(basename "$(dirname "$YUKUMO_KREW")"), kubectl runs it: $v"
# krew's list and uninstall want a local index: an empty one (no fetch);
# a plugin installed from a manifest is listed as `detached/yukumo`.
mkdir -p "$KREW_ROOT/index/default/plugins"
git -C "$KREW_ROOT/index/default" init -q
krew list 2>/dev/null | grep -Eqx "(detached/)?yukumo" || fail "krew list: $(krew list 2>&1)"
krew uninstall yukumo >/dev/null 2>"$W/uninstall.log" || fail "krew uninstall: $(cat "$W/uninstall.log")"
[ ! -e "$KREW_ROOT/bin/kubectl-yukumo" ] || fail "uninstall left the binary"
echo "krew-test: ok"
