/* A per-thread stack of same-size blocks; see recycle.h. */
#include "core/recycle.h"

#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

void tg_recycle_init(tg_recycle_t *r, size_t size, unsigned max) {
  r->size = size < sizeof(void *) ? sizeof(void *) : size;
  r->n = 0;
  r->max = max;
  r->top = NULL;
}

/* Unlinks the top block and returns it, unpoisoned. */
static void *pop(tg_recycle_t *r) {
  void *p = r->top;
  UNPOISON(p, r->size);
  memcpy(&r->top, p, sizeof(void *));
  r->n--;
  return p;
}

void *tg_recycle_alloc(tg_recycle_t *r) {
  if (r->n == 0)
    return malloc(r->size);
  return pop(r);
}

void tg_recycle_free(tg_recycle_t *r, void *p) {
  if (p == NULL)
    return;
  if (r->n >= r->max) {
    free(p);
    return;
  }
  memcpy(p, &r->top, sizeof(void *));
  POISON(p, r->size);
  r->top = p;
  r->n++;
}

void tg_recycle_clear(tg_recycle_t *r) {
  while (r->n > 0)
    free(pop(r));
}
