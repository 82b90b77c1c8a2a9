/* The usage ledger against a real SQLite database in a temporary directory
 * and real libuv loops: callbacks on the appending loop, exact sums, group
 * commit, the backlog bound, the spool when the database refuses (a lock
 * held by another connection, or the backend's failure hook across a
 * restart), in-order replay without duplicates, a torn spool tail, purge
 * and close. */
#define _GNU_SOURCE /* nftw */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>
#include <uv.h>

#include "core/err.h"
#include "core/fault.h"
#include "meter/datalock.h"
#include "meter/db_sqlite.h"
#include "meter/ledger.h"
#include "meter/ledger_backend.h"
#include "policy/state.h"

/* ---- helpers ---- */

static int rm_entry(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw) {
  (void)sb; (void)flag; (void)ftw;
  return remove(path);
}

typedef struct {
  char dir[64];
  char spool[128];
} tmp_t;

static int tmp_setup(void **state) {
  tmp_t *t = calloc(1, sizeof(*t));
  if (t == NULL)
    return -1;
  memcpy(t->dir, "/tmp/tg-ledger-XXXXXX", sizeof("/tmp/tg-ledger-XXXXXX"));
  if (mkdtemp(t->dir) == NULL) {
    free(t);
    return -1;
  }
  snprintf(t->spool, sizeof(t->spool), "%s/%s", t->dir, TG_LEDGER_SPOOL_FILE);
  *state = t;
  return 0;
}

static int tmp_teardown(void **state) {
  tmp_t *t = *state;
  tg__ledger_sqlite_fail_inserts(0);
  tg_fault_set(NULL);
  nftw(t->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
  free(t);
  return 0;
}

static int64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static void set_str(char *dst, size_t cap, const char *s) {
  snprintf(dst, cap, "%s", s);
}

/* 2026-03-01T00:00:00Z and a day, in ms. */
#define DAY_MS INT64_C(86400000)
#define T0 INT64_C(1772323200000)
/* 2^53 + 1: a double cannot hold it, so only integer sums stay exact. */
#define BIG INT64_C(9007199254740993)

static void make_rec(tg_ledger_rec_t *r, const char *id, const char *tenant,
                     const char *model, int64_t ts, int64_t prompt,
                     int64_t completion, int64_t cost) {
  memset(r, 0, sizeof(*r));
  set_str(r->request_id, sizeof(r->request_id), id);
  set_str(r->tenant, sizeof(r->tenant), tenant);
  set_str(r->key_id, sizeof(r->key_id), "3f9c01d2ab47");
  set_str(r->model, sizeof(r->model), model);
  set_str(r->endpoint, sizeof(r->endpoint), "http://127.0.0.1:8000");
  r->ts_ms = ts;
  r->prompt_tokens = prompt;
  r->completion_tokens = completion;
  r->cost_nano = cost;
  r->status = 200;
  r->queue_us = 15;
  r->ttft_us = 1200;
  r->total_us = 54321;
}

/* One callback's landing place. */
typedef struct cbctx_s cbctx_t;
typedef struct {
  cbctx_t *c;
  int called;
  int status;
} slot_t;

struct cbctx_s {
  pthread_t thread;    /* the loop's thread: callbacks must run there */
  int got;
  int wrong_thread;
};

static void on_durable(void *arg, int status) {
  slot_t *s = arg;
  s->called++;
  s->status = status;
  s->c->got++;
  if (!pthread_equal(pthread_self(), s->c->thread))
    s->c->wrong_thread++;
}

/* Runs loop until c->got reaches n or timeout_ms passes. */
static int run_until(uv_loop_t *loop, cbctx_t *c, int n, int64_t timeout_ms) {
  int64_t end = mono_ms() + timeout_ms;
  while (c->got < n && mono_ms() < end) {
    uv_run(loop, UV_RUN_NOWAIT);
    if (c->got < n)
      sleep_ms(1);
  }
  return c->got >= n;
}

/* Polls cond(l) until true or timeout. */
static int wait_for(int (*cond)(tg_ledger_t *), tg_ledger_t *l,
                    int64_t timeout_ms) {
  int64_t end = mono_ms() + timeout_ms;
  while (!cond(l) && mono_ms() < end)
    sleep_ms(5);
  return cond(l);
}

static int spool_empty_db_up(tg_ledger_t *l) {
  return tg_ledger_spool_bytes(l) == 0 && tg_ledger_db_up(l) &&
         tg_ledger_backlog(l) == 0;
}

/* Another connection holding the write lock: in WAL mode BEGIN EXCLUSIVE
 * keeps every other writer out until it ends. */
static sqlite3 *lock_db(const char *dir) {
  sqlite3 *db = NULL;
  char path[128];
  snprintf(path, sizeof(path), "%s/%s", dir, TG_DB_SQLITE_FILE);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, "BEGIN EXCLUSIVE", NULL, NULL, NULL),
                   SQLITE_OK);
  return db;
}

static void unlock_db(sqlite3 *db) {
  assert_int_equal(sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL), SQLITE_OK);
  sqlite3_close(db);
}

/* The ledger's request ids in insertion (rowid) order, joined by ','. */
static char *ids_in_order(const char *dir) {
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  char path[128];
  size_t cap = 1 << 16, len = 0;
  char *out = calloc(1, cap);
  assert_non_null(out);
  snprintf(path, sizeof(path), "%s/%s", dir, TG_DB_SQLITE_FILE);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT request_id FROM ledger "
                                          "ORDER BY rowid", -1, &st, NULL),
                   SQLITE_OK);
  while (sqlite3_step(st) == SQLITE_ROW) {
    int w = snprintf(out + len, cap - len, "%s%s", len ? "," : "",
                     (const char *)sqlite3_column_text(st, 0));
    assert_true(w > 0 && (size_t)w < cap - len);
    len += (size_t)w;
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

static int64_t cost_of(const char *dir, const char *id) {
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  char path[128];
  int64_t v = -1;
  snprintf(path, sizeof(path), "%s/%s", dir, TG_DB_SQLITE_FILE);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT cost_nano FROM ledger "
                                          "WHERE request_id = ?1", -1, &st,
                                      NULL), SQLITE_OK);
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  if (sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return v;
}

static int64_t count_rows(const char *dir, const char *tenant) {
  tg_ledger_db_t *d = NULL;
  int64_t n = -1;
  assert_int_equal(tg_ledger_db_open("sqlite", dir, &d), 0);
  assert_int_equal(tg_ledger_count(d, tenant, &n), 0);
  tg_ledger_db_close(d);
  return n;
}

static int count_lines(const char *path) {
  FILE *f = fopen(path, "r");
  int c, n = 0;
  if (f == NULL)
    return -1;
  while ((c = fgetc(f)) != EOF)
    n += c == '\n';
  fclose(f);
  return n;
}

static int file_exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

/* A loop on the calling thread with one port. */
typedef struct {
  uv_loop_t loop;
  tg_ledger_port_t *port;
  cbctx_t c;
  slot_t *slots;
  int n;
} loopctx_t;

static void loop_open(loopctx_t *x, tg_ledger_t *l, int nslots) {
  memset(x, 0, sizeof(*x));
  assert_int_equal(uv_loop_init(&x->loop), 0);
  assert_int_equal(tg_ledger_port_new(l, &x->loop, &x->port), 0);
  x->c.thread = pthread_self();
  x->slots = calloc((size_t)nslots, sizeof(*x->slots));
  assert_non_null(x->slots);
  for (int i = 0; i < nslots; i++)
    x->slots[i].c = &x->c;
  x->n = nslots;
}

static int loop_append(loopctx_t *x, int slot, const tg_ledger_rec_t *r) {
  return tg_ledger_append(x->port, r, on_durable, &x->slots[slot]);
}

static void loop_close(loopctx_t *x) {
  tg_ledger_port_close(x->port);
  uv_run(&x->loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&x->loop), 0);
  free(x->slots);
}

/* Every slot in [from, to) called exactly once with status 0. */
static void assert_all_durable(loopctx_t *x, int from, int to) {
  for (int i = from; i < to; i++) {
    assert_int_equal(x->slots[i].called, 1);
    assert_int_equal(x->slots[i].status, 0);
  }
  assert_int_equal(x->c.wrong_thread, 0);
}

/* ---- two loops on two threads ---- */

#define PER_THREAD 300

typedef struct {
  tg_ledger_t *l;
  int idx;
  loopctx_t x;
  int append_errors;
  int all_called;
} worker_t;

static const char *worker_tenant(int idx) {
  return idx == 0 ? "acme" : "globex";
}

static void worker_rec(int idx, int i, tg_ledger_rec_t *r) {
  char id[40];
  snprintf(id, sizeof(id), "w%d-%05d", idx, i);
  /* Two models, two days (every third record on the first), big costs. */
  make_rec(r, id, worker_tenant(idx), i % 2 ? "m-b" : "m-a",
           T0 + (i % 3 == 0 ? 0 : DAY_MS) + i, 10 + i, 2 * i,
           BIG + i * (idx + 1));
}

