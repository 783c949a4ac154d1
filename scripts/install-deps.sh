#!/usr/bin/env bash
# install-deps.sh - install, from Debian 12's archive, whatever Forge's build and tests need and the
# machine lacks. Idempotent and quick when everything is there. Needs root (or sudo) to install.
set -euo pipefail
pkgs=(build-essential pkg-config clang libclang-rt-14-dev
      libpcre2-dev libcjson-dev libutf8proc-dev libcmocka-dev hipcc libamdhip64-dev rocm-device-libs clang-15 jq bsdutils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
