/* Per-thread metric tables and their Prometheus rendering; see metrics.h.
 *
 * A worker's table is open addressing with linear probing and no deletion:
 * the owner thread fills a free slot's fields, then publishes its key with a
 * release store; readers load keys with acquire and skip empty slots.
 * Counters are 64-bit relaxed atomics written by one thread only, so an
 * increment is a plain load and store (no locked instruction): a reader
 * never sees a torn value, and there is no other writer to lose. */
#include "obs/metrics.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

#define TABLE_SIZE 8192            /* entries per worker (power of two) */
#define ERR_SLOTS 8                /* distinct error codes per entry */
#define N_LIMITS 9                 /* tg_limit_kind_t, then LIM_QUEUE */
#define LIM_QUEUE 8                /* shed: the model's pool was saturated */
#define OTHER "_other"             /* the tenant past a full table, with model "" */

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
} entry_t;

typedef struct {
  entry_t *e;                      /* TABLE_SIZE entries */
  size_t used;                     /* keys published (owner thread only) */
  ctr_t ovh_b[N_OVH + 1];
  ctr_t ovh_sum_us, ovh_count;
} table_t;

typedef struct event_s {
  struct event_s *next;
  ctr_t day, month;
  char tenant[];
} event_t;

struct tg_metrics_s {
  size_t n;
  table_t *t;
  ctr_t reloads, reload_failures;
  _Atomic(event_t *) events;       /* budget events by tenant (push-only list) */
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

/* Finds (tenant, model) in t; the owner may add it (add != 0). */
static entry_t *find(table_t *t, const char *tenant, const char *model, uint64_t h, int add) {
  size_t i, mask = TABLE_SIZE - 1, probes;
  for (i = h & mask, probes = 0; probes < TABLE_SIZE; i = (i + 1) & mask, probes++) {
    entry_t *e = &t->e[i];
    const char *k = atomic_load_explicit(&e->key, memory_order_acquire);
    if (k == NULL) {
      size_t tl, ml;
      char *nk;
      if (!add)
        return NULL;
      tl = strlen(tenant);
      ml = strlen(model);
      nk = malloc(tl + ml + 2);
      if (nk == NULL)
        return NULL;
      memcpy(nk, tenant, tl + 1);
      memcpy(nk + tl + 1, model, ml + 1);
      e->hash = h;
      atomic_store_explicit(&e->key, nk, memory_order_release);
      t->used++;
      return e;
    }
    if (e->hash == h && key_eq(k, tenant, model))
      return e;
  }
  return NULL;
}

/* Finds (tenant, model) in worker w's table, adding it; past the table's
 * bound, the "_other" entry. The last free slot is kept for "_other": a
 * table filled by other keys would have no room left for it. */
static entry_t *entry_of(tg_metrics_t *m, size_t w, const char *tenant, const char *model) {
  table_t *t = &m->t[w];
  entry_t *e = find(t, tenant, model, hash2(tenant, model), t->used < TABLE_SIZE - 1);
  return e ? e : find(t, OTHER, "", hash2(OTHER, ""), 1);
}

int tg_metrics_new(size_t n_workers, tg_metrics_t **out) {
  tg_metrics_t *m = calloc(1, sizeof(*m));
  size_t i;

  if (m == NULL)
    return TG_ENOMEM;
  m->n = n_workers;
  m->t = calloc(n_workers ? n_workers : 1, sizeof(*m->t));
  if (m->t == NULL) {
    free(m);
    return TG_ENOMEM;
  }
  for (i = 0; i < n_workers; i++) {
    /* calloc of a large block maps zero pages: untouched slots cost no RAM */
    m->t[i].e = calloc(TABLE_SIZE, sizeof(entry_t));
    if (m->t[i].e == NULL) {
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
    for (j = 0; m->t[i].e && j < TABLE_SIZE; j++)
      free((void *)atomic_load(&m->t[i].e[j].key));
    free(m->t[i].e);
  }
  for (ev = atomic_load(&m->events); ev; ev = next) {
    next = ev->next;
    free(ev);
  }
  free(m->t);
  free(m);
}

/* Only for counters with one writer (a worker's own table). */
static void inc(ctr_t *c, uint64_t v) {
  atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
                        memory_order_relaxed);
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

void *tg_metrics_slot(tg_metrics_t *m, size_t w, const char *tenant, const char *model) {
  if (m == NULL || w >= m->n || tenant == NULL || model == NULL)
    return NULL;
  return entry_of(m, w, tenant, model);
}

static void gauge_add(_Atomic int64_t *g, int delta) {
  atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + delta,
                        memory_order_relaxed);
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

/* The node of tenant in the list from head up to (not including) stop. */
static event_t *event_find(event_t *head, event_t *stop, const char *tenant) {
  for (; head != stop; head = head->next)
    if (strcmp(head->tenant, tenant) == 0)
      return head;
  return NULL;
}

void tg_metrics_budget_event(tg_metrics_t *m, const char *tenant, int month) {
  event_t *ev, *head, *found;
  size_t n;

  if (m == NULL)
    return;
  head = atomic_load(&m->events);
  ev = event_find(head, NULL, tenant);
  if (ev == NULL) {
    n = strlen(tenant);
    ev = calloc(1, sizeof(*ev) + n + 1);
    if (ev == NULL)
      return;
    memcpy(ev->tenant, tenant, n + 1);
    ev->next = head;
    /* a failed exchange loads the new head: the nodes pushed meanwhile
     * (down to ev->next, already searched) may hold the tenant */
    while (!atomic_compare_exchange_weak(&m->events, &head, ev)) {
      if ((found = event_find(head, ev->next, tenant)) != NULL) {
        free(ev);
        ev = found;
        break;
      }
      ev->next = head;
    }
  }
  atomic_fetch_add_explicit(month ? &ev->month : &ev->day, 1, memory_order_relaxed);
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
      if (cap > b->max) {
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

/* Calls fn for each distinct (tenant, model) with the entries of every
 * worker holding it (NULL where absent). */
typedef void (*visit_fn)(tg_mbuf_t *b, const char *tenant, const char *model, entry_t **es,
                         size_t n, void *arg);

static void visit(tg_metrics_t *m, tg_mbuf_t *b, visit_fn fn, void *arg) {
  entry_t **es = calloc(m->n ? m->n : 1, sizeof(*es));
  size_t w, i, j;

  if (es == NULL) {
    b->err = TG_ENOMEM;
    return;
  }
  for (w = 0; w < m->n; w++) {
    for (i = 0; i < TABLE_SIZE; i++) {
      entry_t *e = &m->t[w].e[i];
      const char *k = atomic_load_explicit(&e->key, memory_order_acquire);
      const char *tenant, *model;
      int seen = 0;
      if (k == NULL)
        continue;
      tenant = k;
      model = k + strlen(k) + 1;
      for (j = 0; j < w && !seen; j++)
        seen = find(&m->t[j], tenant, model, e->hash, 0) != NULL;
      if (seen)
        continue; /* summed when its first holder was visited */
      for (j = 0; j < m->n; j++)
        es[j] = j < w ? NULL : j == w ? e : find(&m->t[j], tenant, model, e->hash, 0);
      fn(b, tenant, model, es, m->n, arg);
    }
  }
  free(es);
}

typedef struct {
  int what;
} pass_t;

enum { P_TOK, P_INFLIGHT, P_QUEUED };

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
  uint64_t dur[N_DUR + 1], dur_sum, dur_count;
  uint64_t ttft[N_DUR + 1], ttft_sum, ttft_count;
} agg_t;

typedef struct {
  agg_t *a;
  size_t cap, n;
} aggs_t;

static agg_t *agg_get(aggs_t *g, const char *tenant) {
  uint64_t h = hash2(tenant, "");
  size_t i, mask = g->cap - 1;
  for (i = h & mask;; i = (i + 1) & mask) {
    if (g->a[i].tenant == NULL) {
      g->a[i].tenant = tenant;
      g->n++;
      return &g->a[i];
    }
    if (strcmp(g->a[i].tenant, tenant) == 0)
      return &g->a[i];
  }
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

/* Sums every worker's entries by tenant into g (cap >= 2 * keys). */
static void aggregate(tg_metrics_t *m, aggs_t *g) {
  size_t w, i;
  int k, l;
  for (w = 0; w < m->n; w++)
    for (i = 0; i < TABLE_SIZE; i++) {
      entry_t *e = &m->t[w].e[i];
      const char *key = atomic_load_explicit(&e->key, memory_order_acquire);
      agg_t *a;
      if (key == NULL)
        continue;
      a = agg_get(g, key);
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
      a->dur_count += ld(&e->dur.count);
      a->ttft_sum += ld(&e->ttft.sum_us);
      a->ttft_count += ld(&e->ttft.count);
    }
}

/* A histogram's lines from per-bucket counts (not cumulative). */
static void emit_buckets(tg_mbuf_t *b, const char *name, const char *t, const uint64_t *bk,
                         uint64_t sum_us, uint64_t count) {
  uint64_t cum = 0;
  size_t i;
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

static void render_tenants(tg_metrics_t *m, tg_mbuf_t *b) {
  aggs_t g;
  size_t i;
  int k, l;
  char t[300];

  g.cap = 1;
  while (g.cap < 2 * TABLE_SIZE * (m->n ? m->n : 1))
    g.cap *= 2;
  g.n = 0;
  g.a = calloc(g.cap, sizeof(*g.a));
  if (g.a == NULL) {
    b->err = TG_ENOMEM;
    return;
  }
  aggregate(m, &g);
  tg_mbuf_printf(b, "# HELP llm_tenant_requests_total Requests attributed to a tenant, whatever their outcome.\n"
                    "# TYPE llm_tenant_requests_total counter\n");
  for (i = 0; i < g.cap; i++)
    if (g.a[i].tenant)
      tg_mbuf_printf(b, "llm_tenant_requests_total{tenant=\"%s\"} %llu\n",
                     tg_metrics_label(t, sizeof(t), g.a[i].tenant),
                     (unsigned long long)g.a[i].requests);
  tg_mbuf_printf(b, "# HELP llm_tenant_errors_total Responses with status >= 400 other than limit and budget refusals.\n"
                    "# TYPE llm_tenant_errors_total counter\n");
  for (i = 0; i < g.cap; i++) {
    if (!g.a[i].tenant)
      continue;
    tg_metrics_label(t, sizeof(t), g.a[i].tenant);
    for (k = 0; k < g.a[i].ncodes; k++)
      tg_mbuf_printf(b, "llm_tenant_errors_total{tenant=\"%s\",code=\"%d\"} %llu\n", t,
                     g.a[i].codes[k], (unsigned long long)g.a[i].code_n[k]);
    if (g.a[i].other_errors)
      tg_mbuf_printf(b, "llm_tenant_errors_total{tenant=\"%s\",code=\"other\"} %llu\n", t,
                     (unsigned long long)g.a[i].other_errors);
  }
  tg_mbuf_printf(b, "# HELP llm_rate_limit_rejections_total Requests refused by a limit or budget.\n"
                    "# TYPE llm_rate_limit_rejections_total counter\n");
  for (i = 0; i < g.cap; i++) {
    uint64_t v[N_LIMITS] = {0};
    if (!g.a[i].tenant)
      continue;
    tg_metrics_label(t, sizeof(t), g.a[i].tenant);
    for (l = 1; l < N_LIMITS; l++)
      v[strcmp(limit_label[l], "budget") == 0 ? TG_LIMIT_DAILY_BUDGET : l] += g.a[i].rej[l];
    for (l = 1; l < N_LIMITS; l++)
      if (l != TG_LIMIT_MONTHLY_BUDGET && l != TG_LIMIT_UNAVAILABLE)
        tg_mbuf_printf(b, "llm_rate_limit_rejections_total{tenant=\"%s\",limit=\"%s\"} %llu\n", t,
                       limit_label[l], (unsigned long long)v[l]);
  }
  /* Latency histograms by tenant only: by (tenant, model) they made a scrape
   * of 1,000 tenants x 5 models 16 MB. Tokens keep the model label. */
  tg_mbuf_printf(b, "# HELP llm_request_duration_seconds Time from a request's arrival to its last byte.\n"
                    "# TYPE llm_request_duration_seconds histogram\n");
  for (i = 0; i < g.cap; i++)
    if (g.a[i].tenant)
      emit_buckets(b, "llm_request_duration_seconds",
                   tg_metrics_label(t, sizeof(t), g.a[i].tenant), g.a[i].dur, g.a[i].dur_sum,
                   g.a[i].dur_count);
  tg_mbuf_printf(b, "# HELP llm_time_to_first_token_seconds Time from arrival to the upstream's first byte.\n"
                    "# TYPE llm_time_to_first_token_seconds histogram\n");
  for (i = 0; i < g.cap; i++)
    if (g.a[i].tenant)
      emit_buckets(b, "llm_time_to_first_token_seconds",
                   tg_metrics_label(t, sizeof(t), g.a[i].tenant), g.a[i].ttft, g.a[i].ttft_sum,
                   g.a[i].ttft_count);
  free(g.a);
}

static void pass_cb(tg_mbuf_t *b, const char *tenant, const char *model, entry_t **es, size_t n,
                    void *arg) {
  pass_t *p = arg;
  char t[300], mo[300];
  size_t k;
  uint64_t v = 0, v2 = 0;

  tg_metrics_label(t, sizeof(t), tenant);
  tg_metrics_label(mo, sizeof(mo), model);
  switch (p->what) {
  case P_TOK:
    /* a tenant's requests without a model have no tokens; the overflow's
     * have, of every model: they show as model "_other" */
    if (!model[0] && strcmp(tenant, OTHER) != 0) break;
    if (!model[0]) tg_metrics_label(mo, sizeof(mo), OTHER);
    for (k = 0; k < n; k++) if (es[k]) { v += ld(&es[k]->prompt_tokens); v2 += ld(&es[k]->completion_tokens); }
    tg_mbuf_printf(b, "llm_tenant_prompt_tokens_total{tenant=\"%s\",model=\"%s\"} %llu\n"
                      "llm_tenant_completion_tokens_total{tenant=\"%s\",model=\"%s\"} %llu\n",
                   t, mo, (unsigned long long)v, t, mo, (unsigned long long)v2);
    break;
  case P_INFLIGHT:
  case P_QUEUED: {
    int64_t in = 0;
    if (!model[0]) break;
    for (k = 0; k < n; k++)
      if (es[k])
        in += atomic_load_explicit(p->what == P_QUEUED ? &es[k]->queued : &es[k]->inflight,
                                   memory_order_relaxed);
    tg_mbuf_printf(b, "%s{pool=\"%s\",tenant=\"%s\"} %lld\n",
                   p->what == P_QUEUED ? "llm_queue_length" : "llm_inflight_requests", mo, t,
                   (long long)in);
    break;
  }
  }
}

void tg_metrics_render(tg_metrics_t *m, tg_mbuf_t *b) {
  pass_t p;
  size_t w, i;
  uint64_t cum = 0, sum = 0, count = 0;
  event_t *ev;
  char t[300];

  render_tenants(m, b);
  tg_mbuf_printf(b, "# HELP llm_tenant_prompt_tokens_total Prompt tokens billed, by tenant and model.\n"
                    "# TYPE llm_tenant_prompt_tokens_total counter\n"
                    "# HELP llm_tenant_completion_tokens_total Completion tokens billed, by tenant and model.\n"
                    "# TYPE llm_tenant_completion_tokens_total counter\n");
  p.what = P_TOK;
  visit(m, b, pass_cb, &p);
  tg_mbuf_printf(b, "# HELP llm_inflight_requests Requests in flight to the pool's endpoints, by tenant.\n"
                    "# TYPE llm_inflight_requests gauge\n");
  p.what = P_INFLIGHT;
  visit(m, b, pass_cb, &p);
  tg_mbuf_printf(b, "# HELP llm_queue_length Requests waiting for a slot of the saturated pool, by tenant.\n"
                    "# TYPE llm_queue_length gauge\n");
  p.what = P_QUEUED;
  visit(m, b, pass_cb, &p);

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
  for (w = 0; w < m->n; w++) {
    sum += ld(&m->t[w].ovh_sum_us);
    count += ld(&m->t[w].ovh_count);
  }
  tg_mbuf_printf(b, "llm_gateway_overhead_seconds_sum %.6f\nllm_gateway_overhead_seconds_count %llu\n",
                 (double)sum / 1e6, (unsigned long long)count);

  tg_mbuf_printf(b, "# HELP llm_config_reloads_total Config reloads applied.\n"
                    "# TYPE llm_config_reloads_total counter\nllm_config_reloads_total %llu\n"
                    "# HELP llm_config_reload_failures_total Config reloads refused (the old config kept running).\n"
                    "# TYPE llm_config_reload_failures_total counter\nllm_config_reload_failures_total %llu\n",
                 (unsigned long long)ld(&m->reloads), (unsigned long long)ld(&m->reload_failures));
  tg_mbuf_printf(b, "# HELP llm_budget_threshold_events_total Budget alert thresholds crossed.\n"
                    "# TYPE llm_budget_threshold_events_total counter\n");
  for (ev = atomic_load(&m->events); ev; ev = ev->next) {
    tg_metrics_label(t, sizeof(t), ev->tenant);
    tg_mbuf_printf(b, "llm_budget_threshold_events_total{tenant=\"%s\",window=\"day\"} %llu\n"
                      "llm_budget_threshold_events_total{tenant=\"%s\",window=\"month\"} %llu\n",
                   t, (unsigned long long)ld(&ev->day), t, (unsigned long long)ld(&ev->month));
  }
}
