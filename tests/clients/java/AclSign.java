// Tries to sign with one key of a PKCS#11 token through Java's SunPKCS11
// provider, logging in with a PIN.
//
//   java AclSign <sunpkcs11.cfg> <PIN> <alias>
//
// Prints "ALIASES a,b,..." (the key entries the token shows), then one of
// "SIGNED <alias>" (the signature verified against the certificate),
// "NO KEY <alias>", or "DENIED <alias>: <exception>"; exits with 0 in each
// of these cases and 1 on any other failure.

import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.Security;
import java.security.Signature;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

public class AclSign {
    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: AclSign <sunpkcs11.cfg> <PIN> <alias>");
            System.exit(2);
        }
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, args[1].toCharArray());

        List<String> keys = new ArrayList<>();
        for (String a : Collections.list(ks.aliases())) {
            if (ks.isKeyEntry(a)) {
                keys.add(a);
            }
        }
        Collections.sort(keys);
        System.out.println("ALIASES " + String.join(",", keys));

        String alias = args[2];
        if (!ks.isKeyEntry(alias)) {
            System.out.println("NO KEY " + alias);
            return;
        }
        PrivateKey key = (PrivateKey) ks.getKey(alias, null);
        byte[] data = "p11shim key ACL".getBytes(StandardCharsets.UTF_8);
        byte[] sig;
        try {
            Signature signer = Signature.getInstance("SHA256withRSA", p);
            signer.initSign(key);
            signer.update(data);
            sig = signer.sign();
        } catch (Exception e) {
            StringBuilder why = new StringBuilder(e.toString());
            for (Throwable c = e.getCause(); c != null; c = c.getCause()) {
                why.append(" <- ").append(c);
            }
            System.out.println("DENIED " + alias + ": " + why);
            return;
        }
        Signature v = Signature.getInstance("SHA256withRSA");
        v.initVerify(ks.getCertificate(alias).getPublicKey());
        v.update(data);
        if (!v.verify(sig)) {
            System.out.println("BAD SIGNATURE " + alias);
            System.exit(1);
        }
        System.out.println("SIGNED " + alias);
    }
}
