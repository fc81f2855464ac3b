/* Initializes a PKCS#11 module on the main thread and finalizes it from an
 * exit handler, as OpenSSL's cleanup does. Usage: atexit MODULE.so */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef unsigned long CK_RV;
typedef CK_RV (*init_fn)(void *);

static init_fn finalize;

static void bye(void) {
  CK_RV rv = finalize(NULL);
  if (rv != 0) {
    fprintf(stderr, "C_Finalize: 0x%lx\n", rv);
    _Exit(3);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "%s\n", dlerror());
    return 2;
  }
  init_fn initialize = (init_fn)dlsym(lib, "C_Initialize");
  finalize = (init_fn)dlsym(lib, "C_Finalize");
  if (!initialize || !finalize || initialize(NULL) != 0) return 2;
  printf("initialized\n");
  atexit(bye);
  return 0;
}
