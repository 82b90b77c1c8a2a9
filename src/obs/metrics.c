/* Per-thread metric tables and their Prometheus rendering; see metrics.h.
 *
 * A worker's table is an array of entries that never move, found through an
 * index (open addressing, linear probing) only the owner thread reads. The
 * owner fills a free entry's fields, then publishes its key with a release
 * store; it also lists the entries it fills, in order, and publishes their
 * count (`used`) with a release store, so a scrape visits the keys
 * published without walking the table. Entries are removed only by
 * tg_metrics_prune() on the owner thread under the metrics lock, which a
 * scrape holds from its first read of the tables to its last: the list is
 * compacted and the index rebuilt there, and a scrape never sees either
 * half done.
 * Counters are 64-bit relaxed atomics written by one thread only, so an
 * increment is a plain load and store (no locked instruction): a reader
 * never sees a torn value, and there is no other writer to lose. */
#include "obs/metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "core/err.h"

#define TABLE_SIZE 16384           /* index slots per worker (power of two) */
#define MAX_KEYS 8192              /* keys a table takes: at most half full, so a
                                    * lookup of a key it lacks (every request of a
                                    * pair past the bound) ends within a few probes,
                                    * not after a walk of the whole table */
#define ERR_SLOTS 8                /* distinct error codes per entry */
#define N_LIMITS 9                 /* tg_limit_kind_t, then LIM_QUEUE */
#define LIM_QUEUE 8                /* shed: the model's pool was saturated */
#define OTHER TG_METRICS_OTHER     /* the tenant past a full table, with model "" */
#define GONE_KEEP_NS (600 * UINT64_C(1000000000)) /* a gone tenant's entry is freed
                                    * after a scrape showed it, or after this
                                    * long when nothing scrapes */

_Static_assert(MAX_KEYS <= UINT16_MAX, "an entry's index + 1 fits table_t.at");
_Static_assert(MAX_KEYS <= TABLE_SIZE / 2, "tables stay at most half full");

static const double dur_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                    2.5,   5,    10,    30,   60,  120};
#define N_DUR (sizeof(dur_bounds) / sizeof(dur_bounds[0]))
static const double ovh_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                    0.005,  0.01,    0.025,  0.05,  0.1};
#define N_OVH (sizeof(ovh_bounds) / sizeof(ovh_bounds[0]))

typedef _Atomic uint64_t ctr_t;

typedef struct {
  ctr_t b[N_DUR + 1];              /* per bucket (not cumulative); last = +Inf */
  ctr_t sum_us;
  ctr_t count;
} hist_t;

typedef struct {
  _Atomic(const char *) key;       /* "tenant\0model\0", owned; NULL = free */
  uint64_t hash;
  ctr_t requests;
  ctr_t rejections[N_LIMITS];
  _Atomic int err_code[ERR_SLOTS];
  ctr_t err_count[ERR_SLOTS];
  ctr_t err_other;
  ctr_t prompt_tokens, completion_tokens;
  _Atomic int64_t inflight;        /* attempts holding an endpoint slot */
  _Atomic int64_t queued;          /* requests waiting for a slot */
  hist_t dur, ttft;
  _Atomic int holders;             /* calls holding it (tg_metrics_slot; owner writes) */
  /* under the metrics lock (tg_metrics_prune, a scrape) */
  uint64_t gone_mark;              /* 0: its tenant is configured or a call holds
                                    * it; else 1 + the scrapes begun when the
                                    * owner found it gone and quiet */
  uint64_t gone_ns, gone_requests; /* when, and its requests then */
  _Atomic int dead;                /* a scrape showed its tenant's last figures:
                                    * no scrape shows it again, no lookup finds
                                    * it, the owner frees it */
} entry_t;

typedef struct {
  entry_t *e;                      /* MAX_KEYS entries, never moved */
  uint16_t *at;                    /* TABLE_SIZE: 1 + the index in e of the key
                                    * hashed there; 0 empty (owner only) */
  uint16_t *order;                 /* indexes in e of the keys, in the order added (MAX_KEYS) */
  _Atomic size_t used;             /* keys published (written by the owner only) */
  uint16_t *spare;                 /* entries pruned, reused first (owner only) */
  size_t n_spare, n_made;          /* (owner only) */
  ctr_t overflow;                  /* requests counted under "_other" */
  ctr_t ovh_b[N_OVH + 1];
  ctr_t ovh_sum_us, ovh_count;
} table_t;

typedef struct event_s {
  struct event_s *next;
  uint64_t gone_mark, gone_ns, gone_n; /* as entry_t's, under ev_lock */
  ctr_t day, month;
  char tenant[];
} event_t;

struct tg_metrics_s {
  size_t n;
  table_t *t;
  pthread_mutex_t lock;            /* a scrape's reads against tg_metrics_prune() */
  uint64_t scrapes;                /* scrapes begun (under lock) */
  atomic_int said_full;            /* the stderr line on a full table was written */
  ctr_t reloads, reload_failures;
  ctr_t purges, purge_failures, purged;
  pthread_mutex_t ev_lock;         /* events and ev_scrapes */
  event_t *events;                 /* budget events by tenant */
  uint64_t ev_scrapes;             /* scrapes that showed the events */
};

static uint64_t hash2(const char *a, const char *b) {
  uint64_t h = 1469598103934665603ULL;
  for (; *a; a++) h = (h ^ (unsigned char)*a) * 1099511628211ULL;
  h = (h ^ 0xff) * 1099511628211ULL;
  for (; *b; b++) h = (h ^ (unsigned char)*b) * 1099511628211ULL;
  return h;
}

