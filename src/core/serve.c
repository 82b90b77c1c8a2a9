/* `tollgate serve`: builds the app, starts one loop thread per worker (each
 * with its own listener on the shared port, its own curl multi handle and its
 * own calls), an admin loop thread, and waits for signals on the main
 * thread: SIGHUP reloads the config, SIGTERM/SIGINT drain then stop.
 *
 * SIGHUP reaches the main thread only: it is blocked from the start of
 * serve, so every thread started inherits the block, and the main thread
 * lets it through once its handler runs on the main loop. From the stop
 * on it is ignored (SIG_IGN), so a SIGHUP never takes the default action
 * (terminate) of a gateway that starts or stops.
 *
 * Shutdown order on a worker: stop accepting and let calls finish (drain);
 * at the drain timeout, abort what is left (clients see a truncated answer,
 * upstream transfers are cancelled); then close the upstream client and the
 * loop's own handles, so the loop returns and the thread ends. */
#define _GNU_SOURCE /* pipe2 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "api/api.h"
#include "auth/key.h"
#include "core/app.h"
#include "core/cli.h"
#include "core/err.h"
#include "core/strbuf.h"
#include "core/thread.h"
#include "meter/datalock.h"
#include "obs/accesslog.h"

#define TICK_MS 100
#define TG_EXIT_SPOOLED 75 /* sysexits' EX_TEMPFAIL: stopped, records in the spool */

/* ---- runtime ------------------------------------------------------------ */

/* A tenant's cache_salt (vLLM keys its prefix cache by it, so tenants
 * never share cached prefixes, nor learn from a cache hit what another
 * sent): HMAC-SHA256 of the tenant's name under a key every gateway on the
 * same database shares (made by the first, tg_ledger_db_secret), so every
 * replica gives a tenant the same salt and its own requests still share
 * their cache, while no one who knows a tenant's name can compute its
 * salt (and hand it to an upstream the gateway does not salt for).
 * Clients cannot choose it: the gateway overwrites theirs. */
static char salt_key[65]; /* read once at the start, before the loops */

static int load_salt_key(const tg_config_t *cfg) {
  tg_ledger_db_t *db = NULL;
  int r = tg_ledger_db_open(cfg->database, cfg->data_dir, &db);
  if (r == 0)
    r = tg_ledger_db_secret(db, "cache_salt", salt_key, sizeof(salt_key));
  tg_ledger_db_close(db);
  return r;
}

static int cache_salt_of(const char *tenant, char out[TG_CACHE_SALT_LEN + 1]) {
  unsigned char h[EVP_MAX_MD_SIZE];
  unsigned int hl = 0;

  if (salt_key[0] == '\0' ||
      HMAC(EVP_sha256(), salt_key, (int)strlen(salt_key), (const unsigned char *)tenant,
           strlen(tenant), h, &hl) == NULL ||
      hl * 2 < TG_CACHE_SALT_LEN)
    return TG_ENOMEM;
  tg_hex_encode(h, TG_CACHE_SALT_LEN / 2, out);
  out[TG_CACHE_SALT_LEN] = '\0';
  return 0;
}

int tg_runtime_new(tg_config_t *cfg, tg_runtime_t **out) {
  tg_runtime_t *rt = calloc(1, sizeof(*rt));
  size_t i, j;

  if (rt == NULL)
    goto fail;
  atomic_init(&rt->refs, 1);
  rt->cfg = cfg;
  rt->pools = calloc(cfg->n_models ? cfg->n_models : 1, sizeof(*rt->pools));
  if (rt->pools == NULL)
    goto fail;
  for (i = 0; i < cfg->n_models; i++) {
    const tg_model_cfg_t *m = &cfg->models[i];
    tg_pool_t *p = &rt->pools[i];
    p->eps = calloc(m->n_endpoints ? m->n_endpoints : 1, sizeof(*p->eps));
    if (p->eps == NULL)
      goto fail;
    for (j = 0; j < m->n_endpoints; j++) {
      p->eps[j] = tg_endpoint_get(m->endpoints[j].url, m->endpoints[j].max_inflight);
      if (p->eps[j] == NULL)
        goto fail;
      p->n++;
    }
  }
  rt->queued = calloc(cfg->n_models ? cfg->n_models : 1, sizeof(*rt->queued));
  if (rt->queued == NULL)
    goto fail;
  for (i = 0; i < cfg->n_models; i++)
    atomic_init(&rt->queued[i], 0);
  rt->salts = calloc(cfg->n_tenants ? cfg->n_tenants : 1, sizeof(*rt->salts));
  if (rt->salts == NULL)
    goto fail;
  for (i = 0; i < cfg->n_tenants; i++)
    if (cache_salt_of(cfg->tenants[i].name, rt->salts[i]) != 0)
      goto fail;
  *out = rt;
  return 0;
fail:
  if (rt) {
    rt->cfg = NULL;
    tg_runtime_unref(rt);
  }
  tg_config_unref(cfg);
  return TG_ENOMEM;
}

tg_runtime_t *tg_runtime_ref(tg_runtime_t *rt) {
  atomic_fetch_add(&rt->refs, 1);
  return rt;
}

void tg_runtime_unref(tg_runtime_t *rt) {
  size_t i, j, n;
  if (rt == NULL || atomic_fetch_sub(&rt->refs, 1) != 1)
    return;
  n = rt->cfg ? rt->cfg->n_models : 0;
  for (i = 0; rt->pools && i < n; i++) {
    for (j = 0; j < rt->pools[i].n; j++)
      tg_endpoint_put(rt->pools[i].eps[j]);
    free(rt->pools[i].eps);
  }
  free(rt->pools);
  free(rt->queued);
  free(rt->salts);
  if (rt->cfg)
    tg_config_unref(rt->cfg);
  free(rt);
}

const tg_pool_t *tg_runtime_pool(const tg_runtime_t *rt, const tg_model_cfg_t *m) {
  return &rt->pools[m - rt->cfg->models];
}

