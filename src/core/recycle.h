/* Blocks of one size kept for reuse by one thread: the per-request objects
 * of a loop (a call, a transfer, an answer's first buffer) are allocated
 * and freed tens of thousands of times a second, at sizes past the C
 * library's per-thread cache, where each malloc() and free() costs a walk
 * of the shared bins. A freed block is kept (up to the recycle's max) and
 * handed out again as it is: callers initialise what they take. Kept
 * blocks form a stack linked through their first bytes, so the bound costs
 * no memory until blocks are kept.
 *
 * Not thread-safe: one recycle belongs to one loop thread. Under
 * AddressSanitizer a kept block is poisoned whole, so a use after free is
 * still reported. */
#ifndef TG_CORE_RECYCLE_H
#define TG_CORE_RECYCLE_H

#include <stddef.h>

/* What a loop keeps of each kind: enough for a thousand requests in flight
 * to end and the next thousand to start without malloc(). */
#define TG_RECYCLE_MAX 1024

typedef struct {
  size_t size;                   /* bytes of every block */
  unsigned n, max;               /* blocks kept, at most max */
  void *top;                     /* the last kept; its first bytes link the next */
} tg_recycle_t;

/* Sets up an empty recycle of blocks of size bytes (at least a pointer's)
 * that keeps at most max of them. */
void tg_recycle_init(tg_recycle_t *r, size_t size, unsigned max);

/* A block of r->size bytes, not cleared: a kept one or a new one from
 * malloc(). NULL when out of memory. */
void *tg_recycle_alloc(tg_recycle_t *r);

/* Takes back a block of tg_recycle_alloc (NULL is fine): kept, or freed
 * when r holds max already. */
void tg_recycle_free(tg_recycle_t *r, void *p);

/* Frees every kept block (r stays usable). */
void tg_recycle_clear(tg_recycle_t *r);

#endif
