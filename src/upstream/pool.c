/* Endpoint registry, least-outstanding picking and health probing; see
 * pool.h. The registry is a mutex-guarded list touched only when configs
 * are built and by the health thread; the hot path (pick, release) uses
 * atomics only. */
#include "upstream/pool.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "core/err.h"
#include "core/strbuf.h"
#include "core/thread.h"
#include "upstream/client.h"

#define COOL_OFF_MS 2000

struct tg_endpoint_s {
  char *url;
  char *health_url;
  atomic_int refs;
  atomic_int inflight;
  atomic_int max_inflight;
  atomic_int healthy;       /* routable */
  atomic_int probed_ok;     /* a probe has succeeded since the last failure */
  atomic_uint_fast64_t down_at_ms;
  atomic_uint_fast64_t busy_until_ms; /* backing off until then (now_ms); 0: not */
  atomic_uint_fast64_t errors[TG_UPERR_N];
  tg_endpoint_t *next;
};

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static tg_endpoint_t *registry;

/* The error counts of an endpoint no config uses any more, kept (under
 * reg_lock) for when a reload brings its URL back: its counters then go on
 * from where they were (docs/decisions.md). At most RETIRED_MAX are kept,
 * the oldest removed dropped first: a rollout that gives a pool new
 * addresses each time retires its whole endpoint list each time, and a URL
 * that comes back after that many others only starts its counters at 0, a
 * reset Prometheus' rate() and increase() take as one. Found by hash. */
#define RETIRED_MAX 4096
#define RETIRED_BUCKETS 4096 /* a power of two */
typedef struct retired_s {
  struct retired_s *chain;            /* same bucket */
  struct retired_s *newer, *older;    /* in the order retired */
  uint64_t hash;
  uint64_t errors[TG_UPERR_N];
  char url[];
} retired_t;
static retired_t *retired_at[RETIRED_BUCKETS];
static retired_t *retired_newest, *retired_oldest;
static size_t n_retired;

/* Unlinks r from its bucket and the age list, and frees it. */
static void retired_drop(retired_t *r) {
  retired_t **pp = &retired_at[r->hash & (RETIRED_BUCKETS - 1)];
  while (*pp != r)
    pp = &(*pp)->chain;
  *pp = r->chain;
  if (r->newer) r->newer->older = r->older; else retired_newest = r->older;
  if (r->older) r->older->newer = r->newer; else retired_oldest = r->newer;
  n_retired--;
  free(r);
}

/* Keeps ep's counts for its URL, dropping the oldest kept past
 * RETIRED_MAX; best effort (out of memory: they are lost). */
static void retire(const tg_endpoint_t *ep) {
  size_t n = strlen(ep->url) + 1;
  retired_t *r = malloc(sizeof(*r) + n);
  int k;
  if (r == NULL)
    return;
  if (n_retired == RETIRED_MAX)
    retired_drop(retired_oldest);
  for (k = 0; k < TG_UPERR_N; k++)
    r->errors[k] = atomic_load(&ep->errors[k]);
  memcpy(r->url, ep->url, n);
  r->hash = tg_hash_str(r->url);
  r->chain = retired_at[r->hash & (RETIRED_BUCKETS - 1)];
  retired_at[r->hash & (RETIRED_BUCKETS - 1)] = r;
  r->newer = NULL;
  r->older = retired_newest;
  if (retired_newest) retired_newest->newer = r; else retired_oldest = r;
  retired_newest = r;
  n_retired++;
}

/* Gives a new endpoint of url the counts kept for it, if any. */
static void unretire(tg_endpoint_t *ep) {
  uint64_t h = tg_hash_str(ep->url);
  retired_t *r;
  int k;
  for (r = retired_at[h & (RETIRED_BUCKETS - 1)]; r != NULL; r = r->chain)
    if (r->hash == h && strcmp(r->url, ep->url) == 0) {
      for (k = 0; k < TG_UPERR_N; k++)
        atomic_init(&ep->errors[k], r->errors[k]);
      retired_drop(r);
      return;
    }
}