static int key_eq(const char *key, const char *tenant, const char *model) {
  size_t tl = strlen(tenant);
  return strncmp(key, tenant, tl) == 0 && key[tl] == '\0' && strcmp(key + tl + 1, model) == 0;
}

/* Only for counters with one writer (a worker's own table). */
static void inc(ctr_t *c, uint64_t v) {
  atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
                        memory_order_relaxed);
}

/* Puts entry idx (key hash h) in t's index. */
static void index_put(table_t *t, uint16_t idx, uint64_t h) {
  size_t i, mask = TABLE_SIZE - 1;
  for (i = h & mask; t->at[i] != 0; i = (i + 1) & mask)
    ;
  t->at[i] = (uint16_t)(idx + 1);
}

/* Finds (tenant, model) in t; the owner may add it (add != 0, and fewer
 * than MAX_KEYS keys: the index is at most half full, so a probe ends). */
static entry_t *find(table_t *t, const char *tenant, const char *model, uint64_t h, int add) {
  size_t i, mask = TABLE_SIZE - 1, tl, ml, used;
  uint16_t idx;
  entry_t *e;
  char *nk;
  for (i = h & mask; t->at[i] != 0; i = (i + 1) & mask) {
    e = &t->e[t->at[i] - 1];
    if (e->hash == h && !atomic_load_explicit(&e->dead, memory_order_relaxed) &&
        key_eq(atomic_load_explicit(&e->key, memory_order_relaxed), tenant, model))
      return e;
  }
  if (!add)
    return NULL;
  tl = strlen(tenant);
  ml = strlen(model);
  nk = malloc(tl + ml + 2);
  if (nk == NULL)
    return NULL;
  memcpy(nk, tenant, tl + 1);
  memcpy(nk + tl + 1, model, ml + 1);
  idx = t->n_spare > 0 ? t->spare[--t->n_spare] : (uint16_t)t->n_made++;
  e = &t->e[idx];
  e->hash = h;
  atomic_store_explicit(&e->key, nk, memory_order_release);
  t->at[i] = (uint16_t)(idx + 1);
  used = atomic_load_explicit(&t->used, memory_order_relaxed);
  t->order[used] = idx;
  atomic_store_explicit(&t->used, used + 1, memory_order_release);
  return e;
}

/* Finds (tenant, model) in worker w's table, adding it; past the table's
 * bound, the "_other" entry. The last free slot is kept for "_other": a
 * table filled by other keys would have no room left for it. */
static entry_t *entry_of(tg_metrics_t *m, size_t w, const char *tenant, const char *model) {
  table_t *t = &m->t[w];
  int add = atomic_load_explicit(&t->used, memory_order_relaxed) < MAX_KEYS - 1;
  entry_t *e = find(t, tenant, model, hash2(tenant, model), add);
  if (e != NULL)
    return e;
  inc(&t->overflow, 1);
  if (!add && !atomic_exchange(&m->said_full, 1))
    fprintf(stderr, "tollgate: metrics: a worker's table is full (%d tenant and model pairs): "
                    "requests of other pairs count under tenant \"%s\" "
                    "(llm_metrics_overflow_requests_total) until tenants leave the config\n",
            MAX_KEYS - 1, OTHER);
  return find(t, OTHER, "", hash2(OTHER, ""), 1);
}

int tg_metrics_new(size_t n_workers, tg_metrics_t **out) {
  tg_metrics_t *m = calloc(1, sizeof(*m));
  size_t i;

  if (m == NULL)
    return TG_ENOMEM;
  m->n = n_workers;
  m->t = calloc(n_workers ? n_workers : 1, sizeof(*m->t));
  if (m->t == NULL || pthread_mutex_init(&m->lock, NULL) != 0) {
    free(m->t);
    free(m);
    return TG_ENOMEM;
  }
  if (pthread_mutex_init(&m->ev_lock, NULL) != 0) {
    pthread_mutex_destroy(&m->lock);
    free(m->t);
    free(m);
    return TG_ENOMEM;
  }
  for (i = 0; i < n_workers; i++) {
    /* calloc of a large block maps zero pages: untouched entries cost no RAM */
    m->t[i].e = calloc(MAX_KEYS, sizeof(entry_t));
    m->t[i].at = calloc(TABLE_SIZE, sizeof(*m->t[i].at));
    m->t[i].order = malloc(MAX_KEYS * sizeof(*m->t[i].order));
    m->t[i].spare = malloc(MAX_KEYS * sizeof(*m->t[i].spare));
    if (m->t[i].e == NULL || m->t[i].at == NULL || m->t[i].order == NULL ||
        m->t[i].spare == NULL) {
      tg_metrics_free(m);
      return TG_ENOMEM;
    }
  }
  *out = m;
  return 0;
}

void tg_metrics_free(tg_metrics_t *m) {
  size_t i, j;
  event_t *ev, *next;

  if (m == NULL)
    return;
  for (i = 0; i < m->n; i++) {
    for (j = 0; m->t[i].e && j < MAX_KEYS; j++)
      free((void *)atomic_load(&m->t[i].e[j].key));
    free(m->t[i].e);
    free(m->t[i].at);
    free(m->t[i].order);
    free(m->t[i].spare);
  }
  pthread_mutex_destroy(&m->lock);
  pthread_mutex_destroy(&m->ev_lock);
  for (ev = m->events; ev; ev = next) {
    next = ev->next;
    free(ev);
  }
  free(m->t);
  free(m);
}

