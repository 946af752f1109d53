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

crds:
	$(CARGO) run -q --release -p yukumo-crdgen

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

unit:
	$(CARGO) test --release --workspace --exclude yukumo-e2e
	$(CARGO) run -q --release -p yukumo-crdgen -- --check

chart: tools
	e2e/chart-test.sh

e2e: build
	e2e/run.sh

clean: down
	$(CARGO) clean
