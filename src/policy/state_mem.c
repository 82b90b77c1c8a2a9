/* The memory backend of the policy state: exact limits within one process.
 *
 * Tenants' states live in a table split into stripes, each under its own
 * mutex, so loop threads admitting for different tenants rarely meet. The
 * global per-second log has its own mutex. Every decision is one call into
 * limits.c under the tenant's stripe lock: check and commit are one step.
 *
 * Budget spend survives a restart: a saver thread writes the spend of the
 * tenants that changed to the SQLite store (table tenant_spend) every
 * second and once more at shutdown, and the table is read back at start. */
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/err.h"
#include "core/strbuf.h"
#include "core/thread.h"
#include "meter/db_sqlite.h"
#include "policy/state.h"

#define N_STRIPES 64
#define SAVE_INTERVAL_MS 1000

typedef struct ent_s {
  struct ent_s *next;
  uint64_t hash;
  int dirty;                 /* spend changed since the last save */
  tg_tenant_state_t st;
  char name[];
} ent_t;

typedef struct {
  pthread_mutex_t lock;
  ent_t **buckets;
  size_t n_buckets, n;
} stripe_t;

struct tg__mem_s {
  stripe_t stripes[N_STRIPES];
  pthread_mutex_t global_lock;
  tg_slog_t global;
  char *data_dir;            /* NULL: spend is not saved */
  sqlite3 *db;               /* the saver's connection (data_dir set) */
  tg_every_t saver;          /* saves the dirty tenants every second */
};

/* Finds or creates the tenant's entry; the stripe must be locked. */
static ent_t *stripe_get(stripe_t *sp, const char *name, uint64_t h) {
  ent_t *e;
  size_t i, len;

  if (sp->n_buckets > 0)
    for (e = sp->buckets[h % sp->n_buckets]; e != NULL; e = e->next)
      if (e->hash == h && strcmp(e->name, name) == 0)
        return e;
  if (sp->n + 1 > sp->n_buckets) {
    size_t nb = sp->n_buckets ? sp->n_buckets * 2 : 16;
    ent_t **b = calloc(nb, sizeof(*b));
    if (b == NULL)
      return NULL;
    for (i = 0; i < sp->n_buckets; i++) {
      while ((e = sp->buckets[i]) != NULL) {
        sp->buckets[i] = e->next;
        e->next = b[e->hash % nb];
        b[e->hash % nb] = e;
      }
    }
    free(sp->buckets);
    sp->buckets = b;
    sp->n_buckets = nb;
  }
  len = strlen(name);
  e = calloc(1, sizeof(*e) + len + 1);
  if (e == NULL)
    return NULL;
  memcpy(e->name, name, len + 1);
  e->hash = h;
  tg_tenant_state_init(&e->st);
  e->next = sp->buckets[h % sp->n_buckets];
  sp->buckets[h % sp->n_buckets] = e;
  sp->n++;
  return e;
}

static stripe_t *stripe_of(tg__mem_t *m, uint64_t h) {
  return &m->stripes[(h >> 32) % N_STRIPES];
}

void tg__mem_admit(tg__mem_t *m, const tg_admit_req_t *r, int64_t wall_ms, int64_t steady_ms,
                   tg_admission_t *a) {
  uint64_t h = tg_hash_str(r->tenant);
  stripe_t *sp = stripe_of(m, h);
  ent_t *e;
  int rc;

  memset(a, 0, sizeof(*a));
  a->backend = TG_BACKEND_MEMORY;
  if (r->global_rps > 0) {
    int ok;
    pthread_mutex_lock(&m->global_lock);
    ok = tg_global_admit(&m->global, r->global_rps, steady_ms, &a->v.retry_after_ms);
    pthread_mutex_unlock(&m->global_lock);
    if (!ok) {
      a->v.refused = TG_LIMIT_GLOBAL;
      return;
    }
  }
  pthread_mutex_lock(&sp->lock);
  e = stripe_get(sp, r->tenant, h);
  rc = e ? tg_limits_admit_at(&e->st, &r->limits, &r->reserve, wall_ms, steady_ms, &a->v)
         : TG_ENOMEM;
  pthread_mutex_unlock(&sp->lock);
  if (rc < 0) {
    /* out of memory: refuse rather than admit uncounted */
    a->v.refused = TG_LIMIT_UNAVAILABLE;
    a->v.retry_after_ms = 1000;
  }
  if (r->global_rps > 0 && a->v.refused != TG_LIMIT_NONE) {
    /* refused by its tenant's limits: not a request the pool serves */
    pthread_mutex_lock(&m->global_lock);
    tg_global_unadmit(&m->global, steady_ms);
    pthread_mutex_unlock(&m->global_lock);
  }
}