static void hist_add(ctr_t *b, const double *bounds, size_t nb, ctr_t *sum_us, ctr_t *count,
                     double v) {
  size_t i = 0;
  while (i < nb && v > bounds[i])
    i++;
  inc(&b[i], 1);
  inc(sum_us, (uint64_t)(v * 1e6));
  inc(count, 1);
}

void tg_metrics_observe(tg_metrics_t *m, size_t w, const tg_metrics_obs_t *o) {
  table_t *t;
  entry_t *e;
  const char *model;
  int i;

  if (m == NULL || w >= m->n)
    return;
  t = &m->t[w];
  if (o->overhead_s >= 0)
    hist_add(t->ovh_b, ovh_bounds, N_OVH, &t->ovh_sum_us, &t->ovh_count, o->overhead_s);
  if (o->tenant == NULL)
    return;
  model = o->model ? o->model : "";
  e = o->slot ? (entry_t *)o->slot : entry_of(m, w, o->tenant, model);
  if (e == NULL)
    return;
  inc(&e->requests, 1);
  if (o->refused != TG_LIMIT_NONE && o->refused != TG_LIMIT_UNAVAILABLE) {
    inc(&e->rejections[(unsigned)o->refused % LIM_QUEUE], 1);
  } else if (o->shed) {
    inc(&e->rejections[LIM_QUEUE], 1);
  } else if (o->status >= 400) {
    for (i = 0; i < ERR_SLOTS; i++) {
      int c = atomic_load_explicit(&e->err_code[i], memory_order_relaxed);
      if (c == o->status)
        break;
      if (c == 0) {
        atomic_store_explicit(&e->err_code[i], o->status, memory_order_release);
        break;
      }
    }
    if (i < ERR_SLOTS)
      inc(&e->err_count[i], 1);
    else
      inc(&e->err_other, 1);
  }
  if (o->prompt_tokens > 0)
    inc(&e->prompt_tokens, (uint64_t)o->prompt_tokens);
  if (o->completion_tokens > 0)
    inc(&e->completion_tokens, (uint64_t)o->completion_tokens);
  if (model[0] != '\0') {
    hist_add(e->dur.b, dur_bounds, N_DUR, &e->dur.sum_us, &e->dur.count, o->duration_s);
    if (o->ttft_s >= 0)
      hist_add(e->ttft.b, dur_bounds, N_DUR, &e->ttft.sum_us, &e->ttft.count, o->ttft_s);
  }
}

static void hold(entry_t *e, int delta) {
  atomic_store_explicit(&e->holders, atomic_load_explicit(&e->holders, memory_order_relaxed) + delta,
                        memory_order_relaxed);
}

void *tg_metrics_slot(tg_metrics_t *m, size_t w, const char *tenant, const char *model) {
  entry_t *e;
  if (m == NULL || w >= m->n || tenant == NULL || model == NULL)
    return NULL;
  e = entry_of(m, w, tenant, model);
  if (e != NULL)
    hold(e, 1);
  return e;
}

/* Only for gauges with one writer (a worker's own table). */
static void gauge_add(_Atomic int64_t *g, int delta) {
  atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + delta,
                        memory_order_relaxed);
}

void tg_metrics_slot_put(void *slot) {
  if (slot != NULL)
    hold((entry_t *)slot, -1);
}

/* Budget events are rare (a threshold crossed, twice a window per tenant
 * at most): a short lock, never held across anything that waits. */
void tg_metrics_budget_event(tg_metrics_t *m, const char *tenant, int month) {
  event_t *ev;
  size_t n;

  if (m == NULL)
    return;
  pthread_mutex_lock(&m->ev_lock);
  for (ev = m->events; ev != NULL; ev = ev->next)
    if (strcmp(ev->tenant, tenant) == 0)
      break;
  if (ev == NULL) {
    n = strlen(tenant);
    ev = calloc(1, sizeof(*ev) + n + 1);
    if (ev != NULL) {
      memcpy(ev->tenant, tenant, n + 1);
      ev->next = m->events;
      m->events = ev;
    }
  }
  if (ev != NULL)
    atomic_fetch_add_explicit(month ? &ev->month : &ev->day, 1, memory_order_relaxed);
  pthread_mutex_unlock(&m->ev_lock);
}

/* Frees the events of tenants that left the config once a scrape has shown
 * their last counts (or GONE_KEEP_NS went by without one), like the
 * tables' entries. Never waits. */
static void events_prune(tg_metrics_t *m, int (*gone)(const char *tenant, void *arg), void *arg,
                         uint64_t now_ns) {
  event_t **pp, *ev;
  if (pthread_mutex_trylock(&m->ev_lock) != 0)
    return;
  for (pp = &m->events; (ev = *pp) != NULL;) {
    uint64_t n = atomic_load(&ev->day) + atomic_load(&ev->month);
    if (!gone(ev->tenant, arg)) {
      ev->gone_mark = 0;
    } else if (ev->gone_mark == 0 || n != ev->gone_n) {
      ev->gone_mark = m->ev_scrapes + 1;
      ev->gone_ns = now_ns;
      ev->gone_n = n;
    } else if (m->ev_scrapes >= ev->gone_mark || now_ns - ev->gone_ns >= GONE_KEEP_NS) {
      *pp = ev->next;
      free(ev);
      continue;
    }
    pp = &ev->next;
  }
  pthread_mutex_unlock(&m->ev_lock);
}

