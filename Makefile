# pgvpn — `make demo` and `make test` install what they need on a fresh Debian 12 box.
SHELL := /bin/bash
PG_CONFIG ?= /usr/bin/pg_config
PGRX_VERSION := 0.18.1
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
# Packages: PostgreSQL 15 + headers (extension build), clang (bindgen), sudo (pgrx test
# --runas), iproute2/iputils/iperf3 (namespaces, ping, demo and bench traffic).
APT_PACKAGES := postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo \
                iproute2 iputils-ping iperf3 procps
PGRX_TEST_DATA ?= /tmp/pgvpn-pgrx-test-data

.PHONY: all deps build install test test-ext test-e2e demo bench clean

all: build

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@if ! cargo pgrx --version 2>/dev/null | grep -q ' $(PGRX_VERSION)$$'; then \
	  echo "installing cargo-pgrx $(PGRX_VERSION) (takes a few minutes)"; \
	  $(CARGO) install cargo-pgrx --version $(PGRX_VERSION) --locked; \
	fi
	@if ! grep -qs '^pg15' $(HOME)/.pgrx/config.toml; then \
	  cargo pgrx init --pg15 $(PG_CONFIG); \
	fi

build: deps
	$(CARGO) build --release -p pgvpn-shim -p pgvpn-tests
	cd pgvpn_ext && cargo pgrx package --pg-config $(PG_CONFIG) >/dev/null

# Into the system PostgreSQL 15 (needs root, as everything here).
install: deps
	cd pgvpn_ext && cargo pgrx install --release --pg-config $(PG_CONFIG)

test: deps test-ext test-e2e

# Unit tests (decode, route) and #[pg_test]s inside a throwaway pgrx cluster.
test-ext: deps
	rm -rf $(PGRX_TEST_DATA)
	cd pgvpn_ext && cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_TEST_DATA)

# Shim unit tests; SQL API and tunnel tests against a private cluster with the extension installed.
test-e2e: install
	$(CARGO) build --release -p pgvpn-shim
	$(CARGO) test --release -p pgvpn-shim -p pgvpn-tests -- --test-threads=2

demo: install
	$(CARGO) build --release -p pgvpn-shim -p pgvpn-tests
	./target/release/demo

# Throughput, latency and cost: tunnel vs a veth pair vs the database alone (about 6 min;
# BENCH_ARGS=--quick for a 1-minute look). Writes target/bench/latest.json.
bench: install
	$(CARGO) build --release -p pgvpn-shim -p pgvpn-tests
	./target/release/bench $(BENCH_ARGS)

clean:
	$(CARGO) clean
