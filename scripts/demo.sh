#!/usr/bin/env bash
# The p11shim demo, end to end on one machine with embedded defaults:
#
#   1. `p11shim provision` makes three SoftHSM2 tokens the members of one HA
#      virtual slot from a plan: the replication key, and the same keys on
#      every member for two roles (payments-signing, payments-ec for
#      `payments`; reports-signing for `reports`), verified identical;
#   2. p11shim-broker on 127.0.0.1 (SQLite store, static-fingerprint) grants
#      each role the partition PIN, its key ACL policy and its audit key;
#   3. as role payments, with no PIN anywhere, OpenSSL's pkcs11 engine (one
#      process per signature) and a long-lived application sign all along,
#      every signature verified, while member ha-a is pulled out and put
#      back;
#   4. a process of role reports reaches for the payments key and is
#      refused;
#   5. `p11shim audit verify` verifies the audit logs of both roles: hash
#      chains, signed checkpoints, and the denials, failovers and
#      recoveries they hold; `p11shim audit tail` shows the last records.
#
#   scripts/demo.sh [--quick] [--aws]      (make demo builds and runs it)
#
# --aws: the roles are AWS instances instead of this machine's fingerprint.
# moto (from the repository's .venv, scripts/deps.sh) plays EC2 and IAM: one
# running instance per role, its instance profile holding the role's IAM
# role. The IMDSv2 emulator (tests/peers, imds-emulator) serves each
# instance's metadata to the processes of its role, and the broker checks
# it with aws-imds-fields, live against moto's DescribeInstances and
# ListInstanceProfilesForRole. Not aws-iid: its signed identity document is
# checked against AWS's own pinned certificates, and the broker's release
# build refuses the emulator's test CA (aws.iid_cert_dir needs the
# test-overrides feature; tests/tests/attestation_aws.rs covers aws-iid).
# The broker checks that a request comes from one of the instance's
# addresses: each role reaches it through a loopback proxy that adds
# X-Forwarded-For with its instance's private address, as the network path
# from the instance would, and the broker trusts 127.0.0.1 as a proxy.
#
# P11SHIM_LIB names the module (default target/release/libp11shim.so);
# p11shim-broker, p11shim (the CLI), libp11faultmod.so and imds-emulator are
# taken from its directory unless P11SHIM_BROKER / P11SHIM_CLI /
# P11SHIM_FAULTMOD / P11SHIM_IMDS_EMULATOR name them. P11SHIM_DEMO_DIR is where everything lives (default target/demo);
# secrets and tokens there are removed on exit, the logs and reports stay.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0
AWS=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --aws) AWS=1 ;;
    *) echo "usage: scripts/demo.sh [--quick] [--aws]" >&2; exit 2 ;;
  esac
done
# Seconds of signing before the fault, while ha-a is out, after it is back.
PHASE=$([ $QUICK = 1 ] && echo 2 || echo 5)

MODULE=${P11SHIM_LIB:-$ROOT/target/release/libp11shim.so}
BIN_DIR=$(dirname "$MODULE")
BROKER=${P11SHIM_BROKER:-$BIN_DIR/p11shim-broker}
CLI=${P11SHIM_CLI:-$BIN_DIR/p11shim}
FAULTMOD=${P11SHIM_FAULTMOD:-$BIN_DIR/libp11faultmod.so}
SOFTHSM=${SOFTHSM2_LIB:-/usr/lib/softhsm/libsofthsm2.so}
ENGINE=$(find /usr/lib -name pkcs11.so -path '*engines-3*' 2>/dev/null | head -n1)
CLIENT=(python3 "$ROOT/scripts/demo-client.py")
for f in "$MODULE" "$BROKER" "$CLI" "$FAULTMOD"; do
  [ -f "$f" ] || { echo "demo: $f is missing (make demo builds it)"; exit 1; }
