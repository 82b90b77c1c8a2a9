/* A per-thread stack of same-size blocks; see recycle.h. */
#include "core/recycle.h"

#include <stdlib.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

void tg_recycle_init(tg_recycle_t *r, size_t size) {
  r->size = size;
  r->n = 0;
}

void *tg_recycle_alloc(tg_recycle_t *r) {
  void *p;
  if (r->n == 0)
    return malloc(r->size);
  p = r->kept[--r->n];
  UNPOISON(p, r->size);
  return p;
}

void tg_recycle_free(tg_recycle_t *r, void *p) {
  if (p == NULL)
    return;
  if (r->n == TG_RECYCLE_MAX) {
    free(p);
    return;
  }
  POISON(p, r->size);
  r->kept[r->n++] = p;
}

void tg_recycle_clear(tg_recycle_t *r) {
  while (r->n > 0) {
    void *p = r->kept[--r->n];
    UNPOISON(p, r->size);
    free(p);
  }
}
