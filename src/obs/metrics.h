/* Per-tenant metrics in the Prometheus text format, with the seed's names.
 *
 * Counting is per loop thread and takes no lock: each worker owns a table
 * of (tenant, model) entries that only its thread adds to and counts in
 * (relaxed atomics); entries never move, so a scrape on the admin thread
 * visits the entries every worker has published at the same time and sums
 * them in a table of its own, in time and memory proportional to those
 * entries. A table is bounded; requests past its bound count under tenant
 * "_other" (llm_metrics_overflow_requests_total, one line on stderr). The
 * entries of a tenant that left the config are freed once a scrape has
 * shown their last figures (tg_metrics_prune). */
#ifndef TG_OBS_METRICS_H
#define TG_OBS_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "policy/limits.h"

typedef struct tg_metrics_s tg_metrics_t;

/* What one finished API request contributes. */
typedef struct {
  const char *tenant;        /* NULL: not attributed (no valid key) */
  const char *model;         /* NULL or "" when none was resolved */
  int status;                /* the client's status (499: client left) */
  tg_limit_kind_t refused;   /* TG_LIMIT_NONE unless a limit or budget refused */
  int64_t prompt_tokens, completion_tokens;
  double duration_s;         /* arrival to last byte */
  double ttft_s;             /* arrival to the upstream's first byte; < 0: none */
  double overhead_s;         /* time spent in the gateway itself; < 0: unknown */
  int shed;                  /* refused because the model's pool was saturated */
  void *slot;                /* from tg_metrics_slot() for (tenant, model), or NULL */
} tg_metrics_obs_t;

/* One table per worker; all are freed with tg_metrics_free(). */
int tg_metrics_new(size_t n_workers, tg_metrics_t **out);
void tg_metrics_free(tg_metrics_t *m);

/* Counts one request on worker w's table. Only from that worker's thread. */
void tg_metrics_observe(tg_metrics_t *m, size_t w, const tg_metrics_obs_t *o);

/* The counters of (tenant, model) in worker w's table, found (or added)
 * once so a request's later counting skips the lookup; NULL when m is NULL
 * (metrics off). Only from worker w's thread; valid while m lives. */
void *tg_metrics_slot(tg_metrics_t *m, size_t w, const char *tenant, const char *model);

/* Gives back a slot from tg_metrics_slot() once its call no longer counts
 * in it (NULL: nothing). Only from worker w's thread. */
void tg_metrics_slot_put(void *slot);

/* Frees worker w's entries of tenants that have left the config (gone()
 * says so) once a scrape has shown their last figures and no call holds
 * them: all of a tenant's entries on every worker leave the scrapes
 * together, the next scrape after each worker found its entries gone and
 * unchanged. With no scrape for 10 minutes, they are freed anyway. Never
 * waits: skipped while a scrape runs. Only from worker w's thread, about
 * once a second; now_ns is a monotonic clock. */
void tg_metrics_prune(tg_metrics_t *m, size_t w, int (*gone)(const char *tenant, void *arg),
                      void *arg, uint64_t now_ns);

/* Moves the slot's count of requests in flight to the pool (+1 when an
 * attempt takes an endpoint slot, -1 when it gives it back), or of requests
 * waiting in the pool's queue. slot may be NULL (nothing is counted). */
void tg_metrics_inflight(void *slot, int delta);
void tg_metrics_queued(void *slot, int delta);

/* Process-wide counters (any thread). */
void tg_metrics_reload(tg_metrics_t *m, int ok);
/* A retention purge ended: ok 1 when it ran to the end; records removed
 * (also by one that did not finish). */
void tg_metrics_purge(tg_metrics_t *m, int ok, uint64_t records);
void tg_metrics_budget_event(tg_metrics_t *m, const char *tenant, int month);

/* Growable text for a scrape, bounded at max bytes. */
typedef struct {
  char *s;
  size_t len, cap, max;
  int err;
  size_t omitted;          /* groups of families left out: past max */
} tg_mbuf_t;

void tg_mbuf_printf(tg_mbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A group of metric families is whole in the scrape or not there: a group
 * that does not fit under max is taken back (b->omitted counts it) and the
 * scrape goes on with the next, so one large family never costs the
 * others. tg_mbuf_group_end() takes the tg_mbuf_mark() made before it. */
static inline size_t tg_mbuf_mark(const tg_mbuf_t *b) {
  return b->len;
}
void tg_mbuf_group_end(tg_mbuf_t *b, size_t mark);

/* Appends every counter and histogram summed over the workers. Gauges that
 * come from elsewhere (spend, budgets, endpoints, ledger) are appended by
 * the caller. */
void tg_metrics_render(tg_metrics_t *m, tg_mbuf_t *b);

/* Writes a Prometheus label value (escaped) into buf. */
const char *tg_metrics_label(char *buf, size_t size, const char *v);

#endif
