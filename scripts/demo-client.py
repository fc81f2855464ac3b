#!/usr/bin/env python3
"""What the demo needs that no stock tool does, with the standard library
only (ctypes for PKCS#11, nothing to install; aws-seed excepted):

  signer        a long-lived application on p11shim: logs in with no PIN
                (protected authentication path), signs with SHA256-RSA-PKCS
                round-robin over three sessions, writes every message and
                signature for the caller to verify (and index.txt: the epoch
                ms of each), and keeps p11shim's status (C_GetInterface
                ("p11shim"), P11shim_GetStatus) in a file, until a stop file
                appears.
  reach         a process of another role reaches for a key of the payments
                role: finds it (p11shim hides it), signs with its own key,
                then tries to make a key under the other role's name; prints
                each outcome with its exact return code.
  verify-rsa    verifies the signer's SHA256-RSA-PKCS signatures (RFC 8017
                8.2.2: the expected encoding is rebuilt and compared) with
                the public key's numbers as openssl prints them.
  show-grant    one line from `p11shim attest --json`: role, subject, expiry,
                policy.
  rates         signatures verified per second in each phase of the demo.
  audit-story   when the failover and the recovery happened, from the audit
                log's own records.
  audit-summary one line from `p11shim audit verify --json`'s report, with
                the count of each kind of record in the files it verified.
  aws-seed      (--aws) in moto's IAM and EC2: per role an IAM role EC2 may
                take, an instance profile holding it and a running instance
                with that profile; writes each instance as EC2 describes it,
                in the IMDS emulator's --instance form. Needs boto3, which
                moto brings: run it with the venv's python.
  xff-proxy     (--aws) a loopback HTTP proxy in front of the broker that
                appends `X-Forwarded-For: <an instance's private address>`:
                on one machine it stands in for the instance's own network
                path, since every request here comes from 127.0.0.1.

Secrets are read from files, never from the command line, and never
printed.
"""

import argparse
import ctypes
import http.client
import http.server
import json
import os
import sys
import time

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG

CKR_OK = 0x0
CKR_BUFFER_TOO_SMALL = 0x150
CKF_OS_LOCKING_OK = 0x2
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKU_USER = 1
CKO_PRIVATE_KEY = 3
CKA_CLASS = 0x0
CKA_TOKEN = 0x1
CKA_PRIVATE = 0x2
CKA_LABEL = 0x3
CKA_SENSITIVE = 0x103
CKA_MODULUS_BITS = 0x121
CKA_PUBLIC_EXPONENT = 0x122
CKA_SIGN = 0x108
CKA_VERIFY = 0x10A
CKM_RSA_PKCS_KEY_PAIR_GEN = 0x0
CKM_SHA256_RSA_PKCS = 0x40

# Return codes the demo may meet, by name.
CKR_NAMES = {
    0x0: "CKR_OK", 0x5: "CKR_GENERAL_ERROR", 0x30: "CKR_DEVICE_ERROR", 0x32: "CKR_DEVICE_REMOVED",
    0x60: "CKR_KEY_HANDLE_INVALID", 0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x70: "CKR_MECHANISM_INVALID", 0x82: "CKR_OBJECT_HANDLE_INVALID",
    0xD1: "CKR_TEMPLATE_INCONSISTENT", 0x101: "CKR_USER_NOT_LOGGED_IN",
}


def rv_name(rv):
    return f"{CKR_NAMES.get(rv, 'CKR_?')} (0x{rv:X})"


class InitArgs(ctypes.Structure):
    _fields_ = [
        ("create_mutex", ctypes.c_void_p),
        ("destroy_mutex", ctypes.c_void_p),
        ("lock_mutex", ctypes.c_void_p),
        ("unlock_mutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("reserved", ctypes.c_void_p),
    ]


class Attribute(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("value", ctypes.c_void_p), ("len", CK_ULONG)]


class Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("param", ctypes.c_void_p), ("len", CK_ULONG)]


class Interface(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("functions", ctypes.c_void_p), ("flags", CK_ULONG)]


StatusFn = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p, ctypes.POINTER(CK_ULONG))


class P11shimFunctions(ctypes.Structure):
    """P11SHIM_FUNCTION_LIST of include/p11shim.h."""

    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte), ("get_status", StatusFn)]


class Pkcs11Error(Exception):
    def __init__(self, function, rv):
        super().__init__(f"{function} returned {rv_name(rv)}")
        self.rv = rv


