# chvkit — build, test, lint, bench.
CARGO ?= cargo
SKIP_LOG := $(CURDIR)/target/skipped.log

# The real VMM and the fixture kernel, installed for the tests as from an offline mirror
# (scripts/install-test-vmm.sh); product code never names this path.
FIXTURES ?= $(CURDIR)/../shared/fixtures
TEST_VMM := $(CURDIR)/target/test-vmm
# chvkit's own guest kernel build, cached by recipe hash; kept between runs on the same machine.
KERNEL_CACHE ?= $(HOME)/.cache/chvkit/kernel
# What every test run sees: the skip log, the kernel cache, and the real VMM where installed.
TEST_ENV = CHVKIT_SKIP_LOG=$(SKIP_LOG) CHVKIT_KERNEL_CACHE=$(KERNEL_CACHE) $(shell cat $(TEST_VMM)/env 2>/dev/null)

.PHONY: all build test test-deps test-vmm guest-kernel lint fmt clippy bench clean man

all: build

build:
	$(CARGO) build --release

test-deps:
	./scripts/install-test-deps.sh

test-vmm:
	@mkdir -p target && rm -f $(SKIP_LOG)
	./scripts/install-test-vmm.sh "$(FIXTURES)" "$(TEST_VMM)" "$(SKIP_LOG)"

# chvkit's guest kernel (guest/kernel/), built by `chvkit kernel --source build` into the cache
# and installed under target/guest-kernel (about 8 minutes on 2 cores the first time).
guest-kernel:
	$(CARGO) build
	CHVKIT_KERNEL_CACHE=$(KERNEL_CACHE) ./target/debug/chvkit --root $(CURDIR)/target/guest-kernel kernel --source build

# Installs what the tests need if missing, then runs every test (benchmarks are `make bench`:
# they need a release build and a quiet machine to mean anything). Skipped tests print
# `skipped: <test>: <reason>` and are totalled at the end.
test: test-deps test-vmm guest-kernel
	$(TEST_ENV) $(CARGO) test
	@# Where the real VMM is installed the suite above ran against it; run the VMM tests against
	@# the stand-in too, so the stand-in stays honest and its exit-code paths are exercised.
	$(TEST_ENV) CHVKIT_TEST_VMM=standin $(CARGO) test --test cloud_hypervisor_api --test cloud_hypervisor_launch --test cloud_hypervisor_network
	@# The Ansible collection (deploy/ansible) against a network namespace and a temp root.
	$(TEST_ENV) ./scripts/test-ansible.sh target/debug/chvkit
	@if [ -s $(SKIP_LOG) ]; then echo "skipped tests: $$(wc -l < $(SKIP_LOG))"; cat $(SKIP_LOG); else echo "skipped tests: 0"; fi

# Man pages, one per command (chvkit.1, chvkit-doctor.1, …, chvkit-vm-ls.1), generated from the
# CLI definition by examples/man.rs; read one with `man -l target/man/chvkit.1`.
man:
	$(CARGO) run --quiet --example man -- $(CURDIR)/target/man

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

bench: test-deps test-vmm guest-kernel
	$(TEST_ENV) $(CARGO) bench

clean:
	$(CARGO) clean
