/* The policy dispatcher: sends admissions and settlements to the configured
 * backend and applies state_failure when Redis cannot answer (see state.h).
 * With state: memory only the memory backend exists. With Redis, the memory
 * backend is kept too: it decides while Redis is down and state_failure is
 * "open", and settles what it admitted. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "core/err.h"
#include "meter/ledger.h"
#include "policy/state.h"

struct tg_policy_s {
  int backend;             /* TG_BACKEND_* configured */
  int fail_open;
  tg__mem_t *mem;
  tg__redis_t *redis;
};

struct tg_policy_loop_s {
  tg_policy_t *p;
  tg__redis_loop_t *rl;
  int down_logged;
};

typedef struct {
  tg_policy_loop_t *pl;
  tg_admit_req_t req;
  tg_admit_cb cb;
  void *arg;
} pending_t;

int64_t tg_now_ms(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

static void log_line(const char *json) {
  size_t n = strlen(json);
  ssize_t w;
  do
    w = write(STDERR_FILENO, json, n);
  while (w < 0 && errno == EINTR);
}

void tg_policy_log(const char *event, const char *detail) {
  char line[768], q[600];
  if (tg_json_quote(q, sizeof(q), detail ? detail : "") < 0)
    memcpy(q, "\"\"", 3);
  snprintf(line, sizeof(line), "{\"ts_ms\":%lld,\"event\":\"%s\",\"detail\":%s}\n",
           (long long)tg_now_ms(), event, q);
  log_line(line);
}

void (*tg_policy_alert_hook)(const char *tenant, int month);

int tg_policy_ready(tg_policy_t *p) {
  if (p == NULL || p->backend != TG_BACKEND_REDIS || p->fail_open)
    return 1;
  return tg__redis_ready(p->redis);
}

int tg_policy_spend(tg_policy_t *p, const char *tenant, tg_nano_t *day, tg_nano_t *month) {
  *day = *month = 0;
  if (p->backend == TG_BACKEND_REDIS)
    return tg__redis_spend(p->redis, tenant, tg_now_ms(), day, month);
  return tg__mem_spend(p->mem, tenant, tg_now_ms(), day, month);
}

void tg_policy_alert(const char *tenant, const char *window, int64_t period,
                     tg_nano_t spent, tg_nano_t limit, int pct) {
  char line[768], q[300], when[32], s[40], l[40];
  if (tg_json_quote(q, sizeof(q), tenant) < 0)
    memcpy(q, "\"?\"", 4);
  if (strcmp(window, "day") == 0)
    tg_day_str(period, when, sizeof(when));
  else
    tg_month_str(period, when, sizeof(when));
  tg_money_format_usd(spent, s, sizeof(s));
  tg_money_format_usd(limit, l, sizeof(l));
  snprintf(line, sizeof(line),
           "{\"ts_ms\":%lld,\"event\":\"budget_threshold\",\"tenant\":%s,\"window\":\"%s\","
           "\"period\":\"%s\",\"spent_usd\":\"%s\",\"limit_usd\":\"%s\",\"threshold_percent\":%d}\n",
           (long long)tg_now_ms(), q, window, when, s, l, pct);
  log_line(line);
  if (tg_policy_alert_hook)
    tg_policy_alert_hook(tenant, strcmp(window, "month") == 0);
}

/* 1 when a window's spend rebuilt at start has reached the tenant's alert
 * threshold: the settlement that crossed it, before the start, raised the
 * window's one event. */
static int alert_raised(const tg_config_t *cfg, const char *tenant, int month,
                        tg_nano_t spent) {
  const tg_tenant_cfg_t *t = tg_config_tenant(cfg, tenant);
  if (t == NULL)
    return 0;
  return tg_budget_alert_due(spent, month ? t->monthly_limit_nano : t->daily_limit_nano,
                             t->alert_threshold_percent);
}

/* Daily and monthly spend come back from the ledger, the record of what
 * every answered request cost, so a restart never resets a budget, nor
 * raises again a threshold event its window has had. */
static void restore_from_ledger(tg__mem_t *mem, const tg_config_t *cfg) {
  tg_ledger_db_t *db = NULL;
  tg_spend_row_t *rows = NULL;
  size_t n = 0, i;
  int64_t now = tg_now_ms(), day = tg_day_of(now), month = tg_month_of(now);
  int64_t day_start = tg_day_end_ms(day - 1), month_start = tg_month_end_ms(month - 1);

  if (tg_ledger_db_open(cfg->database, cfg->data_dir, &db) < 0) {
    tg_policy_log("budget_restore_failed", "the ledger could not be read; spend starts from the saved figures");
    return;
  }
  if (tg_ledger_spend_by_tenant(db, day_start, INT64_MAX, &rows, &n) == 0) {
    for (i = 0; i < n; i++)
      tg__mem_restore(mem, rows[i].tenant, 0, day, rows[i].cost_nano,
                      alert_raised(cfg, rows[i].tenant, 0, rows[i].cost_nano));
    free(rows);
  }
  rows = NULL;
  n = 0;
  if (tg_ledger_spend_by_tenant(db, month_start, INT64_MAX, &rows, &n) == 0) {
    for (i = 0; i < n; i++)
      tg__mem_restore(mem, rows[i].tenant, 1, month, rows[i].cost_nano,
                      alert_raised(cfg, rows[i].tenant, 1, rows[i].cost_nano));
    free(rows);
  }
  tg_ledger_db_close(db);
}

int tg_policy_new(const tg_config_t *cfg, tg_policy_t **out) {
  tg_policy_t *p = calloc(1, sizeof(*p));
  int r;

  if (p == NULL)
    return TG_ENOMEM;
  p->fail_open = cfg->state_failure != NULL && strcmp(cfg->state_failure, "open") == 0;
  p->backend = (cfg->state != NULL && strncmp(cfg->state, "redis://", 8) == 0)
                   ? TG_BACKEND_REDIS
                   : TG_BACKEND_MEMORY;
  /* The memory backend saves spend only when it is the source of truth. */
  r = tg__mem_new(p->backend == TG_BACKEND_MEMORY ? cfg->data_dir : NULL, &p->mem);
  if (r < 0) {
    fprintf(stderr, "tollgate: cannot start the memory policy state: %s\n", tg_strerror(r));
    free(p);
    return r;
  }
  if (p->backend == TG_BACKEND_MEMORY)
    restore_from_ledger(p->mem, cfg);
  if (p->backend == TG_BACKEND_REDIS) {
    r = tg__redis_new(cfg->state, &p->redis);
    if (r < 0) {
      fprintf(stderr, "tollgate: bad redis state URL %s: %s\n", cfg->state, tg_strerror(r));
      tg_policy_free(p);
      return r;
    }
    /* The configured tenants' spend is read from Redis from the start, so
     * the first /metrics scrape shows it. */
    for (size_t i = 0; i < cfg->n_tenants; i++)
      tg__redis_watch(p->redis, cfg->tenants[i].name);
  }
  *out = p;
  return 0;
}

void tg_policy_free(tg_policy_t *p) {
  if (p == NULL)
    return;
  if (p->redis)
    tg__redis_free(p->redis);
  tg__mem_free(p->mem);
  free(p);
}

int tg_policy_loop_new(tg_policy_t *p, uv_loop_t *loop, tg_policy_loop_t **out) {
  tg_policy_loop_t *pl = calloc(1, sizeof(*pl));
  int r;
  if (pl == NULL)
    return TG_ENOMEM;
  pl->p = p;
  if (p->redis && (r = tg__redis_loop_new(p->redis, loop, &pl->rl)) < 0) {
    free(pl);
    return r;
  }
  *out = pl;
  return 0;
}

void tg_policy_loop_close(tg_policy_loop_t *pl) {
  if (pl == NULL)
    return;
  if (pl->rl)
    tg__redis_loop_close(pl->rl);
  free(pl);
}

/* Redis did not answer: decide by state_failure. */
static void unavailable(tg_policy_loop_t *pl, const tg_admit_req_t *r, tg_admission_t *a) {
  if (!pl->down_logged) {
    pl->down_logged = 1;
    tg_policy_log("state_backend_unavailable",
                  pl->p->fail_open ? "redis unreachable: admitting with local limits (state_failure: open)"
                                   : "redis unreachable: refusing requests (state_failure: closed)");
  }
  if (pl->p->fail_open) {
    tg__mem_admit(pl->p->mem, r, tg_now_ms(), a);
    return;
  }
  memset(a, 0, sizeof(*a));
  a->backend = TG_BACKEND_REDIS;
  a->v.refused = TG_LIMIT_UNAVAILABLE;
  a->v.retry_after_ms = 1000;
}

static void on_redis_admit(void *arg, const tg_admission_t *a) {
  pending_t *pd = arg;
  tg_policy_loop_t *pl = pd->pl;
  tg_admission_t fb;

  if (a->v.refused == TG_LIMIT_UNAVAILABLE) {
    unavailable(pl, &pd->req, &fb);
    pd->cb(pd->arg, &fb);
  } else {
    if (pl->down_logged) {
      pl->down_logged = 0;
      tg_policy_log("state_backend_recovered", "redis answers again");
    }
    pd->cb(pd->arg, a);
  }
  free(pd);
}

int tg_policy_admit(tg_policy_loop_t *pl, const tg_admit_req_t *r, tg_admit_cb cb, void *arg) {
  tg_admission_t a;
  pending_t *pd;
  int64_t now = tg_now_ms();

  if (pl->p->backend == TG_BACKEND_MEMORY) {
    tg__mem_admit(pl->p->mem, r, now, &a);
    cb(arg, &a);
    return 0;
  }
  if (!tg__redis_connected(pl->rl)) {
    unavailable(pl, r, &a);
    cb(arg, &a);
    return 0;
  }
  pd = malloc(sizeof(*pd));
  if (pd == NULL)
    return TG_ENOMEM;
  pd->pl = pl;
  pd->req = *r;
  pd->cb = cb;
  pd->arg = arg;
  if (tg__redis_admit(pl->rl, r, now, on_redis_admit, pd) < 0) {
    free(pd);
    unavailable(pl, r, &a);
    cb(arg, &a);
  }
  return 0;
}

void tg_policy_settle(tg_policy_loop_t *pl, const tg_admit_req_t *r, const tg_admission_t *a,
                      int64_t actual_tokens, tg_nano_t actual_cost) {
  int64_t now = tg_now_ms();
  if (a->v.refused != TG_LIMIT_NONE)
    return;
  if (a->backend == TG_BACKEND_MEMORY)
    tg__mem_settle(pl->p->mem, r, a, actual_tokens, actual_cost, now);
  else if (pl->rl)
    tg__redis_settle(pl->rl, r, a, actual_tokens, actual_cost, now);
}