static void *worker_main(void *arg) {
  worker_t *w = arg;
  tg_ledger_rec_t r;
  /* No cmocka asserts off the main thread: count, check after join. */
  if (uv_loop_init(&w->x.loop) != 0 ||
      tg_ledger_port_new(w->l, &w->x.loop, &w->x.port) != 0) {
    w->append_errors = -1;
    return NULL;
  }
  w->x.c.thread = pthread_self();
  for (int i = 0; i < PER_THREAD; i++) {
    w->x.slots[i].c = &w->x.c;
    worker_rec(w->idx, i, &r);
    if (tg_ledger_append(w->x.port, &r, on_durable, &w->x.slots[i]) != 0)
      w->append_errors++;
    if (i % 50 == 0)
      uv_run(&w->x.loop, UV_RUN_NOWAIT);
  }
  w->all_called = run_until(&w->x.loop, &w->x.c, PER_THREAD, 30000);
  tg_ledger_port_close(w->x.port);
  uv_run(&w->x.loop, UV_RUN_DEFAULT);
  uv_loop_close(&w->x.loop);
  return NULL;
}

static void test_two_loops_exact_sums(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 16};
  tg_ledger_t *l = NULL;
  worker_t w[2];
  pthread_t th[2];
  tg_ledger_db_t *d = NULL;
  tg_usage_row_t *u = NULL;
  tg_spend_row_t *s = NULL;
  size_t n = 0;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  assert_true(tg_ledger_db_up(l));
  for (int k = 0; k < 2; k++) {
    memset(&w[k], 0, sizeof(w[k]));
    w[k].l = l;
    w[k].idx = k;
    w[k].x.slots = calloc(PER_THREAD, sizeof(slot_t));
    assert_non_null(w[k].x.slots);
  }
  for (int k = 0; k < 2; k++)
    assert_int_equal(pthread_create(&th[k], NULL, worker_main, &w[k]), 0);
  for (int k = 0; k < 2; k++)
    assert_int_equal(pthread_join(th[k], NULL), 0);
  tg_ledger_close(l);

  for (int k = 0; k < 2; k++) {
    assert_int_equal(w[k].append_errors, 0);
    assert_true(w[k].all_called);
    assert_int_equal(w[k].x.c.got, PER_THREAD);
    assert_int_equal(w[k].x.c.wrong_thread, 0);
    for (int i = 0; i < PER_THREAD; i++) {
      assert_int_equal(w[k].x.slots[i].called, 1);
      assert_int_equal(w[k].x.slots[i].status, 0);
    }
    free(w[k].x.slots);
  }

  assert_int_equal(tg_ledger_db_open("sqlite", t->dir, &d), 0);
  {
    int64_t all = 0, acme = 0;
    assert_int_equal(tg_ledger_count(d, NULL, &all), 0);
    assert_int_equal(tg_ledger_count(d, "acme", &acme), 0);
    assert_int_equal(all, 2 * PER_THREAD);
    assert_int_equal(acme, PER_THREAD);
  }

  /* Per model, from the records as appended. */
  for (int k = 0; k < 2; k++) {
    int64_t req[2] = {0}, pr[2] = {0}, co[2] = {0}, cost[2] = {0};
    for (int i = 0; i < PER_THREAD; i++) {
      tg_ledger_rec_t r;
      worker_rec(k, i, &r);
      req[i % 2]++;
      pr[i % 2] += r.prompt_tokens;
      co[i % 2] += r.completion_tokens;
      cost[i % 2] += r.cost_nano;
    }
    assert_int_equal(tg_ledger_usage_by_model(d, worker_tenant(k), T0,
                                              T0 + 2 * DAY_MS, &u, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(u[0].model, "m-a");
    assert_string_equal(u[1].model, "m-b");
    for (int m = 0; m < 2; m++) {
      assert_int_equal(u[m].requests, req[m]);
      assert_int_equal(u[m].prompt_tokens, pr[m]);
      assert_int_equal(u[m].completion_tokens, co[m]);
      assert_int_equal(u[m].cost_nano, cost[m]);
    }
    free(u);
    u = NULL;
  }
  /* acme's m-a: 150 records at BIG + i for even i in [0, 300):
   * 150 * BIG + (0 + 2 + ... + 298) = 1351079888211148950 + 22350. */
  assert_int_equal(tg_ledger_usage_by_model(d, "acme", T0, T0 + 2 * DAY_MS,
                                            &u, &n), 0);
  assert_int_equal(u[0].cost_nano, INT64_C(1351079888211171300));
  free(u);
  u = NULL;

  /* Per tenant and day: day 1 holds every third record. */
  for (int day = 0; day < 2; day++) {
    int64_t want[2] = {0, 0};
    for (int k = 0; k < 2; k++)
      for (int i = 0; i < PER_THREAD; i++)
        if ((i % 3 == 0) == (day == 0)) {
          tg_ledger_rec_t r;
          worker_rec(k, i, &r);
          want[k] += r.cost_nano;
        }
    assert_int_equal(tg_ledger_spend_by_tenant(d, T0 + day * DAY_MS,
                                               T0 + (day + 1) * DAY_MS, &s, &n),
                     0);
    assert_int_equal(n, 2);
    assert_string_equal(s[0].tenant, "acme");
    assert_string_equal(s[1].tenant, "globex");
    assert_int_equal(s[0].cost_nano, want[0]);
    assert_int_equal(s[1].cost_nano, want[1]);
    free(s);
    s = NULL;
  }
  /* A window before everything is empty, and says so. */
  assert_int_equal(tg_ledger_spend_by_tenant(d, 0, T0, &s, &n), 0);
  assert_int_equal(n, 0);
  assert_null(s);
  tg_ledger_db_close(d);
}

/* ---- schema ---- */

static int64_t sql_int1(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st = NULL;
  int64_t v = -1;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  if (sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* Migration 5 on a ledger of schema 4: every row kept, in arrival order,
 * with one index left, the unique (tenant, ts_ms, request_id) key, which
 * the queries use and which still keeps a replayed record out. */
static void test_migration_5_one_key(void **state) {
  tmp_t *t = *state;
  char path[128];
  sqlite3 *db = NULL;
  tg_ledger_t *l = NULL;
  tg_ledger_rec_t r;
  loopctx_t x;

  snprintf(path, sizeof(path), "%s/%s", t->dir, TG_DB_SQLITE_FILE);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db,
      "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER);"
      "INSERT INTO schema_migrations VALUES (1, 1), (2, 1), (3, 1), (4, 1);"
      "CREATE TABLE api_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT,"
      " models TEXT, secret_sha256 BLOB NOT NULL, created_at INTEGER NOT NULL,"
      " expires_at INTEGER, revoked_at INTEGER);"
      "CREATE TABLE ledger (request_id TEXT PRIMARY KEY, ts_ms INTEGER NOT NULL,"
      " tenant TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL,"
      " endpoint TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,"
      " completion_tokens INTEGER NOT NULL, cost_nano INTEGER NOT NULL,"
      " status INTEGER NOT NULL, usage_counted INTEGER NOT NULL DEFAULT 0,"
      " queue_us INTEGER NOT NULL DEFAULT -1, ttft_us INTEGER NOT NULL DEFAULT -1,"
      " total_us INTEGER NOT NULL DEFAULT -1) STRICT;"
      "CREATE INDEX ledger_tenant_ts ON ledger(tenant, ts_ms);"
      "INSERT INTO ledger VALUES ('req-z', 1795867200000, 'acme', 'k', 'm-a', 'e', 1, 2, 30, 200, 0, 5, 6, 7),"
      " ('req-a', 1795867200001, 'acme', 'k', 'm-a', 'e', 3, 4, 70, 200, 1, -1, -1, 9),"
      " ('req-m', 1795867199999, 'beta', 'k', 'm-b', 'e', 5, 6, 11, 502, 0, -1, -1, -1);",
      NULL, NULL, NULL), SQLITE_OK);
  sqlite3_close(db);

  assert_int_equal(tg_ledger_open(NULL, t->dir, NULL, &l), 0);
  loop_open(&x, l, 2);
  make_rec(&r, "req-a", "acme", "m-a", 1795867200001, 3, 4, 70); /* stored: kept out */
  assert_int_equal(loop_append(&x, 0, &r), 0);
  make_rec(&r, "req-b", "acme", "m-a", 1795867200002, 1, 1, 5);
  assert_int_equal(loop_append(&x, 1, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 2, 10000));
  assert_all_durable(&x, 0, 2);
  loop_close(&x);
  tg_ledger_close(l);

  char *ids = ids_in_order(t->dir);
  assert_string_equal(ids, "req-z,req-a,req-m,req-b");
  free(ids);
  assert_int_equal(cost_of(t->dir, "req-a"), 70);
  assert_int_equal(count_rows(t->dir, "acme"), 3);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sql_int1(db, "SELECT MAX(version) FROM schema_migrations"),
                   tg_db_sqlite_schema_version());
  assert_int_equal(sql_int1(db, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index'"
                                " AND tbl_name = 'ledger'"), 1);
  assert_int_equal(sql_int1(db, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'ledger_key'"
                                " AND sql LIKE 'CREATE UNIQUE INDEX%(tenant, ts_ms, request_id)'"),
                   1);
  assert_int_equal(sql_int1(db, "SELECT total_us FROM ledger WHERE request_id = 'req-z'"), 7);
  /* An invoice's query is served by the key. */
  {
    sqlite3_stmt *st = NULL;
    int by_key = 0;
    assert_int_equal(sqlite3_prepare_v2(db, "EXPLAIN QUERY PLAN SELECT SUM(cost_nano) FROM ledger"
                                            " WHERE tenant = 'acme' AND ts_ms >= 1 AND ts_ms < 2",
                                        -1, &st, NULL), SQLITE_OK);
    while (sqlite3_step(st) == SQLITE_ROW)
      by_key |= strstr((const char *)sqlite3_column_text(st, 3), "ledger_key") != NULL;
    sqlite3_finalize(st);
    assert_true(by_key);
  }
  sqlite3_close(db);
}

