# yukumo — the targets the README names.
#   make up      build, start the local environment (every host a kubelet
#                node, the chart's pods running the controller and agents),
#                apply the quickstart (VM_HOSTS=2: and two VM hosts whose
#                kernel has 802.1Q VLANs; STORAGE=ceph: and a single-node Ceph
#                behind the `ceph` rbd pool; KUBELETS=0: the controller and
#                agents as processes, no kubelets)
#   make down    stop and remove everything `make up` started
#   make test    the whole suite: lint, unit, CRD drift, chart, end-to-end,
#                and a small benchmark smoke (figures not judged)
#   make image   the container image (umoci, no daemon): target/image/
#   make krew    the kubectl plugin's krew archive and manifest: target/dist/
#   make bench   the network, compute and storage benchmarks (figures and ratios; target/bench/{network,compute,storage}.json)
SHELL := /bin/bash
CARGO ?= cargo
export YUKUMO_ROOT := $(CURDIR)

.PHONY: all tools build crds up down status test lint unit chart image image-test krew krew-test pods-test e2e bench bench-smoke clean

all: build

tools:
	@e2e/lib/tools.sh >/dev/null

# --all-targets: binaries and test binaries are built in one pass with one
# feature set (dev-dependencies included), so `unit` and `e2e` compile nothing.
build: tools
	$(CARGO) build --release --workspace --all-targets

# Every cargo command selects the whole workspace, so features unify the same
# way and dependencies are compiled once for build, unit and e2e.
crds: build
	target/release/yukumo-crdgen

# VM_HOSTS=N adds N VM hosts (a kernel with 802.1Q VLANs: e2e/lib/vm-host.sh).
VM_HOSTS ?= 0
STORAGE ?=
# The chart's pods on kubelet nodes (KUBELETS=0: processes).
KUBELETS ?= 1
up: build
	e2e/env.sh up --vm-hosts $(VM_HOSTS) $(if $(STORAGE),--storage $(STORAGE)) $(if $(filter 1,$(KUBELETS)),--kubelets)

down:
	e2e/env.sh down

status:
	e2e/env.sh status

test: tools lint build unit chart image-test krew-test pods-test e2e bench-smoke

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

unit: build
	$(CARGO) test --release --workspace --lib --bins   # includes the CRD drift check

chart: tools build
	e2e/chart-test.sh

# The container image, without a daemon: target/image/yukumo-<version>.oci.tar.
image: build
	image/build.sh

# Built twice (reproducible), unpacked, every program in it run from its root.
image-test: build
	e2e/image-test.sh

# The plugin as krew installs it: target/dist/{yukumo.yaml,kubectl-yukumo_v*.tar.gz}.
krew: build
	image/krew.sh

# Reproducible; krew installs it from the manifest, refuses a tampered archive.
krew-test: build
	e2e/krew-test.sh

# The chart's pods on two kubelet nodes: leader and agent pod deletion,
# helm upgrade to a new tag, with real guests running throughout.
pods-test: build
	e2e/pods-test.sh

e2e: build
	e2e/run.sh

bench: build
	e2e/bench.sh

# The benchmark parts at a small scale: keeps `make bench` working.
bench-smoke: build
	YUKUMO_BENCH_SMOKE=1 e2e/bench.sh

clean: down
	$(CARGO) clean
