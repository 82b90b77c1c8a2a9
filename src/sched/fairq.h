/* A fair queue of waiting requests for one model pool on one loop thread.
 *
 * Each tenant has its own FIFO; across tenants the queue is start-time fair
 * queuing: every tenant carries a virtual time that advances by 1/weight for
 * each of its requests served, and the waiting tenant with the smallest
 * virtual time goes next (ties: the one that started waiting first). With
 * equal weights tenants alternate; with weights 3:1 three requests of one
 * leave for each of the other's. A tenant that starts waiting takes the
 * current virtual time, so idling earns no credit, and one that floods the
 * queue waits behind its own requests, not in front of others'.
 *
 * The structure is single-threaded (its loop thread owns it) and intrusive:
 * a waiter lives inside the caller's request object, so pushing allocates
 * only for a tenant not seen before (or pruned since). The total length is
 * bounded by the caller (tg_fairq_len before tg_fairq_push); the tenant
 * nodes by tg_fairq_prune, which the caller runs now and then. */
#ifndef TG_SCHED_FAIRQ_H
#define TG_SCHED_FAIRQ_H

#include <stddef.h>
#include <stdint.h>

typedef struct tg_fq_tenant_s tg_fq_tenant_t;

typedef struct tg_fq_waiter_s {
  struct tg_fq_waiter_s *next, *prev;
  tg_fq_tenant_t *t;       /* NULL while not queued */
} tg_fq_waiter_t;

#define TG_FQ_BUCKETS 64
/* The heaviest weight (the config's largest priority class value); a
 * heavier one counts as this. */
#define TG_FQ_WEIGHT_MAX 1000000000u

typedef struct {
  tg_fq_tenant_t *buckets[TG_FQ_BUCKETS];  /* every tenant seen, by name */
  tg_fq_tenant_t *active, *active_tail;     /* tenants with waiters, in the
                                               order they started waiting */
  uint64_t vnow;           /* virtual time of the last request served */
  size_t len;              /* waiters queued */
  size_t n_tenants;        /* tenant nodes allocated */
} tg_fairq_t;

void tg_fairq_init(tg_fairq_t *q);
/* Frees the tenant nodes. The queue must be empty. */
void tg_fairq_fini(tg_fairq_t *q);

/* Queues w (not queued) behind tenant's earlier waiters; weight, 1 to
 * TG_FQ_WEIGHT_MAX, is the tenant's share (its priority class weight): only
 * ratios count. Returns 0, or TG_ENOMEM (w is then not queued). tenant is
 * copied. */
int tg_fairq_push(tg_fairq_t *q, const char *tenant, unsigned weight, tg_fq_waiter_t *w);

/* The waiter that leaves next, or NULL when the queue is empty. */
tg_fq_waiter_t *tg_fairq_peek(const tg_fairq_t *q);

/* Removes the waiter tg_fairq_peek() returned, as served: its tenant's
 * virtual time advances. */
void tg_fairq_pop(tg_fairq_t *q);

/* The waiter that leaves next among those skip(w, arg) does not pass over
 * (it returns nonzero for a waiter that cannot leave now): each tenant's
 * first such waiter, the tenants in their fair order. NULL when none. */
tg_fq_waiter_t *tg_fairq_peek_skip(const tg_fairq_t *q,
                                   int (*skip)(tg_fq_waiter_t *w, void *arg), void *arg);

/* Removes a queued waiter (one tg_fairq_peek_skip() returned) as served:
 * its tenant's virtual time advances. */
void tg_fairq_serve(tg_fairq_t *q, tg_fq_waiter_t *w);

/* Removes a queued waiter wherever it is (cancelled or timed out), without
 * advancing its tenant's virtual time. */
void tg_fairq_remove(tg_fairq_t *q, tg_fq_waiter_t *w);

/* Frees the nodes of tenants with no waiter that the queue no longer
 * needs, and returns how many: one whose virtual time the queue has
 * reached (back, it would start at the current time anyway, so no turn
 * changes), and, when gone is not NULL, one for which gone(tenant, arg)
 * returns nonzero (a tenant the config no longer has). A tenant with
 * waiters is always kept. */
size_t tg_fairq_prune(tg_fairq_t *q, int (*gone)(const char *tenant, void *arg), void *arg);

/* Waiters of tenant now queued (0 when the tenant has none). */
size_t tg_fairq_tenant_len(const tg_fairq_t *q, const char *tenant);

#endif