/* ---- duplicates, validation ---- */

/* The SQLite backend writes a batch in statements of 16 records and the
 * rest one by one: a record repeated inside one statement, across two, or
 * in the single-row tail is stored once, the first time; all others are
 * stored, in order. */
static void test_batch_statements_skip_repeats(void **state) {
  tmp_t *t = *state;
  const tg__ledger_backend_t *be = &tg__ledger_backend_sqlite;
  tg__ledger_conn_opts_t wo = {.busy_timeout_ms = 1000, .writer = 1};
  tg__ledger_conn_t *w = NULL;
  tg_ledger_rec_t recs[40];
  const tg_ledger_rec_t *ptrs[40];
  char id[32], want[1024] = "";
  size_t wl = 0;

  for (int i = 0; i < 40; i++) {
    int src = i == 9 ? 5 : i == 20 ? 3 : i == 37 ? 33 : i; /* repeats */
    snprintf(id, sizeof(id), "req-%02d", src);
    make_rec(&recs[i], id, "acme", "m-a", T0 + src, 1, 1, 10 + i);
    ptrs[i] = &recs[i];
    if (src == i)
      wl += (size_t)snprintf(want + wl, sizeof(want) - wl, "%s%s", wl ? "," : "", id);
  }
  assert_int_equal(be->open(NULL, t->dir, &wo, &w), 0);
  assert_int_equal(be->insert_batch(w, ptrs, 40), 0);
  /* A replay of the whole batch adds nothing. */
  assert_int_equal(be->insert_batch(w, ptrs, 40), 0);
  be->close(w);
  char *ids = ids_in_order(t->dir);
  assert_string_equal(ids, want);
  free(ids);
  assert_int_equal(count_rows(t->dir, "acme"), 37);
  assert_int_equal(cost_of(t->dir, "req-05"), 15);   /* the first, not row 9's */
  assert_int_equal(cost_of(t->dir, "req-33"), 43);
}


static void test_duplicate_request_id_once(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = NULL;
  tg_ledger_rec_t r;
  loopctx_t x;

  assert_int_equal(tg_ledger_open(NULL, t->dir, NULL, &l), 0);
  loop_open(&x, l, 4);
  make_rec(&r, "req-dup", "acme", "m-a", T0, 10, 5, 100);
  assert_int_equal(loop_append(&x, 0, &r), 0);
  r.cost_nano = 999;               /* same id, in the same batch */
  assert_int_equal(loop_append(&x, 1, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 2, 10000));
  r.cost_nano = 555;               /* and in a later one */
  assert_int_equal(loop_append(&x, 2, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 3, 10000));
  assert_all_durable(&x, 0, 3);

  /* Refused outright: no id, an unterminated field, negative money. */
  make_rec(&r, "", "acme", "m-a", T0, 1, 1, 1);
  assert_int_equal(loop_append(&x, 3, &r), TG_EINVAL);
  make_rec(&r, "req-x", "acme", "m-a", T0, 1, 1, 1);
  memset(r.model, 'x', sizeof(r.model));
  assert_int_equal(loop_append(&x, 3, &r), TG_EINVAL);
  make_rec(&r, "req-x", "acme", "m-a", T0, 1, 1, -1);
  assert_int_equal(loop_append(&x, 3, &r), TG_EINVAL);
  assert_int_equal(tg_ledger_backlog(l), 0);

  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_rows(t->dir, NULL), 1);
  assert_int_equal(cost_of(t->dir, "req-dup"), 100);
}

/* ---- backlog bound ---- */

static void test_backlog_bound_refuses(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.max_backlog = 4, .busy_timeout_ms = 5000};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  tg_ledger_rec_t r;
  sqlite3 *lock;
  loopctx_t x;
  char id[40];

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 8);
  /* The writer blocks on the lock with its batch: nothing becomes durable. */
  lock = lock_db(t->dir);
  for (int i = 0; i < 4; i++) {
    snprintf(id, sizeof(id), "bk-%d", i);
    make_rec(&r, id, "acme", "m-a", T0, 1, 1, 7);
    assert_int_equal(loop_append(&x, i, &r), 0);
  }
  make_rec(&r, "bk-4", "acme", "m-a", T0, 1, 1, 7);
  assert_int_equal(loop_append(&x, 4, &r), TG_EUNAVAIL);
  assert_int_equal(tg_ledger_backlog(l), 4);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.refused, 1);
  sleep_ms(50);
  uv_run(&x.loop, UV_RUN_NOWAIT);
  assert_int_equal(x.c.got, 0);          /* the refused one gets no callback */

  unlock_db(lock);
  assert_true(run_until(&x.loop, &x.c, 4, 10000));
  assert_all_durable(&x, 0, 4);
  assert_int_equal(x.slots[4].called, 0);
  assert_int_equal(tg_ledger_backlog(l), 0);
  /* Room again. */
  assert_int_equal(loop_append(&x, 5, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 5, 10000));
  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_rows(t->dir, NULL), 5);
}

/* ---- group commit ---- */

static void test_group_commit_batches(void **state) {
  tmp_t *t = *state;
  /* A long linger: the writer commits only full batches of 50. */
  tg_ledger_opts_t o = {.batch_max = 50, .linger_us = 2000000};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  tg_ledger_rec_t r;
  loopctx_t x;
  char id[40];
  int64_t t0;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 201);
  for (int i = 0; i < 200; i++) {
    snprintf(id, sizeof(id), "gc-%03d", i);
    make_rec(&r, id, "acme", "m-a", T0, 3, 4, 11);
    assert_int_equal(loop_append(&x, i, &r), 0);
  }
  assert_true(run_until(&x.loop, &x.c, 200, 10000));
  assert_all_durable(&x, 0, 200);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.transactions, 4);
  assert_int_equal(st.committed, 200);
  assert_int_equal(st.spooled, 0);

  /* A lone record waits for company, at most the linger. */
  t0 = mono_ms();
  make_rec(&r, "gc-lone", "acme", "m-a", T0, 3, 4, 11);
  assert_int_equal(loop_append(&x, 200, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 201, 10000));
  assert_true(mono_ms() - t0 >= 1900);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.transactions, 5);
  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_rows(t->dir, "acme"), 201);
}

/* ---- database refuses: spool, then replay in order ---- */

static void append_seq(loopctx_t *x, int from, int to) {
  tg_ledger_rec_t r;
  char id[40];
  for (int i = from; i < to; i++) {
    snprintf(id, sizeof(id), "r-%04d", i);
    make_rec(&r, id, "acme", i % 2 ? "m-b" : "m-a", T0 + i, 1, 2, 1000 + i);
    assert_int_equal(loop_append(x, i, &r), 0);
  }
}

static char *seq_ids(int from, int to) {
  size_t cap = 1 << 16, len = 0;
  char *s = calloc(1, cap);
  assert_non_null(s);
  for (int i = from; i < to; i++)
    len += (size_t)snprintf(s + len, cap - len, "%sr-%04d", len ? "," : "", i);
  return s;
}

static void test_db_locked_spools_then_replays_in_order(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 8, .busy_timeout_ms = 100,
                        .retry_ms = 100};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  tg_ledger_rec_t r;
  sqlite3 *lock;
  loopctx_t x;
  char *got, *want;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 60);
  append_seq(&x, 0, 10);
  assert_true(run_until(&x.loop, &x.c, 10, 10000));
  assert_true(tg_ledger_db_up(l));
  assert_false(file_exists(t->spool));

  /* Another writer holds the database past the busy timeout. */
  lock = lock_db(t->dir);
  append_seq(&x, 10, 40);
  /* The same request id again, with another cost: stored once, first wins. */
  make_rec(&r, "r-0003", "acme", "m-b", T0 + 3, 1, 2, 777777);
  assert_int_equal(loop_append(&x, 50, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 41, 10000));
  assert_all_durable(&x, 0, 40);
  assert_int_equal(x.slots[50].status, 0);
  assert_false(tg_ledger_db_up(l));
  assert_true(tg_ledger_spool_bytes(l) > 0);
  assert_int_equal(count_lines(t->spool), 31);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.spooled, 31);
  assert_int_equal(st.committed, 10);
  assert_true(st.db_failures >= 1);

  /* The database comes back; what arrives meanwhile queues behind the
   * spool, never ahead of it. */
  unlock_db(lock);
  append_seq(&x, 40, 50);
  assert_true(run_until(&x.loop, &x.c, 51, 10000));
  assert_true(wait_for(spool_empty_db_up, l, 10000));
  assert_false(file_exists(t->spool));
  tg_ledger_stats(l, &st);
  /* Each record went one way: straight in, or through the spool and back. */
  assert_int_equal(st.committed + st.spooled, 51);
  assert_true(st.spooled >= 31);
  assert_int_equal(st.replayed, st.spooled);
  assert_int_equal(st.lost, 0);
  loop_close(&x);
  tg_ledger_close(l);

  assert_int_equal(count_rows(t->dir, NULL), 50);
  assert_int_equal(cost_of(t->dir, "r-0003"), 1003);
  got = ids_in_order(t->dir);
  want = seq_ids(0, 50);
  assert_string_equal(got, want);
  free(got);
  free(want);
}

/* The database comes back under a load that fills every batch: the spool
 * still drains (each replay step takes more records than a batch brings),
 * and the records after it go straight in, in order. Replaying one batch a
 * step while a full batch was spooled a step kept the spool's size for as
 * long as the load lasted. */
