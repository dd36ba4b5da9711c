#!/usr/bin/env bash
# Install what the test suite needs on a Debian host, as if the machine were new.
# Idempotent: it installs only the packages whose commands or files are missing.
set -euo pipefail

need=()
wanted=()
have() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}
want() { # want COMMAND-OR-PATH PACKAGE
  wanted+=("$1=$2")
  have "$1" || need+=("$2")
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
# qemu-system-x86 from Debian 12 replaces a newer qemu-utils (from backports) and so removes
# qemu-img: install both together so apt picks one matching pair.
have qemu-system-x86_64 || need+=(qemu-utils)
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
# chvkit's own guest kernel (`make guest-kernel`): the distribution's kernel source and what
# its build needs.
want /usr/src/linux-source-6.12.tar.xz linux-source-6.12
want flex flex
want bison bison
want bc bc
want make make
want gcc gcc
want ld binutils
want patch patch
want /usr/include/libelf.h libelf-dev
want xz xz-utils
# doctor's Prometheus output is checked with promtool, the man pages rendered with man -l, the
# completion scripts parsed by zsh and fish.
want promtool prometheus
want man man-db
want groff groff-base
want zsh zsh
want fish fish
# `rootfs --bootable`: the disk is checked with sgdisk, fsck.vfat and mtools, and booted by OVMF
# through systemd-boot under QEMU.
want sgdisk gdisk
want fsck.vfat dosfstools
want mdir mtools
want /usr/share/ovmf/OVMF.fd ovmf
want /usr/lib/systemd/boot/efi/systemd-bootx64.efi systemd-boot-efi
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
# Only promtool is wanted from Debian's prometheus package: on a systemd host the package would
# also enable and start a Prometheus server.
if printf '%s\n' "${need[@]}" | grep -qx prometheus; then
  systemctl disable --now prometheus 2>/dev/null || true
fi

# An install can remove what another package provided (qemu-system-x86 once took qemu-img):
# check everything again and fail loudly rather than let a test skip later.
missing=()
for w in "${wanted[@]}"; do
  have "${w%%=*}" || missing+=("${w%%=*} (package ${w#*=})")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test dependencies: still missing after install: ${missing[*]}" >&2
  exit 1
fi
echo "test dependencies: all present"