class Module:
    """A PKCS#11 module called through its exported C_* functions."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        for name in (
            "C_Initialize", "C_Finalize", "C_GetSlotList", "C_GetTokenInfo",
            "C_OpenSession", "C_CloseAllSessions", "C_Login", "C_Logout",
            "C_CreateObject", "C_FindObjectsInit", "C_FindObjects",
            "C_FindObjectsFinal", "C_SignInit", "C_Sign", "C_GetInterface",
            "C_GetAttributeValue", "C_GenerateKeyPair",
        ):
            if hasattr(self.lib, name):
                getattr(self.lib, name).restype = CK_RV

    def call(self, function, *args, ok=(CKR_OK,)):
        rv = getattr(self.lib, function)(*args)
        if rv not in ok:
            raise Pkcs11Error(function, rv)
        return rv

    def initialize(self):
        args = InitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        self.call("C_Initialize", ctypes.byref(args))

    def finalize(self):
        self.call("C_Finalize", None)

    def slots(self):
        n = CK_ULONG(0)
        self.call("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(n))
        ids = (CK_ULONG * max(n.value, 1))()
        self.call("C_GetSlotList", ctypes.c_ubyte(1), ids, ctypes.byref(n))
        return list(ids[: n.value])

    def token_label(self, slot):
        # CK_TOKEN_INFO begins with the 32-byte blank-padded label.
        info = ctypes.create_string_buffer(512)
        self.call("C_GetTokenInfo", CK_ULONG(slot), info)
        return info.raw[:32].decode("utf-8", "replace").rstrip(" ")

    def open_session(self, slot):
        h = CK_ULONG(0)
        self.call(
            "C_OpenSession", CK_ULONG(slot), CK_ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION),
            None, None, ctypes.byref(h),
        )
        return h.value

    def login(self, session, user_type, pin):
        if pin is None:
            # The protected authentication path: no PIN from the application.
            self.call("C_Login", CK_ULONG(session), CK_ULONG(user_type), None, CK_ULONG(0))
        else:
            buf = ctypes.create_string_buffer(pin, len(pin))
            try:
                self.call("C_Login", CK_ULONG(session), CK_ULONG(user_type), buf, CK_ULONG(len(pin)))
            finally:
                ctypes.memset(buf, 0, len(pin))

    def find_one(self, session, attrs):
        template, _keep = template_of(attrs)
        self.call("C_FindObjectsInit", CK_ULONG(session), template, CK_ULONG(len(attrs)))
        found = (CK_ULONG * 2)()
        n = CK_ULONG(0)
        try:
            self.call("C_FindObjects", CK_ULONG(session), found, CK_ULONG(2), ctypes.byref(n))
        finally:
            self.call("C_FindObjectsFinal", CK_ULONG(session))
        if n.value != 1:
            raise SystemExit(f"demo-client: {n.value} objects match, expected one")
        return found[0]

    def find_all(self, session, attrs, limit=64):
        template, _keep = template_of(attrs)
        self.call("C_FindObjectsInit", CK_ULONG(session), template, CK_ULONG(len(attrs)))
        found = (CK_ULONG * limit)()
        n = CK_ULONG(0)
        try:
            self.call("C_FindObjects", CK_ULONG(session), found, CK_ULONG(limit), ctypes.byref(n))
        finally:
            self.call("C_FindObjectsFinal", CK_ULONG(session))
        return list(found[: n.value])

    def label(self, session, obj):
        buf = ctypes.create_string_buffer(256)
        attr = Attribute(CKA_LABEL, ctypes.cast(buf, ctypes.c_void_p), len(buf))
        self.call("C_GetAttributeValue", CK_ULONG(session), CK_ULONG(obj), ctypes.byref(attr), CK_ULONG(1))
        return buf.raw[: attr.len].decode("utf-8", "replace")

    def sign(self, session, key, data):
        mech = Mechanism(CKM_SHA256_RSA_PKCS, None, 0)
        self.call("C_SignInit", CK_ULONG(session), ctypes.byref(mech), CK_ULONG(key))
        out = ctypes.create_string_buffer(1024)
        n = CK_ULONG(len(out))
        self.call("C_Sign", CK_ULONG(session), data, CK_ULONG(len(data)), out, ctypes.byref(n))
        return out.raw[: n.value]

    def p11shim_status(self):
        iface = ctypes.POINTER(Interface)()
        self.call("C_GetInterface", b"p11shim", None, ctypes.byref(iface), CK_ULONG(0))
        fns = ctypes.cast(iface.contents.functions, ctypes.POINTER(P11shimFunctions)).contents
        n = CK_ULONG(0)
        rv = fns.get_status(None, ctypes.byref(n))
        # The status changes between the two calls (a counter gains a
        # digit): ask again with the new length, a few times.
        for _ in range(5):
            if rv != CKR_OK:
                break
            buf = ctypes.create_string_buffer(n.value + 256)
            n = CK_ULONG(len(buf))
            rv = fns.get_status(buf, ctypes.byref(n))
            if rv == CKR_OK:
                return buf.raw[: n.value].decode("utf-8")
            if rv == CKR_BUFFER_TOO_SMALL:
                rv = CKR_OK
        raise Pkcs11Error("P11shim_GetStatus", rv)


def template_of(attrs):
    """A CK_ATTRIBUTE array; the second value keeps the buffers alive."""
    keep = []
    arr = (Attribute * len(attrs))()
    for i, (kind, value) in enumerate(attrs):
        if isinstance(value, bool):
            raw = b"\x01" if value else b"\x00"
        elif isinstance(value, int):
            raw = bytes(CK_ULONG(value))
        else:
            raw = value
        buf = ctypes.create_string_buffer(len(raw))
        if isinstance(raw, bytearray):
            # Copied without an immutable bytes object (which could not be wiped).
            ctypes.memmove(buf, (ctypes.c_char * len(raw)).from_buffer(raw), len(raw))
        else:
            ctypes.memmove(buf, raw, len(raw))
        keep.append(buf)
        arr[i] = Attribute(kind, ctypes.cast(buf, ctypes.c_void_p), len(raw))
    return arr, keep


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_status(m, out):
    """status.json, and members.txt: `<token> <state> <recoveries> <failovers>`
    per member, for the shell to read."""
    text = m.p11shim_status()
    write_atomic(os.path.join(out, "status.json"), text.encode())
    lines = []
    for slot in json.loads(text).get("slots", []):
        for mb in slot["members"]:
            token = mb["token"].split('"')[1] if '"' in mb["token"] else mb["token"]
            lines.append(f"{token} {mb['state']} {mb['recoveries']} {mb['failovers']}\n")
    write_atomic(os.path.join(out, "members.txt"), "".join(lines).encode())


def signer(args):
    m = Module(args.module)
    m.initialize()
    signed = failed = 0
    try:
        slot = m.slots()[0]
        # Three sessions: p11shim spreads them over the members.
        sessions = [m.open_session(slot) for _ in range(3)]
        m.login(sessions[0], CKU_USER, None)
        key = m.find_one(sessions[0], [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, args.label.encode())])
        os.makedirs(args.out, exist_ok=True)
        save_status(m, args.out)
        index = open(os.path.join(args.out, "index.txt"), "w")
        print("ready", flush=True)
        deadline = time.monotonic() + args.deadline
        saved = time.monotonic()
        i = 0
        while not os.path.exists(args.stop) and time.monotonic() < deadline:
            msg = f"payment {i} signed by a long-lived application\n".encode()
            try:
                sig = m.sign(sessions[i % len(sessions)], key, msg)
            except Pkcs11Error as e:
                failed += 1
                print(f"signature {i}: {e}", file=sys.stderr, flush=True)
            else:
                with open(os.path.join(args.out, f"{i:05}.msg"), "wb") as f:
                    f.write(msg)
                with open(os.path.join(args.out, f"{i:05}.sig"), "wb") as f:
                    f.write(sig)
                index.write(f"{int(time.time() * 1000)} {i:05}\n")
                index.flush()
                signed += 1
            # The status every 50 ms: the caller waits on what it says.
            if time.monotonic() - saved >= 0.05:
                save_status(m, args.out)
                saved = time.monotonic()
            i += 1
            time.sleep(args.interval)
        save_status(m, args.out)
        index.close()
    finally:
        m.finalize()
    print(f"signed {signed} failed {failed}", flush=True)
    return 1 if failed else 0


def reach(args):
    """Role `reports` (the module's configuration says which) reaches for
    another role's key. Exit 1 when p11shim lets it through."""
    m = Module(args.module)
    m.initialize()
    leaked = False
    try:
        slot = m.slots()[0]
        session = m.open_session(slot)
        m.login(session, CKU_USER, None)
        keys = m.find_all(session, [(CKA_CLASS, CKO_PRIVATE_KEY)])
        labels = sorted(m.label(session, k) for k in keys)
        print(f"private keys this role sees: {', '.join(labels) or 'none'}")
        other = args.other.encode()
        found = m.find_all(session, [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, other)])
        print(f"C_FindObjects(label={args.other}): {len(found)} objects")
        leaked |= bool(found)
        own = m.find_one(session, [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, args.own.encode())])
        sig = m.sign(session, own, b"quarterly report\n")
        print(f"C_Sign with {args.own}: CKR_OK ({len(sig)} bytes)")
        # A key pair under the other role's label: what a compromised
        # process might try in order to pass its own key off as theirs.
        pub, keep_pub = template_of([
            (CKA_TOKEN, True), (CKA_LABEL, other), (CKA_VERIFY, True),
            (CKA_MODULUS_BITS, 2048), (CKA_PUBLIC_EXPONENT, b"\x01\x00\x01"),
        ])
        priv, keep_priv = template_of([
            (CKA_TOKEN, True), (CKA_PRIVATE, True), (CKA_LABEL, other), (CKA_SIGN, True),
            (CKA_SENSITIVE, True),
        ])
        mech = Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None, 0)
        hpub, hpriv = CK_ULONG(0), CK_ULONG(0)
        rv = m.lib.C_GenerateKeyPair(
            CK_ULONG(session), ctypes.byref(mech), pub, CK_ULONG(len(keep_pub)),
            priv, CK_ULONG(len(keep_priv)), ctypes.byref(hpub), ctypes.byref(hpriv),
        )
        print(f"C_GenerateKeyPair(label={args.other}): {rv_name(rv)}")
        leaked |= rv == CKR_OK
    finally:
        m.finalize()
    return 1 if leaked else 0