tg_runtime_t *tg_worker_runtime(tg_worker_t *w) {
  tg_app_t *app = w->app;
  uint64_t gen = atomic_load_explicit(&app->rt_gen, memory_order_acquire);
  if (gen != w->rt_gen || w->rt == NULL) {
    tg_runtime_t *old = w->rt;
    pthread_mutex_lock(&app->rt_lock);
    w->rt = tg_runtime_ref(app->rt);
    w->rt_gen = atomic_load(&app->rt_gen);
    pthread_mutex_unlock(&app->rt_lock);
    tg_runtime_unref(old);
  }
  return w->rt;
}

const tg_keyset_t *tg_worker_keys(tg_worker_t *w) {
  uint64_t gen;
  if (w->app->keywatch == NULL)
    return NULL;
  gen = tg_keywatch_generation(w->app->keywatch);
  if (gen != w->keys_gen || w->keys == NULL) {
    tg_keyset_release(w->keys);
    w->keys = tg_keywatch_acquire(w->app->keywatch);
    w->keys_gen = gen;
  }
  return w->keys;
}

/* ---- workers ------------------------------------------------------------ */

/* Stamps w's heartbeat (app.h): the loop turned now. */
static void beat(tg_worker_t *w) {
  atomic_store_explicit(&w->beat_ms, uv_hrtime() / 1000000, memory_order_relaxed);
}

static void on_worker_handle_closed(uv_handle_t *h) {
  (void)h;
}

static void worker_close(tg_worker_t *w) {
  if (w->http == NULL)
    return;
  tg_http_server_close(w->http, NULL, NULL);
  w->http = NULL;
  if (w->up) {
    tg_upstream_close(w->up);
    w->up = NULL;
  }
  /* The ledger port first: closing it runs the commit callbacks of calls
   * the client closure left waiting for their record, and those calls
   * settle their admission with the policy. */
  if (w->ledger) {
    tg_ledger_port_close(w->ledger);
    w->ledger = NULL;
  }
  if (w->policy) {
    tg_policy_loop_close(w->policy);
    w->policy = NULL;
  }
  uv_close((uv_handle_t *)&w->tick, on_worker_handle_closed);
  atomic_store(&w->beat_ms, 0); /* stopped, not stuck: no tick from now on */
  tg_api_worker_closing(w);
  uv_close((uv_handle_t *)&w->async, on_worker_handle_closed);
  tg_access_out_close(w->alog);
}

static void worker_command(tg_worker_t *w) {
  int cmd = atomic_load(&w->app->cmd);
  if (w->http == NULL)
    return;
  if (cmd == TG_CMD_STOP) {
    w->cutting = 1; /* what is left is cut by the gateway, not by its clients */
    worker_close(w);
  } else if (cmd == TG_CMD_DRAIN && !w->is_admin) {
    tg_http_server_drain(w->http);
    /* not when the last request completes: its answer may still be
     * queued for a slow client, and closing now would cut it */
    if (tg_http_server_conns(w->http) == 0)
      worker_close(w);
  }
}

static void on_worker_async(uv_async_t *a) {
  tg_worker_t *w = a->data;
  worker_command(w);
  if (w->http != NULL && !w->is_admin)
    tg_api_serve_queues(w);
}

static void on_worker_tick(uv_timer_t *t) {
  tg_worker_t *w = t->data;
  beat(w);
  if (!w->is_admin)
    tg_api_tick(w);
  /* keep the cached key set fresh even when idle */
  if (!w->is_admin)
    (void)tg_worker_keys(w);
  if (atomic_load(&w->app->cmd) != TG_CMD_NONE)
    worker_command(w);
}

static void worker_main(void *arg) {
  tg_worker_t *w = arg;
  char name[16];

  if (w->is_admin)
    tg_thread_name("tg-admin");
  else {
    snprintf(name, sizeof(name), "tg-worker-%d", w->id);
    tg_thread_name(name);
  }
  beat(w);
  uv_run(&w->loop, UV_RUN_DEFAULT);
}

static int worker_init(tg_app_t *app, tg_worker_t *w, int id, int admin) {
  const tg_config_t *cfg = app->rt->cfg;
  tg_http_limits_t lim;
  int r;

  memset(w, 0, sizeof(*w));
  tg_recycle_init(&w->mem, TG_API_BLOCK, TG_RECYCLE_MAX);
  w->app = app;
  w->id = id;
  w->is_admin = admin;
  if ((r = uv_loop_init(&w->loop)) < 0)
    return r;
  tg_http_limits_default(&lim);
  lim.max_body_bytes = cfg->max_body_bytes;
  lim.max_header_bytes = cfg->max_header_bytes;
  lim.request_timeout_ms = cfg->client_request_timeout_ms;
  lim.keepalive_timeout_ms = cfg->client_keepalive_timeout_ms;
  lim.send_timeout_ms = cfg->client_send_timeout_ms;
  if (admin)
    r = tg_http_server_init(&w->http, &w->loop, cfg->admin_host, cfg->admin_port, 0, &lim,
                            tg_admin_handle, w);
  else
    r = tg_http_server_init(&w->http, &w->loop, cfg->listen_host, cfg->listen_port, 1, &lim,
                            tg_api_handle, w);
  if (r < 0) {
    fprintf(stderr, "tollgate: cannot listen on %s:%d: %s\n",
            admin ? cfg->admin_host : cfg->listen_host,
            admin ? cfg->admin_port : cfg->listen_port, tg_strerror(r));
    uv_run(&w->loop, UV_RUN_DEFAULT);
    uv_loop_close(&w->loop);
    return r;
  }
  tg_http_server_on_reject(w->http, tg_api_reject);
  if (!admin && (r = tg_upstream_init(&w->up, &w->loop)) < 0)
    return r;
  /* native or auto: http:// goes to the native client, https:// to libcurl */
  if (!admin && cfg->upstream_native != TG_UPSTREAM_CLIENT_CURL &&
      (r = tg_upstream_set_mode(w->up, TG_UPSTREAM_NATIVE)) < 0)
    return r;
  if (!admin && (r = tg_policy_loop_new(app->policy, &w->loop, &w->policy)) < 0)
    return r;
  if (!admin && app->ledger != NULL &&
      (r = tg_ledger_port_new(app->ledger, &w->loop, &w->ledger)) < 0)
    return r;
  if (app->log_fd >= 0 && (r = tg_access_out_new(&w->loop, app->log_fd, &w->alog)) < 0)
    return r;
  uv_timer_init(&w->loop, &w->tick);
  w->tick.data = w;
  uv_timer_start(&w->tick, on_worker_tick, TICK_MS, TICK_MS);
  uv_async_init(&w->loop, &w->async, on_worker_async);
  w->async.data = w;
  return 0;
}

