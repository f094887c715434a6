#!/usr/bin/env bash
# Install what the suite needs on Debian/Ubuntu, then a venv with tox. Idempotent and quiet when nothing is missing.
# Exit 2 with the exact command to run when it cannot install (not root, no apt).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(clang-19 llvm-19 bpftool libbpf1 libbpf-dev python3-venv gcc libc6-dev)
# `setup.sh vm`: what the VM backend needs as well (QEMU, busybox for the guest's init, file for virtme-ng); the
# kernel it boots is the provisioned stack's (`setup.sh stack`)
if [ "${1:-}" = vm ]; then
  APT_PACKAGES+=(qemu-system-x86 busybox-static file)
fi
# `setup.sh stack`: what provisioning the real stack needs (apt-get download, dpkg-deb, depmod, the libbpf and
# bpftool builds); the packages themselves are only unpacked into the cache, never installed
# (`setup.sh stack-deps`: only those packages, for the suite's own tests of provisioning)
if [ "${1:-}" = stack ] || [ "${1:-}" = stack-deps ] || [ "${1:-}" = upstream ]; then
  APT_PACKAGES+=(debian-archive-keyring xz-utils kmod make pkg-config libelf-dev zlib1g-dev libcap-dev libssl-dev)
fi
# `setup.sh upstream`: what building upstream's selftests from the stack's source needs (backends/stack/upstream.py):
# extract-vmlinux's readelf and the image's decompressor (Debian's are zstd), openssl for test_progs' signing
# certificate, LLVM's development files for its JIT disassembler
if [ "${1:-}" = upstream ]; then
  APT_PACKAGES+=(binutils zstd openssl llvm-19-dev)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "setup: missing ${missing[*]} and no apt-get here: install clang >= 18, llvm, bpftool, libbpf 1.x and python3-venv by hand" >&2
    exit 2
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing ${missing[*]}; as root run: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/tox" ]; then
  echo "setup: creating $VENV with tox"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q "tox>=4" >/dev/null
fi

# The stack's paths as JSON; on failure its one-line reason and exit code (backends/stack/__main__.py)
if [ "${1:-}" = stack ]; then
  exec python3 -m backends.stack paths
fi
