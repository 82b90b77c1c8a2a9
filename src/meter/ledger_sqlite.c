/* The ledger's SQLite backend: the `ledger` table (migration 3 in
 * db_sqlite.c) in the embedded database file, <data_dir>/tollgate.db.
 *
 * The writer's connection runs WAL with synchronous=NORMAL, so a COMMIT has
 * reached the operating system (not necessarily the disk) before a batch is
 * reported durable,
 * and with a short busy timeout, so a database locked by another writer
 * sends batches to the spool instead of holding responses back. A batch is
 * one BEGIN IMMEDIATE ... COMMIT of INSERT ... ON CONFLICT DO NOTHING with a
 * prepared statement kept for the connection's life.
 *
 * SUM() over INTEGER columns is exact in SQLite and fails with "integer
 * overflow" instead of wrapping or turning into a float; that failure is
 * reported as TG_ETOOBIG. */
#include "meter/ledger_backend.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "core/err.h"
#include "core/thread.h"
#include "meter/db_sqlite.h"

/* The writer's checkpointer. SQLite's automatic checkpoint runs inside the
 * COMMIT that grows the WAL past its threshold, with two fsyncs: every few
 * hundred batches, one batch (and every response waiting on it) would wait
 * for the disk. Instead the writer's connection has no automatic
 * checkpoint; its WAL hook wakes this thread, which checkpoints PASSIVE on
 * its own connection: it copies committed pages into the database file
 * while the writer goes on committing, and never takes the write lock. When
 * a checkpoint has caught up, the writer's next transaction starts the WAL
 * over, so the file stays about CKPT_FRAMES pages long. That needs the
 * writer to pause now and then (it does, between batches, while records
 * linger); when batches follow each other without a break the thread never
 * catches up, and at CKPT_FRAMES_INLINE the writer checkpoints itself, as
 * SQLite would have, which completes and lets the WAL start over. */
#define CKPT_FRAMES 1000
#define CKPT_FRAMES_INLINE (4 * CKPT_FRAMES)

typedef struct {
  sqlite3 *db;            /* the checkpointer's own connection */
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cond;
  int want, stop;
} ckpt_t;

struct tg__ledger_conn_s {
  sqlite3 *db;
  sqlite3_stmt *insert;   /* prepared once, for the writer: one record */
  sqlite3_stmt *insert_n; /* and INSERT_ROWS records */
  sqlite3_stmt *begin;    /* BEGIN IMMEDIATE, likewise */
  sqlite3_stmt *commit;   /* COMMIT, likewise */
  int busy_ms;            /* the connection's lock wait, restored after a probe */
  ckpt_t *ck;             /* the writer's checkpointer, or NULL */
  char err[256];          /* the last write failure, for the writer's log */
};

/* Rows removed per purge transaction: small enough that the writer waits
 * well under its busy timeout for the lock. */
#define PURGE_CHUNK 2000

static atomic_int fail_inserts;

void tg__ledger_sqlite_fail_inserts(int on) {
  atomic_store(&fail_inserts, on);
}

/* A batch goes in statements of INSERT_ROWS records (the rest one by one):
 * one statement's start, parameter handling and finish for many rows cut
 * the writer's CPU per record by about a quarter. Rows of one statement are
 * inserted in order, so a record repeated within it is skipped as it
 * would be across statements. 16 * 14 parameters stay far below SQLite's
 * bound (32766). */
#define INSERT_ROWS 16
#define INSERT_COLS 14

static const char insert_head[] =
    "INSERT INTO ledger (request_id, ts_ms, tenant, key_id, model, endpoint,"
    " prompt_tokens, completion_tokens, cost_nano, status, usage_counted,"
    " queue_us, ttft_us, total_us) VALUES ";
static const char insert_tail[] = " ON CONFLICT (tenant, ts_ms, request_id) DO NOTHING";

/* The insert of `rows` records with anonymous parameters, numbered in
 * order: record r's column k is parameter r * INSERT_COLS + k + 1. */
