# yukumo — the targets the README names.
#   make up      build, start the local environment, apply the quickstart
#   make down    stop and remove everything `make up` started
#   make test    the whole suite: lint, unit, CRD drift, chart, end-to-end
SHELL := /bin/bash
CARGO ?= cargo
export YUKUMO_ROOT := $(CURDIR)

.PHONY: all tools build crds up down status test lint unit chart e2e clean

all: build

tools:
	@e2e/lib/tools.sh >/dev/null

build: tools
	$(CARGO) build --release --workspace --bins

# Every cargo command selects the whole workspace, so features unify the same
# way and dependencies are compiled once for build, unit and e2e.
crds: build
	target/release/yukumo-crdgen

up: build
	e2e/env.sh up

down:
	e2e/env.sh down

status:
	e2e/env.sh status

test: tools lint unit chart e2e

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

unit: tools
	$(CARGO) test --release --workspace --lib --bins   # includes the CRD drift check

chart: tools
	e2e/chart-test.sh

e2e: build
	e2e/run.sh

clean: down
	$(CARGO) clean
