#!/usr/bin/env bash
# Installs the system packages meshchat's build and tests need, when they are missing.
# Debian/Ubuntu, as root (or with sudo). Safe to run again: it only installs what is absent.
#   libclang-dev  RocksDB's bindings are generated with bindgen, which loads libclang
#   iproute2, iptables  the NAT tests build network namespaces (ip netns, MASQUERADE)
#   tmux          the interactive-chat test drives `meshchat chat` in a real terminal
#   ccache        caches RocksDB's C++ objects across builds (see scripts/env.sh)
set -euo pipefail

missing=()
# libclang itself (libclang.so / libclang-14.so.1), not libclang-cpp, which some images carry
# without it and which bindgen cannot use.
have_libclang() {
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
    /usr/lib/*/libclang.so* /usr/lib/*/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}
have_libclang || missing+=(libclang-dev)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v ccache >/dev/null 2>&1 || missing+=(ccache)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "meshchat needs these Debian packages: ${missing[*]}" >&2
    echo "run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
echo "installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