void tg__mem_settle(tg__mem_t *m, const tg_admit_req_t *r, const tg_admission_t *a,
                    int64_t actual_tokens, tg_nano_t actual_cost, int64_t now_ms) {
  uint64_t h = tg_hash_str(r->tenant);
  stripe_t *sp = stripe_of(m, h);
  ent_t *e;
  int alert_day = 0, alert_month = 0;
  tg_nano_t day_spent = 0, month_spent = 0;

  pthread_mutex_lock(&sp->lock);
  e = stripe_get(sp, r->tenant, h);
  if (e != NULL) {
    tg_limits_settle(&e->st, &r->limits, &r->reserve, &a->v, actual_tokens, actual_cost,
                     now_ms, &alert_day, &alert_month);
    e->dirty = 1;
    day_spent = e->st.day.spent;
    month_spent = e->st.month.spent;
  }
  pthread_mutex_unlock(&sp->lock);
  if (alert_day)
    tg_policy_alert(r->tenant, "day", a->v.day, day_spent, r->limits.day_limit,
                    r->limits.alert_pct);
  if (alert_month)
    tg_policy_alert(r->tenant, "month", a->v.month, month_spent, r->limits.month_limit,
                    r->limits.alert_pct);
}

int tg__mem_spend(tg__mem_t *m, const char *tenant, int64_t now_ms, tg_nano_t *day,
                  tg_nano_t *month) {
  uint64_t h = tg_hash_str(tenant);
  stripe_t *sp = stripe_of(m, h);
  ent_t *e = NULL;
  size_t i;

  pthread_mutex_lock(&sp->lock);
  if (sp->n_buckets > 0)
    for (e = sp->buckets[h % sp->n_buckets]; e != NULL; e = e->next)
      if (e->hash == h && strcmp(e->name, tenant) == 0)
        break;
  if (e != NULL) {
    int64_t d, mo;
    tg_limits_periods(&e->st, now_ms, &d, &mo); /* the windows an admission now charges */
    *day = e->st.day.period == d ? e->st.day.spent : 0;
    *month = e->st.month.period == mo ? e->st.month.spent : 0;
  }
  pthread_mutex_unlock(&sp->lock);
  (void)i;
  return e ? 0 : TG_ENOTFOUND;
}

void tg__mem_restore(tg__mem_t *m, const char *tenant, int month, int64_t period,
                     tg_nano_t spent, int alerted) {
  uint64_t h = tg_hash_str(tenant);
  stripe_t *sp = stripe_of(m, h);
  ent_t *e;

  pthread_mutex_lock(&sp->lock);
  e = stripe_get(sp, tenant, h);
  if (e != NULL) {
    tg_budget_t *b = month ? &e->st.month : &e->st.day;
    if (b->period != period) {
      b->period = period;
      b->spent = 0;
      b->reserved = 0;
      b->alerted = 0;
    }
    if (spent > b->spent)
      b->spent = spent;
    if (alerted)
      b->alerted = 1;
    e->dirty = 1;
  }
  pthread_mutex_unlock(&sp->lock);
}

/* ---- saved spend -------------------------------------------------------- */

typedef struct {
  char *tenant;
  int64_t day, month;
  tg_nano_t day_spent, month_spent;
  int day_alerted, month_alerted;
} snap_t;

