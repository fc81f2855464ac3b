#!/usr/bin/env bash
# Installs what the demo and the test suite need, only when it is missing:
# Debian packages (SoftHSM2 and the PKCS#11 clients the tests drive), a
# Python venv with the Python peers, and cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  softhsm2 opensc libengine-pkcs11-openssl libnss3-tools gnutls-bin
  p11-kit libp11-kit-dev openjdk-17-jdk-headless valgrind gcc make
  python3-venv python3-dev pkg-config openssl libssl-dev redis-server postgresql
)
PY_PACKAGES=(python-pkcs11==0.7.0 'moto[ec2,iam]==5.2.5' flask flask-cors)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "deps: creating the Python venv $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.p11shim-deps"
want="${PY_PACKAGES[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "deps: installing ${PY_PACKAGES[*]} into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
  echo "$want" > "$stamp"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "deps: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