static int prepare_insert(sqlite3 *db, int rows, sqlite3_stmt **out) {
  char sql[sizeof(insert_head) + INSERT_ROWS * (2 * INSERT_COLS + 3) + sizeof(insert_tail)];
  size_t o = sizeof(insert_head) - 1;
  memcpy(sql, insert_head, o);
  for (int r = 0; r < rows; r++) {
    if (r > 0)
      sql[o++] = ',';
    sql[o++] = '(';
    for (int k = 0; k < INSERT_COLS; k++) {
      if (k > 0)
        sql[o++] = ',';
      sql[o++] = '?';
    }
    sql[o++] = ')';
  }
  memcpy(sql + o, insert_tail, sizeof(insert_tail));
  return sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, out, NULL) == SQLITE_OK
             ? 0
             : TG_EDB;
}

/* Keeps a write failure's text for errmsg(); the writer decides what to
 * print (once per outage, not once per retry). */
static int note(tg__ledger_conn_t *c, const char *what) {
  snprintf(c->err, sizeof(c->err), "%s: %s", what, sqlite3_errmsg(c->db));
  return TG_EDB;
}

/* A failed insert or commit: TG_EREJECTED when the database's rules refuse
 * the records themselves (a CHECK, NOT NULL, FOREIGN KEY or other UNIQUE
 * constraint, a trigger's RAISE, a value of the wrong type or too big),
 * which no retry changes; else TG_EDB (locked, disk full or failing,
 * read-only...), which a retry may get through. */
static int write_error(tg__ledger_conn_t *c, int code, const char *what) {
  note(c, what);
  code &= 0xff;   /* the primary code of an extended one */
  return code == SQLITE_CONSTRAINT || code == SQLITE_MISMATCH ||
         code == SQLITE_TOOBIG
             ? TG_EREJECTED
             : TG_EDB;
}

static int fail(sqlite3 *db, const char *what) {
  fprintf(stderr, "tollgate: ledger: %s: %s\n", what, sqlite3_errmsg(db));
  return TG_EDB;
}

/* A failed step of an aggregate: SQLite refuses an integer SUM() that
 * leaves int64 with this message (and nothing else carries it). */
static int step_error(sqlite3 *db) {
  const char *msg = sqlite3_errmsg(db);
  if (msg != NULL && strstr(msg, "integer overflow") != NULL)
    return TG_ETOOBIG;
  return fail(db, "query");
}

static void *ckpt_main(void *arg) {
  ckpt_t *k = arg;

  tg_thread_name("tg-checkpoint");
  tg__ledger_thread_background();

  pthread_mutex_lock(&k->mu);
  for (;;) {
    while (!k->want && !k->stop)
      pthread_cond_wait(&k->cond, &k->mu);
    if (k->stop)
      break;
    k->want = 0;
    pthread_mutex_unlock(&k->mu);
    /* PASSIVE neither waits for nor blocks the writer; a failure (a busy
     * database) is retried at the next wake-up. Frames the writer added
     * during a pass are copied by another, a few times at most, so that
     * the WAL is wholly copied the next time the writer pauses. */
    for (int pass = 0; pass < 4; pass++) {
      int log = 0, done = 0;
      if (sqlite3_wal_checkpoint_v2(k->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log,
                                    &done) != SQLITE_OK || done >= log)
        break;
    }
    pthread_mutex_lock(&k->mu);
  }
  pthread_mutex_unlock(&k->mu);
  return NULL;
}

/* The writer connection's WAL hook: after each commit, with the WAL's
 * length in pages. */
static int on_wal_commit(void *arg, sqlite3 *db, const char *name, int frames) {
  ckpt_t *k = arg;

  if (frames >= CKPT_FRAMES_INLINE) {
    sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return SQLITE_OK;
  }
  if (frames >= CKPT_FRAMES) {
    pthread_mutex_lock(&k->mu);
    if (!k->want) {
      k->want = 1;
      pthread_cond_signal(&k->cond);
    }
    pthread_mutex_unlock(&k->mu);
  }
  return SQLITE_OK;
}