/* 1 when e may be freed now: a scrape showed its tenant's last figures
 * (entry_quiet) and no call holds it, or its tenant left the config and
 * nothing scraped for GONE_KEEP_NS. Otherwise notes whether its tenant is
 * gone and it is quiet, for the next scrape. Under m->lock. */
static int prunable(tg_metrics_t *m, entry_t *e, const char *key,
                    int (*gone)(const char *tenant, void *arg), void *arg, uint64_t now_ns) {
  uint64_t requests = atomic_load_explicit(&e->requests, memory_order_relaxed);
  int held = atomic_load_explicit(&e->holders, memory_order_relaxed) > 0;
  if (atomic_load_explicit(&e->dead, memory_order_relaxed))
    return !held;
  if (held || strcmp(key, OTHER) == 0 || !gone(key, arg)) {
    e->gone_mark = 0;
    return 0;
  }
  if (e->gone_mark == 0 || requests != e->gone_requests) {
    e->gone_mark = m->scrapes + 1;
    e->gone_ns = now_ns;
    e->gone_requests = requests;
    return 0;
  }
  /* nothing scrapes: nothing would show the figures anyway */
  return e->gone_mark == m->scrapes + 1 && now_ns - e->gone_ns >= GONE_KEEP_NS;
}

void tg_metrics_prune(tg_metrics_t *m, size_t w, int (*gone)(const char *tenant, void *arg),
                      void *arg, uint64_t now_ns) {
  table_t *t;
  size_t i, n, kept = 0;

  if (m == NULL || w >= m->n)
    return;
  if (w == 0)
    events_prune(m, gone, arg, now_ns); /* they are the process's, not a worker's */
  if (pthread_mutex_trylock(&m->lock) != 0)
    return; /* a scrape is reading: next time */
  t = &m->t[w];
  n = atomic_load_explicit(&t->used, memory_order_relaxed);
  for (i = 0; i < n; i++) {
    uint16_t idx = t->order[i];
    entry_t *e = &t->e[idx];
    const char *key = atomic_load_explicit(&e->key, memory_order_relaxed);
    if (!prunable(m, e, key, gone, arg, now_ns)) {
      t->order[kept++] = idx;
      continue;
    }
    free((void *)key);
    memset(e, 0, sizeof(*e));
    t->spare[t->n_spare++] = idx;
  }
  if (kept < n) {
    atomic_store_explicit(&t->used, kept, memory_order_release);
    memset(t->at, 0, TABLE_SIZE * sizeof(*t->at));
    for (i = 0; i < kept; i++)
      index_put(t, t->order[i], t->e[t->order[i]].hash);
    atomic_store(&m->said_full, 0);
  }
  pthread_mutex_unlock(&m->lock);
}

void tg_metrics_inflight(void *slot, int delta) {
  if (slot != NULL)
    gauge_add(&((entry_t *)slot)->inflight, delta);
}

void tg_metrics_queued(void *slot, int delta) {
  if (slot != NULL)
    gauge_add(&((entry_t *)slot)->queued, delta);
}

/* Process-wide counters: any thread may add, so these take a locked add. */
void tg_metrics_reload(tg_metrics_t *m, int ok) {
  if (m)
    atomic_fetch_add_explicit(ok ? &m->reloads : &m->reload_failures, 1, memory_order_relaxed);
}

void tg_metrics_purge(tg_metrics_t *m, int ok, uint64_t records) {
  if (m == NULL)
    return;
  atomic_fetch_add_explicit(ok ? &m->purges : &m->purge_failures, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&m->purged, records, memory_order_relaxed);
}

/* ---- rendering ------------------------------------------------------------ */

void tg_mbuf_printf(tg_mbuf_t *b, const char *fmt, ...) {
  va_list ap;
  int n;

  for (;;) {
    size_t room;
    if (b->err)
      return;
    room = b->cap - b->len;
    va_start(ap, fmt);
    n = vsnprintf(b->s ? b->s + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n < 0) {
      b->err = TG_EINVAL;
      return;
    }
    if ((size_t)n < room) {
      b->len += (size_t)n;
      return;
    }
    {
      size_t cap = b->cap ? b->cap * 2 : 65536;
      char *ns;
      while (cap < b->len + (size_t)n + 1)
        cap *= 2;
      if (cap > b->max)
        cap = b->max;
      if (cap < b->len + (size_t)n + 1) {
        b->err = TG_ETOOBIG;
        return;
      }
      ns = realloc(b->s, cap);
      if (ns == NULL) {
        b->err = TG_ENOMEM;
        return;
      }
      b->s = ns;
      b->cap = cap;
    }
  }
}

void tg_mbuf_group_end(tg_mbuf_t *b, size_t mark) {
  if (b->err == TG_ETOOBIG) {
    b->len = mark;
    b->err = 0;
    b->omitted++;
  }
}

const char *tg_metrics_label(char *buf, size_t size, const char *v) {
  size_t n = 0;
  for (; *v && n + 2 < size; v++) {
    if (*v == '\\' || *v == '"') {
      buf[n++] = '\\';
      buf[n++] = *v;
    } else if (*v == '\n') {
      buf[n++] = '\\';
      buf[n++] = 'n';
    } else {
      buf[n++] = *v;
    }
  }
  buf[n] = '\0';
  return buf;
}