static void test_spool_drains_under_full_batches(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 8, .busy_timeout_ms = 100, .retry_ms = 1};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  sqlite3 *lock;
  loopctx_t x;
  char *got, *want;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 1200);
  lock = lock_db(t->dir);
  append_seq(&x, 0, 40);
  assert_true(run_until(&x.loop, &x.c, 40, 10000));
  assert_false(tg_ledger_db_up(l));
  assert_int_equal(count_lines(t->spool), 40);

  /* Back, and 1,000 records at once: every batch the writer takes is
   * full for the next 125 batches. */
  unlock_db(lock);
  append_seq(&x, 40, 1040);
  assert_true(run_until(&x.loop, &x.c, 1040, 30000));
  assert_all_durable(&x, 0, 1040);
  assert_true(wait_for(spool_empty_db_up, l, 10000));
  tg_ledger_stats(l, &st);
  /* The 40 spooled while down, and the few batches before the replay had
   * caught up; the rest went straight to the database. */
  assert_true(st.committed >= 900);
  assert_int_equal(st.committed + st.spooled, 1040);
  assert_int_equal(st.replayed, st.spooled);
  assert_int_equal(st.lost, 0);
  loop_close(&x);
  tg_ledger_close(l);

  assert_int_equal(count_rows(t->dir, NULL), 1040);
  got = ids_in_order(t->dir);
  want = seq_ids(0, 1040);
  assert_string_equal(got, want);
  free(got);
  free(want);
}

/* While the database stays locked, a record waits for the spool's fsync,
 * not for a lock wait on every retry of the database. */
static void test_spooling_costs_no_lock_wait(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.busy_timeout_ms = 1500, .retry_ms = 20};
  tg_ledger_t *l = NULL;
  sqlite3 *lock;
  loopctx_t x;
  int64_t t0;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 12);
  lock = lock_db(t->dir);
  t0 = mono_ms();
  append_seq(&x, 0, 1);
  assert_true(run_until(&x.loop, &x.c, 1, 10000));
  /* The first batch found out by waiting the busy timeout... */
  assert_true(mono_ms() - t0 >= 1400);
  assert_false(tg_ledger_db_up(l));
  /* ...the next ones, with many retries in between, do not. */
  for (int i = 1; i < 11; i++) {
    sleep_ms(30);
    t0 = mono_ms();
    append_seq(&x, i, i + 1);
    assert_true(run_until(&x.loop, &x.c, i + 1, 10000));
    assert_true(mono_ms() - t0 < 700);
  }
  assert_all_durable(&x, 0, 11);
  unlock_db(lock);
  assert_true(wait_for(spool_empty_db_up, l, 10000));
  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_rows(t->dir, NULL), 11);
}

/* ---- a spool left behind: replayed at open, torn tail dropped ---- */

static void test_leftover_spool_replayed_at_open(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 4, .retry_ms = 100};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  loopctx_t x;
  int fd;
  char *got, *want;
  static const char torn[] = "L1 1A2B3C4D r-9999 1772323200000 acme 3f9c";

  /* The database is down: five records go to the spool; the gateway stops
   * (as kill -9 would leave it, plus a record cut mid-write). */
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  tg_ledger_close(l);       /* opening created the schema */
  tg__ledger_sqlite_fail_inserts(1);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 20);
  append_seq(&x, 0, 5);
  assert_true(run_until(&x.loop, &x.c, 5, 10000));
  assert_all_durable(&x, 0, 5);
  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_lines(t->spool), 5);
  fd = open(t->spool, O_WRONLY | O_APPEND);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, torn, sizeof(torn) - 1), (ssize_t)sizeof(torn) - 1);
  close(fd);

  /* Restart while it is still down: the torn record is cut, the spool is
   * kept, and new records follow it there. */
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  assert_false(tg_ledger_db_up(l));
  assert_true(tg_ledger_spool_bytes(l) > 0);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.spool_skipped, 1);
  assert_int_equal(st.spool_damaged, 0);  /* a torn last line is no record */
  loop_open(&x, l, 20);
  append_seq(&x, 5, 8);
  assert_true(run_until(&x.loop, &x.c, 3, 10000));
  assert_all_durable(&x, 5, 8);
  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_lines(t->spool), 8);
  assert_int_equal(count_rows(t->dir, NULL), 0);

  /* Back up: the next open replays the spool before returning. */
  tg__ledger_sqlite_fail_inserts(0);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  assert_true(tg_ledger_db_up(l));
  assert_int_equal(tg_ledger_spool_bytes(l), 0);
  assert_false(file_exists(t->spool));
  tg_ledger_stats(l, &st);
  assert_int_equal(st.replayed, 8);
  assert_int_equal(st.spool_skipped, 0);
  tg_ledger_close(l);
  got = ids_in_order(t->dir);
  want = seq_ids(0, 8);
  assert_string_equal(got, want);
  free(got);
  free(want);
  assert_int_equal(cost_of(t->dir, "r-0007"), 1007);
}

/* A line damaged in the middle of the spool is skipped, and kept in the
 * damaged file as it was; the others replay. */
static void test_damaged_spool_line_skipped(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.retry_ms = 100};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  loopctx_t x;
  FILE *f;
  char buf[8192];
  size_t len, line2;
  char *got;

  tg__ledger_sqlite_fail_inserts(1);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 4);
  append_seq(&x, 0, 3);
  assert_true(run_until(&x.loop, &x.c, 3, 10000));
  loop_close(&x);
  tg_ledger_close(l);

  /* Flip one byte of the second record's payload. */
  f = fopen(t->spool, "r+");
  assert_non_null(f);
  len = fread(buf, 1, sizeof(buf), f);
  line2 = (size_t)((char *)memchr(buf, '\n', len) - buf) + 1;
  assert_memory_equal(buf + line2 + 12, "r-0001", 6);
  buf[line2 + 17] = '9';
  fseek(f, 0, SEEK_SET);
  assert_int_equal(fwrite(buf, 1, len, f), len);
  fclose(f);

  tg__ledger_sqlite_fail_inserts(0);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.replayed, 2);
  assert_int_equal(st.spool_skipped, 1);
  assert_int_equal(st.spool_damaged, 1);
  assert_int_equal(tg_ledger_spool_bytes(l), 0);
  tg_ledger_close(l);
  got = ids_in_order(t->dir);
  assert_string_equal(got, "r-0000,r-0002");
  free(got);

  /* the damaged line is kept as it was, for an operator to read */
  {
    char path[256], kept[8192];
    size_t line2_len = (size_t)((char *)memchr(buf + line2, '\n', len - line2) - (buf + line2)) + 1;
    snprintf(path, sizeof(path), "%s/%s", t->dir, TG_LEDGER_DAMAGED_FILE);
    f = fopen(path, "r");
    assert_non_null(f);
    assert_int_equal(fread(kept, 1, sizeof(kept), f), line2_len);
    fclose(f);
    assert_memory_equal(kept, buf + line2, line2_len);
  }
}

/* Text with spaces, percent signs and bytes outside ASCII survives the
 * spool unchanged. */
static void test_spool_keeps_text_exact(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = NULL;
  tg_ledger_rec_t r;
  tg_ledger_db_t *d = NULL;
  tg_usage_row_t *u = NULL;
  size_t n = 0;
  loopctx_t x;
  static const char model[] = "my model %20 ~x\tcaf\xc3\xa9\n";

  tg__ledger_sqlite_fail_inserts(1);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  loop_open(&x, l, 2);
  make_rec(&r, "req-text", "team blue", model, T0, 5, 6, INT64_C(123456789012));
  r.endpoint[0] = '\0';
  r.ttft_us = -1;
  r.status = 499;
  r.usage_counted = 1;
  assert_int_equal(loop_append(&x, 0, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 1, 10000));
  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_lines(t->spool), 1);

  tg__ledger_sqlite_fail_inserts(0);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  tg_ledger_close(l);
  assert_int_equal(tg_ledger_db_open("sqlite", t->dir, &d), 0);
  assert_int_equal(tg_ledger_usage_by_model(d, "team blue", T0, T0 + 1, &u,
                                            &n), 0);
  assert_int_equal(n, 1);
  assert_string_equal(u[0].model, model);
  assert_int_equal(u[0].cost_nano, INT64_C(123456789012));
  assert_int_equal(u[0].prompt_tokens, 5);
  free(u);
  tg_ledger_db_close(d);
  {
    sqlite3 *db;
    sqlite3_stmt *st;
    char path[128];
    snprintf(path, sizeof(path), "%s/%s", t->dir, TG_DB_SQLITE_FILE);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT endpoint, status,"
                                            " usage_counted, queue_us, ttft_us,"
                                            " total_us, key_id FROM ledger",
                                        -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "");
    assert_int_equal(sqlite3_column_int(st, 1), 499);
    assert_int_equal(sqlite3_column_int(st, 2), 1);
    assert_int_equal(sqlite3_column_int64(st, 3), 15);
    assert_int_equal(sqlite3_column_int64(st, 4), -1);
    assert_int_equal(sqlite3_column_int64(st, 5), 54321);
    assert_string_equal((const char *)sqlite3_column_text(st, 6),
                        "3f9c01d2ab47");
    sqlite3_finalize(st);
    sqlite3_close(db);
  }
}

/* The database file is removed (or replaced) under the running gateway:
 * its connection would go on committing to a file no later open reads, and
 * answers would go out whose records are gone at the next start. The
 * writer sees the file moved and spools; the next open replays the spool
 * into the database file then at the path. */
