#!/usr/bin/env bash
# The p11shim demo, end to end on one machine with embedded defaults:
#
#   three SoftHSM2 tokens as the members of one HA virtual slot, the same RSA
#   key on each and a trusted AES key to replicate generated keys;
#   p11shim-broker on 127.0.0.1 granting the partition PIN to this machine
#   (static-fingerprint) and nobody else;
#   real clients with no PIN anywhere: pkcs11-tool lists the slot and makes
#   a key pair, OpenSSL's pkcs11 engine signs in a loop (one process per
#   signature), a long-lived application signs all along, and a member is
#   pulled out from under them and put back. Every signature is verified in
#   software.
#
#   scripts/demo.sh [--quick]      (make demo builds and runs it)
#
# P11SHIM_LIB names the module (default target/release/libp11shim.so);
# p11shim-broker and libp11faultmod.so are taken from its directory unless
# P11SHIM_BROKER / P11SHIM_FAULTMOD name them. P11SHIM_DEMO_DIR is where
# everything lives (default target/demo); secrets there are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0; [ "${1:-}" = "--quick" ] && QUICK=1
SECONDS_OF_SIGNING=$([ $QUICK = 1 ] && echo 2 || echo 5)

MODULE=${P11SHIM_LIB:-$ROOT/target/release/libp11shim.so}
BIN_DIR=$(dirname "$MODULE")
BROKER=${P11SHIM_BROKER:-$BIN_DIR/p11shim-broker}
FAULTMOD=${P11SHIM_FAULTMOD:-$BIN_DIR/libp11faultmod.so}
SOFTHSM=${SOFTHSM2_LIB:-/usr/lib/softhsm/libsofthsm2.so}
ENGINE=$(find /usr/lib -name pkcs11.so -path '*engines-3*' 2>/dev/null | head -n1)
CLIENT=(python3 "$ROOT/scripts/demo-client.py")
for f in "$MODULE" "$BROKER" "$FAULTMOD"; do
  [ -f "$f" ] || { echo "demo: $f is missing (make demo builds it)"; exit 1; }
done
[ -f "$SOFTHSM" ] || { echo "demo: SoftHSM2 is missing (apt-get install softhsm2)"; exit 1; }
[ -n "$ENGINE" ] || { echo "demo: the OpenSSL pkcs11 engine is missing (apt-get install libengine-pkcs11-openssl)"; exit 1; }
for tool in openssl pkcs11-tool softhsm2-util python3 curl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing (make deps installs it)"; exit 1; }
done

WORK=${P11SHIM_DEMO_DIR:-$ROOT/target/demo}
rm -rf "$WORK"
mkdir -p "$WORK/tokens" "$WORK/secrets" "$WORK/signer"
chmod 700 "$WORK/secrets"