size_t tg__endpoint_retired(void) {
  size_t n;
  pthread_mutex_lock(&reg_lock);
  n = n_retired;
  pthread_mutex_unlock(&reg_lock);
  return n;
}

static atomic_int probes_on;
static atomic_uint rr;

static uint64_t now_ms(void) {
  return uv_hrtime() / 1000000;
}

tg_endpoint_t *tg_endpoint_get(const char *url, int max_inflight) {
  tg_endpoint_t *ep;
  size_t n;

  pthread_mutex_lock(&reg_lock);
  for (ep = registry; ep != NULL; ep = ep->next)
    if (strcmp(ep->url, url) == 0)
      break;
  if (ep == NULL) {
    ep = calloc(1, sizeof(*ep));
    n = strlen(url) + sizeof("/health");
    if (ep == NULL || (ep->url = strdup(url)) == NULL ||
        (ep->health_url = malloc(n)) == NULL) {
      if (ep) free(ep->url);
      free(ep);
      pthread_mutex_unlock(&reg_lock);
      return NULL;
    }
    snprintf(ep->health_url, n, "%s/health", url);
    atomic_init(&ep->healthy, 1);
    unretire(ep);
    ep->next = registry;
    registry = ep;
  }
  atomic_fetch_add(&ep->refs, 1);
  atomic_store(&ep->max_inflight, max_inflight);
  pthread_mutex_unlock(&reg_lock);
  return ep;
}

void tg_endpoint_put(tg_endpoint_t *ep) {
  tg_endpoint_t **pp;

  if (ep == NULL)
    return;
  pthread_mutex_lock(&reg_lock);
  if (atomic_fetch_sub(&ep->refs, 1) == 1) {
    for (pp = &registry; *pp != NULL; pp = &(*pp)->next)
      if (*pp == ep) {
        *pp = ep->next;
        break;
      }
    retire(ep);
    free(ep->url);
    free(ep->health_url);
    free(ep);
  }
  pthread_mutex_unlock(&reg_lock);
}

const char *tg_endpoint_url(const tg_endpoint_t *ep) { return ep->url; }
int tg_endpoint_inflight(const tg_endpoint_t *ep) { return atomic_load(&ep->inflight); }

const char *const tg_uperr_names[TG_UPERR_N] = {"connect", "timeout", "broken", "status",
                                                "bad_response"};

void tg_endpoint_error(tg_endpoint_t *ep, tg_uperr_t kind) {
  if (ep != NULL && (unsigned)kind < TG_UPERR_N)
    atomic_fetch_add_explicit(&ep->errors[kind], 1, memory_order_relaxed);
}

uint64_t tg_endpoint_errors(const tg_endpoint_t *ep, tg_uperr_t kind) {
  if ((unsigned)kind >= TG_UPERR_N)
    return 0;
  return atomic_load_explicit(&((tg_endpoint_t *)ep)->errors[kind], memory_order_relaxed);
}

static int usable(tg_endpoint_t *ep) {
  if (atomic_load_explicit(&ep->healthy, memory_order_relaxed))
    return 1;
  if (!atomic_load(&probes_on) &&
      now_ms() - atomic_load(&ep->down_at_ms) >= COOL_OFF_MS) {
    atomic_store(&ep->healthy, 1);
    return 1;
  }
  return 0;
}

int tg_endpoint_healthy(const tg_endpoint_t *ep) {
  return usable((tg_endpoint_t *)ep);
}

void tg_endpoint_back_off(tg_endpoint_t *ep, int64_t wait_ms) {
  if (wait_ms > TG_BACKOFF_MAX_MS)
    wait_ms = TG_BACKOFF_MAX_MS;
  atomic_store(&ep->busy_until_ms, wait_ms > 0 ? now_ms() + (uint64_t)wait_ms : 0);
}