static uint64_t ld(const ctr_t *c) {
  return atomic_load_explicit(c, memory_order_relaxed);
}

static const char *const limit_label[N_LIMITS] = {
    "none", "global", "concurrency", "requests", "tokens", "budget", "budget", "unavailable",
    "queue"};

/* Per-tenant sums over models and workers, for the seed's series. */
#define AGG_CODES 32
typedef struct {
  const char *tenant;          /* points into a table key */
  uint64_t requests;
  uint64_t rej[N_LIMITS];
  int codes[AGG_CODES];
  uint64_t code_n[AGG_CODES];
  int ncodes;
  uint64_t other_errors;
  uint64_t dur[N_DUR + 1], dur_sum;
  uint64_t ttft[N_DUR + 1], ttft_sum;
  int busy;                    /* an entry is not quiet (entry_quiet) */
} agg_t;

/* Per-(tenant, model) sums over workers. */
typedef struct {
  const char *key;             /* a table key, "tenant\0model\0" */
  uint64_t hash;
  size_t agg;                  /* its tenant's index in merge_t.agg */
  uint64_t prompt, completion;
  int64_t inflight, queued;
} pair_t;

/* A scrape's own table: the keys every worker had published when the scrape
 * began, summed, each kept in the order first seen (worker 0's keys in the
 * order it added them, then worker 1's new ones, ...). Its indexes are sized
 * from the keys published, at most half full, so a lookup ends within a few
 * probes: looking keys up in the workers' tables instead cost a walk of all
 * 8,192 slots for each key missing from a full one. */
typedef struct {
  pair_t *pair;
  agg_t *agg;
  size_t n_pair, n_agg, max_pair, max_agg;
  entry_t **ent;               /* the entries summed, n_ent of them */
  size_t *ent_agg;             /* each one's tenant's index in agg */
  size_t n_ent;
  uint32_t *pair_at, *agg_at;  /* 1 + index into pair / agg; 0: free */
  size_t mask;                 /* slots in each index, minus 1 */
} merge_t;

/* Makes room for element n of *a (zeroed), growing it up to max elements. */
static int grow(void **a, size_t *cap, size_t n, size_t max, size_t size) {
  size_t nc;
  char *na;
  if (n < *cap)
    return 0;
  nc = *cap ? *cap * 2 : 64;
  if (nc > max)
    nc = max;
  if (n >= nc || (na = realloc(*a, nc * size)) == NULL)
    return TG_ENOMEM;
  memset(na + *cap * size, 0, (nc - *cap) * size);
  *a = na;
  *cap = nc;
  return 0;
}

/* The index of tenant's sums in g, added when absent; -1: out of memory. */
static long agg_of(merge_t *g, const char *tenant, size_t keys) {
  size_t i;
  for (i = hash2(tenant, "") & g->mask; g->agg_at[i] != 0; i = (i + 1) & g->mask)
    if (strcmp(g->agg[g->agg_at[i] - 1].tenant, tenant) == 0)
      return (long)g->agg_at[i] - 1;
  if (grow((void **)&g->agg, &g->max_agg, g->n_agg, keys, sizeof(*g->agg)) != 0)
    return -1;
  g->agg[g->n_agg].tenant = tenant;
  g->agg_at[i] = (uint32_t)++g->n_agg;
  return (long)g->n_agg - 1;
}

/* The sums of e's (tenant, model) in g, added when absent; NULL: out of memory. */
static pair_t *pair_of(merge_t *g, const entry_t *e, const char *key, size_t keys) {
  const char *model = key + strlen(key) + 1;
  pair_t *p;
  long a;
  size_t i;
  for (i = e->hash & g->mask; g->pair_at[i] != 0; i = (i + 1) & g->mask) {
    p = &g->pair[g->pair_at[i] - 1];
    if (p->hash == e->hash && key_eq(p->key, key, model))
      return p;
  }
  if ((a = agg_of(g, key, keys)) < 0 ||
      grow((void **)&g->pair, &g->max_pair, g->n_pair, keys, sizeof(*g->pair)) != 0)
    return NULL;
  p = &g->pair[g->n_pair];
  p->key = key;
  p->hash = e->hash;
  p->agg = (size_t)a;
  g->pair_at[i] = (uint32_t)++g->n_pair;
  return p;
}

static void agg_code(agg_t *a, int code, uint64_t n) {
  int i;
  for (i = 0; i < a->ncodes; i++)
    if (a->codes[i] == code) {
      a->code_n[i] += n;
      return;
    }
  if (a->ncodes == AGG_CODES) {
    a->other_errors += n;
    return;
  }
  a->codes[a->ncodes] = code;
  a->code_n[a->ncodes++] = n;
}

/* Adds a worker's entry to its pair's and its tenant's sums. */
static void add_entry(pair_t *p, agg_t *a, const entry_t *e) {
  int k, l;
  p->prompt += ld(&e->prompt_tokens);
  p->completion += ld(&e->completion_tokens);
  p->inflight += atomic_load_explicit(&e->inflight, memory_order_relaxed);
  p->queued += atomic_load_explicit(&e->queued, memory_order_relaxed);
  a->requests += ld(&e->requests);
  for (l = 0; l < N_LIMITS; l++)
    a->rej[l] += ld(&e->rejections[l]);
  for (k = 0; k < ERR_SLOTS; k++) {
    int code = atomic_load_explicit(&e->err_code[k], memory_order_acquire);
    if (code != 0)
      agg_code(a, code, ld(&e->err_count[k]));
  }
  a->other_errors += ld(&e->err_other);
  for (l = 0; l <= (int)N_DUR; l++) {
    a->dur[l] += ld(&e->dur.b[l]);
    a->ttft[l] += ld(&e->ttft.b[l]);
  }
  a->dur_sum += ld(&e->dur.sum_us);
  a->ttft_sum += ld(&e->ttft.sum_us);
}

