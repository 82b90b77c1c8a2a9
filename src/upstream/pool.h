/* Upstream endpoints and the pools of them that serve each model.
 *
 * An endpoint's live state (requests in flight, health) is shared by every
 * loop thread and outlives config reloads: endpoints are kept in a registry
 * by URL and looked up again when a new config is built. Picking is
 * least-outstanding-requests among healthy endpoints with a free slot; the
 * slot is taken atomically by the pick itself. An endpoint that said it is
 * overloaded (Retry-After) is passed over for a while.
 *
 * A health thread probes each endpoint's /health; a failed connection marks
 * an endpoint down at once (passive), and a probe brings it back. */
#ifndef TG_UPSTREAM_POOL_H
#define TG_UPSTREAM_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct tg_endpoint_s tg_endpoint_t;

typedef struct {
  tg_endpoint_t **eps;
  size_t n;
} tg_pool_t;

enum { TG_PICK_OK = 0, TG_PICK_NONE_HEALTHY = 1, TG_PICK_SATURATED = 2 };

/* Returns the registry's endpoint for url (created on first use) with one
 * more reference, and sets its slot count; NULL on allocation failure. */
tg_endpoint_t *tg_endpoint_get(const char *url, int max_inflight);
void tg_endpoint_put(tg_endpoint_t *ep);

/* The endpoints whose error counts are kept for a URL no config uses any
 * more (at most 4,096, the oldest dropped first). For tests. */
size_t tg__endpoint_retired(void);

const char *tg_endpoint_url(const tg_endpoint_t *ep);
int tg_endpoint_inflight(const tg_endpoint_t *ep);
int tg_endpoint_healthy(const tg_endpoint_t *ep);

/* Upstream failures, counted per endpoint for the metrics (any thread). */
typedef enum {
  TG_UPERR_CONNECT = 0,   /* could not connect */
  TG_UPERR_TIMEOUT,       /* connect, first-byte or idle timeout */
  TG_UPERR_BROKEN,        /* the connection broke after the request went out */
  TG_UPERR_STATUS,        /* answered with a 5xx status */
  TG_UPERR_BAD_RESPONSE,  /* an answer that is not one (garbage, stream cut before [DONE]) */
  TG_UPERR_N
} tg_uperr_t;

extern const char *const tg_uperr_names[TG_UPERR_N];

void tg_endpoint_error(tg_endpoint_t *ep, tg_uperr_t kind);
uint64_t tg_endpoint_errors(const tg_endpoint_t *ep, tg_uperr_t kind);

/* The endpoints of a pool a call has tried: bit i stands for pool->eps[i].
 * A pool has at most TG_POOL_MAX endpoints (MAX_ENDPOINTS in config.c),
 * so every one of them can be marked and a retry never comes back to one. */
#define TG_POOL_MAX 256
typedef struct {
  uint64_t bits[TG_POOL_MAX / 64];
} tg_tried_t;

static inline void tg_tried_add(tg_tried_t *t, size_t i) {
  if (i < TG_POOL_MAX)
    t->bits[i / 64] |= UINT64_C(1) << (i % 64);
}

static inline int tg_tried_has(const tg_tried_t *t, size_t i) {
  return t != NULL && i < TG_POOL_MAX && (t->bits[i / 64] >> (i % 64)) & 1;
}

/* Picks an endpoint not in tried (NULL: none tried yet) and takes one of its
 * slots, passing over those backing off while another is a candidate
 * (tg_endpoint_back_off); *idx receives its index. Returns the endpoint, or NULL with *why set
 * to TG_PICK_NONE_HEALTHY or TG_PICK_SATURATED. */
tg_endpoint_t *tg_pool_pick(const tg_pool_t *pool, const tg_tried_t *tried, size_t *idx,
                            int *why);

/* The longest an endpoint is kept out of picks by one answer. */
#define TG_BACKOFF_MAX_MS 30000

/* ep answered 429 or 503 with a Retry-After asking for wait_ms: picks pass
 * it over for that long (at most TG_BACKOFF_MAX_MS) while another endpoint
 * of the pool could take the request. wait_ms <= 0 ends a back-off. It
 * stays healthy and ready: only its own word puts it back. Any thread. */
void tg_endpoint_back_off(tg_endpoint_t *ep, int64_t wait_ms);

/* 1 while ep is backing off. */
int tg_endpoint_backing_off(const tg_endpoint_t *ep);

/* Gives back the slot taken by tg_pool_pick. */
void tg_endpoint_release(tg_endpoint_t *ep);

/* A connection to ep failed: mark it down until a probe (or, with probes
 * off, a short cool-off) says otherwise. */
void tg_endpoint_failed(tg_endpoint_t *ep);

/* 1 when at least one endpoint of pool is known healthy. */
int tg_pool_ready(const tg_pool_t *pool);

/* Starts the health thread probing every registered endpoint each
 * interval_ms (0: no probes; down endpoints then return after a cool-off).
 * timeout_ms bounds one probe. Returns 0 or a negative error. */
int tg_health_start(uint64_t interval_ms, uint64_t timeout_ms);

/* Bounds the probes from the next one on by timeout_ms (0: 1 s): a reload
 * that changes the upstream timeouts changes the probes' too. Any thread. */
void tg_health_set_timeout(uint64_t timeout_ms);
void tg_health_stop(void);

#endif
