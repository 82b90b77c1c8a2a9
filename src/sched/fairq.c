/* Start-time fair queuing over per-tenant FIFOs; see fairq.h.
 *
 * Tenants with waiters sit on an active list in the order they started
 * waiting; the next waiter is the head of the active tenant with the
 * smallest virtual time (a scan: the tenants waiting for one pool on one
 * loop are few). A tenant node stays allocated while it waits and while its
 * virtual time is ahead of the queue's, so the hot path allocates nothing
 * for a tenant that keeps coming back; tg_fairq_prune frees the others. */
#include "sched/fairq.h"

#include <stdlib.h>
#include <string.h>

#include "core/err.h"

/* Virtual time per request at weight 1. At the heaviest weight
 * (TG_FQ_WEIGHT_MAX, 10^9) a request still advances ~1.1 million, so shares
 * keep their ratio to within a millionth.
 *
 * Virtual times wrap (a weight-1 tenant after 2^14 requests) and are
 * compared by their difference, which stays small: an active tenant is at
 * most one of its own increments (VT_SCALE / weight) ahead of vnow, and
 * vnow never goes back. A tenant that stopped waiting keeps its time; on its
 * return, a time more than VT_SCALE ahead of vnow can only be one vnow
 * overtook meanwhile (any distance, wrapped), and it restarts at vnow. */
#define VT_SCALE (UINT64_C(1) << 50)
_Static_assert(VT_SCALE / TG_FQ_WEIGHT_MAX > (1u << 20), "shares lose precision");

/* a before b in virtual time */
static int vt_before(uint64_t a, uint64_t b) {
  return (int64_t)(a - b) < 0;
}

struct tg_fq_tenant_s {
  tg_fq_tenant_t *hnext;           /* bucket chain */
  tg_fq_tenant_t *anext, *aprev;   /* active list */
  int active;
  tg_fq_waiter_t *head, *tail;
  size_t n;
  unsigned weight;
  uint64_t vtime;
  char name[];
};

static size_t bucket_of(const char *s) {
  uint32_t h = 2166136261u;
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 16777619u;
  return h % TG_FQ_BUCKETS;
}

static tg_fq_tenant_t *lookup(const tg_fairq_t *q, const char *name) {
  tg_fq_tenant_t *t;
  for (t = q->buckets[bucket_of(name)]; t != NULL; t = t->hnext)
    if (strcmp(t->name, name) == 0)
      return t;
  return NULL;
}

void tg_fairq_init(tg_fairq_t *q) {
  memset(q, 0, sizeof(*q));
}

void tg_fairq_fini(tg_fairq_t *q) {
  size_t i;
  for (i = 0; i < TG_FQ_BUCKETS; i++) {
    tg_fq_tenant_t *t = q->buckets[i], *next;
    for (; t != NULL; t = next) {
      next = t->hnext;
      free(t);
    }
  }
  memset(q, 0, sizeof(*q));
}

static void deactivate(tg_fairq_t *q, tg_fq_tenant_t *t) {
  if (!t->active)
    return;
  t->active = 0;
  if (t->aprev)
    t->aprev->anext = t->anext;
  else
    q->active = t->anext;
  if (t->anext)
    t->anext->aprev = t->aprev;
  else
    q->active_tail = t->aprev;
  t->anext = t->aprev = NULL;
}

/* A tenant coming back at t's virtual time would restart at vnow: vnow has
 * reached it, or overtook it by any (wrapped) distance. */
static int overtaken(const tg_fairq_t *q, const tg_fq_tenant_t *t) {
  return t->vtime == q->vnow || t->vtime - q->vnow > VT_SCALE;
}