/* Copies the dirty tenants' spend (clearing dirty). *out is malloc'd. */
static size_t collect_dirty(tg__mem_t *m, snap_t **out) {
  size_t n = 0, cap = 0, i, b;
  snap_t *v = NULL;
  ent_t *e;

  for (i = 0; i < N_STRIPES; i++) {
    stripe_t *sp = &m->stripes[i];
    pthread_mutex_lock(&sp->lock);
    for (b = 0; b < sp->n_buckets; b++)
      for (e = sp->buckets[b]; e != NULL; e = e->next) {
        if (!e->dirty)
          continue;
        if (n == cap) {
          size_t nc = cap ? cap * 2 : 64;
          snap_t *nv = realloc(v, nc * sizeof(*nv));
          if (nv == NULL)
            goto unlock;
          v = nv;
          cap = nc;
        }
        v[n].tenant = strdup(e->name);
        if (v[n].tenant == NULL)
          goto unlock;
        v[n].day = e->st.day.period;
        v[n].month = e->st.month.period;
        v[n].day_spent = e->st.day.spent;
        v[n].month_spent = e->st.month.spent;
        v[n].day_alerted = e->st.day.alerted;
        v[n].month_alerted = e->st.month.alerted;
        e->dirty = 0;
        n++;
      }
  unlock:
    pthread_mutex_unlock(&sp->lock);
  }
  *out = v;
  return n;
}

static int save_row(sqlite3_stmt *st, const char *tenant, const char *period,
                    tg_nano_t spent, int alerted) {
  int rc;
  sqlite3_reset(st);
  sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, period, -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 3, spent);
  sqlite3_bind_int(st, 4, alerted);
  sqlite3_bind_int64(st, 5, (sqlite3_int64)time(NULL));
  rc = sqlite3_step(st);
  return rc == SQLITE_DONE ? 0 : TG_EDB;
}

/* A save that did not commit: its tenants are dirty again, so the next
 * round writes them even if they do not change meanwhile. */
static void redirty(tg__mem_t *m, const snap_t *v, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint64_t h = tg_hash_str(v[i].tenant);
    stripe_t *sp = stripe_of(m, h);
    ent_t *e;
    pthread_mutex_lock(&sp->lock);
    e = stripe_get(sp, v[i].tenant, h);
    if (e != NULL)
      e->dirty = 1;
    pthread_mutex_unlock(&sp->lock);
  }
}

static void save_dirty(tg__mem_t *m, sqlite3 *db) {
  static const char sql[] =
      "INSERT INTO tenant_spend (tenant, period, spent_nano, alerted, updated_at) "
      "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (tenant, period) DO UPDATE SET "
      "spent_nano = excluded.spent_nano, alerted = excluded.alerted, "
      "updated_at = excluded.updated_at";
  sqlite3_stmt *st = NULL;
  snap_t *v = NULL;
  size_t n, i;
  int ok = 1;
  char day[32], month[32], period[48];

  n = collect_dirty(m, &v);
  if (n == 0) {
    free(v);
    return;
  }
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK ||
      sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
    ok = 0;
  } else {
    for (i = 0; i < n && ok; i++) {
      if (v[i].day > 0) {
        snprintf(period, sizeof(period), "day:%s", tg_day_str(v[i].day, day, sizeof(day)));
        ok = save_row(st, v[i].tenant, period, v[i].day_spent, v[i].day_alerted) == 0;
      }
      if (ok && v[i].month > 0) {
        snprintf(period, sizeof(period), "month:%s",
                 tg_month_str(v[i].month, month, sizeof(month)));
        ok = save_row(st, v[i].tenant, period, v[i].month_spent, v[i].month_alerted) == 0;
      }
    }
    sqlite3_reset(st); /* a statement left mid-step would hold the COMMIT back */
    if (!ok || sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
      ok = 0;
      sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    }
  }
  if (!ok) {
    fprintf(stderr, "tollgate: saving tenant spend failed: %s; retrying\n", sqlite3_errmsg(db));
    redirty(m, v, n);
  }
  sqlite3_finalize(st);
  for (i = 0; i < n; i++)
    free(v[i].tenant);
  free(v);
}