BROKER_PID=""
SIGNER_PID=""
cleanup() {
  local pid
  for pid in "$SIGNER_PID" "$BROKER_PID"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK/tokens" "$WORK/secrets"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }
[ -t 1 ] || say() { printf '[demo] %s\n' "$*"; }
fail() { echo "demo: $*" >&2; exit 1; }

# Waits up to $1 tenths of a second for the command that follows to succeed.
wait_for() {
  local tenths=$1 i; shift
  for ((i = 0; i < tenths; i++)); do
    "$@" && return 0
    sleep 0.1
  done
  return 1
}

# 1. The vendor side: three SoftHSM2 tokens as three HSM partitions, each
#    provisioned by its security officer with the same RSA key and the same
#    trusted AES replication key. Their PIN is random and only the broker
#    will hand it out.
export SOFTHSM2_CONF=$WORK/softhsm2.conf
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
  "$WORK/tokens" > "$SOFTHSM2_CONF"
secret() { ( umask 077; od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n' > "$WORK/secrets/$2" ); }
secret 8 partition.pin
secret 8 so.pin
( umask 077; head -c 32 /dev/urandom > "$WORK/secrets/replication.key" )
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/secrets/rsa.pem" 2>/dev/null
openssl pkey -in "$WORK/secrets/rsa.pem" -pubout -out "$WORK/demo-rsa.pub.pem"
MEMBERS=(a b c)
for m in "${MEMBERS[@]}"; do
  softhsm2-util --init-token --free --label "ha-$m" \
    --so-pin "$(cat "$WORK/secrets/so.pin")" --pin "$(cat "$WORK/secrets/partition.pin")" >/dev/null
  softhsm2-util --import "$WORK/secrets/rsa.pem" --token "ha-$m" --label demo-rsa --id 01 \
    --pin "$(cat "$WORK/secrets/partition.pin")" >/dev/null
  # Each member is loaded through its own copy of the fault-injecting test
  # module, so that one can be pulled out below.
  cp "$FAULTMOD" "$WORK/member-$m.so"
done
"${CLIENT[@]}" trusted-key --module "$SOFTHSM" --token ha-a --token ha-b --token ha-c \
  --so-pin-file "$WORK/secrets/so.pin" --value-file "$WORK/secrets/replication.key"
rm -f "$WORK/secrets/rsa.pem" "$WORK/secrets/so.pin" "$WORK/secrets/replication.key"
export P11FAULT_TARGET=$SOFTHSM
say "3 SoftHSM2 tokens ha-a ha-b ha-c: the same RSA-2048 key 'demo-rsa', a trusted AES replication key, one random PIN"

# 2. The broker: one static-fingerprint role for this machine, the PIN in a
#    0600 file, its one-time-use store in SQLite, plain HTTP on loopback.
FINGERPRINT=$("$BROKER" fingerprint 2>/dev/null)
mkdir -p "$WORK/broker"
cat > "$WORK/broker/broker.toml" <<TOML
[server]
listen = "127.0.0.1:0"              # a free port, printed on stdout
log_format = "text"

[store]
kind = "sqlite"
path = "$WORK/broker/replay.db"

# The demo starts one client process per signature, and each one proves
# itself to the broker; real applications live longer.
[limits]
per_ip = { per_minute = 6000, burst = 600 }
per_identity = { per_minute = 6000, burst = 600 }

[roles.payments]
methods = ["static-fingerprint"]
pin = "file:$WORK/secrets/partition.pin"
fingerprints = ["$FINGERPRINT"]
ttl = "10m"
reauth = "nonce"
TOML
"$BROKER" check --config "$WORK/broker/broker.toml" >/dev/null
"$BROKER" serve --config "$WORK/broker/broker.toml" >"$WORK/broker/stdout" 2>"$WORK/broker/broker.log" &
BROKER_PID=$!
broker_listening() {
  kill -0 "$BROKER_PID" 2>/dev/null || fail "p11shim-broker exited: $(cat "$WORK/broker/broker.log")"
  grep -qs '^listening ' "$WORK/broker/stdout"
}
wait_for 100 broker_listening || fail "p11shim-broker did not start within 10 s"
BROKER_ADDR=$(sed -n 's/^listening //p' "$WORK/broker/stdout" | head -n1)
say "p11shim-broker listening on http://$BROKER_ADDR: role 'payments' for fingerprint ${FINGERPRINT:0:16}… (this machine), PIN file mode $(stat -c %a "$WORK/secrets/partition.pin")"

# 3. p11shim: one virtual slot over the three members, its PIN brokered.
#    The nonce file lets every process of this machine re-authenticate
#    after the first one's trust-on-first-use grant.
export P11SHIM_CONFIG=$WORK/p11shim.toml
{
  cat <<TOML
[log]
level = "info"
file = "$WORK/p11shim.log"

[[slot]]
id = 0
label = "payments"
pin = "broker"
replication_key = "p11shim-replication"
recovery_interval_ms = 100
recovery_max_interval_ms = 400
TOML
  for m in "${MEMBERS[@]}"; do
    printf '\n[[slot.member]]\nlibrary = "%s"\ntoken = "ha-%s"\n' "$WORK/member-$m.so" "$m"
  done
  cat <<TOML

[broker]
url = "http://$BROKER_ADDR"
role = "payments"
method = "static-fingerprint"
nonce_file = "$WORK/secrets/nonce"
TOML
} > "$P11SHIM_CONFIG"
say "p11shim virtual slot payments over ha-a, ha-b, ha-c; pin = \"broker\" ($P11SHIM_CONFIG)"

# 4. What applications see: one slot, a protected authentication path.
pkcs11-tool --module "$MODULE" --list-slots >"$WORK/slots.out" 2>&1 || fail "pkcs11-tool --list-slots: $(cat "$WORK/slots.out")"
sed 's/^/    /' "$WORK/slots.out"
grep -q 'PIN pad present' "$WORK/slots.out" || fail "the virtual token does not show a protected authentication path"

# A key pair generated through the slot: made on one member, wrapped under
# the trusted key and unwrapped on the others.
pkcs11-tool --module "$MODULE" --login --keypairgen --key-type EC:prime256v1 \
  --label demo-ec --id 02 >"$WORK/keygen.out" 2>&1 || fail "pkcs11-tool --keypairgen: $(cat "$WORK/keygen.out")"
holders=()
for m in "${MEMBERS[@]}"; do
  # Read from each member directly (public objects need no login).
  if pkcs11-tool --module "$SOFTHSM" --token-label "ha-$m" --list-objects --type pubkey 2>/dev/null \
      | grep -q "label:.*demo-ec"; then
    holders+=("ha-$m")
  fi
done
[ ${#holders[@]} = 3 ] || fail "the generated key pair is on ${holders[*]:-no member} only"
say "pkcs11-tool (no --pin) generated ECDSA P-256 'demo-ec' through the slot; it is on ${holders[*]}"

# 5. OpenSSL through the engine; its configuration holds no PIN.
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
ossl() { local cmd=$1; shift; openssl "$cmd" -engine pkcs11 "$@" 2>>"$WORK/openssl.err"; }
ossl pkey -inform engine -in "pkcs11:token=payments;object=demo-ec;type=public" -pubout -out "$WORK/demo-ec.pub.pem"
say "OpenSSL config has no PIN: $(grep -ci pin "$OPENSSL_CONF" | sed 's/^0$/0 lines mention a PIN/')"

TOTAL_SIGNED=0
# Signs with both keys, one openssl process per signature, for $1 seconds;
# every signature verified with the public key.
sign_loop() {
  local what=$1 n=0 key end=$((SECONDS + SECONDS_OF_SIGNING))
  while [ $SECONDS -lt $end ]; do
    for key in demo-rsa demo-ec; do
      printf 'payment %d to %s\n' "$n" "$key" > "$WORK/msg"
      ossl dgst -sha256 -keyform engine -sign "pkcs11:token=payments;object=$key;type=private" \
        -out "$WORK/msg.sig" "$WORK/msg" || fail "openssl could not sign with $key ($what)"
      openssl dgst -sha256 -verify "$WORK/$key.pub.pem" -signature "$WORK/msg.sig" "$WORK/msg" >/dev/null \
        || fail "signature $n with $key did NOT verify ($what)"
      n=$((n + 1))
    done
  done
  TOTAL_SIGNED=$((TOTAL_SIGNED + n))
  say "openssl: $n signatures (RSA and ECDSA) $what, all verified, one process and one broker re-authentication each"
}

# A long-lived application signing all along, its status kept in a file.
# (Its p11shim logs at debug level: a failed probe of a member says why.)
P11SHIM_LOG=debug "${CLIENT[@]}" signer --module "$MODULE" --label demo-rsa --out "$WORK/signer" \
  --stop "$WORK/signer.stop" >"$WORK/signer.out" 2>"$WORK/signer.err" &
SIGNER_PID=$!
signer_ready() {
  kill -0 "$SIGNER_PID" 2>/dev/null || fail "the signer exited: $(cat "$WORK/signer.err")"
  grep -qs '^ready' "$WORK/signer.out"
}
wait_for 300 signer_ready || fail "the signer did not log in within 30 s"
say "a long-lived application logged in with no PIN and signs every 40 ms over 3 sessions (one per member)"

sign_loop "with 3 members up"

# 6. A member disappears under the running clients.
fault() { printf '%s\n' "$2" > "$WORK/member-$1.so.ctl.tmp"; mv "$WORK/member-$1.so.ctl.tmp" "$WORK/member-$1.so.ctl"; }
# member_is a down [min recoveries]: what the long-lived application's p11shim says.
member_is() {
  local token state recoveries failovers
  kill -0 "$SIGNER_PID" 2>/dev/null || fail "the long-lived application exited: $(cat "$WORK/signer.err")"
  while read -r token state recoveries failovers; do
    [ "$token" = "ha-$1" ] && [ "$state" = "$2" ] && [ "$recoveries" -ge "${3:-0}" ] && return 0
  done < "$WORK/signer/members.txt"
  return 1
}
fault a remove
say "member ha-a removed (its token is gone: CKR_DEVICE_REMOVED from every call)"
wait_for 100 member_is a down || fail "the long-lived application never saw ha-a down"
say "p11shim status in the long-lived application (P11shim_GetStatus; full JSON in status-member-down.json):"
cp "$WORK/signer/status.json" "$WORK/status-member-down.json"
"${CLIENT[@]}" show-status "$WORK/status-member-down.json" | sed 's/^/    /'
sign_loop "with ha-a removed"

# 7. The member comes back: the recovery thread logs it in again.
fault a ""
wait_for 150 member_is a active 1 || fail "ha-a did not recover within 15 s: $(cat "$WORK/signer/members.txt")
$(grep -E 'probe failed|member' "$WORK/p11shim.log" | tail -n 20)"
say "member ha-a back: the recovery thread found its token, logged it in with the brokered PIN, returned it to service"

touch "$WORK/signer.stop"
wait_for 100 eval '! kill -0 "$SIGNER_PID" 2>/dev/null' || fail "the signer did not stop"
rc=0; wait "$SIGNER_PID" || rc=$?
SIGNER_PID=""
[ $rc = 0 ] || fail "the long-lived application saw a failed call: $(cat "$WORK/signer.err")"
cp "$WORK/signer/status.json" "$WORK/status-final.json"
app_line=$(grep '^signed ' "$WORK/signer.out") || fail "the application did not report its signatures"
read -r _ app_signed _ app_failed <<<"$app_line"
verified=$("${CLIENT[@]}" verify-rsa --pub "$WORK/demo-rsa.pub.pem" --dir "$WORK/signer") \
  || fail "an application signature did NOT verify"
[ "$verified" = "$app_signed" ] || fail "the application signed $app_signed, $verified found"
# The same check by openssl, for the first signature.
openssl dgst -sha256 -verify "$WORK/demo-rsa.pub.pem" -signature "$WORK/signer/00000.sig" "$WORK/signer/00000.msg" >/dev/null \
  || fail "the application's first signature did NOT verify with openssl"
failovers=$(awk '{s += $4} END {print s + 0}' "$WORK/signer/members.txt")
say "long-lived application: $app_signed signatures, $app_failed failed, all verified; $failovers session(s) moved to another member"

# 8. A certificate whose key never leaves the tokens.
ossl req -new -x509 -days 30 -subj "/CN=payments.example" -keyform engine \
  -key "pkcs11:token=payments;object=demo-rsa;type=private" -out "$WORK/cert.pem"
openssl verify -CAfile "$WORK/cert.pem" "$WORK/cert.pem" >/dev/null
say "self-signed certificate for CN=payments.example issued with the token key and verified"

# 9. The broker's side: its decisions, from /metrics.
curl -sf --max-time 5 "http://$BROKER_ADDR/metrics" > "$WORK/broker/metrics.txt" || fail "no /metrics from the broker"
say "p11shim-broker decisions (GET /metrics):"
grep '^p11shim_broker_decisions_total' "$WORK/broker/metrics.txt" | sed 's/^/    /'
granted=$(awk '/^p11shim_broker_decisions_total.*outcome="granted"/ {s += $NF} END {print s + 0}' "$WORK/broker/metrics.txt")
reauth=$(awk '/^p11shim_broker_decisions_total.*outcome="reauthenticated"/ {s += $NF} END {print s + 0}' "$WORK/broker/metrics.txt")
refused=$(awk '/^p11shim_broker_decisions_total/ && !/outcome="(granted|reauthenticated)"/ {s += $NF} END {print s + 0}' "$WORK/broker/metrics.txt")

# 10. The PIN never reached a log.
PIN_VALUE=$(cat "$WORK/secrets/partition.pin")
for log in "$WORK/p11shim.log" "$WORK/broker/broker.log" "$WORK/openssl.err" "$WORK/signer.err"; do
  if grep -qF "$PIN_VALUE" "$log" 2>/dev/null; then
    fail "the PIN appeared in $log"
  fi
done
unset PIN_VALUE
[ -s "$WORK/p11shim.log" ] || fail "p11shim wrote no log"
say "the PIN is in no log: not p11shim's, not the broker's, not the clients'"

say "summary:"
cat <<EOF
    broker: $granted grant on first use, $reauth re-authentications with the nonce, $refused refused
    signatures: $((TOTAL_SIGNED + app_signed)) verified (openssl $TOTAL_SIGNED, long-lived application $app_signed), $app_failed failed
    HA: ha-a removed and recovered while signing, $failovers session(s) moved, ${#holders[@]} members hold the generated key
    PIN: given by the broker to p11shim only; in no client's configuration, command line or log
    files: $WORK
EOF
