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

/* C_Sign, C_Encrypt...: the member serving the session failed during an
 * operation that could not be carried over to another member (its input
 * outgrew the slot's replay_limit, its mechanism parameter could not be
 * kept, or the slot has one member). The session still works: start the
 * operation again. */
#define CKR_P11SHIM_OPERATION_LOST          (CKR_VENDOR_DEFINED | 0x50530004UL)
/* C_GenerateKey, C_GenerateKeyPair: a token key generated on one member of
 * a multi-member slot would not reach the others (set allow_unreplicated
 * on the slot to accept that). */
#define CKR_P11SHIM_NOT_REPLICATED          (CKR_VENDOR_DEFINED | 0x50530005UL)
/* Any security-relevant call (C_Login, C_Logout, a key's *Init, key
 * management) with [audit] on_failure = "fail-closed": the audit log cannot
 * take the call's record (its queue is full or its sink is failing), so the
 * call is refused. It succeeds again once records can be written. */
#define CKR_P11SHIM_AUDIT_UNAVAILABLE       (CKR_VENDOR_DEFINED | 0x50530006UL)

/* The interface name of the standard function lists (C_GetInterface). */
#define P11SHIM_PKCS11_INTERFACE "PKCS 11"

/*
 * p11shim's own interface, version 1.0:
 *
 *     CK_INTERFACE_PTR iface;
 *     C_GetInterface((CK_UTF8CHAR_PTR)P11SHIM_INTERFACE, NULL, &iface, 0);
 *     P11SHIM_FUNCTION_LIST *p11shim = iface->pFunctionList;
 */
#define P11SHIM_INTERFACE "p11shim"

typedef struct P11SHIM_FUNCTION_LIST {
  CK_VERSION version; /* 1.0 */
  /* The status of every virtual slot and of its members, as JSON text
   * (UTF-8, not NUL-terminated), with the PKCS#11 two-call convention:
   * pJson NULL returns the length in *pulLen; a buffer too small gives
   * CKR_BUFFER_TOO_SMALL. Requires C_Initialize.
   *
   *   {"module":"p11shim","version":"0.1.0","config":"/etc/...",
   *    "recovery_thread":true,
   *    "slots":[{"id":0,"label":"payments","serial":"...","logged_in":true,
   *              "sessions":3,
   *              "members":[{"name":"payments#0","library":"/usr/lib/...",
   *                          "token":"token \"ha-a\"","state":"active",
   *                          "standby":false,"weight":1,"sessions":2,
   *                          "inflight":0,"missed_changes":0,
   *                          "logged_in":true,"latency_us":41,
   *                          "sampled_calls":120,"errors":0,"failovers":0,
   *                          "recoveries":0,"down_ms":null}, ...]}],
   *    "credentials":{...},          with [broker]; else null
   *    "acl":{"source":"config","role":"web","rules":2,"epoch":1},
   *                                  with [acl]; else null
   *    "audit":{"chain":"9f...","healthy":true,"written":1200,"lost":0,
   *             "queued":0,"sink_errors":0,"checkpoints":2}}
   *                                  with [audit]; else null
   *
   * A member's state is "active", "standby", "down", "recovering" (a
   * probe is logging it in and giving it what it missed) or "absent" (its
   * token was never found). */
  CK_RV (*P11shim_GetStatus)(CK_UTF8CHAR_PTR pJson, CK_ULONG_PTR pulLen);
} P11SHIM_FUNCTION_LIST;

#ifdef __cplusplus
}
#endif

#endif /* P11SHIM_H */
