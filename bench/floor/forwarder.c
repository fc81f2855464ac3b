/*
 * The floor of a PKCS#11 forwarder, for the benchmark's micro-operations.
 *
 * A module that hands out SoftHSM2's own function list with four entries
 * replaced by functions that call SoftHSM2's: C_DigestInit, C_Digest,
 * C_OpenSession, C_CloseSession, C_Login and C_Logout. Built with -DBOOKKEEPING=1, the
 * session pair also does the least a module with handles of its own must
 * do: under a spin lock (one atomic exchange to take it, a plain store to
 * give it back), take a free entry of a preallocated table and count the
 * slot's sessions; publish a handle of its own that names the entry; on
 * every call find the entry and the vendor's handle from it; and on close
 * free the entry and count down under the lock again. That is two atomic
 * read-modify-writes per pair, no allocation, no hashing. It is a
 * measuring stick, not a module. `make bench-floor` builds both and runs
 * `p11shim-bench` on them in place of p11shim (P11SHIM_LIB).
 *
 * -DCHAIN=n adds a chain of n + 1 dependent loads (all in L1) to the
 * arguments of the vendor's C_OpenSession and C_CloseSession, as a module
 * that finds the vendor's slot or session through its own structures does.
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
#ifndef CHAIN
#define CHAIN -1
#endif

#if CHAIN >= 0
static struct hop {
	struct hop *next;
	unsigned long zero;
} hops[8];
static struct hop *volatile head;

/* 0, after CHAIN + 1 dependent loads. */
static unsigned long chase(void)
{
	struct hop *h = head;
	for (int i = 0; i < CHAIN; i++)
		h = h->next;
	return h->zero;
}

static void chain_init(void)
{
	for (int i = 0; i < 8; i++)
		hops[i].next = &hops[(i + 1) % 8];
	head = &hops[0];
}
#else
#define chase() 0UL
#define chain_init() ((void)0)
#endif

static CK_FUNCTION_LIST_PTR vendor;
static CK_FUNCTION_LIST list;
static pthread_once_t once = PTHREAD_ONCE_INIT;

#if BOOKKEEPING
#define ENTRIES 1024
static struct entry {
	unsigned long handle, vendor, generation;
} entries[ENTRIES];
static unsigned free_list[ENTRIES], free_len, made;
static unsigned long slot_sessions;
static char locked;

static void lock(void)
{
	while (__atomic_exchange_n(&locked, 1, __ATOMIC_ACQUIRE))
		while (__atomic_load_n(&locked, __ATOMIC_RELAXED))
			__builtin_ia32_pause();
}

static void unlock(void)
{
	__atomic_store_n(&locked, 0, __ATOMIC_RELEASE);
}

/* A handle is the entry's index and its generation. */
static struct entry *entry_of(CK_SESSION_HANDLE h)
{
	struct entry *e = &entries[h % ENTRIES];
	return h && __atomic_load_n(&e->handle, __ATOMIC_ACQUIRE) == h ? e : NULL;
}

#define VENDOR(h)                                              \
	struct entry *e_ = entry_of(h);                        \
	if (!e_)                                               \
		return CKR_SESSION_HANDLE_INVALID;             \
	h = e_->vendor
#else
#define VENDOR(h) (void)0
#endif

static CK_RV digest_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m)
{
	VENDOR(s);
	return vendor->C_DigestInit(s, m);
}

static CK_RV digest(CK_SESSION_HANDLE s, CK_BYTE_PTR d, CK_ULONG n, CK_BYTE_PTR out,
		    CK_ULONG_PTR out_len)
{
	VENDOR(s);
	return vendor->C_Digest(s, d, n, out, out_len);
}

static CK_RV login(CK_SESSION_HANDLE s, CK_USER_TYPE u, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	VENDOR(s);
	return vendor->C_Login(s, u, pin, len);
}

static CK_RV logout(CK_SESSION_HANDLE s)
{
	VENDOR(s);
	return vendor->C_Logout(s);
}

static CK_RV open_session(CK_SLOT_ID slot, CK_FLAGS flags, void *app, CK_NOTIFY notify,
			  CK_SESSION_HANDLE_PTR out)
{
	CK_RV rv = vendor->C_OpenSession(slot + chase(), flags, app, notify, out);
	if (rv != CKR_OK)
		return rv;
#if BOOKKEEPING
	lock();
	unsigned i = free_len ? free_list[--free_len] : made < ENTRIES ? made++ : ENTRIES;
	if (i == ENTRIES) {
		unlock();
		vendor->C_CloseSession(*out);
		return CKR_SESSION_COUNT;
	}
	slot_sessions++;
	unlock();
	struct entry *e = &entries[i];
	e->vendor = *out;
	*out = ++e->generation * ENTRIES + i;
	__atomic_store_n(&e->handle, *out, __ATOMIC_RELEASE);
#endif
	return rv;
}

static CK_RV close_session(CK_SESSION_HANDLE s)
{
#if BOOKKEEPING
	struct entry *e = entry_of(s);
	if (!e)
		return CKR_SESSION_HANDLE_INVALID;
	CK_RV rv = vendor->C_CloseSession(e->vendor + chase());
	lock();
	if (e->handle != s) {
		unlock();
		return CKR_SESSION_HANDLE_INVALID;
	}
	e->handle = 0;
	free_list[free_len++] = (unsigned)(e - entries);
	int last = --slot_sessions == 0;
	unlock();
	(void)last;
	return rv;
#else
	return vendor->C_CloseSession(s);
#endif
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
	chain_init();
	memcpy(&list, vendor, sizeof list);
	list.C_DigestInit = digest_init;
	list.C_Digest = digest;
	list.C_OpenSession = open_session;
	list.C_CloseSession = close_session;
	list.C_Login = login;
	list.C_Logout = logout;
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