static void worker_fini(tg_worker_t *w) {
  /* the loop has no handles left once the thread returns */
  uv_run(&w->loop, UV_RUN_DEFAULT);
  uv_loop_close(&w->loop);
  tg_access_out_free(w->alog); /* lines logged while the loop closed */
  w->alog = NULL;
  tg_api_worker_fini(w);
  tg_runtime_unref(w->rt);
  tg_keyset_release(w->keys);
  w->rt = NULL;
  w->keys = NULL;
}

/* ---- reload and signals ------------------------------------------------- */

static tg_metrics_t *alert_metrics; /* for the policy's alert hook */

static void count_alert(const char *tenant, int month) {
  tg_metrics_budget_event(alert_metrics, tenant, month);
}

/* Appends name to the list of keys whose change waits for a restart. */
static void note_key(char *list, size_t cap, const char *name) {
  size_t n = strlen(list);
  snprintf(list + n, cap - n, "%s%s", n ? ", " : "", name);
}

/* *dst becomes a copy of running when they differ. Returns 1 when they
 * did, 0 when not, TG_ENOMEM. */
static int keep_str(char **dst, const char *running) {
  char *p;
  if ((*dst == NULL && running == NULL) ||
      (*dst != NULL && running != NULL && strcmp(*dst, running) == 0))
    return 0;
  if (running != NULL && (p = strdup(running)) == NULL)
    return TG_ENOMEM;
  free(*dst);
  *dst = running != NULL ? p : NULL;
  return 1;
}

/* What the running process was built from cannot change under it: its
 * listeners, threads, stores, policy backend, HTTP limits, access log and
 * health prober are open. A new config keeps the running values of those
 * keys, so every reader of the runtime (the admin API's ledger queries, the
 * retention purge) sees the store the process writes to, and `waits` names
 * the keys whose new value waits for a restart ("" when none changed).
 * Returns 0 or TG_ENOMEM. */
static int keep_running_keys(const tg_config_t *cur, tg_config_t *cfg, char *waits, size_t cap) {
  int r;

  waits[0] = '\0';
#define KEEP_NUM(field, name)                                                                 \
  if (cfg->field != cur->field) {                                                           \
    cfg->field = cur->field;                                                                \
    note_key(waits, cap, name);                                                             \
  }
#define KEEP_STR(field, name)                                                                 \
  if ((r = keep_str(&cfg->field, cur->field)) < 0)                                          \
    return r;                                                                               \
  if (r > 0)                                                                                \
    note_key(waits, cap, name);
  if ((r = keep_str(&cfg->listen_host, cur->listen_host)) < 0)
    return r;
  if (r > 0 || cfg->listen_port != cur->listen_port) {
    cfg->listen_port = cur->listen_port;
    note_key(waits, cap, "listen");
  }
  if ((r = keep_str(&cfg->admin_host, cur->admin_host)) < 0)
    return r;
  if (r > 0 || cfg->admin_port != cur->admin_port) {
    cfg->admin_port = cur->admin_port;
    note_key(waits, cap, "admin_listen");
  }
  KEEP_NUM(workers, "workers")
  KEEP_STR(data_dir, "data_dir")
  KEEP_STR(state, "state")
  KEEP_STR(state_failure, "state_failure")
  KEEP_STR(database, "database")
  KEEP_NUM(ledger_off, "ledger")
  KEEP_NUM(metrics_off, "metrics")
  KEEP_NUM(max_body_bytes, "max_body_bytes")
  KEEP_NUM(max_header_bytes, "max_header_bytes")
  KEEP_NUM(client_request_timeout_ms, "timeouts.client_request")
  KEEP_NUM(client_keepalive_timeout_ms, "timeouts.client_keepalive")
  KEEP_NUM(client_send_timeout_ms, "timeouts.client_send")
  KEEP_NUM(health_check_interval_ms, "health_check_interval")
  KEEP_STR(access_log, "access_log")
  KEEP_NUM(upstream_native, "upstream_client")
#undef KEEP_NUM
#undef KEEP_STR
  return 0;
}

/* A health probe's bound: the connect timeout requests have, and a second
 * for the endpoint to answer /health. */
static uint64_t probe_timeout_ms(const tg_config_t *cfg) {
  return cfg->upstream_connect_timeout_ms + 1000;
}

/* Loads the config file again and swaps it in. Returns 0 or a negative
 * error; on an error, *named is the tenants_file the refused config names
 * (the caller frees it), or NULL when none or not known. */
static int reload(tg_app_t *app, char **named) {
  tg_config_t *cfg = NULL;
  tg_config_errors_t errs = {0};
  tg_runtime_t *rt, *old;
  char waits[512];
  size_t i;
  int r;

  r = tg_config_load(app->config_path, &cfg, &errs);
  if (r < 0) {
    tg_metrics_reload(app->metrics, 0);
    fprintf(stderr, "tollgate: reload failed, keeping the running config:\n");
    for (i = 0; i < errs.n; i++)
      fprintf(stderr, "  %s\n", errs.msgs[i]);
    *named = errs.tenants_file;
    errs.tenants_file = NULL;
    tg_config_errors_free(&errs);
    return r;
  }
  if ((r = keep_running_keys(app->rt->cfg, cfg, waits, sizeof(waits))) < 0) {
    tg_config_unref(cfg);
    return r;
  }
  if (waits[0] != '\0')
    fprintf(stderr, "tollgate: reload: a restart is needed to change %s (the running "
                    "values stay); the rest applies now\n", waits);
  if ((r = tg_runtime_new(cfg, &rt)) < 0)
    return r;
  pthread_mutex_lock(&app->rt_lock);
  old = app->rt;
  app->rt = rt;
  atomic_fetch_add_explicit(&app->rt_gen, 1, memory_order_release);
  pthread_mutex_unlock(&app->rt_lock);
  tg_runtime_unref(old);
  tg_health_set_timeout(probe_timeout_ms(cfg));
  tg_policy_reconfig(app->policy, cfg);
  tg_metrics_reload(app->metrics, 1);
  fprintf(stderr, "tollgate: config reloaded from %s\n", app->config_path);
  return 0;
}