int tg_fairq_push(tg_fairq_t *q, const char *tenant, unsigned weight, tg_fq_waiter_t *w) {
  tg_fq_tenant_t *t = lookup(q, tenant);

  if (t == NULL) {
    size_t n = strlen(tenant);
    size_t b = bucket_of(tenant);
    t = calloc(1, sizeof(*t) + n + 1);
    if (t == NULL)
      return TG_ENOMEM;
    memcpy(t->name, tenant, n + 1);
    t->vtime = q->vnow;
    t->hnext = q->buckets[b];
    q->buckets[b] = t;
    q->n_tenants++;
  }
  t->weight = weight < 1 ? 1 : weight > TG_FQ_WEIGHT_MAX ? TG_FQ_WEIGHT_MAX : weight;
  w->t = t;
  w->next = NULL;
  w->prev = t->tail;
  if (t->tail)
    t->tail->next = w;
  else
    t->head = w;
  t->tail = w;
  t->n++;
  q->len++;
  if (!t->active) {
    /* starts at the current virtual time: waiting later earns no credit */
    if (overtaken(q, t))
      t->vtime = q->vnow;
    t->active = 1;
    t->aprev = q->active_tail;
    t->anext = NULL;
    if (q->active_tail)
      q->active_tail->anext = t;
    else
      q->active = t;
    q->active_tail = t;
  }
  return 0;
}

/* The active tenant whose request leaves next. */
static tg_fq_tenant_t *next_tenant(const tg_fairq_t *q) {
  tg_fq_tenant_t *t, *best = q->active;
  for (t = best ? best->anext : NULL; t != NULL; t = t->anext)
    if (vt_before(t->vtime, best->vtime))
      best = t;
  return best;
}

tg_fq_waiter_t *tg_fairq_peek(const tg_fairq_t *q) {
  tg_fq_tenant_t *t = next_tenant(q);
  return t ? t->head : NULL;
}

static void unlink_waiter(tg_fairq_t *q, tg_fq_waiter_t *w) {
  tg_fq_tenant_t *t = w->t;
  if (w->prev)
    w->prev->next = w->next;
  else
    t->head = w->next;
  if (w->next)
    w->next->prev = w->prev;
  else
    t->tail = w->prev;
  w->next = w->prev = NULL;
  w->t = NULL;
  t->n--;
  q->len--;
}

void tg_fairq_serve(tg_fairq_t *q, tg_fq_waiter_t *w) {
  tg_fq_tenant_t *t = w->t;
  if (t == NULL)
    return;
  unlink_waiter(q, w);
  q->vnow = t->vtime;
  t->vtime += VT_SCALE / t->weight;
  if (t->n == 0)
    deactivate(q, t);
}

void tg_fairq_pop(tg_fairq_t *q) {
  tg_fq_tenant_t *t = next_tenant(q);
  if (t != NULL && t->head != NULL)
    tg_fairq_serve(q, t->head);
}

tg_fq_waiter_t *tg_fairq_peek_skip(const tg_fairq_t *q,
                                   int (*skip)(tg_fq_waiter_t *w, void *arg), void *arg) {
  tg_fq_tenant_t *t, *best = NULL;
  tg_fq_waiter_t *w, *found = NULL;
  for (t = q->active; t != NULL; t = t->anext) {
    if (best != NULL && !vt_before(t->vtime, best->vtime))
      continue;
    for (w = t->head; w != NULL && skip(w, arg); w = w->next)
      ;
    if (w != NULL) {
      best = t;
      found = w;
    }
  }
  return found;
}

void tg_fairq_remove(tg_fairq_t *q, tg_fq_waiter_t *w) {
  tg_fq_tenant_t *t = w->t;
  if (t == NULL)
    return;
  unlink_waiter(q, w);
  if (t->n == 0)
    deactivate(q, t);
}

size_t tg_fairq_prune(tg_fairq_t *q, int (*gone)(const char *tenant, void *arg), void *arg) {
  size_t i, freed = 0;
  for (i = 0; i < TG_FQ_BUCKETS; i++) {
    tg_fq_tenant_t **pp = &q->buckets[i], *t;
    while ((t = *pp) != NULL) {
      if (t->n == 0 && (overtaken(q, t) || (gone != NULL && gone(t->name, arg)))) {
        *pp = t->hnext;
        free(t);
        q->n_tenants--;
        freed++;
      } else {
        pp = &t->hnext;
      }
    }
  }
  return freed;
}

size_t tg_fairq_tenant_len(const tg_fairq_t *q, const char *tenant) {
  const tg_fq_tenant_t *t = lookup(q, tenant);
  return t ? t->n : 0;
}