static void ckpt_stop(ckpt_t *k) {
  if (k == NULL)
    return;
  pthread_mutex_lock(&k->mu);
  k->stop = 1;
  pthread_cond_signal(&k->cond);
  pthread_mutex_unlock(&k->mu);
  pthread_join(k->thread, NULL);
  pthread_cond_destroy(&k->cond);
  pthread_mutex_destroy(&k->mu);
  sqlite3_close(k->db);
  free(k);
}

/* Starts the checkpointer of the writer's connection c and hands it the WAL
 * hook. Returns 0, or an error (c then keeps SQLite's own checkpoints). */
static int ckpt_start(tg__ledger_conn_t *c, const char *data_dir) {
  ckpt_t *k = calloc(1, sizeof(*k));
  int rc;

  if (k == NULL)
    return TG_ENOMEM;
  if ((rc = tg_db_sqlite_open_private(&k->db, data_dir)) != 0) {
    free(k);
    return rc;
  }
  /* NORMAL: a checkpoint syncs the WAL before copying and the database
   * file after, so it never leaves a page only in a file it may reset. */
  sqlite3_exec(k->db, "PRAGMA synchronous=NORMAL", NULL, NULL, NULL);
  pthread_mutex_init(&k->mu, NULL);
  pthread_cond_init(&k->cond, NULL);
  if (pthread_create(&k->thread, NULL, ckpt_main, k) != 0) {
    pthread_cond_destroy(&k->cond);
    pthread_mutex_destroy(&k->mu);
    sqlite3_close(k->db);
    free(k);
    return TG_ENOMEM;
  }
  c->ck = k;
  sqlite3_wal_hook(c->db, on_wal_commit, k);   /* replaces the automatic checkpoint */
  return 0;
}

static void sq_close(tg__ledger_conn_t *c) {
  if (c == NULL)
    return;
  if (c->ck != NULL)
    sqlite3_wal_hook(c->db, NULL, NULL);
  ckpt_stop(c->ck);
  sqlite3_finalize(c->insert);
  sqlite3_finalize(c->insert_n);
  sqlite3_finalize(c->begin);
  sqlite3_finalize(c->commit);
  sqlite3_close(c->db);
  free(c);
}

static int sq_open(const char *database, const char *data_dir,
                   const tg__ledger_conn_opts_t *o, tg__ledger_conn_t **out) {
  tg__ledger_conn_t *c;
  int rc;

  (void)database;
  *out = NULL;
  c = calloc(1, sizeof(*c));
  if (c == NULL)
    return TG_ENOMEM;
  /* the writer's connection is the writer thread's alone */
  rc = o != NULL && o->writer ? tg_db_sqlite_open_private(&c->db, data_dir)
                              : tg_db_sqlite_open(&c->db, data_dir);
  if (rc != 0)
    goto out;
  rc = TG_EDB;
  /* WAL with synchronous=NORMAL: a COMMIT has written the WAL to the
   * operating system before it returns, so a killed gateway (kill -9) loses
   * nothing it reported durable; only an operating-system crash or a power
   * cut can lose the transactions since the last checkpoint. FULL would
   * fsync every commit and cap throughput at (requests in flight) / (fsync
   * time) — docs/decisions.md. */
  if (sqlite3_exec(c->db, "PRAGMA synchronous=NORMAL", NULL, NULL, NULL) !=
      SQLITE_OK) {
    fail(c->db, "cannot set synchronous=NORMAL");
    goto out;
  }
  c->busy_ms = 5000;     /* what tg_db_sqlite_open set */
  if (o != NULL && o->busy_timeout_ms > 0)
    c->busy_ms = o->busy_timeout_ms > INT_MAX ? INT_MAX
                                              : (int)o->busy_timeout_ms;
  if (sqlite3_busy_timeout(c->db, c->busy_ms) != SQLITE_OK)
    goto out;
  if (o != NULL && o->writer &&
      (prepare_insert(c->db, 1, &c->insert) != 0 ||
       prepare_insert(c->db, INSERT_ROWS, &c->insert_n) != 0 ||
       sqlite3_prepare_v3(c->db, "BEGIN IMMEDIATE", -1, SQLITE_PREPARE_PERSISTENT,
                          &c->begin, NULL) != SQLITE_OK ||
       sqlite3_prepare_v3(c->db, "COMMIT", -1, SQLITE_PREPARE_PERSISTENT,
                          &c->commit, NULL) != SQLITE_OK)) {
    fail(c->db, "cannot prepare the insert");
    goto out;
  }
  if (o != NULL && o->writer && ckpt_start(c, data_dir) != 0)
    fprintf(stderr, "tollgate: ledger: no checkpoint thread; SQLite "
            "checkpoints inside commits\n");
  rc = 0;
out:
  if (rc != 0) {
    sq_close(c);
    return rc;
  }
  *out = c;
  return 0;
}

