# chvkit — build, test, lint, bench.
CARGO ?= cargo
SKIP_LOG := $(CURDIR)/target/skipped.log

.PHONY: all build test test-deps lint fmt clippy bench clean

all: build

build:
	$(CARGO) build --release

test-deps:
	./scripts/install-test-deps.sh

# Installs what the tests need if missing, then runs every test. Skipped tests print
# `skipped: <test>: <reason>` and are totalled at the end.
test: test-deps
	@mkdir -p target && rm -f $(SKIP_LOG)
	CHVKIT_SKIP_LOG=$(SKIP_LOG) $(CARGO) test --all-targets
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
