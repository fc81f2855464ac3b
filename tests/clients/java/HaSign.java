// Signs SHA256withRSA many times in one process through Java's SunPKCS11
// provider, pausing mid-signature at chosen points so that a test can make
// the token fail while an operation is in progress.
//
//   java HaSign <sunpkcs11.cfg> <PIN> <count> <pause,pause,...>
//
// Loads the PKCS11 KeyStore once and takes its only private key entry.
// Each signature is over two parts given in two update() calls; at each
// pause point it prints "PAUSED <i>" after the first part and reads a line
// from standard input ("go") before going on. Every signature is verified
// in software against the entry's certificate, and must not verify for a
// tampered message. Prints "FAILED <i> ..." with the stack trace for each
// signature that throws or does not verify, then
// "signed: <n> verified: <n> failed: <n>"; exits with 1 unless all verified.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.Security;
import java.security.Signature;
import java.security.cert.Certificate;
import java.util.Collections;
import java.util.HashSet;
import java.util.Set;

public class HaSign {
    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: HaSign <sunpkcs11.cfg> <PIN> <count> <pause,pause,...>");
            System.exit(2);
        }
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        int count = Integer.parseInt(args[2]);
        Set<Integer> pauses = new HashSet<>();
        for (String s : args[3].split(",")) {
            if (!s.isEmpty()) {
                pauses.add(Integer.parseInt(s));
            }
        }
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));

        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, args[1].toCharArray());
        String alias = null;
        for (String a : Collections.list(ks.aliases())) {
            if (ks.isKeyEntry(a)) {
                if (alias != null) {
                    System.out.println("FAILED more than one key entry: " + alias + ", " + a);
                    System.exit(1);
                }
                alias = a;
            }
        }
        if (alias == null) {
            System.out.println("FAILED no key entry");
            System.exit(1);
        }
        PrivateKey key = (PrivateKey) ks.getKey(alias, null);
        Certificate cert = ks.getCertificate(alias);
        System.out.println("LOADED " + alias + " " + key.getAlgorithm());
        System.out.flush();

        Signature verifier = Signature.getInstance("SHA256withRSA", "SunRsaSign");
        int verified = 0;
        int failed = 0;
        for (int i = 0; i < count; i++) {
            byte[] first = ("first part of message " + i + " ").repeat(50).getBytes(StandardCharsets.UTF_8);
            byte[] second = ("second part of message " + i).getBytes(StandardCharsets.UTF_8);
            Signature signer = null;
            Exception error = null;
            try {
                signer = Signature.getInstance("SHA256withRSA", p);
                signer.initSign(key);
                signer.update(first);
            } catch (Exception e) {
                error = e;
            }
            if (pauses.contains(i)) {
                System.out.println("PAUSED " + i);
                System.out.flush();
                String line = in.readLine();
                if (!"go".equals(line)) {
                    System.out.println("FAILED " + i + " expected \"go\", read " + line);
                    System.exit(1);
                }
            }
            byte[] sig = null;
            if (error == null) {
                try {
                    signer.update(second);
                    sig = signer.sign();
                } catch (Exception e) {
                    error = e;
                }
            }
            if (error != null) {
                System.out.println("FAILED " + i + " " + error);
                error.printStackTrace(System.out);
                failed++;
                continue;
            }
            verifier.initVerify(cert);
            verifier.update(first);
            verifier.update(second);
            boolean ok = verifier.verify(sig);
            verifier.initVerify(cert);
            verifier.update(first);
            verifier.update("tampered".getBytes(StandardCharsets.UTF_8));
            boolean tampered = verifier.verify(sig);
            if (ok && !tampered) {
                verified++;
            } else {
                System.out.println("FAILED " + i + " verified=" + ok + " tampered=" + tampered);
                failed++;
            }
        }
        System.out.println("signed: " + count + " verified: " + verified + " failed: " + failed);
        System.out.flush();
        System.exit(failed == 0 && verified == count ? 0 : 1);
    }
}
