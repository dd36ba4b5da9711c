#!/usr/bin/env bash
# Install the real Cloud Hypervisor v50.0 (and its snapshot-capable build for PVM hosts) for the
# tests, the way a user on an air-gapped host installs from an offline mirror: check the
# mirror's SHA256SUMS, copy into DEST, and write DEST/env with the variables the tests read
# (CHV_BIN, CHV_BIN_SNAP, CHVKIT_FIXTURE_KERNEL). Where the mirror is absent, say so loudly
# (and into the skip log): the tests that need the real VMM then skip with their reasons.
set -euo pipefail
fixtures=${1:?usage: install-test-vmm.sh FIXTURES DEST [SKIP_LOG]}
dest=${2:?usage: install-test-vmm.sh FIXTURES DEST [SKIP_LOG]}
skip_log=${3:-}
# Canonical, so the paths it hands on (a profile's kernel.path among them) have no `..`.
fixtures=$(readlink -m "$fixtures")
vmm=$fixtures/cloud-hypervisor-v50.0
kernel=$fixtures/guest-kernel-pvm

rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
env_line=""
if [ -f "$vmm/SHA256SUMS" ]; then
  (cd "$vmm" && sha256sum --quiet -c SHA256SUMS)
  for f in cloud-hypervisor cloud-hypervisor-pvmfix ch-remote; do
    install -m 0755 "$vmm/$f" "$dest.tmp/$f"
  done
  "$dest.tmp/cloud-hypervisor" --version
  env_line="CHV_BIN=$dest/cloud-hypervisor CHV_BIN_SNAP=$dest/cloud-hypervisor-pvmfix"
else
  msg="skipped: real VMM: $vmm is absent; tests that need the real Cloud Hypervisor skip"
  echo "$msg" >&2
  [ -n "$skip_log" ] && echo "$msg" >>"$skip_log"
fi
# Test data only: the end-to-end tests use it where chvkit's own build kernel cannot be built.
if [ -f "$kernel/SHA256SUMS" ] && (cd "$kernel" && sha256sum --quiet -c SHA256SUMS); then
  env_line="$env_line CHVKIT_FIXTURE_KERNEL=$kernel/vmlinux"
fi
echo "$env_line" >"$dest.tmp/env"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "test VMM: ${env_line:-none}"
