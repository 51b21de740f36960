# pgvpn — `make demo` and `make test` install what they need on a fresh Debian 12 box.
SHELL := /bin/bash
PG_CONFIG ?= /usr/bin/pg_config
PGRX_VERSION := 0.18.1
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
# Packages: PostgreSQL 15 + headers (extension build), clang (bindgen), sudo (pgrx test
# --runas), libssl-dev (TLS to the database), iproute2/iputils/iperf3 (namespaces, ping,
# demo and bench traffic), openssl + tcpdump (the TLS test's CA and its wire capture), tshark
# (the capture tests read pgvpn capture's files with it),
# g++ (libFuzzer in the fuzz smoke).
APT_PACKAGES := postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config sudo \
                libssl-dev iproute2 iputils-ping iperf3 procps openssl tcpdump tshark g++
PGRX_TEST_DATA ?= /tmp/pgvpn-pgrx-test-data

.PHONY: all deps build install check test test-core test-ext test-e2e demo ha-demo bench bench-peers bench-audit soak clean

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

# Everything CI runs (.ci/run): the gates, every test suite, a one-minute fuzz per target.
test: deps check test-core test-ext test-e2e fuzz-smoke

# Formatting, lints (warnings are errors; the workspace denies undocumented unsafe).
check: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The protocol core: no root, no database, no pgrx.
test-core:
	$(CARGO) test -p pgvpn_core

# #[pg_test]s inside a throwaway pgrx cluster (pgvpn preloaded, see pgvpn_ext/src/lib.rs).
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

# pg_auto_failover on one box: a monitor, two nodes and two shims on namespaced hosts;
# ping and iperf3 through the tunnel, `pg_autoctl perform failover`, a kill -9 of the new
# primary's pg_autoctl, and the outage each caused (docs/ha.md, "pg_auto_failover"; about
# 2 min; HA_DEMO_ARGS="--primary-demote-timeout MS"). Not in `make test`.
HA_DEMO_PACKAGES := postgresql-15-auto-failover
ha-demo: install
	@missing=$$(for p in $(HA_DEMO_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	$(CARGO) build --release -p pgvpn-shim -p pgvpn-tests
	./target/release/ha-demo $(HA_DEMO_ARGS)

# Throughput, latency and cost: tunnel vs a veth pair vs the database alone, vs COPY of
# the same rows, send with 2 vs 2,002 peers, the latency floor, and the send ceiling of
# BENCH_BASELINE (v0.1.0; both it and HEAD release builds, each with its own profile, in
# private copies of PostgreSQL, once per commit; about 2 more minutes once built) — each
# issue-12/14 target as met or missed. BENCH_BASELINE= (or BENCH_ARGS=--no-baseline) skips
# the baseline; BENCH_ARGS=--quick for a short look. Writes target/bench/latest.json.
# Only the before/after ceilings: BENCH_ARGS='--baseline-only [--after REV]'.
BENCH_BASELINE ?= v0.1.0
bench: install
	$(CARGO) build --release -p pgvpn-shim -p pgvpn-tests
	./target/release/bench $(if $(BENCH_BASELINE),--baseline $(BENCH_BASELINE)) $(BENCH_ARGS)

# Many active peers: 2, 8, 32 and 64 concurrent SQL peers (no tun) sending to random
# others; packets/s, Jain's fairness, ordering-lock and NOTIFY-lock waits, NOTIFYs per
# commit (BENCH_PEERS_ARGS="--seconds S --peers 2,8,32,64"; about 1 min). Writes
# target/bench/peers-latest.json.
bench-peers: install
	$(CARGO) build --release -p pgvpn-tests
	./target/release/bench-peers $(BENCH_PEERS_ARGS)

# The audit queries on a big log (BENCH_AUDIT_ARGS="--packets N", --quick for a look;
# 50M packets need about 20 GB under /tmp). Writes target/bench/audit-latest.json.
bench-audit: install
	$(CARGO) build --release -p pgvpn-shim -p pgvpn-tests
	./target/release/bench-audit $(BENCH_AUDIT_ARGS)

# A steady stream through the tunnel for 12 minutes while the log rotates every 5 s and
# expires after a minute: log size, throughput per minute, memory, autovacuum,
# exactly-once across chunk drops (SOAK_ARGS="--minutes N --pps N"). Not in `make test`
# (tests/soak.rs runs a 90-second one there). Writes target/soak/latest.json.
soak: install
	$(CARGO) build --release -p pgvpn-shim -p pgvpn-tests
	./target/release/soak $(SOAK_ARGS)

clean:
	$(CARGO) clean

# Fuzzing pgvpn_core (fuzz/: a cargo package of its own, outside the workspace): the
# targets decode, route and cidr run one after another, FUZZ_SECONDS each (fuzz-smoke:
# FUZZ_SMOKE_SECONDS), and the executions per target and in total are printed. A crash
# fails the run and names the crashing input (under fuzz/artifacts/). cargo-fuzz with
# `-s none` builds on stable Rust; libFuzzer (inside libfuzzer-sys) needs a C++ compiler.
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 60
define FUZZ_TOOLS
@command -v c++ >/dev/null || { apt-get update -q && \
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++; }
@if ! cargo fuzz --version 2>/dev/null | grep -q ' $(CARGO_FUZZ_VERSION)$$'; then \
  echo "installing cargo-fuzz $(CARGO_FUZZ_VERSION)"; \
  $(CARGO) install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked; \
fi
endef

.PHONY: fuzz fuzz-smoke

fuzz:
	$(FUZZ_TOOLS)
	fuzz/run.sh $(FUZZ_SECONDS)

fuzz-smoke:
	$(FUZZ_TOOLS)
	fuzz/run.sh $(FUZZ_SMOKE_SECONDS)
