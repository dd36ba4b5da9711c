# chvkit — build, test, lint, bench.
CARGO ?= cargo
SKIP_LOG := $(CURDIR)/target/skipped.log

.PHONY: all build test test-deps lint fmt clippy bench clean

all: build

build:
	$(CARGO) build --release

test-deps:
	./scripts/install-test-deps.sh

# Installs what the tests need if missing, then runs every test (benchmarks are `make bench`:
# they need a release build and a quiet machine to mean anything). Skipped tests print
# `skipped: <test>: <reason>` and are totalled at the end.
test: test-deps
	@mkdir -p target && rm -f $(SKIP_LOG)
	CHVKIT_SKIP_LOG=$(SKIP_LOG) $(CARGO) test
	@# Where the real VMM is installed the suite above ran against it; run the VMM tests against
	@# the stand-in too, so the stand-in stays honest and its exit-code paths are exercised.
	CHVKIT_SKIP_LOG=$(SKIP_LOG) CHVKIT_TEST_VMM=standin $(CARGO) test --test cloud_hypervisor_api --test cloud_hypervisor_launch --test cloud_hypervisor_network
	@if [ -s $(SKIP_LOG) ]; then echo "skipped tests: $$(wc -l < $(SKIP_LOG))"; cat $(SKIP_LOG); else echo "skipped tests: 0"; fi

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

bench: test-deps
	$(CARGO) bench

clean:
	$(CARGO) clean