static void bind_text(sqlite3_stmt *st, int i, const char *s, size_t cap) {
  sqlite3_bind_text(st, i, s, (int)strnlen(s, cap), SQLITE_STATIC);
}

/* Binds record r as the statement's row `row` (0-based). */
static void bind_rec(sqlite3_stmt *st, int row, const tg_ledger_rec_t *r) {
  int b = row * INSERT_COLS;
  bind_text(st, b + 1, r->request_id, sizeof(r->request_id));
  sqlite3_bind_int64(st, b + 2, r->ts_ms);
  bind_text(st, b + 3, r->tenant, sizeof(r->tenant));
  bind_text(st, b + 4, r->key_id, sizeof(r->key_id));
  bind_text(st, b + 5, r->model, sizeof(r->model));
  bind_text(st, b + 6, r->endpoint, sizeof(r->endpoint));
  sqlite3_bind_int64(st, b + 7, r->prompt_tokens);
  sqlite3_bind_int64(st, b + 8, r->completion_tokens);
  sqlite3_bind_int64(st, b + 9, r->cost_nano);
  sqlite3_bind_int(st, b + 10, r->status);
  sqlite3_bind_int(st, b + 11, r->usage_counted ? 1 : 0);
  sqlite3_bind_int64(st, b + 12, r->queue_us);
  sqlite3_bind_int64(st, b + 13, r->ttft_us);
  sqlite3_bind_int64(st, b + 14, r->total_us);
}

/* Runs a prepared statement without rows (BEGIN, COMMIT) and resets it, so
 * a failure's code survives the reset. */
static int step_once(sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  return rc;
}

/* 1 when the database file at its path is no longer the one this
 * connection writes (removed, or replaced by another file): a commit would
 * go to a file no later open reads. */
static int file_moved(tg__ledger_conn_t *c) {
  int moved = 0;
  if (sqlite3_file_control(c->db, "main", SQLITE_FCNTL_HAS_MOVED, &moved) != SQLITE_OK ||
      !moved)
    return 0;
  snprintf(c->err, sizeof(c->err), "the database file was removed or replaced");
  return 1;
}

static int sq_insert_batch(tg__ledger_conn_t *c,
                           const tg_ledger_rec_t *const *recs, size_t n) {
  int rc = TG_EDB, step;

  if (c->insert == NULL || c->insert_n == NULL || c->begin == NULL || c->commit == NULL)
    return TG_EINVAL;
  if (atomic_load(&fail_inserts)) {
    snprintf(c->err, sizeof(c->err), "database down (test)");
    return TG_EDB;
  }
  /* IMMEDIATE takes the write lock now, waiting up to the busy timeout;
   * a deferred BEGIN could fail later, half-way through the batch. */
  if (step_once(c->begin) != SQLITE_DONE)
    return note(c, "cannot begin a batch");
  if (file_moved(c)) {
    rc = TG_EDB;
    goto out;
  }
  /* Every parameter is bound again for each statement: no clearing needed. */
  for (size_t i = 0; i < n;) {
    sqlite3_stmt *st = n - i >= INSERT_ROWS ? c->insert_n : c->insert;
    int rows = st == c->insert_n ? INSERT_ROWS : 1;
    sqlite3_reset(st);
    for (int r = 0; r < rows; r++)
      bind_rec(st, r, recs[i + (size_t)r]);
    if ((step = sqlite3_step(st)) != SQLITE_DONE) {
      rc = write_error(c, step, "insert");
      goto out;
    }
    i += (size_t)rows;
  }
  sqlite3_reset(c->insert);
  sqlite3_reset(c->insert_n);
  /* A deferred foreign key is checked here. */
  if ((step = step_once(c->commit)) != SQLITE_DONE) {
    rc = write_error(c, step, "commit");
    goto out;
  }
  rc = 0;
out:
  sqlite3_reset(c->insert);
  sqlite3_reset(c->insert_n);
  if (rc != 0 && sqlite3_get_autocommit(c->db) == 0)
    sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
  return rc;
}