done
[ -f "$SOFTHSM" ] || { echo "demo: SoftHSM2 is missing (apt-get install softhsm2)"; exit 1; }
[ -n "$ENGINE" ] || { echo "demo: the OpenSSL pkcs11 engine is missing (apt-get install libengine-pkcs11-openssl)"; exit 1; }
for tool in openssl pkcs11-tool python3 curl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing (make deps installs it)"; exit 1; }
done
if [ $AWS = 1 ]; then
  IMDS_EMULATOR=${P11SHIM_IMDS_EMULATOR:-$BIN_DIR/imds-emulator}
  MOTO=$ROOT/.venv/bin/moto_server
  VENV_PYTHON=$ROOT/.venv/bin/python3
  [ -f "$IMDS_EMULATOR" ] || { echo "demo: $IMDS_EMULATOR is missing (make demo DEMO_ARGS=--aws builds it)"; exit 1; }
  [ -x "$MOTO" ] && [ -x "$VENV_PYTHON" ] || { echo "demo: $MOTO is missing (scripts/deps.sh installs it)"; exit 1; }
fi

WORK=${P11SHIM_DEMO_DIR:-$ROOT/target/demo}
rm -rf "$WORK"
mkdir -p "$WORK/tokens" "$WORK/secrets" "$WORK/signer" "$WORK/audit" "$WORK/broker"
chmod 700 "$WORK/secrets" "$WORK/audit"

BROKER_PID=""
SIGNER_PID=""
LOAD_PID=""
AWS_PIDS=()   # --aws: the proxies, the IMDS emulators, moto
cleanup() {
  local pid
  touch "$WORK/load.stop" "$WORK/signer.stop" 2>/dev/null || true
  for pid in "$LOAD_PID" "$SIGNER_PID" "$BROKER_PID" "${AWS_PIDS[@]}"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK/tokens" "$WORK/secrets"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -t 1 ]; then
  say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }
else
  say() { printf '[demo] %s\n' "$*"; }
