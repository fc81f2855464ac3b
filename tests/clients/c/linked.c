/*
 * A C application linked with -lp11shim: it calls the PKCS#11 functions by
 * name, without dlopen() or a function list.
 *
 *     linked <config> <broken config> <PIN> <key label> <message> <signature out>
 *
 * With <config>, it finds the first slot's token, logs in, finds the RSA
 * private key labelled <key label>, signs <message> with
 * CKM_SHA256_RSA_PKCS and writes the signature to <signature out>. Then,
 * with <broken config>, C_Initialize must fail with
 * CKR_P11SHIM_CONFIG_INVALID and leave the module uninitialized.
 *
 * Prints one line per step; exits with 1 at the first unexpected result.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>
#include <p11shim.h>

#define CHECK(call, expected)                                                        \
    do {                                                                             \
        CK_RV rv_ = (call);                                                          \
        if (rv_ != (expected)) {                                                     \
            printf("FAILED: %s returned 0x%lx, expected 0x%lx\n", #call,             \
                   (unsigned long)rv_, (unsigned long)(expected));                   \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static void use_config(const char *path)
{
    if (setenv("P11SHIM_CONFIG", path, 1) != 0) {
        perror("setenv");
        exit(1);
    }
}

static unsigned char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        exit(1);
    }
    unsigned char *buf = malloc(65536);
    *len = fread(buf, 1, 65536, f);
    fclose(f);
    return buf;
}

static void write_file(const char *path, const unsigned char *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s <config> <broken config> <PIN> <key label> <message> <signature out>\n", argv[0]);
        return 2;
    }
    const char *config = argv[1], *broken = argv[2], *pin = argv[3], *label = argv[4];

    /* A good configuration: sign with the token. */
    use_config(config);
    CK_C_INITIALIZE_ARGS init_args;
    memset(&init_args, 0, sizeof init_args);
    init_args.flags = CKF_OS_LOCKING_OK;
    CHECK(C_Initialize(&init_args), CKR_OK);
    printf("initialize: OK\n");

    CK_INFO info;
    CHECK(C_GetInfo(&info), CKR_OK);
    printf("library: %.32s\n", (const char *)info.manufacturerID);

    CK_ULONG count = 0;
    CHECK(C_GetSlotList(CK_TRUE, NULL, &count), CKR_OK);
    CK_SLOT_ID slots[16];
    if (count == 0 || count > 16) {
        printf("FAILED: %lu slots\n", (unsigned long)count);
        return 1;
    }
    CHECK(C_GetSlotList(CK_TRUE, slots, &count), CKR_OK);
    printf("slots: %lu\n", (unsigned long)count);

    CK_TOKEN_INFO token;
    CHECK(C_GetTokenInfo(slots[0], &token), CKR_OK);
    printf("token: %.32s\n", (const char *)token.label);

    CK_SESSION_HANDLE session;
    CHECK(C_OpenSession(slots[0], CKF_SERIAL_SESSION, NULL, NULL, &session), CKR_OK);
    CHECK(C_Login(session, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), CKR_OK);
    printf("login: OK\n");

    CK_OBJECT_CLASS klass = CKO_PRIVATE_KEY;
    CK_KEY_TYPE key_type = CKK_RSA;
    CK_ATTRIBUTE template[] = {
        { CKA_CLASS, &klass, sizeof klass },
        { CKA_KEY_TYPE, &key_type, sizeof key_type },
        { CKA_LABEL, (void *)label, strlen(label) },
    };
    CK_OBJECT_HANDLE keys[4];
    CK_ULONG found = 0;
    CHECK(C_FindObjectsInit(session, template, 3), CKR_OK);
    CHECK(C_FindObjects(session, keys, 4, &found), CKR_OK);
    CHECK(C_FindObjectsFinal(session), CKR_OK);
    printf("keys found: %lu\n", (unsigned long)found);
    if (found != 1) {
        printf("FAILED: expected one key labelled %s\n", label);
        return 1;
    }

    size_t msg_len;
    unsigned char *msg = read_file(argv[5], &msg_len);
    CK_MECHANISM mech = { CKM_SHA256_RSA_PKCS, NULL, 0 };
    CHECK(C_SignInit(session, &mech, keys[0]), CKR_OK);
    /* The length first, then the signature, as most applications do. */
    CK_ULONG sig_len = 0;
    CHECK(C_Sign(session, msg, msg_len, NULL, &sig_len), CKR_OK);
    printf("signature length: %lu\n", (unsigned long)sig_len);
    unsigned char *sig = malloc(sig_len);
    CHECK(C_Sign(session, msg, msg_len, sig, &sig_len), CKR_OK);
    write_file(argv[6], sig, sig_len);
    printf("signed: %lu bytes\n", (unsigned long)sig_len);

    CHECK(C_Logout(session), CKR_OK);
    CHECK(C_CloseSession(session), CKR_OK);
    CHECK(C_Finalize(NULL), CKR_OK);
    printf("finalize: OK\n");

    /* A broken configuration: p11shim's own return code. */
    use_config(broken);
    CK_RV rv = C_Initialize(NULL);
    if (rv == CKR_P11SHIM_CONFIG_INVALID) {
        printf("broken config: CKR_P11SHIM_CONFIG_INVALID\n");
    } else {
        printf("FAILED: broken config: C_Initialize returned 0x%lx\n", (unsigned long)rv);
        return 1;
    }
    CHECK(C_GetSlotList(CK_TRUE, NULL, &count), CKR_CRYPTOKI_NOT_INITIALIZED);
    printf("after the failure: CKR_CRYPTOKI_NOT_INITIALIZED\n");

    free(msg);
    free(sig);
    return 0;
}