static void test_db_file_removed_spools(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 4, .retry_ms = 20};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  loopctx_t x;
  char path[128], *got, *want;

  snprintf(path, sizeof(path), "%s/%s", t->dir, TG_DB_SQLITE_FILE);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 10);
  append_seq(&x, 0, 2);
  assert_true(run_until(&x.loop, &x.c, 2, 10000));
  assert_int_equal(unlink(path), 0);
  append_seq(&x, 2, 8);
  assert_true(run_until(&x.loop, &x.c, 8, 10000));
  assert_all_durable(&x, 0, 8);
  sleep_ms(100);            /* retries: the probe sees the file moved too */
  assert_false(tg_ledger_db_up(l));
  tg_ledger_stats(l, &st);
  assert_int_equal(st.committed, 2);
  assert_int_equal(st.spooled, 6);
  assert_int_equal(count_lines(t->spool), 6);
  loop_close(&x);
  tg_ledger_close(l);

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  assert_true(tg_ledger_db_up(l));
  tg_ledger_close(l);
  assert_false(file_exists(t->spool));
  got = ids_in_order(t->dir);
  want = seq_ids(2, 8);
  assert_string_equal(got, want);
  free(got);
  free(want);
}

/* The spool is removed while records wait in it (an operator tidying up, a
 * tmp cleaner): the writer's descriptor kept the file alive for itself
 * alone, so a stop or a crash before the replay lost every record in it,
 * answers already given. The writer makes it again at the path with what
 * it still holds: on the next batch, or at the next retry when none comes. */
static void test_spool_removed_while_waiting_is_made_again(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 4, .retry_ms = 20};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  loopctx_t x;
  char *got, *want;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  tg_ledger_close(l);       /* opening created the schema */
  tg__ledger_sqlite_fail_inserts(1);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 10);
  append_seq(&x, 0, 3);
  assert_true(run_until(&x.loop, &x.c, 3, 10000));
  assert_int_equal(unlink(t->spool), 0);
  append_seq(&x, 3, 6);     /* the next batch makes it again */
  assert_true(run_until(&x.loop, &x.c, 6, 10000));
  assert_all_durable(&x, 0, 6);
  assert_int_equal(count_lines(t->spool), 6);
  assert_int_equal(unlink(t->spool), 0);
  sleep_ms(200);            /* no batch: a retry makes it again */
  assert_int_equal(count_lines(t->spool), 6);
  loop_close(&x);
  tg_ledger_close(l);

  tg__ledger_sqlite_fail_inserts(0);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.replayed, 6);
  tg_ledger_close(l);
  assert_false(file_exists(t->spool));
  got = ids_in_order(t->dir);
  want = seq_ids(0, 6);
  assert_string_equal(got, want);
  free(got);
  free(want);
}

/* Neither the database nor the spool keeps anything (a full disk under an
 * outage): every batch fails, and each said two lines on stderr, flooding
 * the log (and the disk it may be on). At most SAYS_LINES failure lines a
 * minute are said now; the rest are counted, and their count said at
 * close. */
static void test_failures_said_at_most_ten_lines_a_minute(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 1, .retry_ms = 20};
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  loopctx_t x;
  char log[160], line[512];
  int saved, fd, said = 0, summary = 0;
  FILE *f;

  snprintf(log, sizeof(log), "%s/stderr.txt", t->dir);
  tg__ledger_sqlite_fail_inserts(1);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  assert_int_equal(mkdir(t->spool, 0700), 0);   /* the spool cannot be opened */
  fflush(stderr);
  saved = dup(2);
  fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  assert_true(saved >= 0 && fd >= 0);
  dup2(fd, 2);
  close(fd);
  loop_open(&x, l, 60);
  for (int i = 0; i < 60; i++) {      /* one batch each */
    append_seq(&x, i, i + 1);
    assert_true(run_until(&x.loop, &x.c, i + 1, 10000));
  }
  tg_ledger_stats(l, &st);
  loop_close(&x);
  tg_ledger_close(l);
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  tg__ledger_sqlite_fail_inserts(0);
  rmdir(t->spool);

  assert_int_equal(st.lost, 60);
  f = fopen(log, "r");
  assert_non_null(f);
  while (fgets(line, sizeof(line), f) != NULL) {
    if (strstr(line, "could not be kept") != NULL || strstr(line, "cannot open") != NULL)
      said++;
    if (strstr(line, "more lines like the above not said") != NULL)
      summary++;
  }
  fclose(f);
  assert_true(said > 0 && said <= 10);
  assert_int_equal(summary, 1);
}

/* ---- records the database refuses for good ---- */

/* Runs sql on the ledger's database through a connection of its own. */
static void exec_db(const char *dir, const char *sql) {
  sqlite3 *db = NULL;
  char path[128];
  snprintf(path, sizeof(path), "%s/%s", dir, TG_DB_SQLITE_FILE);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
  sqlite3_close(db);
}

#define REFUSE_X "CREATE TRIGGER refuse_x BEFORE INSERT ON ledger" \
                 " WHEN NEW.tenant = 'x' BEGIN SELECT RAISE(ABORT, 'tenant x" \
                 " is closed'); END"

/* The request ids of a file in the spool's line format, in file order,
 * joined by ','. */
static char *file_ids(const char *path) {
  size_t cap = 1 << 16, len = 0;
  char *out = calloc(1, cap), line[4096];
  FILE *f = fopen(path, "r");
  assert_non_null(out);
  assert_non_null(f);
  while (fgets(line, sizeof(line), f) != NULL) {
    char *id = line + 12, *sp = strchr(id, ' ');
    assert_memory_equal(line, "L1 ", 3);
    assert_non_null(sp);
    len += (size_t)snprintf(out + len, cap - len, "%s%.*s", len ? "," : "",
                            (int)(sp - id), id);
  }
  fclose(f);
  return out;
}

/* The table holds exactly the ids stored, and the rejected file exactly
 * the ids refused, each in order. */
static void assert_split(const char *dir, const char *rejected,
                         const char *stored, const char *refused) {
  char *got = ids_in_order(dir);
  assert_string_equal(got, stored);
  free(got);
  got = file_ids(rejected);
  assert_string_equal(got, refused);
  free(got);
}

/* Appends record i of a sequence whose tenant is x where refused[i]. */
static void append_mixed(loopctx_t *x, int from, int to, const int *refused) {
  tg_ledger_rec_t r;
  char id[40];
  for (int i = from; i < to; i++) {
    snprintf(id, sizeof(id), "r-%04d", i);
    make_rec(&r, id, refused[i] ? "x" : "acme", "m-a", T0 + i, 1, 2, 1000 + i);
    assert_int_equal(loop_append(x, i, &r), 0);
  }
}

/* Opens t's ledger, then has a trigger refuse tenant x's records; the
 * rejected file's path goes to rejected. */
static tg_ledger_t *open_refusing_x(tmp_t *t, const tg_ledger_opts_t *o,
                                    char *rejected, size_t size) {
  tg_ledger_t *l = NULL;
  snprintf(rejected, size, "%s/%s", t->dir, TG_LEDGER_REJECTED_FILE);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, o, &l), 0);
  exec_db(t->dir, REFUSE_X);
  return l;
}

/* A trigger refuses four records in the middle of one batch of 16: they
 * go to the rejected file, the twelve others are stored in their order,
 * every answer is 0, and nothing is spooled. Before, the whole batch went
 * to the spool and every later record behind it, for ever. Appended to
 * the spool once the trigger is gone, they are stored at the next open. */
static void test_refused_records_isolated_in_order(void **state) {
  tmp_t *t = *state;
  /* A long linger: the writer takes exactly one full batch of 16. */
  tg_ledger_opts_t o = {.batch_max = 16, .linger_us = 2000000};
  static const int refused[17] = {[3] = 1, [7] = 1, [8] = 1, [12] = 1};
  char rejected[128];
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  loopctx_t x;

  l = open_refusing_x(t, &o, rejected, sizeof(rejected));
  loop_open(&x, l, 17);
  append_mixed(&x, 0, 16, refused);
  assert_true(run_until(&x.loop, &x.c, 16, 10000));
  assert_all_durable(&x, 0, 16);
  assert_split(t->dir, rejected,
               "r-0000,r-0001,r-0002,r-0004,r-0005,r-0006,"
               "r-0009,r-0010,r-0011,r-0013,r-0014,r-0015",
               "r-0003,r-0007,r-0008,r-0012");
  tg_ledger_stats(l, &st);
  assert_int_equal(st.rejected, 4);
  assert_int_equal(st.committed, 12);
  assert_int_equal(st.spooled, 0);
  assert_int_equal(st.lost, 0);
  /* Bounded: 4 refused of 16 take at most 2 * 4 * log2(16) + 1. */
  assert_true(st.transactions <= 33);
  assert_true(tg_ledger_db_up(l));
  assert_false(file_exists(t->spool));

  /* The next record goes straight in. */
  append_mixed(&x, 16, 17, refused);
  assert_true(run_until(&x.loop, &x.c, 17, 10000));
  assert_all_durable(&x, 16, 17);
  loop_close(&x);
  tg_ledger_close(l);
  assert_int_equal(count_rows(t->dir, NULL), 13);
  assert_false(file_exists(t->spool));

  /* The operator drops the trigger and, the gateway stopped, appends the
   * rejected file to the spool: the next open stores them. */
  exec_db(t->dir, "DROP TRIGGER refuse_x");
  assert_int_equal(rename(rejected, t->spool), 0);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.replayed, 4);
  assert_int_equal(st.rejected, 0);
  assert_true(tg_ledger_db_up(l));
  tg_ledger_close(l);
  assert_false(file_exists(t->spool));
  assert_false(file_exists(rejected));
  assert_int_equal(count_rows(t->dir, "x"), 4);
  assert_int_equal(count_rows(t->dir, NULL), 17);
}

