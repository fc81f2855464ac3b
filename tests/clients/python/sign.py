"""Generates an RSA and an EC key pair in a PKCS#11 token with python-pkcs11,
signs with each and verifies the signatures in the token.

    sign.py <module.so> <token label> <PIN> <output dir>

Writes <output dir>/py-rsa.sig (SHA256-RSA-PKCS) and <output dir>/py-ec.sig
(ECDSA over SHA-256, DER as OpenSSL writes it) of the message in
<output dir>/message.txt, so that they can be checked outside the token.
Prints "RSA OK" and "EC OK" when a signature verifies and a tampered
message does not.
"""

import hashlib
import os
import sys

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters


def check(name, key_pub, mechanism, data, sig):
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    if not key_pub.verify(data, sig, mechanism=mechanism):
        print(f"{name} FAILED: signature does not verify")
        return False
    if key_pub.verify(tampered, sig, mechanism=mechanism):
        print(f"{name} FAILED: tampered data verifies")
        return False
    print(f"{name} OK")
    return True


def main():
    module, label, pin, out = sys.argv[1:5]
    message = open(os.path.join(out, "message.txt"), "rb").read()
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=label)
    ok = True
    with token.open(rw=True, user_pin=pin) as session:
        pub, priv = session.generate_keypair(
            KeyType.RSA, 2048, store=True, label="py-rsa", id=b"\x21",
            public_template={Attribute.VERIFY: True},
            private_template={Attribute.SIGN: True},
        )
        sig = priv.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
        ok &= check("RSA", pub, Mechanism.SHA256_RSA_PKCS, message, sig)
        with open(os.path.join(out, "py-rsa.sig"), "wb") as f:
            f.write(sig)

        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        pub, priv = params.generate_keypair(store=True, label="py-ec", id=b"\x22")
        # ECDSA over a digest computed here: the hashing variants of ECDSA
        # are optional in tokens.
        digest = hashlib.sha256(message).digest()
        sig = priv.sign(digest, mechanism=Mechanism.ECDSA)
        ok &= check("EC", pub, Mechanism.ECDSA, digest, sig)
        with open(os.path.join(out, "py-ec.sig"), "wb") as f:
            f.write(encode_ecdsa_signature(sig))

        # The keys are found again by label, as an application would.
        found = sorted(k.label for k in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        print("private keys: " + ",".join(found))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
