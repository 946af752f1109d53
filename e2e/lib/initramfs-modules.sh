# Sourced by the initramfs builders (tiny-guest.sh, vm-host-initrd.sh).

# Copy kernel modules MODULE... of kernel KVER, with everything they depend
# on, decompressed, into DIR/lib/modules, and list them in dependency order
# in DIR/lib/modules/order (the init script insmods them in that order).
initramfs_modules() { # kver dir module...
  local kver=$1 dir=$2 ko name
  shift 2
  mkdir -p "$dir/lib/modules"
  : > "$dir/lib/modules/order"
  for m in "$@"; do
    modprobe -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    name=$(basename "$ko"); name=${name%.xz}; name=${name%.zst}
    case $ko in
      *.xz) xz -dc "$ko" > "$dir/lib/modules/$name" ;;
      *.zst) zstd -dcq "$ko" > "$dir/lib/modules/$name" ;;
      *) cp "$ko" "$dir/lib/modules/$name" ;;
    esac
    echo "$name" >> "$dir/lib/modules/order"
  done
}