/* Records spooled while the database was away, two of which it refuses
 * once back: the replay moves those two to the rejected file and goes on
 * in order, and the spool is removed. Before, the replay stopped at the
 * first of them and the spool grew for ever. */
static void test_spool_replay_moves_refused_records_aside(void **state) {
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 4, .retry_ms = 50};
  static const int refused[12] = {[2] = 1, [9] = 1};
  char rejected[128];
  tg_ledger_stats_t st;
  tg_ledger_t *l = NULL;
  loopctx_t x;

  l = open_refusing_x(t, &o, rejected, sizeof(rejected));
  tg__ledger_sqlite_fail_inserts(1);
  loop_open(&x, l, 12);
  append_mixed(&x, 0, 10, refused);
  assert_true(run_until(&x.loop, &x.c, 10, 10000));
  assert_all_durable(&x, 0, 10);
  assert_int_equal(count_lines(t->spool), 10);

  tg__ledger_sqlite_fail_inserts(0);
  assert_true(wait_for(spool_empty_db_up, l, 10000));
  append_mixed(&x, 10, 12, refused);
  assert_true(run_until(&x.loop, &x.c, 12, 10000));
  assert_all_durable(&x, 10, 12);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.rejected, 2);
  assert_int_equal(st.replayed, 8);
  assert_int_equal(st.committed, 2);
  assert_int_equal(st.lost, 0);
  loop_close(&x);
  tg_ledger_close(l);
  assert_false(file_exists(t->spool));
  assert_split(t->dir, rejected,
               "r-0000,r-0001,r-0003,r-0004,r-0005,r-0006,"
               "r-0007,r-0008,r-0010,r-0011",
               "r-0002,r-0009");
}

/* ---- kill -9: every record reported durable survives ---- */

#define KILL_MAX_IDS 2000000

static int child_fd = -1;

static void child_cb(void *arg, int status) {
  int32_t id = (int32_t)(intptr_t)arg;
  if (status == 0 && write(child_fd, &id, sizeof(id)) != sizeof(id))
    _exit(3);
}

/* The child: appends as fast as the backlog allows, and reports each
 * record's id on the pipe from its durable callback. Never returns. */
static void child_main(const char *dir, int fd, int db_down) {
  tg_ledger_t *l = NULL;
  tg_ledger_port_t *port = NULL;
  tg_ledger_rec_t r;
  uv_loop_t loop;
  char id[40];
  int32_t i = 0;

  child_fd = fd;
  if (db_down)
    tg__ledger_sqlite_fail_inserts(1);
  if (tg_ledger_open("sqlite", dir, NULL, &l) != 0 || uv_loop_init(&loop) != 0 ||
      tg_ledger_port_new(l, &loop, &port) != 0)
    _exit(2);
  for (;;) {
    int rc = TG_EUNAVAIL;
    if (i < KILL_MAX_IDS) {
      snprintf(id, sizeof(id), "k-%07d", (int)i);
      make_rec(&r, id, "acme", "m-a", T0 + i, 1, 1, 1);
      rc = tg_ledger_append(port, &r, child_cb, (void *)(intptr_t)i);
      if (rc == 0)
        i++;
    }
    if (rc != 0 || i % 64 == 0)
      uv_run(&loop, rc != 0 ? UV_RUN_ONCE : UV_RUN_NOWAIT);
  }
}

static void kill9_run(tmp_t *t, int db_down) {
  unsigned char *reported = calloc(KILL_MAX_IDS, 1);
  unsigned char *stored = calloc(KILL_MAX_IDS, 1);
  int fds[2], status = 0;
  int64_t nrep = 0, end;
  tg_ledger_t *l = NULL;
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  char path[128];
  int32_t id;
  pid_t pid;

  assert_non_null(reported);
  assert_non_null(stored);
  assert_int_equal(pipe(fds), 0);
  pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    child_main(t->dir, fds[1], db_down);
  }
  close(fds[1]);
  /* Kill it mid-stream, once a few thousand records are durable. */
  end = mono_ms() + 30000;
  while (nrep < 3000 && mono_ms() < end &&
         read(fds[0], &id, sizeof(id)) == (ssize_t)sizeof(id)) {
    assert_true(id >= 0 && id < KILL_MAX_IDS);
    reported[id] = 1;
    nrep++;
  }
  assert_int_equal(kill(pid, SIGKILL), 0);
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  /* What it reported before dying is still in the pipe. */
  while (read(fds[0], &id, sizeof(id)) == (ssize_t)sizeof(id)) {
    assert_true(id >= 0 && id < KILL_MAX_IDS);
    reported[id] = 1;
    nrep++;
  }
  close(fds[0]);
  assert_true(nrep >= 3000);

  /* Restart: a leftover spool goes in at open. */
  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  assert_true(tg_ledger_db_up(l));
  tg_ledger_close(l);
  snprintf(path, sizeof(path), "%s/%s", t->dir, TG_DB_SQLITE_FILE);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_prepare_v2(db, "SELECT request_id FROM ledger", -1,
                                      &st, NULL), SQLITE_OK);
  while (sqlite3_step(st) == SQLITE_ROW) {
    long v = strtol((const char *)sqlite3_column_text(st, 0) + 2, NULL, 10);
    assert_true(v >= 0 && v < KILL_MAX_IDS);
    assert_int_equal(stored[v], 0);       /* stored once */
    stored[v] = 1;
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  for (int32_t i = 0; i < KILL_MAX_IDS; i++)
    if (reported[i] && !stored[i])
      fail_msg("record k-%07d was reported durable and is gone", (int)i);
  free(reported);
  free(stored);
}

static void test_kill9_keeps_durable_records(void **state) {
  kill9_run(*state, 0);
}

static void test_kill9_while_spooling_keeps_durable_records(void **state) {
  kill9_run(*state, 1);
}

/* ---- close, purge, overflow, retention ---- */

static void test_close_writes_everything(void **state) {
  tmp_t *t = *state;
  /* A linger far longer than the test: only close can flush these. */
  tg_ledger_opts_t o = {.batch_max = 1000, .linger_us = 30000000};
  tg_ledger_t *l = NULL;
  loopctx_t x;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 10);
  append_seq(&x, 0, 10);
  assert_int_equal(tg_ledger_backlog(l), 10);
  tg_ledger_close(l);
  /* The port outlives the ledger; closing it runs what was delivered. */
  assert_int_equal(x.c.got, 0);
  tg_ledger_port_close(x.port);
  assert_int_equal(x.c.got, 10);
  assert_all_durable(&x, 0, 10);
  uv_run(&x.loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&x.loop), 0);
  free(x.slots);
  assert_int_equal(count_rows(t->dir, NULL), 10);
}

static void test_purge_only_older_rows(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = NULL;
  tg_ledger_db_t *d = NULL;
  tg_ledger_rec_t r;
  loopctx_t x;
  int64_t now = wall_ms(), deleted = -1, n = -1;
  /* First millisecond of the previous month. */
  int64_t prev = tg_ledger_retention_cutoff_ms(now, 1);
  struct {
    const char *id, *tenant;
    int64_t ts;
  } rows[] = {
    {"p-a-2020-01", "acme", INT64_C(1579046400000)},    /* 2020-01-15 */
    {"p-a-2020-06", "acme", INT64_C(1590969600000)},    /* 2020-06-01 */
    {"p-b-2020-01", "globex", INT64_C(1579046400000)},
    {"p-a-before-prev", "acme", 0},
    {"p-a-prev", "acme", 0},
    {"p-a-now", "acme", 0},
  };
  rows[3].ts = prev - 1;
  rows[4].ts = prev + 3600000;
  rows[5].ts = now;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  loop_open(&x, l, 6);
  for (int i = 0; i < 6; i++) {
    make_rec(&r, rows[i].id, rows[i].tenant, "m-a", rows[i].ts, 1, 1, 1);
    assert_int_equal(loop_append(&x, i, &r), 0);
  }
  assert_true(run_until(&x.loop, &x.c, 6, 10000));
  loop_close(&x);
  tg_ledger_close(l);

  assert_int_equal(tg_ledger_db_open("sqlite", t->dir, &d), 0);
  /* Asking for everything up to tomorrow still keeps this month and the
   * last: only acme's older rows go. */
  assert_int_equal(tg_ledger_purge(d, "acme", now + DAY_MS, &deleted), 0);
  assert_int_equal(deleted, 3);
  assert_int_equal(tg_ledger_count(d, "acme", &n), 0);
  assert_int_equal(n, 2);
  assert_int_equal(tg_ledger_count(d, "globex", &n), 0);
  assert_int_equal(n, 1);
  /* All tenants, before February 2020: globex's January row. */
  assert_int_equal(tg_ledger_purge(d, NULL, INT64_C(1580515200000), &deleted),
                   0);
  assert_int_equal(deleted, 1);
  assert_int_equal(tg_ledger_count(d, NULL, &n), 0);
  assert_int_equal(n, 2);
  assert_int_equal(tg_ledger_purge(d, NULL, INT64_C(1580515200000), &deleted),
                   0);
  assert_int_equal(deleted, 0);
  tg_ledger_db_close(d);
  assert_int_equal(cost_of(t->dir, "p-a-now"), 1);
  assert_int_equal(cost_of(t->dir, "p-a-prev"), 1);
}