def show_grant(args):
    with open(args.file) as f:
        doc = json.load(f)
    g = doc.get("grant") or {}
    rules = (g.get("policy") or {}).get("keys") or []
    policy = "; ".join(
        f"{r.get('label', '*')} {'/'.join(r.get('ops') or ['visible'])}" for r in rules
    )
    subject = g.get("subject") or ""
    # An AWS subject is aws:<account>:<region>:<instance id>.
    aws = subject.split(":")
    if len(aws) == 4 and aws[0] == "aws":
        subject += f" (account {aws[1]}, region {aws[2]}, instance {aws[3]})"
    print(
        f"role {g.get('role')}, subject {subject}, expires {g.get('expires_at')} "
        f"(ttl {g.get('ttl_seconds')} s), reauth {g.get('reauth')}, key policy: {policy or 'none'}, "
        f"PIN {g.get('pin')}"
    )


def rates(args):
    """Verified signatures per second in each phase between the marks."""
    times = []
    with open(args.load) as f:
        for line in f:
            t, outcome, _key = line.split()
            if outcome == "ok":
                times.append(int(t))
    with open(args.signer) as f:
        times.extend(int(line.split()[0]) for line in f)
    bounds = [args.t0] + args.marks
    names = ["3 members up", "ha-a out", "ha-a back"]
    for (lo, hi), name in zip(zip(bounds, bounds[1:]), names):
        n = sum(lo <= t < hi for t in times)
        secs = max(hi - lo, 1) / 1000
        print(f"{name:<13} {n / secs:7.1f} signatures/s ({n} in {secs:.1f} s)")
    return 0 if times else 1


