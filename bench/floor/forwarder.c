/*
 * The floor of a PKCS#11 forwarder, for the benchmark's micro-operations.
 *
 * A module that hands out SoftHSM2's own function list with four entries
 * replaced by functions that call SoftHSM2's: C_DigestInit, C_Digest,
 * C_OpenSession and C_CloseSession. Built with -DBOOKKEEPING=1, the
 * session pair also does the least a module with handles of its own must
 * do: take a handle from a shared counter, allocate the session's state,
 * enter it into a table under a write lock and remove it again, and count
 * the slot's sessions (8 atomic read-modify-writes and a malloc/free per
 * pair, no hashing). No session handle is translated: it is a measuring
 * stick, not a module. `make bench-floor` builds both and runs
 * `p11shim-bench` on them in place of p11shim (P11SHIM_LIB).
 */
#define CK_PTR *
#define CK_DECLARE_FUNCTION(rv, name) rv name
#define CK_DECLARE_FUNCTION_POINTER(rv, name) rv (*name)
#define CK_CALLBACK_FUNCTION(rv, name) rv (*name)
#ifndef NULL_PTR
#define NULL_PTR 0
#endif
#include <p11-kit-1/p11-kit/pkcs11.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifndef BOOKKEEPING
#define BOOKKEEPING 0
#endif

static CK_FUNCTION_LIST_PTR vendor;
static CK_FUNCTION_LIST list;
static pthread_once_t once = PTHREAD_ONCE_INIT;

#if BOOKKEEPING
static unsigned long next_handle = 0x10000, slot_sessions;
static pthread_rwlock_t table = PTHREAD_RWLOCK_INITIALIZER;
static void *state;
#endif

static CK_RV digest_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m)
{
	return vendor->C_DigestInit(s, m);
}

static CK_RV digest(CK_SESSION_HANDLE s, CK_BYTE_PTR d, CK_ULONG n, CK_BYTE_PTR out,
		    CK_ULONG_PTR out_len)
{
	return vendor->C_Digest(s, d, n, out, out_len);
}

static CK_RV open_session(CK_SLOT_ID slot, CK_FLAGS flags, void *app, CK_NOTIFY notify,
			  CK_SESSION_HANDLE_PTR out)
{
	CK_RV rv = vendor->C_OpenSession(slot, flags, app, notify, out);
	if (rv != CKR_OK)
		return rv;
#if BOOKKEEPING
	__atomic_fetch_add(&next_handle, 1, __ATOMIC_RELAXED);
	void *p = calloc(1, 160);
	pthread_rwlock_wrlock(&table);
	void *old = state;
	state = p;
	pthread_rwlock_unlock(&table);
	free(old);
	__atomic_fetch_add(&slot_sessions, 1, __ATOMIC_ACQ_REL);
#endif
	return rv;
}

static CK_RV close_session(CK_SESSION_HANDLE s)
{
#if BOOKKEEPING
	pthread_rwlock_wrlock(&table);
	void *p = state;
	state = NULL;
	pthread_rwlock_unlock(&table);
	free(p);
	__atomic_fetch_sub(&slot_sessions, 1, __ATOMIC_ACQ_REL);
#endif
	return vendor->C_CloseSession(s);
}

static void load(void)
{
	const char *path = getenv("SOFTHSM2_LIB");
	void *h = dlopen(path ? path : "/usr/lib/softhsm/libsofthsm2.so", RTLD_NOW | RTLD_LOCAL);
	if (!h)
		return;
	CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
	if (!get || get(&vendor) != CKR_OK)
		return;
	memcpy(&list, vendor, sizeof list);
	list.C_DigestInit = digest_init;
	list.C_Digest = digest;
	list.C_OpenSession = open_session;
	list.C_CloseSession = close_session;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
	if (!out)
		return CKR_ARGUMENTS_BAD;
	pthread_once(&once, load);
	if (!vendor)
		return CKR_GENERAL_ERROR;
	*out = &list;
	return CKR_OK;
}
