#!/usr/bin/env python3
"""PKCS#11 calls the demo needs that no stock tool makes, through ctypes
(the standard library only, nothing to install):

  trusted-key   the security officer puts the HA replication key (AES,
                CKA_TRUSTED) on one member token, with SoftHSM2 called
                directly: what each HSM partition's officer does once.
  signer        a long-lived application on p11shim: logs in with no PIN
                (protected authentication path), signs with SHA256-RSA-PKCS
                round-robin over three sessions, writes every message and
                signature for the caller to verify, and keeps p11shim's
                status JSON (C_GetInterface("p11shim"), P11shim_GetStatus)
                in a file, until a stop file appears.
  show-status   prints the interesting part of a saved status JSON.
  verify-rsa    verifies the signer's SHA256-RSA-PKCS signatures (RFC 8017
                8.2.2: the expected encoding is rebuilt and compared) with
                the public key's numbers as openssl prints them.

Secrets are read from files, never from the command line, and never
printed.
"""

import argparse
import ctypes
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
CKU_SO = 0
CKU_USER = 1
CKO_PRIVATE_KEY = 3
CKO_SECRET_KEY = 4
CKK_AES = 0x1F
CKA_CLASS = 0x0
CKA_TOKEN = 0x1
CKA_PRIVATE = 0x2
CKA_LABEL = 0x3
CKA_TRUSTED = 0x86
CKA_VALUE = 0x11
CKA_KEY_TYPE = 0x100
CKA_SENSITIVE = 0x103
CKA_WRAP = 0x106
CKA_UNWRAP = 0x107
CKA_EXTRACTABLE = 0x162
CKM_SHA256_RSA_PKCS = 0x40


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
        super().__init__(f"{function} returned 0x{rv:X}")
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


def read_secret(path):
    """A PIN file's content, without the line end."""
    with open(path, "rb") as f:
        return f.read().rstrip(b"\r\n")


def trusted_key(args):
    m = Module(args.module)
    m.initialize()
    try:
        labels = {m.token_label(s): s for s in m.slots()}
        for token in args.token:
            if token not in labels:
                raise SystemExit(f"demo-client: no token {token!r}")
            put_trusted_key(m, labels[token], args)
    finally:
        m.finalize()


def put_trusted_key(m, slot, args):
    session = m.open_session(slot)
    m.login(session, CKU_SO, read_secret(args.so_pin_file))
    with open(args.value_file, "rb") as f:
        value = bytearray(f.read())
    try:
        if len(value) != 32:
            raise SystemExit("demo-client: the replication key must be 32 bytes")
        template, keep = template_of([
            (CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_TOKEN, True),
            (CKA_PRIVATE, False), (CKA_LABEL, args.label.encode()), (CKA_WRAP, True),
            (CKA_UNWRAP, True), (CKA_TRUSTED, True), (CKA_SENSITIVE, True),
            (CKA_EXTRACTABLE, False), (CKA_VALUE, value),
        ])
        h = CK_ULONG(0)
        try:
            m.call("C_CreateObject", CK_ULONG(session), template, CK_ULONG(len(keep)), ctypes.byref(h))
        finally:
            for b in keep:
                ctypes.memset(b, 0, len(b))
    finally:
        value[:] = bytes(len(value))
    m.call("C_Logout", CK_ULONG(session))
    m.call("C_CloseAllSessions", CK_ULONG(slot))


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
        print("ready", flush=True)
        deadline = time.monotonic() + args.deadline
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
                signed += 1
            save_status(m, args.out)
            i += 1
            time.sleep(args.interval)
    finally:
        m.finalize()
    print(f"signed {signed} failed {failed}", flush=True)
    return 1 if failed else 0


def show_status(args):
    with open(args.file) as f:
        st = json.load(f)
    c = st.get("credentials") or {}
    line = (
        f"credentials: state={c.get('state')} role={c.get('role')} method={c.get('method')} "
        f"subject={c.get('subject')} grants={c.get('grants')} expires_in_s={c.get('expires_in_s')}"
    )
    if c.get("last_error"):
        line += f" last_error={c['last_error']!r}"
    print(line)
    for slot in st.get("slots", []):
        print(
            f"slot {slot['id']} '{slot['label']}': logged_in={str(slot['logged_in']).lower()} "
            f"sessions={slot['sessions']}"
        )
        for mb in slot["members"]:
            print(
                f"  {mb['name']} {mb['token']}: {mb['state']}, sessions={mb['sessions']} "
                f"errors={mb['errors']} failovers={mb['failovers']} recoveries={mb['recoveries']} "
                f"missed_changes={mb['missed_changes']}"
            )


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trusted-key")
    t.add_argument("--module", required=True)
    t.add_argument("--token", required=True, action="append")
    t.add_argument("--so-pin-file", required=True)
    t.add_argument("--value-file", required=True)
    t.add_argument("--label", default="p11shim-replication")
    s = sub.add_parser("signer")
    s.add_argument("--module", required=True)
    s.add_argument("--label", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--stop", required=True)
    s.add_argument("--interval", type=float, default=0.04)
    s.add_argument("--deadline", type=float, default=120.0)
    v = sub.add_parser("show-status")
    v.add_argument("file")
    r = sub.add_parser("verify-rsa")
    r.add_argument("--pub", required=True)
    r.add_argument("--dir", required=True)
    a = p.parse_args()
    try:
        return {
            "trusted-key": trusted_key,
            "signer": signer,
            "show-status": show_status,
            "verify-rsa": verify_rsa,
        }[a.command](a) or 0
    except Pkcs11Error as e:
        print(f"demo-client: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