typedef struct {
  uv_work_t work;
  tg_runtime_t *rt;
  int64_t deleted;
  int rc;                    /* the purge's outcome, 0 or a TG_E* code */
  int running;
  int stopped;               /* the stop cut its waits short */
  tg_metrics_t *metrics;     /* counts runs and records removed */
  int wake[2];               /* a pipe: a stop ends the purge's waits for the
                              * database (-1 when it could not be made) */
} purge_t;

/* A reload follows a change of the config file or of its tenants_file (see
 * watch_files): these are the directories watched for them. */
#define WATCH_DIRS 8   /* directories watched at once */
#define WATCH_HOPS 8   /* symlinks followed from one file */
#define WATCH_NAMES 8  /* names that count in one directory */
#define WATCH_NAME_MAX 256

typedef struct {
  char dir[PATH_MAX];        /* its real path */
  int any_yaml;              /* the config's own directory: any .yaml name counts */
  size_t n_names;
  char names[WATCH_NAMES][WATCH_NAME_MAX]; /* the files' and links' names in it */
} watch_want_t;

typedef struct {
  uv_fs_event_t h;           /* first: the callback's handle is the watch */
  int on;                    /* started */
  watch_want_t want;
} watch_dir_t;

typedef struct {
  tg_app_t *app;
  uv_timer_t purge_timer;    /* ledger retention, hourly */
  purge_t purge;
  uv_signal_t sigterm, sigint, sighup;
  uv_timer_t drain_timer, watch;
  uv_timer_t cfg_debounce;   /* editors write in several steps */
  uint64_t settle_since;     /* loop time of a pending reload's first cause */
  watch_dir_t watches[WATCH_DIRS]; /* the directories of the config's files */
  char *watched_tenants;     /* the tenants_file they follow, or NULL */
  int stopping;
  int lock_fd;               /* data_dir's owner lock, -1 when none (ledger off) */
} main_ctx_t;

/* Blocks (SIG_BLOCK) or lets through (SIG_UNBLOCK) SIGHUP in the calling
 * thread. */
static void sighup_mask(int how) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(how, &set, NULL);
}

/* Closes the SIGHUP handle and ignores SIGHUP from then on. Closing the
 * last handle of a signal makes libuv restore its default action, which
 * for SIGHUP ends the process (before the final save of the spend, the
 * ledger's last records): blocked meanwhile, a SIGHUP sent between the two
 * waits, and SIG_IGN discards it. */
static void sighup_ignore(uv_signal_t *h) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = SIG_IGN;
  sigemptyset(&sa.sa_mask);
  sighup_mask(SIG_BLOCK);
  uv_close((uv_handle_t *)h, NULL);
  sigaction(SIGHUP, &sa, NULL);
  sighup_mask(SIG_UNBLOCK);
}

static void broadcast(tg_app_t *app, int cmd) {
  int i;
  atomic_store(&app->cmd, cmd);
  for (i = 0; i < app->n_workers; i++)
    uv_async_send(&app->workers[i].async);
  uv_async_send(&app->admin.async);
}

static void on_drain_timeout(uv_timer_t *t) {
  main_ctx_t *m = t->data;
  fprintf(stderr, "tollgate: drain timeout, closing remaining connections\n");
  broadcast(m->app, TG_CMD_STOP);
}

/* Stops the admin loop once every API worker has finished and no admin
 * query runs or waits (the drain timeout stops it anyway). */
static void on_watch(uv_timer_t *t) {
  main_ctx_t *m = t->data;
  int i, alive = 0;
  for (i = 0; i < m->app->n_workers; i++)
    if (m->app->workers[i].http != NULL)
      alive++;
  if (alive == 0 && (atomic_load(&m->app->admin_jobs) == 0 || m->app->admin.http == NULL)) {
    broadcast(m->app, TG_CMD_STOP);
    uv_close((uv_handle_t *)&m->sigterm, NULL);
    uv_close((uv_handle_t *)&m->sigint, NULL);
    sighup_ignore(&m->sighup);
    uv_close((uv_handle_t *)&m->drain_timer, NULL);
    uv_close((uv_handle_t *)&m->watch, NULL);
    for (i = 0; i < WATCH_DIRS; i++)
      uv_close((uv_handle_t *)&m->watches[i].h, NULL);
    uv_close((uv_handle_t *)&m->purge_timer, NULL);
    uv_close((uv_handle_t *)&m->cfg_debounce, NULL);
  }
}

/* ---- ledger retention ----------------------------------------------------
 * Hourly, off the loop: each tenant's records older than its
 * retention_days go (the default for tenants no longer configured), never
 * one of the current or previous month. */

static int retention_of(void *arg, const char *tenant) {
  purge_t *p = arg;
  const tg_tenant_cfg_t *t = tg_config_tenant(p->rt->cfg, tenant);
  return t ? t->retention_days : 0; /* a tenant no longer configured: the default */
}

