#!/usr/bin/env bash
# install-deps.sh [--test] - install, from Debian 12's archive, what Forge needs and the machine
# lacks. Idempotent and quick when everything is there. Needs root (or sudo) to install.
#   (no flag)  what building and running forge needs (scripts/demo.sh)
#   --test     also what the tests need: cmocka, clang + libFuzzer, jq, script(1), python3 (the
#              fake model hub of tests/test_pull.sh), Node.js + npm and chromium (forge serve's
#              tests in tests/server/; a Node.js already installed, e.g. NodeSource's with its
#              own npm, is kept), and Debian's ROCm
#              toolchain for the HIP compile check (scripts/test.sh, CI). nvcc is not a Debian
#              package: CI machines have it at /usr/local/cuda/bin/nvcc.
set -euo pipefail
# libcurl (forge pull): the OpenSSL flavour, unless the GnuTLS one (same API) is already there
curl_dev=libcurl4-openssl-dev
dpkg-query -W -f='${Status}' libcurl4-gnutls-dev 2>/dev/null | grep -q "install ok installed" &&
    curl_dev=libcurl4-gnutls-dev
pkgs=(build-essential pkg-config libpcre2-dev libcjson-dev libutf8proc-dev "$curl_dev"
      libmicrohttpd-dev)
if [ "${1:-}" = "--test" ]; then
    pkgs+=(clang libclang-rt-14-dev libcmocka-dev jq bsdutils python3
           hipcc libamdhip64-dev rocm-device-libs clang-15 chromium)
    command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
fi
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