/* Takes and gives back the write lock without waiting for it. */
static int sq_probe(tg__ledger_conn_t *c) {
  int rc;
  if (atomic_load(&fail_inserts)) {
    snprintf(c->err, sizeof(c->err), "database down (test)");
    return TG_EDB;
  }
  sqlite3_busy_timeout(c->db, 0);
  rc = sqlite3_exec(c->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK
           ? (file_moved(c) ? TG_EDB : 0)
           : note(c, "probe");
  sqlite3_busy_timeout(c->db, c->busy_ms);
  if (sqlite3_get_autocommit(c->db) == 0)
    sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
  return rc;
}

static const char *sq_errmsg(tg__ledger_conn_t *c) {
  return c->err;
}

/* Copies column text into a fixed field, cut at its size (the gateway never
 * writes longer values; a foreign row is shown cut rather than refused). */
static void copy_col(char *dst, size_t cap, sqlite3_stmt *st, int col) {
  const unsigned char *s = sqlite3_column_text(st, col);
  size_t len = s ? (size_t)sqlite3_column_bytes(st, col) : 0;
  if (len >= cap)
    len = cap - 1;
  if (len > 0)
    memcpy(dst, s, len);
  dst[len] = '\0';
}

/* Grows *rows (of elem bytes each) to hold one more; bounded. */
static int grow(void **rows, size_t *cap, size_t n, size_t elem) {
  void *p;
  size_t ncap;
  if (n < *cap)
    return 0;
  if (n >= TG__LEDGER_MAX_ROWS)
    return TG_ETOOBIG;
  ncap = *cap ? *cap * 2 : 16;
  if (ncap > TG__LEDGER_MAX_ROWS)
    ncap = TG__LEDGER_MAX_ROWS;
  p = realloc(*rows, ncap * elem);
  if (p == NULL)
    return TG_ENOMEM;
  *rows = p;
  *cap = ncap;
  return 0;
}

/* Runs a query over [from_ms, to_ms): its parameters are tenant (when not
 * NULL) then the two bounds; row() copies one result row into a slot of
 * size bytes. On success *rows (malloc'd) and *n take the rows. */
static int range_query(tg__ledger_conn_t *c, const char *sql, const char *what,
                       const char *tenant, int64_t from_ms, int64_t to_ms,
                       void (*row)(sqlite3_stmt *st, void *slot), size_t size,
                       void **rows, size_t *n) {
  sqlite3_stmt *st = NULL;
  char *v = NULL;
  size_t cap = 0, cnt = 0;
  int rc = TG_EDB, s, i = 1;

  *rows = NULL;
  *n = 0;
  if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK) {
    fail(c->db, what);
    goto out;
  }
  if (tenant != NULL)
    sqlite3_bind_text(st, i++, tenant, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, i++, from_ms);
  sqlite3_bind_int64(st, i, to_ms);
  while ((s = sqlite3_step(st)) == SQLITE_ROW) {
    if ((rc = grow((void **)&v, &cap, cnt, size)) != 0)
      goto out;
    row(st, v + cnt * size);
    cnt++;
  }
  rc = s == SQLITE_DONE ? 0 : step_error(c->db);
out:
  sqlite3_finalize(st);
  if (rc != 0) {
    free(v);
    return rc;
  }
  *rows = v;
  *n = cnt;
  return 0;
}