static int days_of(void *arg, const char *tenant) {
  (void)arg;
  if (strcmp(tenant, "acme") == 0)
    return 30;
  if (strcmp(tenant, "beta") == 0)
    return 9999;
  return 0;               /* globex, and "gone" which left the config */
}

static void test_retention_purge(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = NULL;
  tg_ledger_db_t *d = NULL;
  tg_ledger_rec_t r;
  loopctx_t x;
  int64_t now = wall_ms(), deleted = -1, n = -1;
  const int64_t jan2020 = INT64_C(1579046400000);
  struct {
    const char *id, *tenant;
    int64_t ts;
    int kept;
  } rows[] = {
    {"acme-old", "acme", jan2020, 0},
    {"acme-now", "acme", 0, 1},
    {"globex-old", "globex", jan2020, 0},
    {"globex-300d", "globex", 0, 1},
    {"gone-old", "gone", jan2020, 0},
    {"gone-300d", "gone", 0, 1},
    {"beta-old", "beta", jan2020, 1},
  };
  size_t nrows = sizeof(rows) / sizeof(rows[0]);
  rows[1].ts = now;
  rows[3].ts = rows[5].ts = now - 300 * DAY_MS;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  loop_open(&x, l, 8);
  for (size_t i = 0; i < nrows; i++) {
    make_rec(&r, rows[i].id, rows[i].tenant, "m-a", rows[i].ts, 1, 1, 1);
    assert_int_equal(loop_append(&x, (int)i, &r), 0);
  }
  assert_true(run_until(&x.loop, &x.c, (int)nrows, 10000));

  assert_int_equal(tg_ledger_db_open("sqlite", t->dir, &d), 0);
  assert_int_equal(tg_ledger_purge_expired(d, now, days_of, NULL, &deleted), 0);
  assert_int_equal(deleted, 3);
  for (size_t i = 0; i < nrows; i++)
    assert_int_equal(cost_of(t->dir, rows[i].id), rows[i].kept ? 1 : -1);
  assert_int_equal(tg_ledger_count(d, "acme", &n), 0);
  assert_int_equal(n, 1);
  tg_ledger_db_close(d);
  loop_close(&x);
  tg_ledger_close(l);
}

static void test_sum_overflow_is_refused(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = NULL;
  tg_ledger_db_t *d = NULL;
  tg_ledger_rec_t r;
  tg_spend_row_t *s = NULL;
  tg_usage_row_t *u = NULL;
  size_t n = 7;
  loopctx_t x;

  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  loop_open(&x, l, 2);
  make_rec(&r, "ov-1", "acme", "m-a", T0, 1, 1, INT64_MAX / 2 + 1);
  assert_int_equal(loop_append(&x, 0, &r), 0);
  make_rec(&r, "ov-2", "acme", "m-a", T0, 1, 1, INT64_MAX / 2 + 1);
  assert_int_equal(loop_append(&x, 1, &r), 0);
  assert_true(run_until(&x.loop, &x.c, 2, 10000));
  loop_close(&x);
  tg_ledger_close(l);

  assert_int_equal(tg_ledger_db_open("sqlite", t->dir, &d), 0);
  assert_int_equal(tg_ledger_spend_by_tenant(d, T0, T0 + 1, &s, &n),
                   TG_ETOOBIG);
  assert_null(s);
  assert_int_equal(n, 0);
  assert_int_equal(tg_ledger_usage_by_model(d, "acme", T0, T0 + 1, &u, &n),
                   TG_ETOOBIG);
  assert_null(u);
  tg_ledger_db_close(d);
}

/* The writer's connection leaves checkpoints to a thread of its own (no
 * fsync inside a batch's commit). Under a stream of batches that pauses now
 * and then (the writer lingers between batches; here a longer pause every
 * 100 batches, so that a slow disk's fsyncs fit in it) the WAL must still be
 * copied into the database file and started over, so it stays near the
 * checkpoint threshold (1,000 pages) instead of growing with every record
 * or reaching the writer's own fallback (4,000), and every record stays
 * readable from another connection while the writer runs. */
static void test_wal_stays_bounded(void **state) {
  tmp_t *t = *state;
  const tg__ledger_backend_t *be = &tg__ledger_backend_sqlite;
  tg__ledger_conn_opts_t wo = {.busy_timeout_ms = 1000, .writer = 1};
  tg__ledger_conn_t *w = NULL;
  enum { BATCHES = 2500, PER = 12 };
  static tg_ledger_rec_t recs[PER];
  const tg_ledger_rec_t *ptrs[PER];
  char path[160], id[40];
  struct stat st;

  assert_int_equal(be->open("sqlite", t->dir, &wo, &w), 0);
  for (int b = 0; b < BATCHES; b++) {
    for (int i = 0; i < PER; i++) {
      snprintf(id, sizeof(id), "wal-%06d-%02d", b, i);
      make_rec(&recs[i], id, i % 2 ? "acme" : "globex", "llama-3.1-8b",
               T0 + b, 10, 20, 30);
      ptrs[i] = &recs[i];
    }
    assert_int_equal(be->insert_batch(w, ptrs, PER), 0);
    if (b % 100 == 99)
      sleep_ms(100);
  }
  assert_int_equal(count_rows(t->dir, NULL), BATCHES * PER);
  /* 30,000 records took about 12,000 WAL pages (48 MB) to write */
  snprintf(path, sizeof(path), "%s/%s-wal", t->dir, TG_DB_SQLITE_FILE);
  assert_int_equal(stat(path, &st), 0);
  fprintf(stderr, "# WAL file: %lld pages\n", (long long)st.st_size / 4120);
  assert_true(st.st_size < (off_t)3000 * 4120);
  /* and the database file itself got the pages */
  snprintf(path, sizeof(path), "%s/%s", t->dir, TG_DB_SQLITE_FILE);
  assert_int_equal(stat(path, &st), 0);
  assert_true(st.st_size > (off_t)1000 * 4096);
  be->close(w);
}

/* Threads of this process whose scheduling policy is SCHED_BATCH (the
 * 41st field of /proc/self/task/TID/stat, the 39th after the name's ')'). */
static int batch_threads(void) {
  DIR *d = opendir("/proc/self/task");
  struct dirent *e;
  int n = 0;

  assert_non_null(d);
  while ((e = readdir(d)) != NULL) {
    char path[300], buf[1024];
    const char *p;
    int field = 3;
    FILE *f;
    size_t len;

    if (e->d_name[0] == '.')
      continue;
    snprintf(path, sizeof(path), "/proc/self/task/%s/stat", e->d_name);
    if ((f = fopen(path, "r")) == NULL)
      continue; /* the thread ended meanwhile */
    len = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[len] = '\0';
    p = strrchr(buf, ')');
    assert_non_null(p);
    for (p += 2; *p != '\0' && field < 41; p++)
      if (*p == ' ')
        field++;
    if (field == 41 && atoi(p) == SCHED_BATCH)
      n++;
  }
  closedir(d);
  return n;
}

/* The writer and the checkpointer never preempt a loop thread when they
 * wake (ledger.c, tg__ledger_thread_background). */
static void test_threads_yield_to_loops(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = NULL;

  assert_int_equal(batch_threads(), 0);
  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  for (int i = 0; i < 200 && batch_threads() < 2; i++)
    sleep_ms(10);
  assert_int_equal(batch_threads(), 2);
  tg_ledger_close(l);
  assert_int_equal(batch_threads(), 0);
}

/* A gateway-wide secret: made by the first caller, the same for every
 * later one (another connection, after a reopen), one per name. */
static void test_secret_made_once(void **state) {
  tmp_t *t = *state;
  tg_ledger_db_t *d = NULL;
  char a[65], b[65], c[65], small[10];

  assert_int_equal(tg_ledger_db_open("sqlite", t->dir, &d), 0);
  assert_int_equal(tg_ledger_db_secret(d, "cache_salt", a, sizeof(a)), 0);
  assert_int_equal(strlen(a), 64);
  assert_int_equal(strspn(a, "0123456789abcdef"), 64);
  assert_int_equal(tg_ledger_db_secret(d, "other", c, sizeof(c)), 0);
  assert_string_not_equal(a, c);
  assert_int_equal(tg_ledger_db_secret(d, "cache_salt", small, sizeof(small)), TG_ETOOBIG);
  tg_ledger_db_close(d);
  assert_int_equal(tg_ledger_db_open("sqlite", t->dir, &d), 0);
  assert_int_equal(tg_ledger_db_secret(d, "cache_salt", b, sizeof(b)), 0);
  assert_string_equal(a, b);
  tg_ledger_db_close(d);
}

static void test_retention_cutoff_and_open_errors(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = (tg_ledger_t *)1;
  tg_ledger_db_t *d = (tg_ledger_db_t *)1;
  /* 2026-03-15T00:00Z */
  int64_t now = INT64_C(1773532800000);
  int64_t feb1 = INT64_C(1769904000000);

  /* 30 days back would reach into February: kept back to February 1. */
  assert_int_equal(tg_ledger_retention_cutoff_ms(now, 30), feb1);
  assert_int_equal(tg_ledger_retention_cutoff_ms(now, 400), now - 400 * DAY_MS);
  assert_int_equal(tg_ledger_retention_cutoff_ms(now, 0),
                   now - TG_LEDGER_RETENTION_DAYS_DEFAULT * DAY_MS);
  /* January 1st: the previous month is December of the year before. */
  assert_int_equal(tg_ledger_retention_cutoff_ms(INT64_C(1767225600000), 1),
                   INT64_C(1764547200000));

  assert_int_equal(tg_ledger_open("mysql", t->dir, NULL, &l), TG_EINVAL);
  assert_null(l);
  assert_int_equal(tg_ledger_db_open("sqlite", "", &d), TG_EINVAL);
  assert_null(d);
}