fi
fail() { echo "demo: $*" >&2; exit 1; }
now_ms() { local t=${EPOCHREALTIME/,/.}; echo $(( ${t%.*} * 1000 + 10#${t#*.} / 1000 )); }

# Waits up to $1 tenths of a second for the command that follows to succeed.
wait_for() {
  local tenths=$1 i; shift
  for ((i = 0; i < tenths; i++)); do
    "$@" && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------------------
# 1. Three SoftHSM2 tokens provisioned as one HA slot by `p11shim provision`.
#    Each member is loaded through its own copy of the fault-injecting test
#    module, so that one can be pulled out below.
export SOFTHSM2_CONF=$WORK/softhsm2.conf
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
  "$WORK/tokens" > "$SOFTHSM2_CONF"
secret() { ( umask 077; od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n' > "$WORK/secrets/$2" ); }
secret 8 partition.pin
secret 8 so.pin
secret 32 payments-audit.key
secret 32 reports-audit.key
MEMBERS=(a b c)
for m in "${MEMBERS[@]}"; do cp "$FAULTMOD" "$WORK/member-$m.so"; done
export P11FAULT_TARGET=$SOFTHSM

# The module's configuration for each role: the same slot over the same
# members, the PIN, the key ACL and the audit key from the broker. Only
# the role, its nonce, its log and its audit file differ (with --aws also
# its instance's IMDS and its way to the broker).
if [ $AWS = 1 ]; then METHOD=aws-imds-fields; else METHOD=static-fingerprint; fi
module_config() {
  local role=$1 m
  cat <<TOML
[log]
level = "info"
file = "$WORK/p11shim-$role.log"

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
url = "http://127.0.0.1:9"         # the broker's port, set once it listens
role = "$role"
method = "$METHOD"
nonce_file = "$WORK/secrets/$role.nonce"
$([ $AWS = 1 ] && echo 'imds_endpoint = "http://127.0.0.1:9"   # the instance'"'"'s IMDS, set once it listens')

[acl]
source = "broker"

[audit]
file = "$WORK/audit/$role.jsonl"
signing_key = "broker"
checkpoint_records = 200
TOML
}
module_config payments > "$WORK/payments.toml"
module_config reports > "$WORK/reports.toml"

cat > "$WORK/provision.toml" <<TOML
config = "$WORK/payments.toml"
TOML
for m in "${MEMBERS[@]}"; do
  cat >> "$WORK/provision.toml" <<TOML

[[member]]
token = "ha-$m"
init = true
so_pin = "file:$WORK/secrets/so.pin"
pin = "file:$WORK/secrets/partition.pin"
TOML
done
cat >> "$WORK/provision.toml" <<'TOML'

[[key]]
label = "payments-signing"
id = "01"
type = "rsa"
bits = 2048
usage = ["sign", "verify"]

[[key]]
label = "payments-ec"
id = "02"
type = "ec"
curve = "p256"

[[key]]
label = "reports-signing"
id = "03"
type = "rsa"
bits = 2048
usage = ["sign", "verify"]
TOML
"$CLI" provision "$WORK/provision.toml" >"$WORK/provision.out" 2>&1 \
  || fail "p11shim provision: $(cat "$WORK/provision.out")"
verified_line=$(grep -o 'verified slot 0: .*' "$WORK/provision.out") \
  || fail "p11shim provision did not verify the members: $(cat "$WORK/provision.out")"
rm -f "$WORK/secrets/so.pin"
say "p11shim provision $WORK/provision.toml: tokens ha-a ha-b ha-c initialized, replication key and keys payments-signing (RSA-2048), payments-ec (P-256), reports-signing (RSA-2048) made once and copied; $verified_line"

# ---------------------------------------------------------------------------
# 2. The broker: two static-fingerprint roles for this machine (--aws: two
#    aws-imds-fields roles, one instance each), each with its key ACL
#    policy and its audit key; the PIN in a 0600 file; the one-time-use
#    store in SQLite; plain HTTP on loopback.
ROLES=(payments reports)
if [ $AWS = 1 ]; then
  # moto on a free port (it prints the one it took), EC2 and IAM seeded
  # with one instance per role, then each instance's IMDS.
  mkdir -p "$WORK/aws"
  "$MOTO" -H 127.0.0.1 -p 0 >"$WORK/aws/moto.log" 2>&1 &
  AWS_PIDS+=($!)
  MOTO_PID=$!
  MOTO_URL=""
  moto_ready() {
    kill -0 "$MOTO_PID" 2>/dev/null || fail "moto exited: $(cat "$WORK/aws/moto.log")"
    [ -n "$MOTO_URL" ] || MOTO_URL=$(grep -o -m1 'http://127\.0\.0\.1:[0-9]*' "$WORK/aws/moto.log") || return 1
    curl -sf --max-time 2 "$MOTO_URL/moto-api/" >/dev/null
  }
  wait_for 300 moto_ready || fail "moto did not answer within 30 s: $(cat "$WORK/aws/moto.log")"
  MOTO_URL=$MOTO_URL/
  "$VENV_PYTHON" "$ROOT/scripts/demo-client.py" aws-seed --endpoint "$MOTO_URL" --out "$WORK/aws" \
    --role payments:payments-hsm --role reports:reports-hsm >"$WORK/aws/instances.txt" 2>"$WORK/aws/seed.err" \
    || fail "seeding moto: $(cat "$WORK/aws/seed.err")"
  declare -A INSTANCE PRIVATE_IP ACCOUNT PROFILE IMDS_PID
  while read -r role id ip account profile; do
    INSTANCE[$role]=$id PRIVATE_IP[$role]=$ip ACCOUNT[$role]=$account PROFILE[$role]=$profile
  done < "$WORK/aws/instances.txt"
  for role in "${ROLES[@]}"; do
    [ -n "${INSTANCE[$role]:-}" ] || fail "moto has no instance for role $role: $(cat "$WORK/aws/instances.txt")"
    # Each its own CA directory (the emulator makes its keys on first use),
    # in secrets/: removed on exit.
    "$IMDS_EMULATOR" --listen 127.0.0.1:0 --instance "$WORK/aws/$role.json" --ca-dir "$WORK/secrets/imds-ca-$role" \
      >"$WORK/aws/imds-$role.out" 2>"$WORK/aws/imds-$role.log" &
    AWS_PIDS+=($!)
    IMDS_PID[$role]=$!
  done
  declare -A IMDS_URL
  imds_ready() {
    local role
    for role in "${ROLES[@]}"; do
      kill -0 "${IMDS_PID[$role]}" 2>/dev/null || fail "imds-emulator ($role) exited: $(cat "$WORK/aws/imds-$role.log")"
      grep -qs '^listening ' "$WORK/aws/imds-$role.out" || return 1
      IMDS_URL[$role]=http://$(sed -n 's/^listening //p' "$WORK/aws/imds-$role.out" | head -n1)
    done
  }
  wait_for 300 imds_ready || fail "the IMDS emulators did not start within 30 s"
  # moto takes any key; the broker reads its keys from files all the same.
  ( umask 077; printf testing > "$WORK/secrets/aws-access-key-id"; printf testing > "$WORK/secrets/aws-secret-access-key" )
  for role in "${ROLES[@]}"; do
    say "moto at $MOTO_URL (EC2, IAM): role $role is instance ${INSTANCE[$role]} (account ${ACCOUNT[$role]}, us-east-1, private address ${PRIVATE_IP[$role]}), instance profile ${PROFILE[$role]} holding IAM role $role-hsm; its IMDSv2 at ${IMDS_URL[$role]}"
  done
else
  FINGERPRINT=$("$BROKER" fingerprint 2>/dev/null)
fi
# Who may be the role: this machine (its fingerprint), or (--aws) an
# instance of the role's IAM role in moto's account.
role_members() {
  if [ $AWS = 1 ]; then
    printf 'account_ids = ["%s"]\niam_role_name = "%s-hsm"\n' "${ACCOUNT[$1]}" "$1"
  else
    printf 'fingerprints = ["%s"]\n' "$FINGERPRINT"
  fi
}
broker_role() {
  cat <<TOML

[roles.$1]
methods = ["$METHOD"]
pin = "file:$WORK/secrets/partition.pin"
audit_key = "file:$WORK/secrets/$1-audit.key"
$(role_members "$1")
ttl = "10m"
reauth = "nonce"
policy = { keys = [{ label = "$1-*", ops = ["sign"] }] }
TOML
}
{
  cat <<TOML
[server]
listen = "127.0.0.1:0"              # a free port, printed on stdout
log_format = "text"
$([ $AWS = 1 ] && echo 'trusted_proxies = ["127.0.0.1/32"]  # the instances'"'"' loopback proxies')

[store]
kind = "sqlite"
path = "$WORK/broker/replay.db"

# Every OpenSSL process proves itself to the broker; real applications live
# longer.
[limits]
per_ip = { per_minute = 60000, burst = 6000 }
per_identity = { per_minute = 60000, burst = 6000 }
TOML
  if [ $AWS = 1 ]; then
    cat <<TOML

# moto as EC2 and IAM.
[aws]
region = "us-east-1"
endpoint = "$MOTO_URL"
access_key_id = "file:$WORK/secrets/aws-access-key-id"
secret_access_key = "file:$WORK/secrets/aws-secret-access-key"
TOML
  fi
  broker_role payments
  broker_role reports
} > "$WORK/broker/broker.toml"
"$CLI" config check "$WORK/payments.toml" --broker "$WORK/broker/broker.toml" >"$WORK/config-check.out" 2>&1 \
  || fail "p11shim config check: $(cat "$WORK/config-check.out")"
"$BROKER" serve --config "$WORK/broker/broker.toml" >"$WORK/broker/stdout" 2>"$WORK/broker/broker.log" &
BROKER_PID=$!
broker_listening() {
  kill -0 "$BROKER_PID" 2>/dev/null || fail "p11shim-broker exited: $(cat "$WORK/broker/broker.log")"
  grep -qs '^listening ' "$WORK/broker/stdout"
}
wait_for 100 broker_listening || fail "p11shim-broker did not start within 10 s"
BROKER_ADDR=$(sed -n 's/^listening //p' "$WORK/broker/stdout" | head -n1)
if [ $AWS = 1 ]; then
  # Each role's way to the broker: a proxy adding its instance's address.
  declare -A PROXY_PID PROXY_ADDR
  for role in "${ROLES[@]}"; do
    "${CLIENT[@]}" xff-proxy --upstream "$BROKER_ADDR" --forward "${PRIVATE_IP[$role]}" \
      >"$WORK/aws/proxy-$role.out" 2>"$WORK/aws/proxy-$role.log" &
    AWS_PIDS+=($!)
    PROXY_PID[$role]=$!
  done
  proxies_ready() {
    local role
    for role in "${ROLES[@]}"; do
      kill -0 "${PROXY_PID[$role]}" 2>/dev/null || fail "the $role proxy exited: $(cat "$WORK/aws/proxy-$role.log")"
      grep -qs '^listening ' "$WORK/aws/proxy-$role.out" || return 1
      PROXY_ADDR[$role]=$(sed -n 's/^listening //p' "$WORK/aws/proxy-$role.out" | head -n1)
    done
  }
  wait_for 100 proxies_ready || fail "the proxies did not start within 10 s"
  for role in "${ROLES[@]}"; do
    sed -i -e "s|^url = \"http://127.0.0.1:9\".*|url = \"http://${PROXY_ADDR[$role]}\"|" \
      -e "s|^imds_endpoint = \"http://127.0.0.1:9\".*|imds_endpoint = \"${IMDS_URL[$role]}\"|" "$WORK/$role.toml"
  done
  say "p11shim-broker on http://$BROKER_ADDR (SQLite, aws-imds-fields, checked live against moto's EC2 and IAM on every request): roles payments (IAM role payments-hsm, keys payments-*) and reports (IAM role reports-hsm, keys reports-*), each with an audit key"
  say "each role reaches the broker through a loopback proxy that adds X-Forwarded-For: its instance's private address (payments via ${PROXY_ADDR[payments]}, reports via ${PROXY_ADDR[reports]}), the source the broker requires; aws-imds-fields, not aws-iid: the release broker pins AWS's own identity-document certificates and refuses the emulator's test CA"
else
  sed -i "s|^url = \"http://127.0.0.1:9\".*|url = \"http://$BROKER_ADDR\"|" "$WORK/payments.toml" "$WORK/reports.toml"
  say "p11shim-broker on http://$BROKER_ADDR (SQLite, static-fingerprint): roles payments (keys payments-*) and reports (keys reports-*), each with an audit key, for fingerprint ${FINGERPRINT:0:16}… (this machine)"
fi

# Credentials: one exchange per role, as the module makes it. It binds the
# role's nonce, with which every later process of the role re-authenticates.
for role in payments reports; do
  "$CLI" attest --config "$WORK/$role.toml" --json >"$WORK/attest-$role.json" 2>"$WORK/attest-$role.err" \
    || fail "p11shim attest ($role): $(cat "$WORK/attest-$role.err")"
  grant=$("${CLIENT[@]}" show-grant "$WORK/attest-$role.json")
  if [ $AWS = 1 ]; then
    # The attested subject is the role's own instance, as EC2 knows it.
    want="subject aws:${ACCOUNT[$role]}:us-east-1:${INSTANCE[$role]} "
    [[ $grant == *"$want"* ]] || fail "role $role was attested as another subject than its instance: $grant"
  fi
  say "credentials fetched: $grant"
done

# What applications see: one slot, a protected authentication path, and
# only the role's keys.
export P11SHIM_CONFIG=$WORK/payments.toml
pkcs11-tool --module "$MODULE" --list-slots >"$WORK/slots.out" 2>&1 || fail "pkcs11-tool --list-slots: $(cat "$WORK/slots.out")"
grep -q 'PIN pad present' "$WORK/slots.out" || fail "the virtual token does not show a protected authentication path"
pkcs11-tool --module "$MODULE" --login --list-objects --type privkey >"$WORK/objects-payments.out" 2>&1 \
  || fail "pkcs11-tool --list-objects: $(cat "$WORK/objects-payments.out")"
seen=$(sed -n 's/^ *label: *//p' "$WORK/objects-payments.out" | sort | tr '\n' ' ')
[ "$seen" = "payments-ec payments-signing " ] || fail "role payments sees private keys: ${seen:-none}"
say "pkcs11-tool as role payments (no --pin; the token has a PIN pad): private keys ${seen% }"

# ---------------------------------------------------------------------------
# 3. Role payments signs all along while ha-a fails and comes back.
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
for key in payments-signing payments-ec; do
  ossl pkey -inform engine -in "pkcs11:token=payments;object=$key;type=public" -pubout -out "$WORK/$key.pub.pem" \
    || fail "openssl could not read the public key $key: $(tail -n 3 "$WORK/openssl.err")"
done
say "OpenSSL config has no PIN: $(grep -ci pin "$OPENSSL_CONF" | sed 's/^0$/0 lines mention a PIN/')"

# OpenSSL signing in a loop, one process per signature, RSA and ECDSA in
# turn, each signature verified with the public key; one line per signature
# in load.txt: <epoch ms> <ok|FAILED> <key>.
openssl_load() {
  local n=0 key line
  mkdir -p "$WORK/load"
  while [ ! -e "$WORK/load.stop" ] && [ $n -lt 100000 ]; do
    key=$([ $((n % 2)) = 0 ] && echo payments-signing || echo payments-ec)
    printf 'payment %d with %s\n' "$n" "$key" > "$WORK/load/msg"
    if ossl dgst -sha256 -keyform engine -sign "pkcs11:token=payments;object=$key;type=private" \
         -out "$WORK/load/sig" "$WORK/load/msg" \
       && openssl dgst -sha256 -verify "$WORK/$key.pub.pem" -signature "$WORK/load/sig" "$WORK/load/msg" >/dev/null 2>&1
    then line=ok; else line=FAILED; fi
    echo "$(now_ms) $line $key" >> "$WORK/load.txt"
    n=$((n + 1))
  done
}

# A long-lived application (one process, three sessions) signing all along;
# its p11shim status in signer/members.txt.
P11SHIM_LOG=debug "${CLIENT[@]}" signer --module "$MODULE" --label payments-signing --out "$WORK/signer" \
  --stop "$WORK/signer.stop" >"$WORK/signer.out" 2>"$WORK/signer.err" &
SIGNER_PID=$!
signer_ready() {
  kill -0 "$SIGNER_PID" 2>/dev/null || fail "the long-lived application exited: $(cat "$WORK/signer.err")"
  grep -qs '^ready' "$WORK/signer.out"
}
wait_for 300 signer_ready || fail "the long-lived application did not log in within 30 s"
T0=$(now_ms)
: > "$WORK/load.txt"
openssl_load &
LOAD_PID=$!
say "signing as role payments: OpenSSL (one process per signature, RSA and ECDSA) and a long-lived application (3 sessions, one per member); every signature verified; times below in ms since this line"
sleep "$PHASE"

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
T_PULL=$(now_ms)
fault a remove
say "T=$((T_PULL - T0)) ms: member ha-a pulled out (its token is gone: CKR_DEVICE_REMOVED from every call)"
wait_for 100 member_is a down || fail "the long-lived application never saw ha-a down"
sleep "$PHASE"

T_BACK=$(now_ms)
fault a ""
say "T=$((T_BACK - T0)) ms: member ha-a put back"
wait_for 150 member_is a active 1 || fail "ha-a did not recover within 15 s: $(cat "$WORK/signer/members.txt")
$(grep -E 'probe failed|member' "$WORK/p11shim-payments.log" | tail -n 20)"
sleep "$PHASE"

T_END=$(now_ms)
# The OpenSSL load first, then the long-lived application: its chain, which
# ends with the signed stop checkpoint of C_Finalize, is the last one in
# the payments audit log.
touch "$WORK/load.stop"
wait "$LOAD_PID" || fail "the OpenSSL load stopped with an error"
LOAD_PID=""
touch "$WORK/signer.stop"
wait_for 100 eval '! kill -0 "$SIGNER_PID" 2>/dev/null' || fail "the long-lived application did not stop"
rc=0; wait "$SIGNER_PID" || rc=$?
SIGNER_PID=""
[ $rc = 0 ] || fail "the long-lived application saw a failed call: $(cat "$WORK/signer.err")"
cp "$WORK/signer/status.json" "$WORK/status-final.json"
if grep -q ' FAILED ' "$WORK/load.txt"; then
  fail "an OpenSSL signature failed or did not verify: $(grep -c ' FAILED ' "$WORK/load.txt") of $(wc -l < "$WORK/load.txt"); $(tail -n 5 "$WORK/openssl.err")"
fi
"${CLIENT[@]}" verify-rsa --pub "$WORK/payments-signing.pub.pem" --dir "$WORK/signer" >"$WORK/signer-verified.txt" \
  || fail "a signature of the long-lived application did NOT verify"
openssl dgst -sha256 -verify "$WORK/payments-signing.pub.pem" -signature "$WORK/signer/00000.sig" "$WORK/signer/00000.msg" >/dev/null \
  || fail "the long-lived application's first signature did NOT verify with openssl"
"${CLIENT[@]}" rates --t0 "$T0" --marks "$T_PULL" "$T_BACK" "$T_END" \
  --load "$WORK/load.txt" --signer "$WORK/signer/index.txt" > "$WORK/rates.txt" \
  || fail "no signature rates"
say "signatures verified per second (OpenSSL + long-lived application):"
sed 's/^/    /' "$WORK/rates.txt"

# ---------------------------------------------------------------------------
# 4. Role reports reaches for the payments key.
export P11SHIM_CONFIG=$WORK/reports.toml
# (pkcs11-tool, which picks the key by CKA_ID: OpenSSL's pkcs11 engine of
# Debian 12 crashes on exit after a key it could not find, with any module.)
if pkcs11-tool --module "$MODULE" --login --sign --id 01 -m SHA256-RSA-PKCS \
     -i "$WORK/load/msg" -o "$WORK/reports-try.sig" >"$WORK/reports-try.out" 2>&1; then
  fail "role reports signed with payments-signing"
fi
refusal=$(grep -v '^ *$' "$WORK/reports-try.out" | grep -iv 'using slot' | head -n 1)
say "role reports, pkcs11-tool --login --sign --id 01 (payments-signing's CKA_ID): refused ($refusal)"
"${CLIENT[@]}" reach --module "$MODULE" --own reports-signing --other payments-signing \
  > "$WORK/reach.out" 2>"$WORK/reach.err" || fail "role reports: $(cat "$WORK/reach.out" "$WORK/reach.err")"
sed 's/^/    /' "$WORK/reach.out"
denial=$(grep -m1 'denied by the key ACL' "$WORK/p11shim-reports.log" | sed 's/^.*denied by the key ACL/denied by the key ACL/') \
  || fail "p11shim logged no denial for role reports"
say "role reports was refused the payments key; p11shim's log: $denial"
unset P11SHIM_CONFIG

# ---------------------------------------------------------------------------
# 5. The audit logs, verified by the operator CLI with each role's key, the
#    secret the broker hands out as the role's audit_key (every process has
#    shut down: nothing is still being written).
audit_verify() {
  "$CLI" audit verify --hmac-key "file:$WORK/secrets/$1-audit.key" "$WORK/audit/$1.jsonl" "${@:2}"
}
for role in payments reports; do
  audit_verify "$role" --json > "$WORK/audit-verify-$role.json" \
    || fail "the $role audit log did NOT verify: $(audit_verify "$role" 2>&1 | grep -v '^  chain ')"
done
"${CLIENT[@]}" audit-story --t0 "$T0" --after "$T_PULL" --back "$T_BACK" \
  --log "$WORK/audit/payments.jsonl" > "$WORK/audit-story.txt" || fail "no failover in the payments audit log"
say "$(cat "$WORK/audit-story.txt")"
for role in payments reports; do
  summary=$("${CLIENT[@]}" audit-summary "$WORK/audit-verify-$role.json") \
    || fail "the $role audit log's report: $(cat "$WORK/audit-verify-$role.json")"
  say "audit log $role.jsonl verified: $summary"
done
"$CLI" audit tail -n 5 "$WORK/audit/payments.jsonl" > "$WORK/audit-tail.txt" 2>&1 \
  || fail "p11shim audit tail: $(cat "$WORK/audit-tail.txt")"

# ---------------------------------------------------------------------------
# The broker's side and the PIN.
curl -sf --max-time 5 "http://$BROKER_ADDR/metrics" > "$WORK/broker/metrics.txt" || fail "no /metrics from the broker"
metric() {
  awk -v want="$1" '/^p11shim_broker_decisions_total/ {
      o = $0; sub(/.*outcome="/, "", o); sub(/".*/, "", o)
      if ((want == "other" && o != "granted" && o != "reauthenticated") || o == want) s += $NF
    } END { print s + 0 }' "$WORK/broker/metrics.txt"
}
# The PIN and the audit keys, in none of what the demo leaves behind.
for secret_file in partition.pin payments-audit.key reports-audit.key; do
  SECRET_VALUE=$(cat "$WORK/secrets/$secret_file")
  for log in "$WORK"/p11shim-*.log "$WORK/broker/broker.log" "$WORK/openssl.err" "$WORK/signer.err" \
             "$WORK"/audit/*.jsonl "$WORK"/*.out "$WORK"/attest-*.json "$WORK"/audit-verify-*.json "$WORK/audit-tail.txt" \
             "$WORK"/aws/*.log "$WORK"/aws/*.out; do
    if grep -qF "$SECRET_VALUE" "$log" 2>/dev/null; then
      fail "the secret $secret_file appeared in $log"
    fi
  done
done
unset SECRET_VALUE

load_ok=$(grep -c ' ok ' "$WORK/load.txt" || true)
app_signed=$(cat "$WORK/signer-verified.txt")
say "summary:"
cat <<EOF
    broker: $(metric granted) grants on first use, $(metric reauthenticated) re-authentications with the nonce, $(metric other) refused
    signatures: $((load_ok + app_signed)) verified (openssl $load_ok, long-lived application $app_signed), 0 failed
    PIN: given by the broker to p11shim only; in no client's configuration, command line, log or audit record (nor are the audit keys)
EOF
if [ $AWS = 1 ]; then
  issued() { grep -c "credentials issued.*subject=aws:${ACCOUNT[$1]}:us-east-1:${INSTANCE[$1]}" "$WORK/broker/broker.log" || true; }
  echo "    attested by aws-imds-fields against moto: payments as aws:${ACCOUNT[payments]}:us-east-1:${INSTANCE[payments]} ($(issued payments) credentials issued), reports as aws:${ACCOUNT[reports]}:us-east-1:${INSTANCE[reports]} ($(issued reports) credentials issued)"
fi
echo "    files: $WORK"

# The payments log's last records, as an operator reads them (made in
# step 5, before the check for secrets).
say "p11shim audit tail -n 5 audit/payments.jsonl:"
sed 's/^/    /' "$WORK/audit-tail.txt"