static void purge_work(uv_work_t *wk) {
  purge_t *p = wk->data;
  const tg_config_t *cfg = p->rt->cfg;
  tg_ledger_db_t *db = NULL;
  struct sched_param sp = {.sched_priority = 0};

  /* as the ledger's own threads: waking, it never preempts a loop thread
   * (the pool's thread gets its policy back at the end) */
  (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);
  p->deleted = 0;
  p->rc = tg_ledger_db_open_wake(cfg->database, cfg->data_dir, p->wake[0], &db);
  if (p->rc == 0)
    p->rc = tg_ledger_purge_expired(db, tg_now_ms(), retention_of, p, &p->deleted);
  tg_ledger_db_close(db);
  (void)pthread_setschedparam(pthread_self(), SCHED_OTHER, &sp);
}

static void purge_done(uv_work_t *wk, int status) {
  purge_t *p = wk->data;
  char msg[160];
  (void)status;
  /* counted before the lines are logged: whoever reads a line sees its count */
  tg_metrics_purge(p->metrics, p->rc == 0, (uint64_t)(p->deleted > 0 ? p->deleted : 0));
  if (p->deleted > 0) {
    snprintf(msg, sizeof(msg), "%lld ledger records past their tenant's retention removed",
             (long long)p->deleted);
    tg_policy_log("ledger_retention_purge", msg);
  }
  if (p->rc != 0) {
    /* the database's own line on stderr says why; the next try is in an hour */
    snprintf(msg, sizeof(msg), "the ledger's retention purge did not finish (%s)%s",
             tg_strerror(p->rc), p->stopped ? ": the gateway is stopping" : "");
    tg_policy_log("ledger_retention_purge_failed", msg);
  }
  tg_runtime_unref(p->rt);
  p->rt = NULL;
  p->running = 0;
}

static void on_purge_timer(uv_timer_t *t) {
  main_ctx_t *m = t->data;
  tg_app_t *app = m->app;
  int r;

  if (m->purge.running || m->stopping)
    return;
  pthread_mutex_lock(&app->rt_lock);
  m->purge.rt = tg_runtime_ref(app->rt);
  pthread_mutex_unlock(&app->rt_lock);
  m->purge.work.data = &m->purge;
  m->purge.running = 1;
  /* the first work queued starts libuv's pool threads, which inherit the
   * mask: SIGHUP stays with the main thread */
  sighup_mask(SIG_BLOCK);
  r = uv_queue_work(t->loop, &m->purge.work, purge_work, purge_done);
  sighup_mask(SIG_UNBLOCK);
  if (r < 0) {
    tg_runtime_unref(m->purge.rt);
    m->purge.rt = NULL;
    m->purge.running = 0;
  }
}

/* How long a SIGHUP waits for the next one: a burst (a reloader that
 * signals every replica's process, an operator's loop) gives one reload,
 * and a SIGTERM behind it is not held by a queue of whole reloads. */
#define HUP_SETTLE_MS 100
#define FILE_SETTLE_MS 300 /* editors write in several steps */
#define SETTLE_MAX_MS 1000 /* causes that never pause still reload */

static void on_cfg_settled(uv_timer_t *t);

/* A reload after ms without another cause (a SIGHUP, a file's change), or
 * SETTLE_MAX_MS after the first one if they keep coming. */
static void settle_then_reload(main_ctx_t *m, uint64_t ms) {
  uint64_t now = uv_now(m->cfg_debounce.loop);
  if (!uv_is_active((uv_handle_t *)&m->cfg_debounce))
    m->settle_since = now;
  else if (now - m->settle_since >= SETTLE_MAX_MS)
    return; /* it is due: let it fire */
  uv_timer_start(&m->cfg_debounce, on_cfg_settled, ms, 0);
}

/* Splits path into its directory (into dir, "." or "/" when it has none)
 * and returns its last component; NULL when the directory does not fit. */
static const char *split_dir(const char *path, char *dir, size_t cap) {
  const char *slash = strrchr(path, '/');
  size_t n = slash ? (size_t)(slash - path) : 0;

  if (n == 0) {
    snprintf(dir, cap, "%s", slash ? "/" : ".");
  } else {
    if (n >= cap)
      return NULL;
    memcpy(dir, path, n);
    dir[n] = '\0';
  }
  return slash ? slash + 1 : path;
}

static int ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), k = strlen(suffix);
  return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Adds name, in directory dir (its real path once resolved), to what
 * plan[0..*n) watches; a directory that does not exist is left out. */
static void want_name(watch_want_t *plan, size_t *n, const char *dir, const char *name,
                      int any_yaml) {
  char real[PATH_MAX];
  watch_want_t *w;
  size_t i;

  if (strlen(name) >= WATCH_NAME_MAX || realpath(dir, real) == NULL)
    return;
  for (i = 0; i < *n && strcmp(plan[i].dir, real) != 0; i++)
    ;
  if (i == *n) {
    if (*n == WATCH_DIRS)
      return;
    memcpy(plan[i].dir, real, sizeof(real));
    (*n)++;
  }
  w = &plan[i];
  w->any_yaml |= any_yaml;
  for (i = 0; i < w->n_names && strcmp(w->names[i], name) != 0; i++)
    ;
  if (i == w->n_names && w->n_names < WATCH_NAMES)
    memcpy(w->names[w->n_names++], name, strlen(name) + 1);
}

/* Adds path's name in its directory to plan and, while it is a symlink,
 * its target's, hop by hop: a link to a file elsewhere (a ConfigMap
 * mounted apart from the config) and a ConfigMap's own
 * `name -> ..data/name` are watched where the change happens. */
static void want_file(watch_want_t *plan, size_t *n, const char *path, int is_config) {
  char cur[PATH_MAX], dir[PATH_MAX], target[PATH_MAX];
  const char *name;
  ssize_t len;
  int hop;

  if (strlen(path) >= sizeof(cur))
    return;
  memcpy(cur, path, strlen(path) + 1);
  for (hop = 0; hop <= WATCH_HOPS; hop++) {
    if ((name = split_dir(cur, dir, sizeof(dir))) == NULL)
      return;
    want_name(plan, n, dir, name, is_config && hop == 0);
    len = readlink(cur, target, sizeof(target) - 1);
    if (len < 0)
      return; /* no link (or no file yet): the end */
    target[len] = '\0';
    if (target[0] == '/')
      memcpy(cur, target, (size_t)len + 1);
    else if ((size_t)snprintf(cur, sizeof(cur), "%s/%s", dir, target) >= sizeof(cur))
      return;
  }
}

