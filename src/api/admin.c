/* The admin listener: liveness (/healthz), readiness (/readyz: the config is
 * loaded, the gateway is not draining, every model has at least one
 * healthy endpoint, with `state_failure: closed` every loop is connected
 * to Redis, and the ledger keeps records and has room for more), and the admin API, which needs an admin key (a key made
 * with `tollgate keys create --admin`):
 *
 *   GET /admin/v1/tenants/{tenant}/invoices/{YYYY-MM}[?format=json|csv]
 *   GET /admin/v1/tenants/{tenant}/usage/{YYYY-MM-DD}
 *
 * Ledger queries block, so they run on libuv's thread pool, never on the
 * loop. */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>

#include <llhttp.h>

#include "api/api.h"
#include "core/err.h"
#include "core/strbuf.h"
#include "meter/invoice.h"
#include "obs/accesslog.h"

/* No cache keeps an admin answer: a tenant's money changes with every
 * request, and a refusal kept (401, 403, tenant_not_found) would outlive
 * the key or the tenant that ends it. */
#define NO_STORE "Cache-Control: no-store\r\n"

/* tg_api_error with NO_STORE before extra (NULL or header lines): every
 * error the admin listener answers. */
static void admin_error(tg_http_req_t *req, int status, const char *type, const char *code,
                        const char *rid, const char *extra, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static void admin_error(tg_http_req_t *req, int status, const char *type, const char *code,
                        const char *rid, const char *extra, const char *fmt, ...) {
  char msg[512], hdrs[256];
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  snprintf(hdrs, sizeof(hdrs), "%s%s", NO_STORE, extra ? extra : "");
  tg_api_error(req, status, type, code, rid, hdrs, "%s", msg);
}

static void respond_json(tg_http_req_t *req, const char *rid, int status, json_t *root) {
  char *text = json_dumps(root, JSON_COMPACT);
  char hdr[64];
  json_decref(root);
  if (text == NULL) {
    admin_error(req, 500, "server_error", "internal_error", rid, NULL, "out of memory");
    return;
  }
  snprintf(hdr, sizeof(hdr), "x-request-id: %s\r\n", rid);
  tg_http_respond(req, status, "application/json", hdr, text, strlen(text));
  free(text);
}

/* /healthz: the process answers, and every API loop turns. A loop whose
 * heartbeat (app.h) is older than timeouts.worker_stall is stuck in a
 * callback: its connections, and the ones its listener accepts, wait for
 * nothing; 503 names it, so a liveness probe restarts the process. A loop
 * that has stopped (drained) is not stuck. */
static void healthz(tg_worker_t *w, tg_http_req_t *req, const char *rid) {
  const tg_app_t *app = w->app;
  uint64_t bound = tg_worker_runtime(w)->cfg->worker_stall_timeout_ms;
  uint64_t now = uv_hrtime() / 1000000;
  json_t *root = json_object(), *stuck = json_array();
  int i;

  for (i = 0; i < app->n_workers; i++) {
    uint64_t b = atomic_load_explicit(&app->workers[i].beat_ms, memory_order_relaxed);
    if (b != 0 && now > b && now - b > bound)
      json_array_append_new(stuck, json_pack("{s:i,s:I}", "worker", i, "silent_ms",
                                             (json_int_t)(now - b)));
  }
  if (json_array_size(stuck) > 0) {
    json_object_set_new(root, "status", json_string("stuck"));
    json_object_set_new(root, "stuck_workers", stuck);
    respond_json(req, rid, 503, root);
    return;
  }
  json_decref(stuck);
  json_object_set_new(root, "status", json_string("ok"));
  respond_json(req, rid, 200, root);
}

static void readyz(tg_worker_t *w, tg_http_req_t *req, const char *rid) {
  tg_runtime_t *rt = tg_worker_runtime(w);
  json_t *root = json_object(), *down = json_array();
  size_t i;
  int draining = atomic_load(&w->app->cmd) != TG_CMD_NONE;
  /* with `state_failure: closed`, a loop without its Redis connection
   * refuses every request: not ready until all have one */
  int state_up = tg_policy_ready(w->app->policy);
  /* answers are being withheld because their records cannot be kept, or
   * new requests are refused because the ledger's backlog is full */
  const tg_ledger_t *lg = w->app->ledger;
  const char *ledger = lg == NULL                                        ? "off"
                       : tg_ledger_losing(lg)                            ? "losing_records"
                       : tg_ledger_backlog(lg) >= w->app->ledger_refuse_at ? "backlog_full"
                                                                         : "up";
  int ledger_up = lg == NULL || strcmp(ledger, "up") == 0;

  for (i = 0; i < rt->cfg->n_models; i++)
    if (!tg_pool_ready(&rt->pools[i]))
      json_array_append_new(down, json_string(rt->cfg->models[i].name));
  if (draining || json_array_size(down) > 0 || !state_up || !ledger_up) {
    json_object_set_new(root, "status", json_string(draining ? "draining" : "not_ready"));
    json_object_set_new(root, "models_without_healthy_endpoint", down);
    json_object_set_new(root, "state", json_string(state_up ? "up" : "unavailable"));
    json_object_set_new(root, "ledger", json_string(ledger));
    respond_json(req, rid, 503, root);
    return;
  }
  json_decref(down);
  json_object_set_new(root, "status", json_string("ready"));
  respond_json(req, rid, 200, root);
}

/* Ledger queries run on libuv's thread pool (4 threads unless
 * UV_THREADPOOL_SIZE says otherwise), which the loops' name lookups (native
 * upstream client, Redis) and the retention purge use too: slow queries
 * (a big ledger, a locked table, a slow PostgreSQL) must not take all of it,
 * or requests to an endpoint named by host name wait behind them. */
#define TG_ADMIN_JOBS_RUNNING 2
#define TG_ADMIN_JOBS_WAITING 256

typedef struct admin_job_s {
  uv_work_t work;
  struct admin_job_s *next;  /* waiting for a turn */
  int waiting;
  tg_http_req_t *req;
  tg_worker_t *w;
  char rid[32];
  uint64_t start_ns;  /* the request's first byte, for the audit line */
  char key_id[40];    /* the admin key's id, for the audit line */
  char path[160];
  char tenant[128];
  char period[16];
  int invoice, csv;
  int unlisted;       /* a tenant no longer (or never) in the config */
  int64_t from_ms, to_ms;
  int rc;             /* < 0: error; 1: an unlisted tenant without rows */
  char *text;
  char *database, *data_dir;
  int gone;
} admin_job_t;

/* One access-log line for every /admin/v1 request, answered or refused:
 * who (the admin key's id, or none), which tenant's data, the path, the
 * status. The audit trail of the admin API's reads. */
static void audit(tg_worker_t *w, uint64_t start_ns, const char *rid, const char *key_id,
                  const char *tenant, const char *path, int status, const char *error) {
  tg_access_rec_t r;
  memset(&r, 0, sizeof(r));
  /* from the request's first byte, as an API request's line */
  r.duration_ms = (double)(uv_hrtime() - start_ns) / 1e6;
  r.request_id = rid;
  r.key_id = key_id != NULL && key_id[0] != '\0' ? key_id : NULL;
  r.tenant = tenant;
  r.path = path;
  r.status = status;
  r.error = error;
  r.ttfb_ms = -1;
  tg_access_log(w->alog, &r);
}

static void job_work(uv_work_t *wk) {
  admin_job_t *j = wk->data;
  tg_ledger_db_t *db = NULL;

  j->rc = tg_ledger_db_open(j->database, j->data_dir, &db);
  if (j->rc < 0)
    return;
  if (j->unlisted) {
    /* A tenant taken out of the config is still billed for what its rows
     * hold; a name with none in the period is unknown. */
    tg_usage_row_t *rows = NULL;
    size_t n = 0;
    j->rc = tg_ledger_usage_by_model(db, j->tenant, j->from_ms, j->to_ms, &rows, &n);
    free(rows);
    if (j->rc == 0 && n == 0)
      j->rc = 1;
    if (j->rc != 0) {
      tg_ledger_db_close(db);
      return;
    }
  }
  j->rc = j->invoice ? tg_invoice_build(db, j->tenant, j->period, j->csv, &j->text)
                     : tg_usage_build(db, j->tenant, j->period, &j->text);
  tg_ledger_db_close(db);
}

static void job_free(admin_job_t *j) {
  free(j->text);
  free(j->database);
  free(j->data_dir);
  free(j);
}

static void job_done(uv_work_t *wk, int status);

/* Puts j on the thread pool, or answers 500 when it cannot be queued. */
static void job_start(admin_job_t *j) {
  tg_worker_t *w = j->w;
  if (uv_queue_work(&w->loop, &j->work, job_work, job_done) < 0) {
    j->req->on_abort = NULL;
    audit(w, j->start_ns, j->rid, j->key_id, j->tenant, j->path, 500, "internal_error");
    admin_error(j->req, 500, "server_error", "internal_error", j->rid, NULL,
                 "cannot queue the query");
    atomic_fetch_sub(&w->app->admin_jobs, 1);
    job_free(j);
    return;
  }
  w->jobs_running++;
}

/* A query finished: the next waiting one takes its turn. */
static void job_next(tg_worker_t *w) {
  while (w->jobs_head != NULL && w->jobs_running < TG_ADMIN_JOBS_RUNNING) {
    admin_job_t *j = w->jobs_head;
    w->jobs_head = j->next;
    if (w->jobs_head == NULL)
      w->jobs_tail = NULL;
    w->jobs_waiting--;
    j->waiting = 0;
    job_start(j);
  }
}

static void job_done(uv_work_t *wk, int status) {
  admin_job_t *j = wk->data;
  tg_worker_t *w = j->w;
  char hdr[96];

  w->jobs_running--;
  atomic_fetch_sub(&w->app->admin_jobs, 1);
  job_next(w);
  if (j->gone) {
    /* the client left: its request was completed in on_job_abort */
    audit(j->w, j->start_ns, j->rid, j->key_id, j->tenant, j->path, 499, "client_gone");
    job_free(j);
    return;
  }
  j->req->on_abort = NULL;
  if (status == 0 && j->rc == 1) {
    audit(j->w, j->start_ns, j->rid, j->key_id, j->tenant, j->path, 404, "tenant_not_found");
    admin_error(j->req, 404, "invalid_request_error", "tenant_not_found", j->rid, NULL,
                 "no tenant '%s' in the configuration, and none in the ledger for %s",
                 j->tenant, j->period);
  } else if (status == 0 && j->rc == TG_ETOOBIG) {
    audit(j->w, j->start_ns, j->rid, j->key_id, j->tenant, j->path, 500, "ledger_totals_too_large");
    admin_error(j->req, 500, "server_error", "ledger_totals_too_large", j->rid, NULL,
                 "the period's totals do not fit 64-bit integers (nano-USD, tokens or "
                 "requests): a record holds an implausible figure");
  } else if (status < 0 || j->rc < 0) {
    audit(j->w, j->start_ns, j->rid, j->key_id, j->tenant, j->path, 500, "ledger_unavailable");
    admin_error(j->req, 500, "server_error", "ledger_unavailable", j->rid, NULL,
                 "the ledger could not be read");
  } else {
    audit(j->w, j->start_ns, j->rid, j->key_id, j->tenant, j->path, 200, NULL);
    /* one tenant's money, changing with every request: no cache keeps it */
    snprintf(hdr, sizeof(hdr), "x-request-id: %s\r\n" NO_STORE, j->rid);
    tg_http_respond(j->req, 200, j->csv ? "text/csv" : "application/json", hdr, j->text,
                    strlen(j->text));
  }
  job_free(j);
}

static void on_job_abort(tg_http_req_t *req) {
  admin_job_t *j = req->data;
  tg_worker_t *w = j->w;
  if (j->waiting) {
    /* never started: out of the line, and gone */
    admin_job_t **pp = &w->jobs_head, *prev = NULL;
    while (*pp != j) {
      prev = *pp;
      pp = &(*pp)->next;
    }
    *pp = j->next;
    if (w->jobs_tail == j)
      w->jobs_tail = prev;
    w->jobs_waiting--;
    atomic_fetch_sub(&w->app->admin_jobs, 1);
    audit(w, j->start_ns, j->rid, j->key_id, j->tenant, j->path, 499, "client_gone");
    job_free(j);
  } else {
    j->gone = 1;
  }
  tg_http_abort(req);
}

/* 1 when the request carries a valid admin key; else answers 401/403. */
static int admin_auth(tg_worker_t *w, tg_http_req_t *req, const char *rid, const char *tenant,
                      char *key_id, size_t key_id_size) {
  const tg_keyset_t *ks = tg_worker_keys(w);
  const tg_key_rec_t *rec = NULL;
  const char *v, *bad = tg_api_credentials(req, &v);
  tg_key_verdict_t verdict;

  key_id[0] = '\0';
  if (bad != NULL) {
    audit(w, req->start_ns, rid, NULL, tenant, req->path, 400, "ambiguous_credentials");
    admin_error(req, 400, "invalid_request_error", "ambiguous_credentials", rid, NULL,
                 "%s", bad);
    return 0;
  }
  if (v == NULL || *v == '\0') {
    audit(w, req->start_ns, rid, NULL, tenant, req->path, 401, "missing_api_key");
    admin_error(req, 401, "authentication_error", "missing_api_key", rid,
                 "WWW-Authenticate: Bearer\r\n", "the admin API needs an admin key");
    return 0;
  }
  verdict = ks ? tg_keyset_verify(ks, v, strlen(v), (int64_t)time(NULL), &rec) : TG_KEY_UNKNOWN;
  if (verdict != TG_KEY_OK) {
    audit(w, req->start_ns, rid, NULL, tenant, req->path, 401, "invalid_api_key");
    admin_error(req, 401, "authentication_error", "invalid_api_key", rid,
                 "WWW-Authenticate: Bearer\r\n", "invalid API key");
    return 0;
  }
  snprintf(key_id, key_id_size, "%s", rec->id);
  if (strcmp(rec->tenant, TG_ADMIN_TENANT) != 0) {
    /* a tenant key tried the admin API: its id is on the line */
    audit(w, req->start_ns, rid, key_id, tenant, req->path, 403, "admin_only");
    admin_error(req, 403, "permission_error", "admin_only", rid, NULL,
                 "this key is a tenant key; the admin API needs an admin key");
    return 0;
  }
  return 1;
}

/* 1 when the query string holds the parameter param ("name=value") whole. */
/* The format a query asks for: 0 JSON (no format parameter, or
 * format=json), 1 CSV (format=csv), -1 anything else (another value, or
 * format given twice). Other parameters are ignored. */
static int query_format(const char *query) {
  const char *p;
  int got = 0, seen = 0;
  for (p = query; p != NULL; p = strchr(p, '&'), p = p ? p + 1 : NULL) {
    size_t n = strcspn(p, "&");
    if (strncmp(p, "format=", 7) != 0)
      continue;
    if (seen++)
      return -1;
    if (n == 11 && strncmp(p + 7, "json", 4) == 0)
      got = 0;
    else if (n == 10 && strncmp(p + 7, "csv", 3) == 0)
      got = 1;
    else
      return -1;
  }
  return got;
}

/* /admin/v1/tenants/{tenant}/{invoices|usage}/{period} */
static void admin_api(tg_worker_t *w, tg_http_req_t *req, const char *rid) {
  const char *p = req->path + strlen("/admin/v1/tenants/"), *slash, *kind, *period;
  tg_runtime_t *rt = tg_worker_runtime(w);
  admin_job_t *j;
  char tenant[128], key_id[40];
  size_t tl;
  int64_t a, b;
  int r;

  slash = strchr(p, '/');
  if (slash == NULL || (tl = (size_t)(slash - p)) == 0 || tl >= 128)
    goto notfound;
  kind = slash + 1;
  if (strncmp(kind, "invoices/", 9) == 0)
    period = kind + 9;
  else if (strncmp(kind, "usage/", 6) == 0)
    period = kind + 6;
  else
    goto notfound;
  /* percent-encoded octets decoded (RFC 3986 2.1, 6.2.2.2: a client may
   * send "acme%2Dcorp" for "acme-corp"); a '/' the name's check refuses
   * after, an encoded NUL here */
  if (tg_pct_decode(tenant, sizeof(tenant), p, tl, 0) < 0)
    goto notfound;
  tl = strlen(tenant);
  if (!admin_auth(w, req, rid, tenant, key_id, sizeof(key_id)))
    return;
  j = calloc(1, sizeof(*j));
  if (j == NULL) {
    audit(w, req->start_ns, rid, key_id, tenant, req->path, 500, "internal_error");
    admin_error(req, 500, "server_error", "internal_error", rid, NULL, "out of memory");
    return;
  }
  memcpy(j->tenant, tenant, tl + 1);
  memcpy(j->key_id, key_id, sizeof(j->key_id));
  snprintf(j->path, sizeof(j->path), "%s", req->path);
  j->invoice = kind[0] == 'i';
  /* only an invoice has a CSV form; a day's usage is always JSON */
  j->csv = query_format(req->query);
  if (j->csv < 0 || (j->csv && !j->invoice)) {
    audit(w, req->start_ns, rid, key_id, tenant, req->path, 400, "bad_format");
    admin_error(req, 400, "invalid_request_error", "bad_format", rid, NULL,
                 j->invoice ? "format must be json or csv, given once"
                            : "format must be json, given once: a day's usage has no CSV form");
    free(j);
    return;
  }
  r = strlen(period) >= sizeof(j->period)
          ? TG_EPARSE
          : tg_period_range(period, j->invoice, (int64_t)time(NULL) * 1000, &a, &b);
  if (r < 0) {
    audit(w, req->start_ns, rid, key_id, tenant, req->path, 400, "bad_period");
    if (r == TG_EINVAL)
      admin_error(req, 400, "invalid_request_error", "bad_period", rid, NULL,
                   "the period %s has not begun (UTC): no record can be in it yet", period);
    else
      admin_error(req, 400, "invalid_request_error", "bad_period", rid, NULL,
                   "the period must be %s", j->invoice ? "YYYY-MM" : "YYYY-MM-DD");
    free(j);
    return;
  }
  if (tg_config_tenant(rt->cfg, j->tenant) == NULL) {
    if (!tg_config_tenant_name_ok(j->tenant)) {
      audit(w, req->start_ns, rid, key_id, NULL, req->path, 404, "tenant_not_found");
      admin_error(req, 404, "invalid_request_error", "tenant_not_found", rid, NULL,
                   "no tenant '%s'", j->tenant);
      free(j);
      return;
    }
    j->unlisted = 1;  /* removed from the config: its ledger rows decide */
  }
  j->from_ms = a;
  j->to_ms = b;
  memcpy(j->period, period, strlen(period) + 1);
  memcpy(j->rid, rid, sizeof(j->rid));
  j->start_ns = req->start_ns;
  j->database = strdup(rt->cfg->database);
  j->data_dir = strdup(rt->cfg->data_dir);
  j->req = req;
  j->w = w;
  j->work.data = j;
  if (j->database == NULL || j->data_dir == NULL) {
    audit(w, req->start_ns, rid, key_id, tenant, req->path, 500, "internal_error");
    admin_error(req, 500, "server_error", "internal_error", rid, NULL, "out of memory");
    job_free(j);
    return;
  }
  if (w->jobs_running >= TG_ADMIN_JOBS_RUNNING && w->jobs_waiting >= TG_ADMIN_JOBS_WAITING) {
    audit(w, req->start_ns, rid, key_id, tenant, req->path, 503, "admin_busy");
    admin_error(req, 503, "server_error", "admin_busy", rid, TG_RETRY_AFTER_1S,
                 "%d ledger queries are waiting already", TG_ADMIN_JOBS_WAITING);
    job_free(j);
    return;
  }
  req->data = j;
  req->on_abort = on_job_abort;
  atomic_fetch_add(&w->app->admin_jobs, 1);
  if (w->jobs_running < TG_ADMIN_JOBS_RUNNING) {
    job_start(j);
    return;
  }
  j->waiting = 1;
  if (w->jobs_tail != NULL)
    w->jobs_tail->next = j;
  else
    w->jobs_head = j;
  w->jobs_tail = j;
  w->jobs_waiting++;
  return;
notfound:
  audit(w, req->start_ns, rid, NULL, NULL, req->path, 404, "not_found");
  admin_error(req, 404, "invalid_request_error", "not_found", rid, NULL,
               "unknown admin path '%.200s'", req->path);
}

/* GET /metrics: the workers' counters summed, plus gauges read now. */
static void usd_gauge(tg_mbuf_t *b, const char *name, const char *tenant, tg_nano_t nano) {
  char v[48];
  if (tg_money_format_usd(nano, v, sizeof(v)) < 0)
    return;
  tg_mbuf_printf(b, "%s{tenant=\"%s\"} %s\n", name, tenant, v);
}

/* A scrape's bound, and room kept past it for the line that says what was
 * left out. */
#define TG_SCRAPE_MAX (64u * 1024 * 1024)
#define TG_SCRAPE_TAIL 256

static void metrics(tg_worker_t *w, tg_http_req_t *req, const char *rid) {
  tg_app_t *app = w->app;
  tg_runtime_t *rt = tg_worker_runtime(w);
  const tg_config_t *cfg = rt->cfg;
  tg_mbuf_t b = {NULL, 0, 0, TG_SCRAPE_MAX - TG_SCRAPE_TAIL, 0, 0};
  char t[300], ep[2 * TG_CONFIG_URL_MAX + 1], hdr[64];
  size_t i, j, mark;

  /* What the standard alerts read first (budgets, endpoints, the ledger),
   * then the request counters: each group whole or left out, so a scrape
   * past its bound (tens of thousands of busy tenants) still carries the
   * rest, and says so. */
  mark = tg_mbuf_mark(&b);
  tg_mbuf_printf(&b, "# HELP llm_tenant_daily_spend_usd Spend in the current UTC day.\n"
                     "# TYPE llm_tenant_daily_spend_usd gauge\n"
                     "# HELP llm_tenant_monthly_spend_usd Spend in the current UTC month.\n"
                     "# TYPE llm_tenant_monthly_spend_usd gauge\n"
                     "# HELP llm_tenant_daily_budget_usd Daily budget (absent: unlimited).\n"
                     "# TYPE llm_tenant_daily_budget_usd gauge\n"
                     "# HELP llm_tenant_monthly_budget_usd Monthly budget (absent: unlimited).\n"
                     "# TYPE llm_tenant_monthly_budget_usd gauge\n");
  for (i = 0; i < cfg->n_tenants; i++) {
    const tg_tenant_cfg_t *tc = &cfg->tenants[i];
    tg_nano_t day = 0, month = 0;
    tg_metrics_label(t, sizeof(t), tc->name);
    /* a tenant with no state yet has spent nothing (Redis: see docs); one
     * whose figures are not followed has no gauge rather than a false 0 */
    if (tg_policy_spend(app->policy, tc->name, &day, &month) != TG_ETOOBIG) {
      usd_gauge(&b, "llm_tenant_daily_spend_usd", t, day);
      usd_gauge(&b, "llm_tenant_monthly_spend_usd", t, month);
    }
    if (tc->daily_limit_nano > 0)
      usd_gauge(&b, "llm_tenant_daily_budget_usd", t, tc->daily_limit_nano);
    if (tc->monthly_limit_nano > 0)
      usd_gauge(&b, "llm_tenant_monthly_budget_usd", t, tc->monthly_limit_nano);
  }
  tg_mbuf_printf(&b, "# HELP llm_tenant_spend_untracked Configured tenants whose spend in "
                     "Redis is not followed (past 4,096): their spend gauges are left out.\n"
                     "# TYPE llm_tenant_spend_untracked gauge\nllm_tenant_spend_untracked %zu\n",
                 tg_policy_spend_untracked(app->policy));
  tg_mbuf_group_end(&b, mark);
  mark = tg_mbuf_mark(&b);
  tg_mbuf_printf(&b, "# HELP llm_endpoint_up 1 when the endpoint is healthy.\n"
                     "# TYPE llm_endpoint_up gauge\n");
  for (i = 0; i < cfg->n_models; i++) {
    const tg_pool_t *pool = &rt->pools[i];
    tg_metrics_label(t, sizeof(t), cfg->models[i].name);
    for (j = 0; j < pool->n; j++) {
      tg_metrics_label(ep, sizeof(ep), tg_endpoint_url(pool->eps[j]));
      tg_mbuf_printf(&b, "llm_endpoint_up{pool=\"%s\",endpoint=\"%s\"} %d\n", t, ep,
                     tg_endpoint_healthy(pool->eps[j]) ? 1 : 0);
    }
  }
  tg_mbuf_group_end(&b, mark);
  mark = tg_mbuf_mark(&b);
  tg_mbuf_printf(&b, "# HELP llm_ledger_backlog Usage records queued, not yet durable.\n"
                     "# TYPE llm_ledger_backlog gauge\nllm_ledger_backlog %zu\n"
                     "# HELP llm_ledger_spool_bytes Usage records spooled while the database is away.\n"
                     "# TYPE llm_ledger_spool_bytes gauge\nllm_ledger_spool_bytes %lld\n",
                 app->ledger ? tg_ledger_backlog(app->ledger) : (size_t)0,
                 app->ledger ? (long long)tg_ledger_spool_bytes(app->ledger) : 0LL);
  {
    tg_ledger_stats_t ls = {0};
    if (app->ledger != NULL)
      tg_ledger_stats(app->ledger, &ls);
    tg_mbuf_printf(&b, "# HELP llm_ledger_transactions_total Batches of usage records committed to the database.\n"
                       "# TYPE llm_ledger_transactions_total counter\nllm_ledger_transactions_total %llu\n"
                       "# HELP llm_ledger_records_total Usage records by what became of them.\n"
                       "# TYPE llm_ledger_records_total counter\n"
                       "llm_ledger_records_total{outcome=\"committed\"} %llu\n"
                       "llm_ledger_records_total{outcome=\"spooled\"} %llu\n"
                       "llm_ledger_records_total{outcome=\"replayed\"} %llu\n"
                       "llm_ledger_records_total{outcome=\"refused\"} %llu\n"
                       "llm_ledger_records_total{outcome=\"rejected\"} %llu\n"
                       "llm_ledger_records_total{outcome=\"lost\"} %llu\n"
                       "llm_ledger_records_total{outcome=\"damaged\"} %llu\n",
                   (unsigned long long)ls.transactions, (unsigned long long)ls.committed,
                   (unsigned long long)ls.spooled, (unsigned long long)ls.replayed,
                   (unsigned long long)ls.refused, (unsigned long long)ls.rejected,
                   (unsigned long long)ls.lost, (unsigned long long)ls.spool_damaged);
  }
  tg_mbuf_group_end(&b, mark);
  tg_metrics_render(app->metrics, &b);
  mark = tg_mbuf_mark(&b);
  tg_mbuf_printf(&b, "# HELP llm_upstream_errors_total Failed upstream attempts, by endpoint and kind.\n"
                     "# TYPE llm_upstream_errors_total counter\n");
  for (i = 0; i < cfg->n_models; i++) {
    const tg_pool_t *pool = &rt->pools[i];
    tg_metrics_label(t, sizeof(t), cfg->models[i].name);
    for (j = 0; j < pool->n; j++) {
      int k;
      tg_metrics_label(ep, sizeof(ep), tg_endpoint_url(pool->eps[j]));
      for (k = 0; k < TG_UPERR_N; k++)
        tg_mbuf_printf(&b, "llm_upstream_errors_total{pool=\"%s\",endpoint=\"%s\",kind=\"%s\"} %llu\n",
                       t, ep, tg_uperr_names[k],
                       (unsigned long long)tg_endpoint_errors(pool->eps[j], (tg_uperr_t)k));
    }
  }
  tg_mbuf_group_end(&b, mark);
  b.max = TG_SCRAPE_MAX;
  tg_mbuf_printf(&b, "# HELP llm_metrics_omitted_families Groups of metric families left out of "
                     "this scrape: it was past its bound.\n"
                     "# TYPE llm_metrics_omitted_families gauge\nllm_metrics_omitted_families %zu\n",
                 b.omitted);
  if (b.err) {
    free(b.s);
    admin_error(req, 500, "server_error", "internal_error", rid, NULL, "out of memory");
    return;
  }
  snprintf(hdr, sizeof(hdr), "x-request-id: %s\r\n", rid);
  tg_http_respond(req, 200, "text/plain; version=0.0.4", hdr, b.s ? b.s : "", b.len);
  free(b.s);
}

void tg_admin_handle(tg_http_req_t *req) {
  tg_worker_t *w = tg_http_server_data(req->server);
  char rid[32];
  int admin_path;

  tg_api_request_id(w, rid, sizeof(rid));
  /* The admin API's requests are audited whatever their answer, those
   * refused before any key is looked at too: a probe leaves its trace. */
  admin_path = strncmp(req->path, "/admin", 6) == 0 &&
               (req->path[6] == '\0' || req->path[6] == '/');
  /* HEAD is served wherever GET is (RFC 9110 9.1; a load balancer's
   * `HEAD /healthz`): the HTTP layer sends the head without the body. */
  if (req->method != HTTP_GET && req->method != HTTP_HEAD) {
    if (admin_path)
      audit(w, req->start_ns, rid, NULL, NULL, req->path, 405, "method_not_allowed");
    admin_error(req, 405, "invalid_request_error", "method_not_allowed", rid,
                 "Allow: GET, HEAD\r\n", "use GET or HEAD");
    return;
  }
  if (strcmp(req->path, "/healthz") == 0) {
    healthz(w, req, rid);
    return;
  }
  if (strcmp(req->path, "/readyz") == 0) {
    readyz(w, req, rid);
    return;
  }
  if (strcmp(req->path, "/metrics") == 0 && w->app->metrics != NULL) {
    metrics(w, req, rid);
    return;
  }
  if (strncmp(req->path, "/admin/v1/tenants/", 18) == 0) {
    admin_api(w, req, rid);
    return;
  }
  if (admin_path)
    audit(w, req->start_ns, rid, NULL, NULL, req->path, 404, "not_found");
  admin_error(req, 404, "invalid_request_error", "not_found", rid, NULL,
               "unknown admin path '%.200s'", req->path);
}
