/* The running gateway: its config snapshot, its loop threads and what they
 * share. One tg_app_t per process, built by `tollgate serve`.
 *
 * The runtime (config + the endpoint pools built from it) is an immutable,
 * refcounted snapshot; a reload publishes a new one and bumps rt_gen, and
 * each worker re-acquires only when the generation moved, so the request
 * path reads one atomic. */
#ifndef TG_CORE_APP_H
#define TG_CORE_APP_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "auth/key.h"
#include "auth/keystore.h"
#include "policy/state.h"
#include "config/config.h"
#include "core/recycle.h"
#include "meter/ledger.h"
#include "obs/metrics.h"
#include "http/server.h"
#include "upstream/client.h"
#include "upstream/pool.h"

/* A tenant's vLLM cache_salt: 32 hex digits of SHA-256 of its name. */
#define TG_CACHE_SALT_LEN 32

typedef struct tg_runtime_s {
  atomic_int refs;
  tg_config_t *cfg;
  tg_pool_t *pools;          /* parallel to cfg->models */
  char (*salts)[TG_CACHE_SALT_LEN + 1]; /* parallel to cfg->tenants */
  atomic_int *queued;        /* parallel to cfg->models: calls waiting, every loop's */
} tg_runtime_t;

typedef struct tg_call_s tg_call_t;

/* Bytes of the blocks a loop recycles for its calls (tg_worker_t.mem). */
#define TG_API_BLOCK 4096
typedef struct tg_app_s tg_app_t;

typedef struct tg_worker_s {
  tg_app_t *app;
  int id;
  uv_loop_t loop;
  uv_thread_t thread;
  uv_async_t async;          /* commands from the main thread */
  uv_timer_t tick;           /* upstream first-byte and idle deadlines */
  tg_http_server_t *http;
  tg_upstream_t *up;
  tg_policy_loop_t *policy;
  tg_ledger_port_t *ledger;
  struct tg_access_out_s *alog; /* the access log's lines, NULL when off */
  tg_runtime_t *rt;
  uint64_t rt_gen;
  tg_keyset_t *keys;
  uint64_t keys_gen;
  tg_call_t *calls;          /* calls in flight on this loop */
  tg_recycle_t mem;          /* TG_API_BLOCK blocks: calls, answers' first buffers */
  struct tg_wqueue_s **queues; /* calls waiting for a saturated pool, by model */
  size_t n_queues;
  int serving;               /* a queue is being served: none is freed */
  uint64_t swept_ns;         /* when the tick last freed unneeded queues */
  atomic_int queued;         /* calls waiting here: other loops wake this one */
  int async_closed;          /* under the API's wake lock */
  uint64_t seq;
  int is_admin;
  /* the loop's heartbeat: monotonic ms of its last tick, stamped by the
   * loop, read by the admin loop's /healthz; 0 while it does not run */
  atomic_uint_fast64_t beat_ms;
  int cutting;               /* stopping: the requests left are cut, not abandoned */
  /* the admin loop's ledger queries (admin.c): at most TG_ADMIN_JOBS_RUNNING
   * on libuv's thread pool, the others waiting in order */
  struct admin_job_s *jobs_head, *jobs_tail;
  int jobs_running, jobs_waiting;
} tg_worker_t;

struct tg_app_s {
  char *config_path;
  pthread_mutex_t rt_lock;
  tg_runtime_t *rt;
  atomic_uint_fast64_t rt_gen;
  tg_keywatch_t *keywatch;
  tg_policy_t *policy;
  tg_ledger_t *ledger;
  tg_metrics_t *metrics;
  size_t ledger_refuse_at;   /* backlog at which new requests are refused */
  int log_fd;                /* access log, or -1 */
  char id_prefix[13];        /* 48 random bits per process: request ids stay unique */
  tg_worker_t *workers;
  int n_workers;
  tg_worker_t admin;
  atomic_int admin_jobs;     /* admin queries running or waiting: a stop waits for them */
  atomic_int cmd;            /* TG_CMD_* for the workers */
  atomic_int queued;         /* calls waiting for a pool slot, all loops */
};

enum { TG_CMD_NONE = 0, TG_CMD_DRAIN = 1, TG_CMD_STOP = 2 };

/* Builds a runtime for cfg (takes over the caller's reference to cfg).
 * Returns 0 or TG_ENOMEM. */
int tg_runtime_new(tg_config_t *cfg, tg_runtime_t **out);
tg_runtime_t *tg_runtime_ref(tg_runtime_t *rt);
void tg_runtime_unref(tg_runtime_t *rt);
/* The pool serving model m of rt->cfg. */
const tg_pool_t *tg_runtime_pool(const tg_runtime_t *rt, const tg_model_cfg_t *m);

/* The worker's current runtime, re-acquired when a reload published one. */
tg_runtime_t *tg_worker_runtime(tg_worker_t *w);
/* The worker's current keyset (may be NULL before the first load). */
const tg_keyset_t *tg_worker_keys(tg_worker_t *w);

/* `tollgate serve --config FILE`. */
int tg_cmd_serve(int argc, char **argv);

#endif