/* 1 when a change of filename in w's directory reloads: one of its names,
 * a ConfigMap's `..data` swap, or in the config's own directory any YAML
 * file (by its suffix: an editor's .tollgate.yaml.swp, backup
 * tollgate.yaml~ or autosave #tollgate.yaml# is none). */
static int counts(const watch_want_t *w, const char *filename) {
  size_t i;
  if (strcmp(filename, "..data") == 0 ||
      (w->any_yaml && (ends_with(filename, ".yaml") || ends_with(filename, ".yml"))))
    return 1;
  for (i = 0; i < w->n_names; i++)
    if (strcmp(filename, w->names[i]) == 0)
      return 1;
  return 0;
}

static void on_watch_event(uv_fs_event_t *h, const char *filename, int events, int status) {
  watch_dir_t *w = (watch_dir_t *)(void *)h;
  (void)events;
  if (status < 0 || filename == NULL || !counts(&w->want, filename))
    return;
  settle_then_reload(h->data, FILE_SETTLE_MS);
}

/* Watches the config file and tenants_file (NULL: none): the directory of
 * each, and of each symlink on the way to them, for their names. The
 * directories are watched, not the files, because editors replace files by
 * renaming, which ends a watch on the file itself; and a ConfigMap volume
 * swaps its `..data` link, so no file's name changes. Called at the start
 * and after each reload, failed or not: the links may point elsewhere now,
 * and the file the config names is watched even when its error refused the
 * reload, so its fix reloads. Out of memory, what is watched stays. */
static void watch_files(main_ctx_t *m, const char *tenants_file) {
  watch_want_t *plan = calloc(WATCH_DIRS, sizeof(*plan));
  char *keep = tenants_file != NULL ? strdup(tenants_file) : NULL;
  size_t n = 0, i, j;

  if (plan == NULL || (tenants_file != NULL && keep == NULL)) {
    free(plan);
    free(keep);
    return;
  }
  want_file(plan, &n, m->app->config_path, 1);
  if (tenants_file != NULL)
    want_file(plan, &n, tenants_file, 0);
  for (i = 0; i < WATCH_DIRS; i++) {
    watch_dir_t *w = &m->watches[i];
    for (j = 0; j < n && strcmp(plan[j].dir, w->want.dir) != 0; j++)
      ;
    if (w->on && j == n) {
      uv_fs_event_stop(&w->h);
      w->on = 0;
    }
  }
  for (j = 0; j < n; j++) {
    watch_dir_t *w = NULL;
    for (i = 0; i < WATCH_DIRS && w == NULL; i++)
      if (m->watches[i].on && strcmp(m->watches[i].want.dir, plan[j].dir) == 0)
        w = &m->watches[i];
    for (i = 0; i < WATCH_DIRS && w == NULL; i++)
      if (!m->watches[i].on)
        w = &m->watches[i];
    w->want = plan[j]; /* the names may have changed */
    if (!w->on)
      w->on = uv_fs_event_start(&w->h, on_watch_event, w->want.dir, 0) == 0;
  }
  free(plan);
  free(m->watched_tenants);
  m->watched_tenants = keep;
}

static void watch_init(main_ctx_t *m, uv_loop_t *loop) {
  int i;
  uv_timer_init(loop, &m->cfg_debounce); /* SIGHUP's too */
  m->cfg_debounce.data = m;
  for (i = 0; i < WATCH_DIRS; i++) {
    uv_fs_event_init(loop, &m->watches[i].h);
    m->watches[i].h.data = m;
  }
}

static void on_cfg_settled(uv_timer_t *t) {
  main_ctx_t *m = t->data;
  char *named = NULL;

  if (m->stopping)
    return;
  if (reload(m->app, &named) == 0)
    watch_files(m, m->app->rt->cfg->tenants_file);
  else
    /* the file the refused config names, when it says */
    watch_files(m, named != NULL ? named : m->watched_tenants);
  free(named);
}

static void on_signal(uv_signal_t *s, int signum) {
  main_ctx_t *m = s->data;
  if (signum == SIGHUP) {
    /* reloads once the signals stop coming, on the debounce timer the
     * file watcher starts too (one reload for both); none once stopping */
    if (!m->stopping)
      settle_then_reload(m, HUP_SETTLE_MS);
    return;
  }
  if (m->stopping) {
    fprintf(stderr, "tollgate: second signal, closing remaining connections\n");
    broadcast(m->app, TG_CMD_STOP);
    return;
  }
  m->stopping = 1;
  /* first, before the listeners close: a successor that finds the port
   * free then finds the data_dir's holder draining, and waits for it */
  tg_datalock_draining(m->lock_fd);
  if (m->purge.wake[1] >= 0) {
    /* a purge waiting on a frozen database would hold the stop */
    ssize_t n = write(m->purge.wake[1], "x", 1);
    (void)n;
    m->purge.stopped = 1;
  }
  fprintf(stderr, "tollgate: draining (up to %llu ms)\n",
          (unsigned long long)m->app->rt->cfg->drain_timeout_ms);
  broadcast(m->app, TG_CMD_DRAIN);
  uv_timer_start(&m->drain_timer, on_drain_timeout, m->app->rt->cfg->drain_timeout_ms, 0);
  uv_timer_start(&m->watch, on_watch, 50, 50);
}

/* ---- serve -------------------------------------------------------------- */

/* How long a successor waits for a draining predecessor beyond its own
 * drain timeout (the predecessor then flushes its ledger and exits); and
 * how long a holder that says it serves is given to say it drains (a
 * SIGTERM sent a moment before this start). */
#define LOCK_WAIT_MARGIN_MS 10000
#define LOCK_SERVING_GRACE_MS 1000
#define LOCK_POLL_MS 100

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void holder_text(const tg_datalock_holder_t *h, char *buf, size_t size) {
  if (h->pid > 0)
    snprintf(buf, size, "pid %ld", h->pid);
  else
    snprintf(buf, size, "pid unknown");
}