static void save_tick(void *arg) {
  tg__mem_t *m = arg;
  save_dirty(m, m->db);
}

/* Reads back the spend of the current day and month. */
static int load_spend(tg__mem_t *m, sqlite3 *db) {
  static const char sql[] =
      "SELECT tenant, period, spent_nano, alerted FROM tenant_spend WHERE period IN (?1, ?2)";
  sqlite3_stmt *st = NULL;
  int64_t now = tg_now_ms(), day = tg_day_of(now), month = tg_month_of(now);
  char d[32], mo[32], pd[48], pm[48];

  snprintf(pd, sizeof(pd), "day:%s", tg_day_str(day, d, sizeof(d)));
  snprintf(pm, sizeof(pm), "month:%s", tg_month_str(month, mo, sizeof(mo)));
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
    return TG_EDB;
  sqlite3_bind_text(st, 1, pd, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, pm, -1, SQLITE_STATIC);
  while (sqlite3_step(st) == SQLITE_ROW) {
    const char *tenant = (const char *)sqlite3_column_text(st, 0);
    const char *period = (const char *)sqlite3_column_text(st, 1);
    uint64_t h;
    stripe_t *sp;
    ent_t *e;
    if (tenant == NULL || period == NULL)
      continue;
    h = tg_hash_str(tenant);
    sp = stripe_of(m, h);
    pthread_mutex_lock(&sp->lock);
    e = stripe_get(sp, tenant, h);
    if (e != NULL) {
      tg_budget_t *b = period[0] == 'd' ? &e->st.day : &e->st.month;
      b->period = period[0] == 'd' ? day : month;
      b->spent = sqlite3_column_int64(st, 2);
      b->alerted = sqlite3_column_int(st, 3);
    }
    pthread_mutex_unlock(&sp->lock);
  }
  sqlite3_finalize(st);
  return 0;
}

int tg__mem_new(const char *data_dir, tg__mem_t **out) {
  tg__mem_t *m = calloc(1, sizeof(*m));
  int i, r;

  if (m == NULL)
    return TG_ENOMEM;
  for (i = 0; i < N_STRIPES; i++)
    pthread_mutex_init(&m->stripes[i].lock, NULL);
  pthread_mutex_init(&m->global_lock, NULL);
  if (data_dir != NULL) {
    m->data_dir = strdup(data_dir);
    if (m->data_dir == NULL) {
      tg__mem_free(m);
      return TG_ENOMEM;
    }
    if ((r = tg_db_sqlite_open(&m->db, data_dir)) < 0 || (r = load_spend(m, m->db)) < 0 ||
        (r = tg_every_start(&m->saver, "tg-state-save", SAVE_INTERVAL_MS, save_tick, m)) < 0) {
      tg__mem_free(m);
      return r;
    }
  }
  *out = m;
  return 0;
}

void tg__mem_free(tg__mem_t *m) {
  size_t i, b;
  ent_t *e;

  if (m == NULL)
    return;
  if (m->saver.running) {
    tg_every_stop(&m->saver);
    save_dirty(m, m->db); /* what changed since the last round */
  }
  if (m->db != NULL)
    sqlite3_close(m->db);
  for (i = 0; i < N_STRIPES; i++) {
    stripe_t *sp = &m->stripes[i];
    for (b = 0; b < sp->n_buckets; b++)
      while ((e = sp->buckets[b]) != NULL) {
        sp->buckets[b] = e->next;
        tg_tenant_state_free(&e->st);
        free(e);
      }
    free(sp->buckets);
    pthread_mutex_destroy(&sp->lock);
  }
  tg_slog_free(&m->global);
  pthread_mutex_destroy(&m->global_lock);
  free(m->data_dir);
  free(m);
}