def epoch_ms(stamp):
    from datetime import datetime

    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


def audit_story(args):
    """The first failover after `--after` and the first recovery after
    `--back`, as the audit log recorded them (ms since --t0)."""
    failover = recovery = None
    with open(args.log) as f:
        for line in f:
            r = json.loads(line)
            t = epoch_ms(r["time"])
            if r["kind"] == "failover" and t >= args.after and (failover is None or t < failover[0]):
                failover = (t, r)
            if r["kind"] == "recovery" and t >= args.back and (recovery is None or t < recovery[0]):
                recovery = (t, r)
    if failover is None or recovery is None:
        print("the audit log holds no failover or no recovery", file=sys.stderr)
        return 1
    (tf, rf), (tr, rr) = failover, recovery
    print(
        f"failover at T={tf - args.t0} ms ({rf['function']} {rf.get('member', '?')}, "
        f"{tf - args.after} ms after the pull); recovery at T'={tr - args.t0} ms "
        f"({rr['function']} {rr.get('member', '?')}, {tr - args.back} ms after it was put back), "
        "from the audit log's records"
    )
    return 0


def audit_kinds(files):
    """How many records of each kind the audit files hold."""
    kinds = {}
    for path in files:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    kind = json.loads(line)["kind"]
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(f"demo-client: {path}:{n}: not an audit record")
                kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def audit_summary(args):
    """One line from `p11shim audit verify --json`: its counts, and the
    kinds of record counted in the files it verified (only when they
    verified)."""
    with open(args.file) as f:
        report = json.load(f)
    broken = report.get("broken")
    if not report.get("ok") or broken:
        print(f"demo-client: the audit files did not verify: {broken}", file=sys.stderr)
        return 1
    key = report.get("key")
    if not key:
        print("demo-client: the audit files were verified without a key", file=sys.stderr)
        return 1
    chains = report["chains"]
    closed = sum(1 for c in chains if c["terminated"])
    signed = sum(c["verified"] for c in chains)
    kinds = audit_kinds(report["files"])
    if sum(kinds.values()) != report["records"]:
        print(
            f"demo-client: {sum(kinds.values())} records in the files, {report['records']} verified",
            file=sys.stderr,
        )
        return 1
    open_note = (
        f", {len(chains) - closed} without (processes that exit without C_Finalize)"
        if closed < len(chains) else ""
    )
    print(
        f"{report['records']} records in {len(chains)} chains (one per process; {closed} ended by "
        f"their stop checkpoint{open_note}), {report['checkpoints']} checkpoints, {signed} signed "
        f"({key['alg']} key {key['key_id']}, the role's audit key from the broker), "
        f"0 broken links; {kinds.get('denial', 0)} denials, "
        f"{kinds.get('failover', 0)} failovers, {kinds.get('recovery', 0)} recoveries, "
        f"{kinds.get('key_use', 0)} key uses, {kinds.get('credentials', 0)} credential fetches"
    )
    return 0