/* One gateway a data_dir: its ledger spool has one writer (docs/ledger.md).
 * Takes the data_dir's owner lock before the spool is opened or replayed.
 * A holder that is draining (a rolling restart on this host) is waited
 * for, up to the drain timeout and a margin, saying so once; a holder that
 * serves makes this start fail. Returns 0 and *fd, or -1 having said why. */
static int lock_data_dir(const tg_config_t *cfg, int *fd) {
  tg_datalock_holder_t h;
  uint64_t start = mono_ms(), waited = 0, limit = cfg->drain_timeout_ms + LOCK_WAIT_MARGIN_MS;
  struct timespec poll = {0, LOCK_POLL_MS * 1000000L};
  char who[48];
  int r, said = 0;

  for (;;) {
    r = tg_datalock_try(cfg->data_dir, fd, &h);
    if (r != TG_EBUSY)
      break;
    waited = mono_ms() - start;
    holder_text(&h, who, sizeof(who));
    if (h.draining && waited < limit) {
      if (!said)
        fprintf(stderr, "tollgate: data_dir %s is held by the gateway with %s, which is "
                        "draining; waiting up to %llu ms for it to stop\n",
                cfg->data_dir, who, (unsigned long long)limit);
      said = 1;
    } else if (h.draining || waited >= LOCK_SERVING_GRACE_MS) {
      break;
    }
    nanosleep(&poll, NULL);
  }
  if (r == 0) {
    if (said)
      fprintf(stderr, "tollgate: data_dir %s is free after %llu ms\n", cfg->data_dir,
              (unsigned long long)(mono_ms() - start));
    return 0;
  }
  if (r == TG_EBUSY && h.draining)
    fprintf(stderr, "tollgate: data_dir %s is still held by the gateway with %s, draining, "
                    "after %llu ms; not starting\n",
            cfg->data_dir, who, (unsigned long long)waited);
  else if (r == TG_EBUSY)
    fprintf(stderr, "tollgate: data_dir %s is in use by another gateway (%s): a data_dir's "
                    "ledger has one writer; give each gateway its own data_dir\n",
            cfg->data_dir, who);
  else
    fprintf(stderr, "tollgate: cannot lock data_dir %s (%s/%s): %s\n", cfg->data_dir,
            cfg->data_dir, TG_DATALOCK_FILE, r == TG_EIO ? strerror(errno) : tg_strerror(r));
  return -1;
}

/* Every client connection and every upstream connection is a descriptor,
 * and so is each idle one kept for reuse. Debian's default soft limit
 * (1,024) is below what one loop holds at a thousand concurrent requests
 * (a client and an upstream connection each), so the soft limit is raised
 * to the hard one, as a server that expects many connections does. Says so
 * when the hard limit is still low. */
static void raise_nofile(void) {
  struct rlimit rl;

  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || getrlimit(RLIMIT_NOFILE, &rl) != 0)
      return;
  }
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < 16384)
    fprintf(stderr, "tollgate: warning: open files limited to %llu; each concurrent "
                    "request takes two\n", (unsigned long long)rl.rlim_cur);
}