/* One process owns a data_dir's ledger: the lock file names it, says when
 * it drains, is close-on-exec, and goes with the process (kill -9). */
static void test_data_dir_lock_has_one_holder(void **state) {
  tmp_t *t = *state;
  tg_datalock_holder_t h;
  char dir[128], path[192];
  struct stat sb;
  int fd = -1, fd2 = -1, ready[2];
  pid_t pid;
  char c;

  snprintf(dir, sizeof(dir), "%s/a/data", t->dir);
  assert_int_equal(tg_datalock_try(dir, &fd, &h), 0);
  assert_true(fd >= 0);
  assert_true(fcntl(fd, F_GETFD) & FD_CLOEXEC);
  snprintf(path, sizeof(path), "%s/%s", dir, TG_DATALOCK_FILE);
  assert_int_equal(stat(path, &sb), 0);
  assert_int_equal(sb.st_mode & 0777, 0600);
  assert_int_equal(stat(dir, &sb), 0);
  assert_int_equal(sb.st_mode & 0777, 0700);

  /* a second opener (another open file, as another process has) */
  assert_int_equal(tg_datalock_try(dir, &fd2, &h), TG_EBUSY);
  assert_int_equal(fd2, -1);
  assert_int_equal(h.pid, (long)getpid());
  assert_int_equal(h.draining, 0);
  tg_datalock_draining(fd);
  assert_int_equal(tg_datalock_try(dir, &fd2, &h), TG_EBUSY);
  assert_int_equal(h.pid, (long)getpid());
  assert_int_equal(h.draining, 1);
  tg_datalock_release(fd);

  /* a holder killed with SIGKILL leaves the lock free */
  assert_int_equal(pipe(ready), 0);
  pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    tg_datalock_holder_t ch;
    int cfd;
    if (tg_datalock_try(dir, &cfd, &ch) != 0)
      _exit(2);
    if (write(ready[1], "x", 1) != 1)
      _exit(3);
    for (;;)
      pause();
  }
  close(ready[1]);
  assert_int_equal(read(ready[0], &c, 1), 1);
  close(ready[0]);
  assert_int_equal(tg_datalock_try(dir, &fd2, &h), TG_EBUSY);
  assert_int_equal(h.pid, (long)pid);
  assert_int_equal(h.draining, 0);
  kill(pid, SIGKILL);
  assert_int_equal(waitpid(pid, NULL, 0), pid);
  assert_int_equal(tg_datalock_try(dir, &fd2, &h), 0);
  tg_datalock_release(fd2);
}

/* The append that created the spool failed before its directory entry was
 * synced: the next append that succeeds must sync it, or a crash can lose
 * the whole file although its records were reported durable. Only the
 * first append used to sync the directory, so the second was reported
 * durable without it. */
static void test_spool_dir_synced_after_a_failed_first_append(void **state) {
#ifndef TG_FAULTS
  (void)state;
  skip();
#else
  tmp_t *t = *state;
  tg_ledger_opts_t o = {.batch_max = 4, .retry_ms = 20};
  tg_ledger_t *l = NULL;
  loopctx_t x;

  tg__ledger_sqlite_fail_inserts(1);
  tg_fault_set("ledger_file_sync:1,ledger_dir_sync:1");
  assert_int_equal(tg_ledger_open("sqlite", t->dir, &o, &l), 0);
  loop_open(&x, l, 3);
  append_seq(&x, 0, 1);                 /* creates the spool; its fsync fails */
  assert_true(run_until(&x.loop, &x.c, 1, 10000));
  assert_int_equal(x.slots[0].status, TG_EIO);
  assert_true(file_exists(t->spool));
  append_seq(&x, 1, 2);                 /* syncs the directory, which fails */
  assert_true(run_until(&x.loop, &x.c, 2, 10000));
  assert_int_equal(x.slots[1].status, TG_EIO);
  append_seq(&x, 2, 3);                 /* syncs it again, and is durable */
  assert_true(run_until(&x.loop, &x.c, 3, 10000));
  assert_int_equal(x.slots[2].status, 0);
  loop_close(&x);
  tg_ledger_close(l);
  tg_fault_set(NULL);
  assert_int_equal(count_lines(t->spool), 1);
#endif
}

/* ---- budget windows rebuilt at start ---- */

/* The memory backend's day and month spend of acme, rebuilt from the
 * ledger in dir at now, as an admission at now would read them. */
static void rebuilt_spend(const char *dir, int64_t now, tg_nano_t *day, tg_nano_t *month) {
  tg_config_t cfg;
  tg__mem_t *m = NULL;

  memset(&cfg, 0, sizeof(cfg));
  cfg.database = (char *)"sqlite";
  cfg.data_dir = (char *)dir;
  assert_int_equal(tg__mem_new(NULL, &m), 0);
  assert_int_equal(tg__mem_from_ledger(m, &cfg, now), 0);
  assert_int_equal(tg__mem_spend(m, "acme", now, day, month), 0);
  tg__mem_free(m);
}

/* Records dated after now (charged to a window the wall clock then stepped
 * back out of, or written by a clock that ran ahead) count in their own
 * period only: a restart before their day used to count them in now's day
 * and month as well, and again in their own once it came. */
static void test_rebuild_counts_each_record_in_one_period(void **state) {
  tmp_t *t = *state;
  tg_ledger_t *l = NULL;
  tg_ledger_rec_t r;
  loopctx_t x;
  tg_nano_t day = -1, month = -1;
  const int64_t HOUR = 3600000, APR1 = T0 + 31 * DAY_MS;
  const struct {
    const char *id;
    int64_t ts, cost;
  } rows[] = {
    {"mar01", T0 + 10 * HOUR, 1},          /* 2026-03-01 10:00 */
    {"mar02-open", T0 + DAY_MS, 10},       /* dated at the open window's start */
    {"mar02", T0 + DAY_MS + 5 * HOUR, 100},
    {"mar04-ahead", T0 + 3 * DAY_MS, 1000},
    {"apr01", APR1, 10000},
  };

  assert_int_equal(tg_ledger_open("sqlite", t->dir, NULL, &l), 0);
  loop_open(&x, l, 5);
  for (int i = 0; i < 5; i++) {
    make_rec(&r, rows[i].id, "acme", "m-a", rows[i].ts, 1, 1, rows[i].cost);
    assert_int_equal(loop_append(&x, i, &r), 0);
  }
  assert_true(run_until(&x.loop, &x.c, 5, 10000));
  assert_all_durable(&x, 0, 5);
  loop_close(&x);
  tg_ledger_close(l);

  /* March 1st at noon: its own day; March without April. */
  rebuilt_spend(t->dir, T0 + 12 * HOUR, &day, &month);
  assert_int_equal(day, 1);
  assert_int_equal(month, 1111);
  /* 23:30: March 2nd's window was open (a clock stepped back half an hour
   * across midnight) and is charged still, with its records alone. */
  rebuilt_spend(t->dir, T0 + DAY_MS - HOUR / 2, &day, &month);
  assert_int_equal(day, 110);
  assert_int_equal(month, 1111);
  rebuilt_spend(t->dir, T0 + DAY_MS + 6 * HOUR, &day, &month);
  assert_int_equal(day, 110);
  assert_int_equal(month, 1111);
  /* March 3rd: nothing; March 4th's record waits for its day. */
  rebuilt_spend(t->dir, T0 + 2 * DAY_MS + HOUR, &day, &month);
  assert_int_equal(day, 0);
  assert_int_equal(month, 1111);
  rebuilt_spend(t->dir, T0 + 3 * DAY_MS + HOUR, &day, &month);
  assert_int_equal(day, 1000);
  assert_int_equal(month, 1111);
  /* March 31st 23:30 with April's window open: April's day and month. */
  rebuilt_spend(t->dir, APR1 - HOUR / 2, &day, &month);
  assert_int_equal(day, 10000);
  assert_int_equal(month, 10000);
  /* Two hours before: too far ahead to be a step back; March's month. */
  rebuilt_spend(t->dir, APR1 - 2 * HOUR, &day, &month);
  assert_int_equal(day, 0);
  assert_int_equal(month, 1111);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(test_two_loops_exact_sums, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_migration_5_one_key, tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_batch_statements_skip_repeats, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_duplicate_request_id_once, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_backlog_bound_refuses, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_group_commit_batches, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_db_locked_spools_then_replays_in_order,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_spool_drains_under_full_batches,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_spooling_costs_no_lock_wait,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_leftover_spool_replayed_at_open,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_damaged_spool_line_skipped, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_refused_records_isolated_in_order,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_spool_replay_moves_refused_records_aside,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_db_file_removed_spools, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_spool_removed_while_waiting_is_made_again,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_failures_said_at_most_ten_lines_a_minute,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_spool_keeps_text_exact, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_kill9_keeps_durable_records,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(
        test_kill9_while_spooling_keeps_durable_records, tmp_setup,
        tmp_teardown),
    cmocka_unit_test_setup_teardown(test_close_writes_everything, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_spool_dir_synced_after_a_failed_first_append,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_rebuild_counts_each_record_in_one_period,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_purge_only_older_rows, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_retention_purge, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_sum_overflow_is_refused, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_secret_made_once, tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_retention_cutoff_and_open_errors,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_threads_yield_to_loops, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_wal_stays_bounded, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_data_dir_lock_has_one_holder, tmp_setup,
                                    tmp_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