# DigestInfo of SHA-256 (RFC 8017 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def verify_rsa(args):
    """Verifies every <n>.sig over <n>.msg in a directory; prints the count."""
    import hashlib
    import re
    import subprocess

    text = subprocess.run(
        ["openssl", "rsa", "-pubin", "-in", args.pub, "-noout", "-text"],
        check=True, capture_output=True, text=True,
    ).stdout
    body = text.split("Modulus:", 1)[1].split("Exponent:", 1)
    n = int(re.sub(r"[^0-9a-f]", "", body[0]), 16)
    e = int(body[1].split()[0])
    k = (n.bit_length() + 7) // 8
    names = sorted(f[:-4] for f in os.listdir(args.dir) if f.endswith(".msg"))
    for name in names:
        with open(os.path.join(args.dir, name + ".msg"), "rb") as f:
            msg = f.read()
        with open(os.path.join(args.dir, name + ".sig"), "rb") as f:
            sig = f.read()
        t = SHA256_DIGEST_INFO + hashlib.sha256(msg).digest()
        expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
        s = int.from_bytes(sig, "big")
        if len(sig) != k or s >= n or pow(s, e, n).to_bytes(k, "big") != expected:
            print(f"demo-client: signature {name} does NOT verify", file=sys.stderr)
            return 1
    print(len(names))
    return 0


# moto's one account, and the region the demo's instances run in.
AWS_REGION = "us-east-1"
EC2_TRUST = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{
        "Effect": "Allow",
        "Principal": {"Service": "ec2.amazonaws.com"},
        "Action": "sts:AssumeRole",
    }],
})


