#!/usr/bin/env bash
# Install what the test suite needs on a Debian host, as if the machine were new.
# Idempotent: it installs only the packages whose commands or files are missing.
set -euo pipefail

need=()
want() { # want COMMAND-OR-PATH PACKAGE
  case "$1" in
    /*) [ -e "$1" ] || need+=("$2") ;;
    *) command -v "$1" >/dev/null 2>&1 || need+=("$2") ;;
  esac
}
want ip iproute2
want bridge iproute2
want nft nftables
want ip6tables iptables
want buildah buildah
want umoci umoci
want skopeo skopeo
want mkfs.ext4 e2fsprogs
want debugfs e2fsprogs
want busybox busybox-static
want qemu-system-x86_64 qemu-system-x86
want cpio cpio
want modinfo kmod
want setcap libcap2-bin
want python3 python3
want curl curl
want sha256sum coreutils
want hyperfine hyperfine
want strace strace
want ps procps
want setpriv util-linux
want qemu-img qemu-utils
want mkfs.xfs xfsprogs
want /usr/lib/x86_64-linux-gnu/libnftables.so.1 libnftables1
# The QEMU guest harness boots Debian's cloud kernel.
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)

if [ ${#need[@]} -eq 0 ]; then
  echo "test dependencies: all present"
  exit 0
fi
# De-duplicate.
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
echo "test dependencies: installing ${need[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "not root: run 'sudo $0' or install: ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