int tg_endpoint_backing_off(const tg_endpoint_t *ep) {
  uint64_t until = atomic_load_explicit(&((tg_endpoint_t *)ep)->busy_until_ms,
                                        memory_order_relaxed);
  return until != 0 && now_ms() < until;
}

/* The least loaded endpoint of pool with a free slot, not in tried, usable
 * and, unless backing_off is set, not backing off; pool->n when none.
 * *seen is set when such a candidate exists, full or not. */
static size_t least_loaded(const tg_pool_t *pool, const tg_tried_t *tried, size_t start,
                           int backing_off, int *seen) {
  size_t i, k, best = pool->n;
  int best_load = -1;

  for (k = 0; k < pool->n; k++) {
    tg_endpoint_t *ep;
    int load, max;
    i = (start + k) % pool->n;
    if (tg_tried_has(tried, i))
      continue;
    ep = pool->eps[i];
    if (!usable(ep) || (!backing_off && tg_endpoint_backing_off(ep)))
      continue;
    *seen = 1;
    load = atomic_load_explicit(&ep->inflight, memory_order_relaxed);
    max = atomic_load_explicit(&ep->max_inflight, memory_order_relaxed);
    if (load >= max)
      continue;
    if (best_load < 0 || load < best_load) {
      best_load = load;
      best = i;
    }
  }
  return best;
}

tg_endpoint_t *tg_pool_pick(const tg_pool_t *pool, const tg_tried_t *tried, size_t *idx,
                            int *why) {
  size_t start, best;

  if (pool->n == 0) {
    *why = TG_PICK_NONE_HEALTHY;
    return NULL;
  }
  /* Start the scan at a rotating place so ties spread across replicas. */
  start = atomic_fetch_add_explicit(&rr, 1, memory_order_relaxed) % pool->n;
  for (;;) {
    int ready = 0, any_healthy = 0;
    /* An endpoint backing off is passed over while another can take the
     * request, full or not (the request then waits for that one); only
     * when each candidate is backing off does one of them get it. */
    best = least_loaded(pool, tried, start, 0, &ready);
    any_healthy = ready;
    if (best == pool->n && !ready)
      best = least_loaded(pool, tried, start, 1, &any_healthy);
    if (best == pool->n) {
      *why = any_healthy ? TG_PICK_SATURATED : TG_PICK_NONE_HEALTHY;
      return NULL;
    }
    {
      tg_endpoint_t *ep = pool->eps[best];
      int max = atomic_load(&ep->max_inflight);
      if (atomic_fetch_add(&ep->inflight, 1) < max) {
        *idx = best;
        return ep;
      }
      /* another thread took the last slot: give it back and look again */
      atomic_fetch_sub(&ep->inflight, 1);
    }
  }
}

void tg_endpoint_release(tg_endpoint_t *ep) {
  atomic_fetch_sub(&ep->inflight, 1);
}

void tg_endpoint_failed(tg_endpoint_t *ep) {
  atomic_store(&ep->down_at_ms, now_ms());
  atomic_store(&ep->probed_ok, 0);
  atomic_store(&ep->healthy, 0);
}

int tg_pool_ready(const tg_pool_t *pool) {
  size_t i;
  for (i = 0; i < pool->n; i++) {
    tg_endpoint_t *ep = pool->eps[i];
    if (atomic_load(&probes_on) ? atomic_load(&ep->probed_ok) && atomic_load(&ep->healthy)
                                : usable(ep))
      return 1;
  }
  return 0;
}

/* ---- health thread ---------------------------------------------------- */

static pthread_t health_thread;
static pthread_mutex_t health_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t health_cond = PTHREAD_COND_INITIALIZER;
static int health_stop;
static int health_running;
static uint64_t health_interval_ms;
static atomic_uint_fast64_t health_timeout_ms; /* follows reloads (tg_health_set_timeout) */

static size_t discard(char *p, size_t s, size_t n, void *u) {
  (void)p; (void)u;
  return s * n;
}