def aws_seed(args):
    """`--role NAME:IAM_ROLE` for each broker role: the IAM role, a profile
    `<IAM_ROLE>-profile` holding it, one running t3.micro with the profile.
    Writes `<out>/<NAME>.json` (the emulator's instance) and prints one
    line per role: `<NAME> <instance id> <private ip> <account> <profile>`."""
    from datetime import timezone

    import boto3  # moto's dependency, in the venv

    def client(service):
        # moto takes any key; these are not secrets.
        return boto3.client(
            service, region_name=AWS_REGION, endpoint_url=args.endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )

    iam, ec2 = client("iam"), client("ec2")
    os.makedirs(args.out, exist_ok=True)
    for spec in args.role:
        name, iam_role = spec.split(":", 1)
        profile = f"{iam_role}-profile"
        iam.create_role(RoleName=iam_role, AssumeRolePolicyDocument=EC2_TRUST)
        profile_id = iam.create_instance_profile(
            InstanceProfileName=profile)["InstanceProfile"]["InstanceProfileId"]
        iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=iam_role)
        run = ec2.run_instances(
            ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="t3.micro",
            IamInstanceProfile={"Name": profile},
        )
        instance_id = run["Instances"][0]["InstanceId"]
        # As the broker will see it: DescribeInstances.
        reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
        i = reservation["Instances"][0]
        if i["State"]["Name"] != "running" or not i.get("PrivateIpAddress"):
            print(f"demo-client: {instance_id} is {i['State']['Name']}, address "
                  f"{i.get('PrivateIpAddress')}", file=sys.stderr)
            return 1
        launch = i["LaunchTime"].astimezone(timezone.utc)
        instance = {
            "instance_id": instance_id,
            "reservation_id": reservation["ReservationId"],
            "instance_type": i["InstanceType"],
            "local_hostname": i.get("PrivateDnsName", ""),
            "public_hostname": i.get("PublicDnsName", ""),
            "local_ipv4": i["PrivateIpAddress"],
            "public_ipv4": i.get("PublicIpAddress", ""),
            "ami_id": i["ImageId"],
            "region": AWS_REGION,
            "availability_zone": i["Placement"]["AvailabilityZone"],
            "account_id": reservation["OwnerId"],
            "pending_time": launch.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "instance_profile_arn": i["IamInstanceProfile"]["Arn"],
            "instance_profile_id": profile_id,
        }
        write_atomic(os.path.join(args.out, f"{name}.json"), json.dumps(instance).encode())
        print(f"{name} {instance_id} {i['PrivateIpAddress']} {reservation['OwnerId']} {profile}")
    return 0


# Headers a proxy does not pass on (RFC 9110 7.6.1), and the ones it sets.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


def xff_proxy(args):
    """Relays each request to `--upstream` with `X-Forwarded-For` ending in
    `--forward`; prints `listening <addr>` once it accepts connections."""
    host, port = args.upstream.rsplit(":", 1)

    class Relay(http.server.BaseHTTPRequestHandler):
        def relay(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1 << 20:
                self.send_error(413)
                return
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            prior = self.headers.get("X-Forwarded-For")
            headers.pop("X-Forwarded-For", None)
            headers["X-Forwarded-For"] = f"{prior}, {args.forward}" if prior else args.forward
            up = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                up.request(self.command, self.path, body=body, headers=headers)
                answer = up.getresponse()
                data = answer.read()
            except OSError as e:
                self.send_error(502, explain=type(e).__name__)
                return
            finally:
                up.close()
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = relay

        def log_message(self, fmt, *a):
            sys.stderr.write(f"xff-proxy: {self.address_string()} {fmt % a}\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    server.daemon_threads = True
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("signer")
    s.add_argument("--module", required=True)
    s.add_argument("--label", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--stop", required=True)
    s.add_argument("--interval", type=float, default=0.005)
    s.add_argument("--deadline", type=float, default=120.0)
    c = sub.add_parser("reach")
    c.add_argument("--module", required=True)
    c.add_argument("--own", required=True)
    c.add_argument("--other", required=True)
    r = sub.add_parser("verify-rsa")
    r.add_argument("--pub", required=True)
    r.add_argument("--dir", required=True)
    g = sub.add_parser("show-grant")
    g.add_argument("file")
    t = sub.add_parser("rates")
    t.add_argument("--t0", type=int, required=True)
    t.add_argument("--marks", type=int, nargs=3, required=True)
    t.add_argument("--load", required=True)
    t.add_argument("--signer", required=True)
    a = sub.add_parser("audit-story")
    a.add_argument("--t0", type=int, required=True)
    a.add_argument("--after", type=int, required=True)
    a.add_argument("--back", type=int, required=True)
    a.add_argument("--log", required=True)
    u = sub.add_parser("audit-summary")
    u.add_argument("file")
    w = sub.add_parser("aws-seed")
    w.add_argument("--endpoint", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--role", action="append", required=True, metavar="NAME:IAM_ROLE")
    x = sub.add_parser("xff-proxy")
    x.add_argument("--upstream", required=True, metavar="HOST:PORT")
    x.add_argument("--forward", required=True, metavar="IP")
    a = p.parse_args()
    try:
        return {
            "signer": signer,
            "reach": reach,
            "verify-rsa": verify_rsa,
            "show-grant": show_grant,
            "rates": rates,
            "audit-story": audit_story,
            "audit-summary": audit_summary,
            "aws-seed": aws_seed,
            "xff-proxy": xff_proxy,
        }[a.command](a) or 0
    except Pkcs11Error as e:
        print(f"demo-client: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
