// Signs and verifies with every private key of a PKCS#11 token through
// Java's SunPKCS11 provider.
//
//   java P11Sign <sunpkcs11.cfg> [PIN]
//
// Without a PIN the key store is loaded with a null password: the token
// then has to log in by itself (a protected authentication path).
// Prints "<ALG> OK <alias>" for each key whose signature verifies, both
// with the token and in software against the key's certificate; exits
// with 1 when a key fails or there is none.

import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.Security;
import java.security.Signature;
import java.security.cert.Certificate;
import java.util.Collections;

public class P11Sign {
    public static void main(String[] args) throws Exception {
        if (args.length < 1 || args.length > 2) {
            System.err.println("usage: P11Sign <sunpkcs11.cfg> [PIN]");
            System.exit(2);
        }
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        char[] pin = args.length == 2 ? args[1].toCharArray() : null;

        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, pin);

        byte[] data = "p11shim signs for Java".getBytes(StandardCharsets.UTF_8);
        int keys = 0;
        int failed = 0;
        for (String alias : Collections.list(ks.aliases())) {
            if (!ks.isKeyEntry(alias)) {
                continue;
            }
            PrivateKey key = (PrivateKey) ks.getKey(alias, null);
            Certificate cert = ks.getCertificate(alias);
            String alg;
            switch (key.getAlgorithm()) {
                case "RSA": alg = "SHA256withRSA"; break;
                case "EC": alg = "SHA256withECDSA"; break;
                default:
                    System.out.println("SKIP " + key.getAlgorithm() + " " + alias);
                    continue;
            }

            Signature signer = Signature.getInstance(alg, p);
            signer.initSign(key);
            signer.update(data);
            byte[] sig = signer.sign();

            // Verified once by the token, once in software.
            Signature tokenVerifier = Signature.getInstance(alg, p);
            tokenVerifier.initVerify(cert.getPublicKey());
            tokenVerifier.update(data);
            boolean byToken = tokenVerifier.verify(sig);

            Signature softVerifier = Signature.getInstance(alg, providerFor(alg));
            softVerifier.initVerify(cert);
            softVerifier.update(data);
            boolean inSoftware = softVerifier.verify(sig);

            // A tampered message must not verify.
            softVerifier.initVerify(cert);
            softVerifier.update("tampered".getBytes(StandardCharsets.UTF_8));
            boolean tampered = softVerifier.verify(sig);

            if (byToken && inSoftware && !tampered) {
                System.out.println(key.getAlgorithm() + " OK " + alias);
                keys++;
            } else {
                System.out.println(key.getAlgorithm() + " FAILED " + alias + " token=" + byToken + " software=" + inSoftware + " tampered=" + tampered);
                failed++;
            }
        }
        System.out.println("keys signed: " + keys);
        System.exit(failed == 0 && keys > 0 ? 0 : 1);
    }

    private static String providerFor(String alg) {
        return alg.endsWith("RSA") ? "SunRsaSign" : "SunEC";
    }
}