/* The probe's socket, made here to tell "this gateway has no descriptor
 * left" (the endpoint keeps its state) from an endpoint that is down. */
static curl_socket_t probe_socket(void *clientp, curlsocktype purpose,
                                  struct curl_sockaddr *a) {
  (void)purpose;
  return tg_curl_socket(a->family, a->socktype, a->protocol, clientp);
}

/* 1: healthy; 0: down; -1: the gateway could not probe (no socket). */
static int probe(CURL *e, const char *url) {
  long code = 0;
  int local = 0;
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, probe_socket);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, &local);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)atomic_load(&health_timeout_ms));
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
  if (curl_easy_perform(e) != CURLE_OK)
    return local ? -1 : 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
  return code >= 200 && code < 300;
}

static void *health_main(void *arg) {
  CURL *e = curl_easy_init();
  (void)arg;
  tg_thread_name("tg-health");
  pthread_mutex_lock(&health_lock);
  while (!health_stop) {
    char **urls = NULL;
    size_t n = 0, i;
    tg_endpoint_t *ep;

    pthread_mutex_unlock(&health_lock);
    /* Snapshot the URLs so no lock is held while probing. */
    pthread_mutex_lock(&reg_lock);
    for (ep = registry; ep != NULL; ep = ep->next)
      n++;
    urls = calloc(n ? n : 1, sizeof(*urls));
    i = 0;
    for (ep = registry; ep != NULL && urls != NULL; ep = ep->next)
      urls[i++] = strdup(ep->health_url);
    pthread_mutex_unlock(&reg_lock);

    for (i = 0; urls != NULL && i < n; i++) {
      int ok = e != NULL && urls[i] != NULL ? probe(e, urls[i]) : 0;
      if (ok < 0) {
        free(urls[i]);
        continue; /* says nothing of the endpoint: its state stays */
      }
      pthread_mutex_lock(&reg_lock);
      for (ep = registry; ep != NULL; ep = ep->next)
        if (urls[i] && strcmp(ep->health_url, urls[i]) == 0) {
          if (ok) {
            atomic_store(&ep->healthy, 1);
            atomic_store(&ep->probed_ok, 1);
          } else {
            if (atomic_load(&ep->healthy))
              atomic_store(&ep->down_at_ms, now_ms());
            atomic_store(&ep->healthy, 0);
            atomic_store(&ep->probed_ok, 0);
          }
        }
      pthread_mutex_unlock(&reg_lock);
      free(urls[i]);
    }
    free(urls);

    pthread_mutex_lock(&health_lock);
    if (!health_stop) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_sec += (time_t)(health_interval_ms / 1000);
      ts.tv_nsec += (long)(health_interval_ms % 1000) * 1000000L;
      if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
      }
      pthread_cond_timedwait(&health_cond, &health_lock, &ts);
    }
  }
  pthread_mutex_unlock(&health_lock);
  if (e)
    curl_easy_cleanup(e);
  return NULL;
}

int tg_health_start(uint64_t interval_ms, uint64_t timeout_ms) {
  atomic_store(&probes_on, interval_ms > 0);
  if (interval_ms == 0)
    return 0;
  health_interval_ms = interval_ms;
  tg_health_set_timeout(timeout_ms);
  health_stop = 0;
  if (pthread_create(&health_thread, NULL, health_main, NULL) != 0)
    return TG_ENOMEM;
  health_running = 1;
  return 0;
}

void tg_health_set_timeout(uint64_t timeout_ms) {
  atomic_store(&health_timeout_ms, timeout_ms ? timeout_ms : 1000);
}

void tg_health_stop(void) {
  if (!health_running)
    return;
  pthread_mutex_lock(&health_lock);
  health_stop = 1;
  pthread_cond_signal(&health_cond);
  pthread_mutex_unlock(&health_lock);
  pthread_join(health_thread, NULL);
  health_running = 0;
}