/* 1 when e's tenant has left the config and e has not counted since its
 * owner found that, and no call holds it: its figures are final. */
static int entry_quiet(entry_t *e) {
  return e->gone_mark != 0 && atomic_load_explicit(&e->holders, memory_order_relaxed) == 0 &&
         atomic_load_explicit(&e->requests, memory_order_relaxed) == e->gone_requests;
}

/* After a scrape printed g: the entries of each tenant whose every entry on
 * every worker is final are dead, never shown again, and their owners free
 * them (tg_metrics_prune). All of a tenant's go at once, so its counters
 * never show a part of their sum, which Prometheus would take for a reset. */
static void bury(merge_t *g) {
  size_t i;
  for (i = 0; i < g->n_ent; i++)
    if (!g->agg[g->ent_agg[i]].busy)
      atomic_store_explicit(&g->ent[i]->dead, 1, memory_order_relaxed);
}

static void merge_free(merge_t *g) {
  free(g->ent);
  free(g->ent_agg);
  free(g->pair);
  free(g->agg);
  free(g->pair_at);
  free(g->agg_at);
}

/* Sums every worker's published entries into g by (tenant, model) and by
 * tenant. Costs time and memory in proportion to the keys published. */
static int merge(tg_metrics_t *m, merge_t *g) {
  size_t *n_keys = calloc(m->n ? m->n : 1, sizeof(*n_keys));
  size_t w, i, keys = 0, slots = 16;
  int rc = TG_ENOMEM;

  memset(g, 0, sizeof(*g));
  if (n_keys == NULL)
    return TG_ENOMEM;
  /* the count first: keys a worker adds meanwhile wait for the next scrape,
   * so the indexes stay at most half full */
  for (w = 0; w < m->n; w++)
    keys += n_keys[w] = atomic_load_explicit(&m->t[w].used, memory_order_acquire);
  while (slots < 2 * keys)
    slots *= 2;
  g->mask = slots - 1;
  g->pair_at = calloc(slots, sizeof(*g->pair_at));
  g->agg_at = calloc(slots, sizeof(*g->agg_at));
  g->ent = malloc((keys ? keys : 1) * sizeof(*g->ent));
  g->ent_agg = malloc((keys ? keys : 1) * sizeof(*g->ent_agg));
  if (g->pair_at == NULL || g->agg_at == NULL || g->ent == NULL || g->ent_agg == NULL)
    goto out;
  for (w = 0; w < m->n; w++)
    for (i = 0; i < n_keys[w]; i++) {
      entry_t *e = &m->t[w].e[m->t[w].order[i]];
      const char *key = atomic_load_explicit(&e->key, memory_order_acquire);
      pair_t *p;
      if (atomic_load_explicit(&e->dead, memory_order_relaxed))
        continue; /* shown for the last time already */
      if ((p = pair_of(g, e, key, keys)) == NULL)
        goto out;
      add_entry(p, &g->agg[p->agg], e);
      g->agg[p->agg].busy |= !entry_quiet(e);
      g->ent[g->n_ent] = e;
      g->ent_agg[g->n_ent++] = p->agg;
    }
  rc = 0;
out:
  free(n_keys);
  return rc;
}

/* A histogram's lines from per-bucket counts (not cumulative). */
/* The count printed is the buckets' total, the +Inf bucket's: counts read
 * apart from the buckets while requests end would disagree with it. */
static void emit_buckets(tg_mbuf_t *b, const char *name, const char *t, const uint64_t *bk,
                         uint64_t sum_us) {
  uint64_t cum = 0, count = 0;
  size_t i;
  for (i = 0; i <= N_DUR; i++)
    count += bk[i];
  if (count == 0)
    return;
  for (i = 0; i <= N_DUR; i++) {
    cum += bk[i];
    if (i < N_DUR)
      tg_mbuf_printf(b, "%s_bucket{tenant=\"%s\",le=\"%g\"} %llu\n", name, t, dur_bounds[i],
                     (unsigned long long)cum);
    else
      tg_mbuf_printf(b, "%s_bucket{tenant=\"%s\",le=\"+Inf\"} %llu\n", name, t,
                     (unsigned long long)cum);
  }
  tg_mbuf_printf(b, "%s_sum{tenant=\"%s\"} %.6f\n%s_count{tenant=\"%s\"} %llu\n", name, t,
                 (double)sum_us / 1e6, name, t, (unsigned long long)count);
}

