#!/usr/bin/env bash
# The p11shim demo, end to end on one machine with embedded defaults:
# a SoftHSM2 token behind a p11shim virtual slot whose PIN the application
# never holds, keys made with OpenSC's pkcs11-tool, and OpenSSL signing
# through p11shim with no PIN anywhere in its configuration; every
# signature is verified with the public key.
#
#   scripts/demo.sh [--quick]      (make demo builds and runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0; [ "${1:-}" = "--quick" ] && QUICK=1
SECONDS_OF_SIGNING=$([ $QUICK = 1 ] && echo 2 || echo 5)

MODULE=${P11SHIM_LIB:-$ROOT/target/release/libp11shim.so}
SOFTHSM=/usr/lib/softhsm/libsofthsm2.so
ENGINE=$(find /usr/lib -name pkcs11.so -path '*engines-3*' 2>/dev/null | head -n1)
[ -f "$MODULE" ] || { echo "demo: $MODULE is missing (make demo builds it)"; exit 1; }
[ -n "$ENGINE" ] || { echo "demo: the OpenSSL pkcs11 engine is missing (apt-get install libengine-pkcs11-openssl)"; exit 1; }

WORK=${P11SHIM_DEMO_DIR:-$ROOT/target/demo}
rm -rf "$WORK"
mkdir -p "$WORK/tokens"
trap 'rm -rf "$WORK/tokens" "$WORK/pin"' EXIT

say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }
[ -t 1 ] || say() { printf '[demo] %s\n' "$*"; }

# 1. The vendor side: a SoftHSM2 token, as an HSM partition would be.
export SOFTHSM2_CONF=$WORK/softhsm2.conf
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" > "$SOFTHSM2_CONF"
PIN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
softhsm2-util --init-token --free --label partition-a --so-pin "$PIN-so" --pin "$PIN" >/dev/null
say "SoftHSM2 token 'partition-a' created; its PIN is random and held only by p11shim's PIN source"

# 2. p11shim: one virtual slot, PIN from a file only p11shim reads.
( umask 077; printf '%s\n' "$PIN" > "$WORK/pin" )
unset PIN
export P11SHIM_CONFIG=$WORK/p11shim.toml
cat > "$P11SHIM_CONFIG" <<TOML
[log]
level = "warn"
file = "$WORK/p11shim.log"

[[slot]]
id = 0
label = "payments"
pin = "file:$WORK/pin"

[[slot.member]]
library = "$SOFTHSM"
token = "partition-a"
TOML
say "p11shim config: virtual slot 0 'payments' over partition-a ($P11SHIM_CONFIG)"

# 3. What applications see: only the virtual slot.
pkcs11-tool --module "$MODULE" --list-slots 2>/dev/null | sed 's/^/    /'

# 4. Keys, made through p11shim by pkcs11-tool (no --pin: protected path).
pkcs11-tool --module "$MODULE" --login --keypairgen --key-type rsa:2048 --label demo-rsa --id 01 >/dev/null 2>&1
pkcs11-tool --module "$MODULE" --login --keypairgen --key-type EC:prime256v1 --label demo-ec --id 02 >/dev/null 2>&1
say "generated RSA-2048 'demo-rsa' and ECDSA P-256 'demo-ec' in the token, through p11shim"

# 5. OpenSSL signs through p11shim; its configuration holds no PIN.
cat > "$WORK/openssl.cnf" <<CNF
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = $ENGINE
MODULE_PATH = $MODULE
init = 0
CNF
export OPENSSL_CONF=$WORK/openssl.cnf
ossl() { local cmd=$1; shift; openssl "$cmd" -engine pkcs11 "$@" 2>/dev/null; }
for key in demo-rsa demo-ec; do
  ossl pkey -inform engine -in "pkcs11:token=payments;object=$key;type=public" -pubout -out "$WORK/$key.pub.pem"
done
say "OpenSSL config has no PIN: $(grep -ci pin "$OPENSSL_CONF" | sed 's/^0$/0 lines mention a PIN/')"

sign_loop() {
  local key=$1 n=0 end=$((SECONDS + SECONDS_OF_SIGNING))
  while [ $SECONDS -lt $end ]; do
    printf 'payment %d to %s\n' "$n" "$key" > "$WORK/msg"
    ossl dgst -sha256 -keyform engine -sign "pkcs11:token=payments;object=$key;type=private" -out "$WORK/msg.sig" "$WORK/msg"
    openssl dgst -sha256 -verify "$WORK/$key.pub.pem" -signature "$WORK/msg.sig" "$WORK/msg" >/dev/null \
      || { echo "demo: signature $n with $key did NOT verify"; exit 1; }
    n=$((n + 1))
  done
  say "$key: $n signatures made by 'openssl dgst -sign' through p11shim, all verified ($((n / SECONDS_OF_SIGNING))/s, one openssl process each)"
}
sign_loop demo-rsa
sign_loop demo-ec

# 6. A self-signed certificate whose key never leaves the token.
ossl req -new -x509 -days 30 -subj "/CN=payments.example" -keyform engine \
  -key "pkcs11:token=payments;object=demo-rsa;type=private" -out "$WORK/cert.pem"
openssl verify -CAfile "$WORK/cert.pem" "$WORK/cert.pem" >/dev/null
say "self-signed certificate for CN=payments.example issued with the token key and verified"

if grep -q "$(head -c 8 "$WORK/pin")" "$WORK/p11shim.log" 2>/dev/null; then
  echo "demo: the PIN appeared in the log"; exit 1
fi
say "done: pkcs11-tool and openssl never held the PIN: not in their configuration, their command line or the log ($WORK)"