int tg_cmd_serve(int argc, char **argv) {
  tg_app_t app;
  tg_config_t *cfg = NULL;
  tg_config_errors_t errs = {0};
  main_ctx_t m;
  uv_loop_t *main_loop = uv_default_loop();
  unsigned char rnd[6];
  const char *path = NULL;
  const tg_cli_opt_t opts[] = {{"--config", "-c", &path}, {NULL, NULL, NULL}};
  int i, r, rc = 1, started = 0, admin_started = 0;
  size_t k;

  r = tg_cli_parse("serve", argc, argv, opts);
  if (r != 0 || path == NULL || path[0] == '\0') {
    fprintf(r == TG_CLI_HELP ? stdout : stderr, "usage: tollgate serve --config FILE\n");
    return r == TG_CLI_HELP ? 0 : 2;
  }
  /* Until its handler runs, a SIGHUP would end the gateway: it waits,
   * blocked (the threads started from here inherit the block), and one
   * sent during the start gives a reload once the loop runs. */
  sighup_mask(SIG_BLOCK);
  memset(&app, 0, sizeof(app));
  memset(&m, 0, sizeof(m));
  m.purge.wake[0] = m.purge.wake[1] = -1;
  m.lock_fd = -1;
  app.log_fd = -1;
  pthread_mutex_init(&app.rt_lock, NULL);
  if (tg_config_load(path, &cfg, &errs) < 0) {
    for (k = 0; k < errs.n; k++)
      fprintf(stderr, "%s\n", errs.msgs[k]);
    tg_config_errors_free(&errs);
    return 1;
  }
  /* the workers' listeners share the port (SO_REUSEPORT), and would share
   * it with another gateway already there: check that none is, before
   * anything (the ledger's spool) is opened */
  if ((r = tg_http_listen_probe(cfg->listen_host, cfg->listen_port)) < 0) {
    fprintf(stderr, "tollgate: cannot listen on %s:%d: %s\n", cfg->listen_host,
            cfg->listen_port, tg_strerror(r));
    tg_config_unref(cfg);
    pthread_mutex_destroy(&app.rt_lock);
    return 1;
  }
  /* the spool's owner; commands that only use the database (keys,
   * invoice, usage, migrate) go through its own locking and take no part */
  if (!cfg->ledger_off && lock_data_dir(cfg, &m.lock_fd) < 0) {
    tg_config_unref(cfg);
    pthread_mutex_destroy(&app.rt_lock);
    return 1;
  }
  app.config_path = strdup(path);
  signal(SIGPIPE, SIG_IGN);
  raise_nofile();
  curl_global_init(CURL_GLOBAL_DEFAULT);
  if (RAND_bytes(rnd, sizeof(rnd)) != 1)
    memset(rnd, 0, sizeof(rnd));
  tg_hex_encode(rnd, sizeof(rnd), app.id_prefix); /* request ids stay unique across gateways */
  app.id_prefix[2 * sizeof(rnd)] = '\0';

  r = tg_access_log_open(cfg->access_log);
  if (r < -1) {
    fprintf(stderr, "tollgate: cannot open access log %s: %s\n", cfg->access_log,
            strerror(-(r + 1)));
    tg_config_unref(cfg);
    goto out;
  }
  app.log_fd = r;
  r = tg_keywatch_start_db(cfg->database, cfg->data_dir, 200, &app.keywatch);
  if (r < 0) {
    fprintf(stderr, "tollgate: cannot open the key store (%s): %s\n",
            strcmp(cfg->database, "sqlite") == 0 ? cfg->data_dir : "database", tg_strerror(r));
    tg_config_unref(cfg);
    goto out;
  }
  r = cfg->ledger_off ? 0 : tg_ledger_open(cfg->database, cfg->data_dir, NULL, &app.ledger);
  if (r < 0) {
    fprintf(stderr, "tollgate: cannot open the usage ledger: %s\n", tg_strerror(r));
    tg_config_unref(cfg);
    goto out;
  }
  app.ledger_refuse_at = 90000; /* 90 % of the ledger's default bound */
  if (tg_policy_new(cfg, &app.policy) < 0) {
    tg_config_unref(cfg);
    goto out;
  }
  if ((r = load_salt_key(cfg)) < 0) {
    fprintf(stderr, "tollgate: cannot read the cache_salt key from the database: %s\n",
            tg_strerror(r));
    tg_config_unref(cfg);
    goto out;
  }
  if (tg_runtime_new(cfg, &app.rt) < 0)
    goto out;
  atomic_store(&app.rt_gen, 1);
  tg_health_start(app.rt->cfg->health_check_interval_ms, probe_timeout_ms(app.rt->cfg));

  app.n_workers = app.rt->cfg->workers > 0 ? app.rt->cfg->workers : 1;
  if (!app.rt->cfg->metrics_off && tg_metrics_new((size_t)app.n_workers, &app.metrics) < 0)
    goto out;
  alert_metrics = app.metrics;
  tg_policy_alert_hook = count_alert;
  app.workers = calloc((size_t)app.n_workers, sizeof(*app.workers));
  if (app.workers == NULL)
    goto out;
  for (i = 0; i < app.n_workers; i++) {
    if (worker_init(&app, &app.workers[i], i, 0) < 0)
      goto stop;
    started++;
  }
  if (worker_init(&app, &app.admin, 255, 1) < 0)
    goto stop;
  admin_started = 1;

  uv_signal_init(main_loop, &m.sigterm);
  uv_signal_init(main_loop, &m.sigint);
  uv_signal_init(main_loop, &m.sighup);
  uv_timer_init(main_loop, &m.drain_timer);
  uv_timer_init(main_loop, &m.watch);
  m.app = &app;
  m.sigterm.data = m.sigint.data = m.sighup.data = &m;
  m.drain_timer.data = m.watch.data = &m;
  uv_signal_start(&m.sigterm, on_signal, SIGTERM);
  uv_signal_start(&m.sigint, on_signal, SIGINT);
  uv_signal_start(&m.sighup, on_signal, SIGHUP);
  watch_init(&m, main_loop);
  watch_files(&m, app.rt->cfg->tenants_file);
  if (pipe2(m.purge.wake, O_CLOEXEC | O_NONBLOCK) != 0)
    m.purge.wake[0] = m.purge.wake[1] = -1;
  m.purge.metrics = app.metrics;
  uv_timer_init(main_loop, &m.purge_timer);
  m.purge_timer.data = &m;
  uv_timer_start(&m.purge_timer, on_purge_timer, 30 * 1000, 3600 * 1000);

  for (i = 0; i < app.n_workers; i++)
    uv_thread_create(&app.workers[i].thread, worker_main, &app.workers[i]);
  uv_thread_create(&app.admin.thread, worker_main, &app.admin);
  fprintf(stderr, "tollgate: serving on %s:%d (admin %s:%d), %d workers\n",
          app.rt->cfg->listen_host, app.rt->cfg->listen_port, app.rt->cfg->admin_host,
          app.rt->cfg->admin_port, app.n_workers);

  sighup_mask(SIG_UNBLOCK); /* the main thread's alone: the others keep the block */
  uv_run(main_loop, UV_RUN_DEFAULT);
  for (i = 0; i < app.n_workers; i++)
    uv_thread_join(&app.workers[i].thread);
  uv_thread_join(&app.admin.thread);
  for (i = 0; i < app.n_workers; i++)
    worker_fini(&app.workers[i]);
  worker_fini(&app.admin);
  uv_loop_close(main_loop);
  fprintf(stderr, "tollgate: stopped\n");
  rc = 0;
  goto out;

stop:
  /* a listener failed before any thread ran: close what was opened here */
  for (i = 0; i < started; i++) {
    worker_close(&app.workers[i]);
    worker_fini(&app.workers[i]);
  }
  if (admin_started) {
    worker_close(&app.admin);
    worker_fini(&app.admin);
  }
out:
  tg_health_stop();
  free(app.workers);
  if (app.keywatch)
    tg_keywatch_stop(app.keywatch);
  tg_runtime_unref(app.rt);
  tg_policy_alert_hook = NULL;
  tg_policy_free(app.policy);
  tg_metrics_free(app.metrics);
  /* records the database has not taken wait in the spool: the exit says
   * so, for whoever restarts the gateway (or only watches its exits) */
  if (app.ledger && tg_ledger_close(app.ledger) > 0 && rc == 0)
    rc = TG_EXIT_SPOOLED;
  tg_datalock_release(m.lock_fd); /* after the last spool write */
  if (app.log_fd > STDERR_FILENO)
    close(app.log_fd);
  for (i = 0; i < 2; i++)
    if (m.purge.wake[i] >= 0)
      close(m.purge.wake[i]);
  free(app.config_path);
  free(m.watched_tenants);
  pthread_mutex_destroy(&app.rt_lock);
  curl_global_cleanup();
  return rc;
}