static void render_tenants(const merge_t *g, tg_mbuf_t *b) {
  size_t i;
  int k, l;
  char t[300];

  size_t mark = tg_mbuf_mark(b);

  tg_mbuf_printf(b, "# HELP llm_tenant_requests_total Requests attributed to a tenant, whatever their outcome.\n"
                    "# TYPE llm_tenant_requests_total counter\n");
  for (i = 0; i < g->n_agg; i++)
    tg_mbuf_printf(b, "llm_tenant_requests_total{tenant=\"%s\"} %llu\n",
                   tg_metrics_label(t, sizeof(t), g->agg[i].tenant),
                   (unsigned long long)g->agg[i].requests);
  tg_mbuf_group_end(b, mark);
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_tenant_errors_total Responses with status >= 400 other than limit and budget refusals.\n"
                    "# TYPE llm_tenant_errors_total counter\n");
  for (i = 0; i < g->n_agg; i++) {
    const agg_t *a = &g->agg[i];
    tg_metrics_label(t, sizeof(t), a->tenant);
    for (k = 0; k < a->ncodes; k++)
      tg_mbuf_printf(b, "llm_tenant_errors_total{tenant=\"%s\",code=\"%d\"} %llu\n", t,
                     a->codes[k], (unsigned long long)a->code_n[k]);
    if (a->other_errors)
      tg_mbuf_printf(b, "llm_tenant_errors_total{tenant=\"%s\",code=\"other\"} %llu\n", t,
                     (unsigned long long)a->other_errors);
  }
  tg_mbuf_group_end(b, mark);
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_rate_limit_rejections_total Requests refused by a limit or budget.\n"
                    "# TYPE llm_rate_limit_rejections_total counter\n");
  for (i = 0; i < g->n_agg; i++) {
    uint64_t v[N_LIMITS] = {0};
    tg_metrics_label(t, sizeof(t), g->agg[i].tenant);
    for (l = 1; l < N_LIMITS; l++)
      v[strcmp(limit_label[l], "budget") == 0 ? TG_LIMIT_DAILY_BUDGET : l] += g->agg[i].rej[l];
    for (l = 1; l < N_LIMITS; l++)
      if (l != TG_LIMIT_MONTHLY_BUDGET && l != TG_LIMIT_UNAVAILABLE)
        tg_mbuf_printf(b, "llm_rate_limit_rejections_total{tenant=\"%s\",limit=\"%s\"} %llu\n", t,
                       limit_label[l], (unsigned long long)v[l]);
  }
  tg_mbuf_group_end(b, mark);
  /* Latency histograms by tenant only: by (tenant, model) they made a scrape
   * of 1,000 tenants x 5 models 16 MB. Tokens keep the model label. */
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_request_duration_seconds Time from a request's arrival to its last byte.\n"
                    "# TYPE llm_request_duration_seconds histogram\n");
  for (i = 0; i < g->n_agg; i++)
    emit_buckets(b, "llm_request_duration_seconds",
                 tg_metrics_label(t, sizeof(t), g->agg[i].tenant), g->agg[i].dur,
                 g->agg[i].dur_sum);
  tg_mbuf_group_end(b, mark);
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_time_to_first_token_seconds Time from arrival to the upstream's first byte.\n"
                    "# TYPE llm_time_to_first_token_seconds histogram\n");
  for (i = 0; i < g->n_agg; i++)
    emit_buckets(b, "llm_time_to_first_token_seconds",
                 tg_metrics_label(t, sizeof(t), g->agg[i].tenant), g->agg[i].ttft,
                 g->agg[i].ttft_sum);
  tg_mbuf_group_end(b, mark);
}

static void render_tokens(const merge_t *g, tg_mbuf_t *b) {
  char t[300], mo[300];
  size_t i, mark = tg_mbuf_mark(b);

  tg_mbuf_printf(b, "# HELP llm_tenant_prompt_tokens_total Prompt tokens billed, by tenant and model.\n"
                    "# TYPE llm_tenant_prompt_tokens_total counter\n"
                    "# HELP llm_tenant_completion_tokens_total Completion tokens billed, by tenant and model.\n"
                    "# TYPE llm_tenant_completion_tokens_total counter\n");
  for (i = 0; i < g->n_pair; i++) {
    const pair_t *p = &g->pair[i];
    const char *model = p->key + strlen(p->key) + 1;
    /* a tenant's requests without a model have no tokens; the overflow's
     * have, of every model: they show as model "_other" */
    if (!model[0] && strcmp(p->key, OTHER) != 0)
      continue;
    tg_metrics_label(t, sizeof(t), p->key);
    tg_metrics_label(mo, sizeof(mo), model[0] ? model : OTHER);
    tg_mbuf_printf(b, "llm_tenant_prompt_tokens_total{tenant=\"%s\",model=\"%s\"} %llu\n"
                      "llm_tenant_completion_tokens_total{tenant=\"%s\",model=\"%s\"} %llu\n",
                   t, mo, (unsigned long long)p->prompt, t, mo,
                   (unsigned long long)p->completion);
  }
  tg_mbuf_group_end(b, mark);
}

/* llm_inflight_requests (queued == 0) or llm_queue_length, by pool and tenant. */
static void render_pool_gauge(const merge_t *g, tg_mbuf_t *b, int queued) {
  const char *name = queued ? "llm_queue_length" : "llm_inflight_requests";
  char t[300], mo[300];
  size_t i, mark = tg_mbuf_mark(b);

  if (queued)
    tg_mbuf_printf(b, "# HELP llm_queue_length Requests waiting for a slot of the saturated pool, by tenant.\n"
                      "# TYPE llm_queue_length gauge\n");
  else
    tg_mbuf_printf(b, "# HELP llm_inflight_requests Requests in flight to the pool's endpoints, by tenant.\n"
                      "# TYPE llm_inflight_requests gauge\n");
  for (i = 0; i < g->n_pair; i++) {
    const pair_t *p = &g->pair[i];
    const char *model = p->key + strlen(p->key) + 1;
    if (!model[0])
      continue;
    tg_mbuf_printf(b, "%s{pool=\"%s\",tenant=\"%s\"} %lld\n", name,
                   tg_metrics_label(mo, sizeof(mo), model), tg_metrics_label(t, sizeof(t), p->key),
                   (long long)(queued ? p->queued : p->inflight));
  }
  tg_mbuf_group_end(b, mark);
}