static void usage_row(sqlite3_stmt *st, void *slot) {
  tg_usage_row_t *r = slot;
  copy_col(r->model, sizeof(r->model), st, 0);
  r->requests = sqlite3_column_int64(st, 1);
  r->prompt_tokens = sqlite3_column_int64(st, 2);
  r->completion_tokens = sqlite3_column_int64(st, 3);
  r->cost_nano = sqlite3_column_int64(st, 4);
}

static int sq_usage_by_model(tg__ledger_conn_t *c, const char *tenant,
                             int64_t from_ms, int64_t to_ms,
                             tg_usage_row_t **rows, size_t *n) {
  static const char sql[] =
      "SELECT model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),"
      " SUM(cost_nano) FROM ledger WHERE tenant = ?1 AND ts_ms >= ?2"
      " AND ts_ms < ?3 GROUP BY model ORDER BY model";
  return range_query(c, sql, "cannot prepare the usage query", tenant, from_ms, to_ms,
                     usage_row, sizeof(tg_usage_row_t), (void **)rows, n);
}

/* The tenants with records, one index seek each on (tenant, ts_ms): the
 * queries over every tenant go through it, there being no index on ts_ms
 * alone (migration 4), so none of them reads the whole table. */
#define TENANTS_CTE                                                         \
  "WITH RECURSIVE t(tenant) AS (SELECT MIN(tenant) FROM ledger UNION ALL"   \
  " SELECT (SELECT MIN(tenant) FROM ledger WHERE tenant > t.tenant) FROM t" \
  " WHERE t.tenant IS NOT NULL)"

static void spend_row(sqlite3_stmt *st, void *slot) {
  tg_spend_row_t *r = slot;
  copy_col(r->tenant, sizeof(r->tenant), st, 0);
  r->cost_nano = sqlite3_column_int64(st, 1);
}

static int sq_spend_by_tenant(tg__ledger_conn_t *c, int64_t from_ms,
                              int64_t to_ms, tg_spend_row_t **rows, size_t *n) {
  static const char sql[] =
      TENANTS_CTE
      ", v AS MATERIALIZED (SELECT tenant, (SELECT SUM(cost_nano) FROM ledger l"
      " WHERE l.tenant = t.tenant AND l.ts_ms >= ?1 AND l.ts_ms < ?2) AS s"
      " FROM t WHERE tenant IS NOT NULL)"
      " SELECT tenant, s FROM v WHERE s IS NOT NULL ORDER BY tenant";
  return range_query(c, sql, "cannot prepare the spend query", NULL, from_ms, to_ms,
                     spend_row, sizeof(tg_spend_row_t), (void **)rows, n);
}

static int sq_purge(tg__ledger_conn_t *c, const char *tenant, int64_t before_ms,
                    int64_t *deleted) {
  /* By rowid in chunks, each its own transaction: one DELETE of a year's
   * rows would hold the write lock long enough to push the writer's
   * batches into the spool. */
  static const char sql[] =
      "DELETE FROM ledger WHERE rowid IN (SELECT rowid FROM ledger"
      " WHERE tenant = ?2 AND ts_ms < ?1 LIMIT ?3)";
  sqlite3_stmt *st = NULL;
  int64_t total = 0;
  int rc = TG_EDB, ch;

  if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK) {
    fail(c->db, "cannot prepare the purge");
    goto out;
  }
  sqlite3_bind_int64(st, 1, before_ms);
  sqlite3_bind_text(st, 2, tenant, -1, SQLITE_STATIC);
  sqlite3_bind_int(st, 3, PURGE_CHUNK);
  do {
    sqlite3_reset(st);
    if (sqlite3_step(st) != SQLITE_DONE) {
      fail(c->db, "purge");
      goto out;
    }
    ch = sqlite3_changes(c->db);
    total += ch;
  } while (ch > 0);
  rc = 0;
out:
  sqlite3_finalize(st);
  if (deleted != NULL)
    *deleted = total;
  return rc;
}

