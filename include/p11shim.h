/*
 * p11shim.h: the extensions of p11shim to the PKCS#11 API.
 *
 * Include it after a standard PKCS#11 header, for example p11-kit's:
 *
 *     #include <p11-kit/pkcs11.h>
 *     #include <p11shim.h>
 *
 * and link with -lp11shim, or load libp11shim.so with dlopen() and call
 * C_GetFunctionList / C_GetInterface as with any PKCS#11 module.
 */
#ifndef P11SHIM_H
#define P11SHIM_H

#ifdef __cplusplus
extern "C" {
#endif

#ifndef CKR_VENDOR_DEFINED
#error "include a standard pkcs11.h before p11shim.h"
#endif

/*
 * Vendor-defined return codes. Every other code a function returns is a
 * standard one, or a vendor library's own code passed through unchanged.
 */

/* C_Initialize: the configuration file is missing or invalid. The log
 * names the file, the line and the key. */
#define CKR_P11SHIM_CONFIG_INVALID          (CKR_VENDOR_DEFINED | 0x50530001UL)
/* C_Initialize: a configured vendor library could not be loaded or
 * initialized. */
#define CKR_P11SHIM_BACKEND_UNAVAILABLE     (CKR_VENDOR_DEFINED | 0x50530002UL)
/* C_Login: the slot's configured PIN source (env: or file:) could not be
 * read. */
#define CKR_P11SHIM_PIN_SOURCE_UNAVAILABLE  (CKR_VENDOR_DEFINED | 0x50530003UL)

/* The interface name of the standard function lists (C_GetInterface). */
#define P11SHIM_PKCS11_INTERFACE "PKCS 11"

#ifdef __cplusplus
}
#endif

#endif /* P11SHIM_H */