void tg_metrics_render(tg_metrics_t *m, tg_mbuf_t *b) {
  merge_t g;
  size_t w, i, mark, omitted;
  uint64_t cum = 0, sum = 0;
  event_t *ev;
  char t[300];

  /* the keys merged are the workers' own strings: none is freed
   * (tg_metrics_prune) until the last is printed */
  pthread_mutex_lock(&m->lock);
  m->scrapes++;
  omitted = b->omitted;
  if (merge(m, &g) != 0) {
    pthread_mutex_unlock(&m->lock);
    merge_free(&g);
    b->err = TG_ENOMEM;
    return;
  }
  render_tenants(&g, b);
  render_tokens(&g, b);
  render_pool_gauge(&g, b, 0);
  render_pool_gauge(&g, b, 1);
  if (b->omitted == omitted && !b->err)
    bury(&g); /* only once their figures are in the scrape */
  pthread_mutex_unlock(&m->lock);
  merge_free(&g);

  /* every family in a group of its own, like the others: one cut by the
   * bound would leave half a histogram in the scrape */
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_gateway_overhead_seconds Time a request spent in the gateway itself.\n"
                    "# TYPE llm_gateway_overhead_seconds histogram\n");
  for (i = 0; i <= N_OVH; i++) {
    for (w = 0; w < m->n; w++)
      cum += ld(&m->t[w].ovh_b[i]);
    if (i < N_OVH)
      tg_mbuf_printf(b, "llm_gateway_overhead_seconds_bucket{le=\"%g\"} %llu\n", ovh_bounds[i],
                     (unsigned long long)cum);
    else
      tg_mbuf_printf(b, "llm_gateway_overhead_seconds_bucket{le=\"+Inf\"} %llu\n",
                     (unsigned long long)cum);
  }
  /* the count is the +Inf bucket's: read apart, requests that ended in
   * between made them disagree */
  for (w = 0; w < m->n; w++)
    sum += ld(&m->t[w].ovh_sum_us);
  tg_mbuf_printf(b, "llm_gateway_overhead_seconds_sum %.6f\nllm_gateway_overhead_seconds_count %llu\n",
                 (double)sum / 1e6, (unsigned long long)cum);
  tg_mbuf_group_end(b, mark);
  mark = tg_mbuf_mark(b);
  sum = 0;
  for (w = 0; w < m->n; w++)
    sum += ld(&m->t[w].overflow);
  tg_mbuf_printf(b, "# HELP llm_metrics_overflow_requests_total Requests counted under tenant "
                    "\"_other\": a worker's metrics table had no room for their tenant and model.\n"
                    "# TYPE llm_metrics_overflow_requests_total counter\n"
                    "llm_metrics_overflow_requests_total %llu\n",
                 (unsigned long long)sum);
  tg_mbuf_group_end(b, mark);
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_config_reloads_total Config reloads applied.\n"
                    "# TYPE llm_config_reloads_total counter\nllm_config_reloads_total %llu\n"
                    "# HELP llm_config_reload_failures_total Config reloads refused (the old config kept running).\n"
                    "# TYPE llm_config_reload_failures_total counter\nllm_config_reload_failures_total %llu\n",
                 (unsigned long long)ld(&m->reloads), (unsigned long long)ld(&m->reload_failures));
  tg_mbuf_group_end(b, mark);
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_ledger_purges_total Hourly retention purges run to the end.\n"
                    "# TYPE llm_ledger_purges_total counter\nllm_ledger_purges_total %llu\n"
                    "# HELP llm_ledger_purge_failures_total Retention purges that did not finish (database away, stop).\n"
                    "# TYPE llm_ledger_purge_failures_total counter\nllm_ledger_purge_failures_total %llu\n"
                    "# HELP llm_ledger_purged_records_total Ledger records removed past their tenant's retention.\n"
                    "# TYPE llm_ledger_purged_records_total counter\nllm_ledger_purged_records_total %llu\n",
                 (unsigned long long)ld(&m->purges), (unsigned long long)ld(&m->purge_failures),
                 (unsigned long long)ld(&m->purged));
  tg_mbuf_group_end(b, mark);
  mark = tg_mbuf_mark(b);
  tg_mbuf_printf(b, "# HELP llm_budget_threshold_events_total Budget alert thresholds crossed.\n"
                    "# TYPE llm_budget_threshold_events_total counter\n");
  pthread_mutex_lock(&m->ev_lock);
  for (ev = m->events; ev; ev = ev->next) {
    tg_metrics_label(t, sizeof(t), ev->tenant);
    tg_mbuf_printf(b, "llm_budget_threshold_events_total{tenant=\"%s\",window=\"day\"} %llu\n"
                      "llm_budget_threshold_events_total{tenant=\"%s\",window=\"month\"} %llu\n",
                   t, (unsigned long long)ld(&ev->day), t, (unsigned long long)ld(&ev->month));
  }
  omitted = b->omitted;
  tg_mbuf_group_end(b, mark);
  if (b->omitted == omitted && !b->err)
    m->ev_scrapes++; /* their counts are in this scrape */
  pthread_mutex_unlock(&m->ev_lock);
}