static int sq_count(tg__ledger_conn_t *c, const char *tenant, int64_t *n) {
  sqlite3_stmt *st = NULL;
  int rc = TG_EDB;

  *n = 0;
  if (sqlite3_prepare_v2(c->db,
                         tenant ? "SELECT COUNT(*) FROM ledger WHERE tenant = ?1"
                                : "SELECT COUNT(*) FROM ledger",
                         -1, &st, NULL) != SQLITE_OK) {
    fail(c->db, "cannot prepare the count");
    goto out;
  }
  if (tenant != NULL)
    sqlite3_bind_text(st, 1, tenant, -1, SQLITE_STATIC);
  if (sqlite3_step(st) != SQLITE_ROW) {
    fail(c->db, "count");
    goto out;
  }
  *n = sqlite3_column_int64(st, 0);
  rc = 0;
out:
  sqlite3_finalize(st);
  return rc;
}

static int sq_secret(tg__ledger_conn_t *c, const char *name, const char *candidate, char *out,
                     size_t size) {
  sqlite3_stmt *st = NULL;
  const unsigned char *v;
  int rc = TG_EDB;

  if (sqlite3_prepare_v2(c->db,
                         "INSERT OR IGNORE INTO gateway_secrets (name, value) VALUES (?1, ?2)",
                         -1, &st, NULL) != SQLITE_OK) {
    fail(c->db, "cannot prepare the secret");
    goto out;
  }
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, candidate, -1, SQLITE_STATIC);
  if (sqlite3_step(st) != SQLITE_DONE) {
    fail(c->db, "secret");
    goto out;
  }
  sqlite3_finalize(st);
  st = NULL;
  if (sqlite3_prepare_v2(c->db, "SELECT value FROM gateway_secrets WHERE name = ?1", -1, &st,
                         NULL) != SQLITE_OK) {
    fail(c->db, "cannot prepare the secret");
    goto out;
  }
  sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
  if (sqlite3_step(st) != SQLITE_ROW || (v = sqlite3_column_text(st, 0)) == NULL) {
    fail(c->db, "secret");
    goto out;
  }
  rc = (size_t)snprintf(out, size, "%s", (const char *)v) < size ? 0 : TG_ETOOBIG;
out:
  sqlite3_finalize(st);
  return rc;
}

static int sq_tenants_before(tg__ledger_conn_t *c, int64_t before_ms,
                             tg_spend_row_t **rows, size_t *n) {
  static const char sql[] =
      TENANTS_CTE
      " SELECT tenant FROM t WHERE tenant IS NOT NULL AND (SELECT MIN(ts_ms)"
      " FROM ledger l WHERE l.tenant = t.tenant) < ?1 ORDER BY tenant";
  sqlite3_stmt *st = NULL;
  tg_spend_row_t *v = NULL;
  size_t cap = 0, cnt = 0;
  int rc = TG_EDB, s;

  *rows = NULL;
  *n = 0;
  if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK) {
    fail(c->db, "cannot prepare the tenant query");
    goto out;
  }
  sqlite3_bind_int64(st, 1, before_ms);
  while ((s = sqlite3_step(st)) == SQLITE_ROW) {
    if ((rc = grow((void **)&v, &cap, cnt, sizeof(*v))) != 0)
      goto out;
    copy_col(v[cnt].tenant, sizeof(v[cnt].tenant), st, 0);
    v[cnt].cost_nano = 0;
    cnt++;
  }
  rc = s == SQLITE_DONE ? 0 : step_error(c->db);
out:
  sqlite3_finalize(st);
  if (rc != 0) {
    free(v);
    return rc;
  }
  *rows = v;
  *n = cnt;
  return 0;
}

const tg__ledger_backend_t tg__ledger_backend_sqlite = {
  .name = "sqlite",
  .open = sq_open,
  .insert_batch = sq_insert_batch,
  .probe = sq_probe,
  .errmsg = sq_errmsg,
  .usage_by_model = sq_usage_by_model,
  .spend_by_tenant = sq_spend_by_tenant,
  .purge = sq_purge,
  .count = sq_count,
  .tenants_before = sq_tenants_before,
  .secret = sq_secret,
  .close = sq_close,
};
