/* The policy dispatcher: sends admissions and settlements to the configured
 * backend and applies state_failure when Redis cannot answer (see state.h).
 * With state: memory only the memory backend exists. With Redis, the memory
 * backend is kept too: it decides while Redis is down and state_failure is
 * "open", and settles what it admitted. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "core/err.h"
#include "core/thread.h"
#include "meter/ledger.h"
#include "policy/state.h"

/* Spend of one tenant's window that Redis has not seen. */
typedef struct {
  char *tenant;
  int month;               /* 0: the day window */
  int64_t period;
  tg_nano_t amount;
} owed_t;

/* At most this many windows wait for Redis (two a tenant, for an outage
 * within one day): past it an outage's spend is logged as not added. */
#define TG_OWED_MAX 65536

struct tg_policy_s {
  int backend;             /* TG_BACKEND_* configured */
  int fail_open;
  tg__mem_t *mem;
  tg__redis_t *redis;
  /* Redis: the re-seeding thread and what it keeps (only it touches epoch,
   * reseed_failed and conn; cfg is swapped by tg_policy_reconfig) */
  pthread_mutex_t cfg_lock;
  tg_config_t *cfg;        /* a reference: tenants' alert thresholds, ledger */
  char epoch[64];          /* the mark last seen in Redis; "" = none yet */
  int reseed_failed;       /* logged; quiet until a pass succeeds */
  int loss_seen;           /* the loss being re-seeded was logged and told */
  tg__redis_sync_t *conn;  /* the thread's connection; NULL: none open */
  tg_every_t reseed;       /* looks at the mark every TG_RESEED_EVERY_MS */
  /* Redis, state_failure: open: what the memory backend's admissions spent
   * while Redis could not answer, for the thread to add to Redis's windows
   * (owe(), flush_owed()) */
  pthread_mutex_t owed_lock;
  owed_t *owed;
  size_t n_owed, cap_owed;
  int owed_full_logged;
  atomic_size_t untracked;  /* configured tenants whose spend is not followed */
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

int64_t tg_steady_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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

/* Takes a tenant's spend of a period read from the ledger. */
typedef int (*spend_apply_fn)(void *arg, const char *tenant, int month, int64_t period,
                              tg_nano_t spent, int alerted, int64_t now);

/* Reads every tenant's spend of the windows an admission at now charges
 * from the ledger (blocking: never on a loop thread) and hands each to
 * apply, with whether the window's threshold event was raised already.
 * Each window sums its own period's records, [start, end): a record dated
 * after now (charged to a window the clock then stepped back out of) counts
 * in its own period and in no earlier one, so it is never counted twice.
 * For each of day and month, now's period comes first, then the next one
 * when its start is at most TG_CLOCK_STEP_BACK_MAX_MS ahead: a tenant with
 * records there had that window open, and tg_limits_periods() charges it
 * still (the memory backend keeps the later window, Redis keeps each
 * period's). Returns 0, or a negative error when the ledger could not be
 * read or apply failed. */
static int from_ledger(const tg_config_t *cfg, int64_t now, spend_apply_fn apply, void *arg) {
  tg_ledger_db_t *db = NULL;
  tg_spend_row_t *rows = NULL;
  size_t n = 0, i;
  int64_t period[2] = {tg_day_of(now), tg_month_of(now)};
  int rc;

  if ((rc = tg_ledger_db_open(cfg->database, cfg->data_dir, &db)) < 0)
    return rc;
  for (int k = 0; k < 4 && rc == 0; k++) {
    int month = k / 2;
    int64_t p = period[month] + k % 2;
    int64_t start = month ? tg_month_end_ms(p - 1) : tg_day_end_ms(p - 1);
    int64_t end = month ? tg_month_end_ms(p) : tg_day_end_ms(p);
    if (k % 2 == 1 && start - now > TG_CLOCK_STEP_BACK_MAX_MS)
      continue;
    if ((rc = tg_ledger_spend_by_tenant(db, start, end, &rows, &n)) < 0)
      break;
    for (i = 0; i < n && rc == 0; i++)
      rc = apply(arg, rows[i].tenant, month, p, rows[i].cost_nano,
                 alert_raised(cfg, rows[i].tenant, month, rows[i].cost_nano), now);
    free(rows);
    rows = NULL;
    n = 0;
  }
  tg_ledger_db_close(db);
  return rc;
}

static int mem_apply(void *arg, const char *tenant, int month, int64_t period, tg_nano_t spent,
                     int alerted, int64_t now) {
  (void)now;
  tg__mem_restore(arg, tenant, month, period, spent, alerted);
  return 0;
}

/* Daily and monthly spend come back from the ledger, the record of what
 * every answered request cost, so a restart never resets a budget, nor
 * raises again a threshold event its window has had. */
int tg__mem_from_ledger(tg__mem_t *mem, const tg_config_t *cfg, int64_t now_ms) {
  int rc = from_ledger(cfg, now_ms, mem_apply, mem);
  if (rc < 0)
    tg_policy_log("budget_restore_failed", "the ledger could not be read; spend starts from the saved figures");
  return rc;
}

/* ---- Redis: spend admitted while it could not answer ----------------- */

/* Notes spend Redis's windows did not see; the re-seeding thread adds it
 * there (flush_owed). */
static void owe(tg_policy_t *p, const char *tenant, int month, int64_t period,
                tg_nano_t amount) {
  size_t i;
  pthread_mutex_lock(&p->owed_lock);
  for (i = 0; i < p->n_owed; i++) {
    owed_t *o = &p->owed[i];
    if (o->month == month && o->period == period && strcmp(o->tenant, tenant) == 0) {
      o->amount = o->amount > INT64_MAX - amount ? INT64_MAX : o->amount + amount;
      pthread_mutex_unlock(&p->owed_lock);
      return;
    }
  }
  if (p->n_owed == p->cap_owed && p->cap_owed < TG_OWED_MAX) {
    size_t cap = p->cap_owed ? p->cap_owed * 2 : 16;
    owed_t *n = realloc(p->owed, cap * sizeof(*n));
    if (n != NULL) {
      p->owed = n;
      p->cap_owed = cap;
    }
  }
  if (p->n_owed < p->cap_owed && (p->owed[p->n_owed].tenant = strdup(tenant)) != NULL) {
    p->owed[p->n_owed].month = month;
    p->owed[p->n_owed].period = period;
    p->owed[p->n_owed].amount = amount;
    p->n_owed++;
  } else if (!p->owed_full_logged) {
    p->owed_full_logged = 1;
    tg_policy_log("state_redis_spend_lost",
                  "spend admitted while redis was unreachable could not be kept for it");
  }
  pthread_mutex_unlock(&p->owed_lock);
}

/* Takes every owed window out (the caller frees them). */
static owed_t *owed_take(tg_policy_t *p, size_t *n) {
  owed_t *o;
  pthread_mutex_lock(&p->owed_lock);
  o = p->owed;
  *n = p->n_owed;
  p->owed = NULL;
  p->n_owed = p->cap_owed = 0;
  pthread_mutex_unlock(&p->owed_lock);
  return o;
}

static void owed_free(owed_t *o, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(o[i].tenant);
  free(o);
}

/* Adds what the memory backend's admissions spent to Redis's windows, once
 * Redis answers. What cannot be sent waits for the next pass. Returns 0 or
 * the error that stopped it. */
static int flush_owed(tg_policy_t *p, tg__redis_sync_t *s) {
  size_t n, i;
  owed_t *o = owed_take(p, &n);
  int rc = 0;

  for (i = 0; i < n && rc == 0; i++)
    if ((rc = tg__redis_add_spent(s, o[i].tenant, o[i].month, o[i].period, o[i].amount,
                                  tg_now_ms())) < 0)
      break;
  for (; i < n; i++)
    owe(p, o[i].tenant, o[i].month, o[i].period, o[i].amount);
  owed_free(o, n);
  return rc;
}

/* ---- Redis: re-seeding the budget windows --------------------------------
 * Redis's windows are the only figures its limits read; a Redis that lost
 * its data (restart without persistence, failover to a replica that lagged,
 * FLUSHALL) would start every budget again from 0. A gateway marks Redis
 * (tg:epoch) once it has raised the windows to its ledger's spend; a thread
 * of its own looks at the mark every second, and when it is gone or not the
 * one this gateway saw, raises the windows again from the ledger, then marks
 * Redis. Requests are served with what Redis has meanwhile
 * (docs/state-redis.md, Losing Redis's data). */

#define TG_RESEED_EVERY_MS 1000
#define TG_RESEED_TIMEOUT_MS 1000

static int redis_apply(void *arg, const char *tenant, int month, int64_t period, tg_nano_t spent,
                       int alerted, int64_t now) {
  return tg__redis_raise(arg, tenant, month, period, spent, alerted, now);
}

/* One look at the mark; raises the windows when it changed. Returns 0, or a
 * negative error (Redis or the ledger failed: the next look tries again). */
static int reseed_check(tg_policy_t *p, tg__redis_sync_t *s) {
  char cur[sizeof p->epoch];
  tg_config_t *cfg;
  int rc = tg__redis_epoch_get(s, cur, sizeof cur);

  if (rc < 0 && rc != TG_ENOTFOUND)
    return rc;
  if (rc == 0 && strcmp(cur, p->epoch) == 0)
    return 0;
  if (p->epoch[0] != '\0' && !p->loss_seen) {
    /* once per loss, however many passes its re-seed takes */
    p->loss_seen = 1;
    tg__redis_lost(p->redis);
    tg_policy_log("state_redis_reseed",
                  rc == TG_ENOTFOUND
                      ? "redis lost its data (no tg:epoch): raising the budget windows to the ledger's spend"
                      : "redis was re-seeded by another gateway: raising the budget windows to this gateway's ledger");
  }
  /* The ledger holds what the memory backend's admissions spent (their
   * records were written as they were answered): the windows raised from
   * it must not have that spend added again. */
  {
    size_t n;
    owed_t *o = owed_take(p, &n);
    owed_free(o, n);
  }
  /* the running config's thresholds say which events were raised */
  pthread_mutex_lock(&p->cfg_lock);
  cfg = tg_config_ref(p->cfg);
  pthread_mutex_unlock(&p->cfg_lock);
  rc = from_ledger(cfg, tg_now_ms(), redis_apply, s);
  tg_config_unref(cfg);
  if (rc < 0) {
    if (!p->reseed_failed)
      tg_policy_log("budget_restore_failed", "the ledger or redis failed while re-seeding; trying again");
    p->reseed_failed = 1;
    return rc;
  }
  p->reseed_failed = 0;
  if ((rc = tg__redis_epoch_mark(s, p->epoch, sizeof p->epoch)) == 0)
    p->loss_seen = 0;
  return rc;
}

/* One pass on the connection, opened when there is none. */
static void reseed_pass(void *arg) {
  tg_policy_t *p = arg;
  if (p->conn == NULL && tg__redis_sync_open(p->redis, TG_RESEED_TIMEOUT_MS, &p->conn) < 0)
    return;
  if (reseed_check(p, p->conn) < 0 || flush_owed(p, p->conn) < 0) {
    tg__redis_sync_close(p->conn);
    p->conn = NULL;
  }
}

/* At start, before the loops serve: the windows are raised at once when
 * Redis answers (else the thread does it when it does), then the thread
 * keeps watching. */
static int reseed_start(tg_policy_t *p, const tg_config_t *cfg) {
  p->cfg = tg_config_ref((tg_config_t *)cfg);
  reseed_pass(p);
  return tg_every_start(&p->reseed, "tg-reseed", TG_RESEED_EVERY_MS, reseed_pass, p);
}

static void reseed_stop(tg_policy_t *p) {
  size_t n;
  tg_every_stop(&p->reseed);
  /* what the memory backend's admissions spent goes to Redis before the
   * gateway stops, when Redis answers now */
  pthread_mutex_lock(&p->owed_lock);
  n = p->n_owed;
  pthread_mutex_unlock(&p->owed_lock);
  if (n > 0 && p->redis != NULL &&
      (p->conn != NULL || tg__redis_sync_open(p->redis, TG_RESEED_TIMEOUT_MS, &p->conn) == 0) &&
      flush_owed(p, p->conn) < 0)
    tg_policy_log("state_redis_spend_lost",
                  "spend admitted while redis was unreachable was not added to it before the stop");
  owed_free(owed_take(p, &n), n);
  tg__redis_sync_close(p->conn);
  p->conn = NULL;
  if (p->cfg != NULL)
    tg_config_unref(p->cfg);
  p->cfg = NULL;
}

/* Follows the spend of cfg's tenants in Redis, and of no other: a tenant
 * the config dropped frees its place. Says on stderr when some do not fit,
 * once for each count. */
static void follow_tenants(tg_policy_t *p, const tg_config_t *cfg) {
  const char **names = malloc((cfg->n_tenants ? cfg->n_tenants : 1) * sizeof(*names));
  size_t i, untracked;
  if (names == NULL)
    return; /* out of memory: the tenants followed stay as they were */
  for (i = 0; i < cfg->n_tenants; i++)
    names[i] = cfg->tenants[i].name;
  untracked = tg__redis_keep(p->redis, names, cfg->n_tenants);
  free(names);
  if (untracked != atomic_exchange(&p->untracked, untracked) && untracked > 0)
    fprintf(stderr, "tollgate: the spend of %zu of %zu tenants is not followed in redis "
                    "(at most 4096): their spend gauges are left out of /metrics "
                    "(llm_tenant_spend_untracked)\n",
            untracked, cfg->n_tenants);
}

size_t tg_policy_spend_untracked(tg_policy_t *p) {
  return p != NULL ? atomic_load(&p->untracked) : 0;
}

void tg_policy_reconfig(tg_policy_t *p, const tg_config_t *cfg) {
  tg_config_t *old;
  if (p == NULL || p->backend != TG_BACKEND_REDIS)
    return;
  follow_tenants(p, cfg);
  pthread_mutex_lock(&p->cfg_lock);
  old = p->cfg;
  p->cfg = tg_config_ref((tg_config_t *)cfg);
  pthread_mutex_unlock(&p->cfg_lock);
  if (old != NULL)
    tg_config_unref(old);
}

int tg_policy_new(const tg_config_t *cfg, tg_policy_t **out) {
  tg_policy_t *p = calloc(1, sizeof(*p));
  int r;

  if (p == NULL)
    return TG_ENOMEM;
  pthread_mutex_init(&p->cfg_lock, NULL);
  pthread_mutex_init(&p->owed_lock, NULL);
  p->fail_open = cfg->state_failure != NULL && strcmp(cfg->state_failure, "open") == 0;
  p->backend = (cfg->state != NULL && strncmp(cfg->state, "redis://", 8) == 0)
                   ? TG_BACKEND_REDIS
                   : TG_BACKEND_MEMORY;
  /* The memory backend saves spend only when it is the source of truth. */
  r = tg__mem_new(p->backend == TG_BACKEND_MEMORY ? cfg->data_dir : NULL, &p->mem);
  if (r < 0) {
    fprintf(stderr, "tollgate: cannot start the memory policy state: %s\n", tg_strerror(r));
    pthread_mutex_destroy(&p->cfg_lock);
    pthread_mutex_destroy(&p->owed_lock);
    free(p);
    return r;
  }
  /* With Redis, state_failure: open decides by the memory backend while
   * Redis cannot answer: its budgets start from the ledger too. */
  if (p->backend == TG_BACKEND_MEMORY || p->fail_open)
    tg__mem_from_ledger(p->mem, cfg, tg_now_ms());
  if (p->backend == TG_BACKEND_REDIS) {
    r = tg__redis_new(cfg->state, &p->redis);
    if (r < 0) {
      fprintf(stderr, "tollgate: cannot use the redis state URL: %s\n", tg_strerror(r));
      tg_policy_free(p);
      return r;
    }
    /* The configured tenants' spend is read from Redis from the start, so
     * the first /metrics scrape shows it. */
    follow_tenants(p, cfg);
    if ((r = reseed_start(p, cfg)) < 0) {
      fprintf(stderr, "tollgate: cannot start the budget re-seeding thread: %s\n", tg_strerror(r));
      tg_policy_free(p);
      return r;
    }
  }
  *out = p;
  return 0;
}

void tg_policy_free(tg_policy_t *p) {
  if (p == NULL)
    return;
  reseed_stop(p);
  if (p->redis)
    tg__redis_free(p->redis);
  tg__mem_free(p->mem);
  pthread_mutex_destroy(&p->cfg_lock);
  pthread_mutex_destroy(&p->owed_lock);
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
    int64_t now = tg_now_ms();
    tg_nano_t day, month;
    /* Local limits, but not a budget started again from 0: the windows are
     * at least what Redis last said every gateway had spent. */
    if (tg__redis_spend(pl->p->redis, r->tenant, now, &day, &month) == 0) {
      tg__mem_restore(pl->p->mem, r->tenant, 0, tg_day_of(now), day,
                      tg_budget_alert_due(day, r->limits.day_limit, r->limits.alert_pct));
      tg__mem_restore(pl->p->mem, r->tenant, 1, tg_month_of(now), month,
                      tg_budget_alert_due(month, r->limits.month_limit, r->limits.alert_pct));
    }
    tg__mem_admit(pl->p->mem, r, now, tg_steady_ms(), a);
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
    tg__mem_admit(pl->p->mem, r, now, tg_steady_ms(), &a);
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
  if (a->backend == TG_BACKEND_MEMORY) {
    tg__mem_settle(pl->p->mem, r, a, actual_tokens, actual_cost, tg_steady_ms());
    if (pl->p->backend == TG_BACKEND_REDIS && actual_cost > 0) {
      owe(pl->p, r->tenant, 0, a->v.day, actual_cost);
      owe(pl->p, r->tenant, 1, a->v.month, actual_cost);
    }
  } else if (pl->rl)
    tg__redis_settle(pl->rl, r, a, actual_tokens, actual_cost, now);
}
