/* The ledger's PostgreSQL backend: the `ledger` table (migration 3 in
 * db_pg.c) in the database that every gateway replica shares.
 *
 * A batch is one COPY (the fast path, see copy_op) or, when it repeats a
 * stored request id, one INSERT ... SELECT FROM unnest(<14 arrays>) ON
 * CONFLICT (tenant, ts_ms, request_id) DO NOTHING: a statement prepared once per
 * connection, one round trip and one transaction for the whole batch
 * whatever its size (batches beyond CHUNK rows always go this way, in
 * several statements inside one BEGIN ... COMMIT). A statement is its own
 * transaction and PostgreSQL
 * flushes the commit record to its WAL before answering, with
 * synchronous_commit on — which the writer makes sure of — so a batch is
 * durable when insert_batch returns 0.
 *
 * The server may go away at any time. Every call runs on a connection
 * that is (re)made on demand: a call that finds its connection broken
 * (a restart cut it while idle) reconnects once and runs again, which is
 * safe because inserts skip request ids already stored; a call that cannot
 * reach the server fails with TG_EDB within the connect timeout, so the
 * ledger core spools and tries again later. The writer connects lazily: a
 * gateway may start while the database is away. While the core spools it
 * asks probe(), which makes a new connection a step at a time within a few
 * milliseconds per call, so a server that hangs costs the writer next to
 * nothing. The writer's calls print nothing (errmsg() keeps the reason and
 * the core says once per outage); query connections say why they failed.
 *
 * Sums are computed as numeric by PostgreSQL (SUM(bigint) is numeric) and
 * cast back to bigint in the query: a total beyond int64 is an error
 * (numeric_value_out_of_range), reported as TG_ETOOBIG, never a rounded
 * figure. Every value is read as text and parsed exactly. */
#include "meter/ledger_backend.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/err.h"
#include "meter/db_pg.h"

struct tg__ledger_conn_s {
  char *url;
  PGconn *pg;            /* NULL while not connected */
  PGconn *pending;       /* a connection probe() is making, or NULL */
  int64_t pending_since_ms;
  int64_t pending_limit_ms; /* its connect timeout (the URL's, else ours) */
  int hosts, host;       /* the URL's hosts; the one probe() tries */
  tg_db_pg_opts_t opts;
  tg_db_pg_wait_t wait;  /* how long a statement's answer may take */
  int writer;
  int prepared;          /* the insert is prepared on pg */
  int read_only;         /* pg refused a write as read-only: replace it */
  int conflict;          /* the last failure was a serialization failure
                          * (SQLSTATE class 40): the same statement again
                          * may well succeed */
  char err[512];         /* the last failure, for errmsg() */
};

/* Rows per INSERT statement: bounds the arrays built for one statement
 * (a few hundred KiB) while keeping the usual batch to one statement. */
#define CHUNK 1024
/* Rows removed per purge statement (each its own transaction), so the
 * writer never waits long behind a purge. */
#define PURGE_CHUNK 2000
/* The writer's statements: a batch that takes longer goes to the spool. */
#define WRITER_STATEMENT_MS 5000
#define QUERY_STATEMENT_MS 60000
/* Past the statement timeout, the server's own error is due: a server that
 * has not answered a little after it cannot (stopped, frozen, stuck on its
 * disk), and its connection is cut so the writer can spool. */
#define ANSWER_GRACE_MS 1000
/* What one probe may wait for the network: enough for a whole handshake
 * on a LAN, little enough that a server that went silent costs the writer
 * next to nothing per retry. A slower handshake goes on at the next probe. */
#define PROBE_WAIT_MS 50

#define INSERT_NAME "tg_ledger_insert"
#define N_COLS 14

static const char insert_sql[] =
    "INSERT INTO ledger (request_id, ts_ms, tenant, key_id, model, endpoint,"
    " prompt_tokens, completion_tokens, cost_nano, status, usage_counted,"
    " queue_us, ttft_us, total_us)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],"
    " $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[],"
    " $10::integer[], $11::integer[], $12::bigint[], $13::bigint[],"
    " $14::bigint[])"
    " ON CONFLICT (tenant, ts_ms, request_id) DO NOTHING";

/* ---- connection ---- */

static void drop(tg__ledger_conn_t *c) {
  PQfinish(c->pg);
  c->pg = NULL;
  c->prepared = 0;
}

static int64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A query connection says why a call failed on stderr, as the SQLite
 * backend does; the writer's caller decides what to print (once per outage
 * rather than once per retry). */
static void say(const tg__ledger_conn_t *c) {
  if (!c->writer)
    fprintf(stderr, "tollgate: ledger: %s\n", c->err);
}

/* Keeps the reason of a failure for errmsg(), and says it unless the
 * connection broke: then with_conn() reconnects and tries again, and says
 * only what is still wrong after that. */
static int note(tg__ledger_conn_t *c, const char *what, const char *why) {
  char msg[256];
  if (why == NULL && c->wait.cut) {
    snprintf(msg, sizeof(msg), "no answer from the server within %d ms",
             c->wait.wait_ms);
    why = msg;
  }
  snprintf(c->err, sizeof(c->err), "%s: %s", what,
           why ? why : tg_db_pg_errmsg(c->pg, msg, sizeof(msg)));
  if (!tg_db_pg_broken(c->pg))
    say(c);
  return TG_EDB;
}

/* tg_db_pg_exec within the connection's answer time. Returns 0 or
 * TG_EDB. */
static int exec_ok(tg__ledger_conn_t *c, const char *sql) {
  PGresult *r = tg_db_pg_query(c->pg, sql, 0, NULL, NULL, NULL, &c->wait);
  ExecStatusType st = PQresultStatus(r);
  PQclear(r);
  return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK ? 0 : TG_EDB;
}

/* What a new connection needs before use: the schema current and, for the
 * writer, commits that wait for the disk. A server set to
 * synchronous_commit=off answers COMMIT before the record is on disk; the
 * ledger promises durability, so the writer asks for it (a stronger
 * setting such as remote_apply is kept). Returns 0 or TG_EDB (noted). */
static int setup(tg__ledger_conn_t *c) {
  tg_db_pg_opts_t mo = {.quiet = 1};
  char why[256] = "";
  PGresult *r;
  int off;

  mo.err = why;
  mo.err_size = sizeof(why);
  if (tg_db_pg_migrate(c->pg, &mo) != 0)
    return note(c, "schema migration", why);
  if (!c->writer)
    return 0;
  r = tg_db_pg_query(c->pg, "SELECT current_setting('synchronous_commit')", 0,
                     NULL, NULL, NULL, &c->wait);
  if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
    PQclear(r);
    return note(c, "cannot read synchronous_commit", NULL);
  }
  off = strcmp(PQgetvalue(r, 0, 0), "off") == 0;
  PQclear(r);
  if (off && exec_ok(c, "SET synchronous_commit = on") != 0)
    return note(c, "cannot set synchronous_commit", NULL);
  return 0;
}

/* Makes sure c has a live connection with the schema current, connecting
 * (and waiting up to the connect timeout) when it has none. Returns 0,
 * TG_EDB (noted) or TG_ENOMEM. */
static int ensure(tg__ledger_conn_t *c) {
  char why[256], shown[200], what[240];
  int rc;

  if (c->pg != NULL)
    return 0;
  PQfinish(c->pending);   /* a half-made probe connection: start afresh */
  c->pending = NULL;
  why[0] = '\0';
  c->opts.err = why;
  c->opts.err_size = sizeof(why);
  rc = c->wait.wake_fd >= 0
           ? tg_db_pg_connect_wake(c->url, &c->opts, c->wait.wake_fd, &c->pg)
           : tg_db_pg_connect(c->url, &c->opts, &c->pg);
  c->opts.err = NULL;
  if (rc != 0) {
    snprintf(what, sizeof(what), "cannot connect to %s",
             tg_db_pg_redact(c->url, shown, sizeof(shown)));
    snprintf(c->err, sizeof(c->err), "%s: %s", what, why);
    say(c);
    return rc == TG_ENOMEM || rc == TG_EINVAL ? rc : TG_EDB;
  }
  rc = setup(c);
  if (rc != 0)
    drop(c);
  return rc;
}

/* Runs op on a live connection. When op fails on a connection that was
 * already open and turns out broken (the server restarted since), it
 * reconnects once and runs op again: every op here is safe to repeat.
 * Each answer is awaited for the statement timeout and a little more
 * (tg_db_pg_result), so a server that cannot answer costs that, once. */
static int with_conn(tg__ledger_conn_t *c, int (*op)(tg__ledger_conn_t *, void *),
                     void *arg) {
  int fresh = c->pg == NULL, rc;

  c->wait.cut = 0;
  rc = ensure(c);
  if (rc != 0)
    return rc;
  rc = op(c, arg);
  if (rc == 0 || !tg_db_pg_broken(c->pg))
    return rc;
  drop(c);
  /* A server that did not answer in time is not asked again at once: a
   * new connection would wait for it as long again. */
  if (fresh || c->wait.cut) {
    say(c);
    return rc;
  }
  rc = ensure(c);
  if (rc != 0)
    return rc;
  rc = op(c, arg);
  if (rc != 0 && tg_db_pg_broken(c->pg)) {
    say(c);
    drop(c);
  }
  return rc;
}

/* Reports a failed statement: numeric overflow of a sum as TG_ETOOBIG,
 * anything else as TG_EDB with the server's reason noted. Clears r. */
static int stmt_error(tg__ledger_conn_t *c, PGresult *r, const char *what) {
  const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
  int rc = TG_EDB;

  if (state != NULL && strcmp(state, "22003") == 0) {
    rc = TG_ETOOBIG;   /* numeric_value_out_of_range: a sum beyond int64 */
  } else {
    /* invalid_sql_statement_name: the insert was deallocated under us (a
     * pooler's DISCARD ALL); prepare it again on the next call. */
    if (state != NULL && strcmp(state, "26000") == 0)
      c->prepared = 0;
    /* read_only_sql_transaction: the session is read-only (a standby
     * after a failover, default_transaction_read_only) for its life, and
     * the probe finds it live, so the spool would never replay: a new
     * connection may reach the primary (target_session_attrs=read-write)
     * or find the setting changed. */
    if (state != NULL && strcmp(state, "25006") == 0)
      c->read_only = 1;
    c->conflict = state != NULL && strncmp(state, "40", 2) == 0;
    note(c, what, NULL);
  }
  PQclear(r);
  return rc;
}

/* A failed write of the ledger's records: TG_EREJECTED when the server
 * refuses the records themselves, by SQLSTATE class 22 (data exception: a
 * value out of a column's range, text that is not valid UTF-8) or 23
 * (integrity constraint: a CHECK, NOT NULL, foreign key, or a unique
 * constraint other than the record's key, which ON CONFLICT skips), or
 * P0001 (a trigger's RAISE EXCEPTION, how rows are refused by trigger): no
 * retry changes those. Anything else (the server away, a timeout, a lock
 * wait, a full disk, a read-only standby) as stmt_error. Clears r. */
static int write_error(tg__ledger_conn_t *c, PGresult *r, const char *what) {
  const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;

  if (state != NULL && (strncmp(state, "22", 2) == 0 ||
                        strncmp(state, "23", 2) == 0 ||
                        strcmp(state, "P0001") == 0)) {
    note(c, what, NULL);
    PQclear(r);
    return TG_EREJECTED;
  }
  return stmt_error(c, r, what) == TG_ENOMEM ? TG_ENOMEM : TG_EDB;
}

/* Says whether a write would go through now, without waiting more than
 * PROBE_WAIT_MS: a live connection answers yes (insert_batch finds out if
 * the server restarted meanwhile and reconnects); without one, a
 * connection is started, and each call advances it within that budget, so
 * a server that is down or unreachable costs the spooling writer next to
 * nothing. A connection still not made after the connect timeout is
 * dropped and the next call starts another, to the URL's next host when it
 * names several: libpq, not blocking, would wait on the first for ever
 * when it does not answer, and never reach the one that took over. The
 * connect timeout is the URL's connect_timeout when it sets one.
 * Returns 0 or TG_EDB (noted). */
static int pg_probe(tg__ledger_conn_t *c) {
  char why[256], shown[200];
  int rc, limit_ms;

  if (c->pg != NULL && !tg_db_pg_broken(c->pg))
    return 0;
  if (c->pg != NULL)
    drop(c);
  c->wait.cut = 0;
  if (c->pending == NULL) {
    why[0] = '\0';
    c->opts.err = why;
    c->opts.err_size = sizeof(why);
    rc = tg_db_pg_connect_start(c->url, &c->opts,
                                c->hosts > 1 ? c->host : -1, &c->pending);
    c->opts.err = NULL;
    if (rc != 0) {
      snprintf(c->err, sizeof(c->err), "cannot connect to %s: %s",
               tg_db_pg_redact(c->url, shown, sizeof(shown)), why);
      return rc == TG_ENOMEM ? rc : TG_EDB;
    }
    c->pending_since_ms = mono_ms();
    /* the URL's connect_timeout when it sets one: a handshake that needs
     * longer than ours (TLS to a distant server) must be let finish, or
     * every probe would start it over and the spool would never replay */
    limit_ms = tg_db_pg_connect_wait_ms(c->pending);
    c->pending_limit_ms = limit_ms > 0 ? limit_ms : 3000;
  }
  rc = tg_db_pg_connect_step(c->pending, PROBE_WAIT_MS, -1);
  if (rc == 1 && mono_ms() - c->pending_since_ms < c->pending_limit_ms) {
    snprintf(c->err, sizeof(c->err), "connecting to %s",
             tg_db_pg_redact(c->url, shown, sizeof(shown)));
    return TG_EDB;
  }
  if (rc != 0) {
    snprintf(c->err, sizeof(c->err), "cannot connect to %s: %s",
             tg_db_pg_redact(c->url, shown, sizeof(shown)),
             rc == 1 ? "timeout expired"
                     : tg_db_pg_errmsg(c->pending, why, sizeof(why)));
    PQfinish(c->pending);
    c->pending = NULL;
    c->host = (c->host + 1) % c->hosts;
    return TG_EDB;
  }
  c->pg = c->pending;
  c->pending = NULL;
  rc = setup(c);
  if (rc != 0)
    drop(c);
  return rc;
}

static const char *pg_errmsg(tg__ledger_conn_t *c) {
  return c->err[0] ? c->err : "no error";
}

static void pg_close(tg__ledger_conn_t *c) {
  if (c == NULL)
    return;
  PQfinish(c->pending);
  PQfinish(c->pg);
  free(c->url);
  free(c);
}

static int pg_open(const char *database, const char *data_dir,
                   const tg__ledger_conn_opts_t *o, tg__ledger_conn_t **out) {
  tg__ledger_conn_t *c;
  size_t len;
  int rc;

  (void)data_dir;
  *out = NULL;
  if (!tg_db_pg_is_url(database) ||
      (len = strlen(database)) >= TG_DB_PG_URL_MAX)
    return TG_EINVAL;
  c = calloc(1, sizeof(*c));
  if (c == NULL)
    return TG_ENOMEM;
  c->url = malloc(len + 1);
  if (c->url == NULL) {
    free(c);
    return TG_ENOMEM;
  }
  memcpy(c->url, database, len + 1);
  c->hosts = tg_db_pg_hosts(database);
  c->writer = o != NULL && o->writer;
  c->opts.statement_timeout_ms = c->writer ? WRITER_STATEMENT_MS
                                           : QUERY_STATEMENT_MS;
  c->opts.lock_timeout_ms = o != NULL && o->busy_timeout_ms > 0
                                ? o->busy_timeout_ms : 0;
  c->wait.wait_ms = (int)c->opts.statement_timeout_ms + ANSWER_GRACE_MS;
  c->wait.wake_fd = o != NULL && o->wake_fd != NULL ? *o->wake_fd : -1;
  c->opts.quiet = 1;   /* ensure() and note() say it in our words */
  rc = ensure(c);
  if (rc == TG_ENOMEM || rc == TG_EINVAL || (rc != 0 && !c->writer)) {
    if (rc == TG_EINVAL && c->writer)
      fprintf(stderr, "tollgate: ledger: %s\n", c->err);
    pg_close(c);
    return rc;
  }
  /* The writer starts without its database all the same: the ledger core
   * spools until probe() finds it answering. */
  if (rc != 0)
    fprintf(stderr, "tollgate: ledger: %s; records spool until it "
            "answers\n", c->err);
  *out = c;
  return 0;
}

/* ---- insert ---- */

/* A growable text buffer with a hard bound (one array literal). */
typedef struct {
  char *p;
  size_t len, cap;
} buf_t;

/* Bytes of one array literal: CHUNK elements of at most 256 bytes, each
 * byte escaped to two, plus quotes and commas. */
#define ARRAY_MAX ((size_t)CHUNK * (2 * 256 + 3) + 16)

static int buf_put(buf_t *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t ncap = b->cap ? b->cap : 256;
    char *p;
    while (ncap < b->len + n + 1)
      ncap *= 2;
    if (ncap > ARRAY_MAX)
      ncap = ARRAY_MAX;
    if (b->len + n + 1 > ncap)
      return TG_ETOOBIG;
    p = realloc(b->p, ncap);
    if (p == NULL)
      return TG_ENOMEM;
    b->p = p;
    b->cap = ncap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 0;
}

/* Appends one text element, double-quoted with '"' and '\' escaped, so
 * no value (not even "NULL" or one with braces or commas) is misread. */
static int put_text(buf_t *b, const char *s, size_t cap) {
  size_t n = strnlen(s, cap), i = 0;
  int rc = buf_put(b, "\"", 1);
  while (rc == 0 && i < n) {
    size_t run = strcspn(s + i, "\"\\");
    if (run > n - i)
      run = n - i;
    rc = buf_put(b, s + i, run);
    i += run;
    if (rc == 0 && i < n) {
      char esc[2] = {'\\', s[i]};
      rc = buf_put(b, esc, 2);
      i++;
    }
  }
  return rc == 0 ? buf_put(b, "\"", 1) : rc;
}

static int put_int(buf_t *b, int64_t v) {
  char num[24];
  int n = snprintf(num, sizeof(num), "%" PRId64, v);
  return buf_put(b, num, (size_t)n);
}

/* Builds the 14 array literals of recs[0..n). */
static int build_arrays(buf_t a[N_COLS], const tg_ledger_rec_t *const *recs,
                        size_t n) {
  int rc = 0;

  for (int k = 0; k < N_COLS; k++) {
    a[k].len = 0;
    if ((rc = buf_put(&a[k], "{", 1)) != 0)
      return rc;
  }
  for (size_t i = 0; i < n && rc == 0; i++) {
    const tg_ledger_rec_t *r = recs[i];
    if (i > 0)
      for (int k = 0; k < N_COLS && rc == 0; k++)
        rc = buf_put(&a[k], ",", 1);
    if (rc == 0)
      rc = put_text(&a[0], r->request_id, sizeof(r->request_id));
    if (rc == 0)
      rc = put_int(&a[1], r->ts_ms);
    if (rc == 0)
      rc = put_text(&a[2], r->tenant, sizeof(r->tenant));
    if (rc == 0)
      rc = put_text(&a[3], r->key_id, sizeof(r->key_id));
    if (rc == 0)
      rc = put_text(&a[4], r->model, sizeof(r->model));
    if (rc == 0)
      rc = put_text(&a[5], r->endpoint, sizeof(r->endpoint));
    if (rc == 0)
      rc = put_int(&a[6], r->prompt_tokens);
    if (rc == 0)
      rc = put_int(&a[7], r->completion_tokens);
    if (rc == 0)
      rc = put_int(&a[8], r->cost_nano);
    if (rc == 0)
      rc = put_int(&a[9], r->status);
    if (rc == 0)
      rc = put_int(&a[10], r->usage_counted ? 1 : 0);
    if (rc == 0)
      rc = put_int(&a[11], r->queue_us);
    if (rc == 0)
      rc = put_int(&a[12], r->ttft_us);
    if (rc == 0)
      rc = put_int(&a[13], r->total_us);
  }
  for (int k = 0; k < N_COLS && rc == 0; k++)
    rc = buf_put(&a[k], "}", 1);
  return rc;
}

typedef struct {
  const tg_ledger_rec_t *const *recs;
  size_t n;
  buf_t a[N_COLS];
} batch_t;

static int insert_op(tg__ledger_conn_t *c, void *arg) {
  batch_t *b = arg;
  const char *vals[N_COLS];
  PGresult *r;
  int rc, multi = b->n > CHUNK;

  if (!c->prepared) {
    r = PQsendPrepare(c->pg, INSERT_NAME, insert_sql, N_COLS, NULL)
            ? tg_db_pg_result(c->pg, &c->wait) : NULL;
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
      return stmt_error(c, r, "cannot prepare the insert");
    PQclear(r);
    c->prepared = 1;
  }
  /* One statement is one transaction; several need an explicit one. */
  if (multi && exec_ok(c, "BEGIN") != 0)
    return stmt_error(c, NULL, "cannot begin a batch");
  for (size_t off = 0; off < b->n; off += CHUNK) {
    size_t cnt = b->n - off < CHUNK ? b->n - off : CHUNK;
    rc = build_arrays(b->a, b->recs + off, cnt);
    if (rc != 0)
      goto fail;
    for (int k = 0; k < N_COLS; k++)
      vals[k] = b->a[k].p;
    r = PQsendQueryPrepared(c->pg, INSERT_NAME, N_COLS, vals, NULL, NULL, 0)
            ? tg_db_pg_result(c->pg, &c->wait) : NULL;
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
      rc = write_error(c, r, "insert");
      goto fail;
    }
    PQclear(r);
  }
  if (multi) {
    /* A deferred constraint is checked here. */
    r = tg_db_pg_query(c->pg, "COMMIT", 0, NULL, NULL, NULL, &c->wait);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
      rc = write_error(c, r, "commit");
      goto fail;
    }
    PQclear(r);
  }
  return 0;
fail:
  if (!tg_db_pg_broken(c->pg) &&
      PQtransactionStatus(c->pg) != PQTRANS_IDLE)
    exec_ok(c, "ROLLBACK");
  return rc == TG_ENOMEM || rc == TG_EREJECTED ? rc : TG_EDB;
}

/* ---- the fast path: COPY ----
 *
 * The common batch holds request ids the table has never seen. COPY stores
 * it for a fraction of the server's CPU of INSERT ... ON CONFLICT: no
 * array literals to parse, no speculative insertion (an extra unique-index
 * probe and an extra WAL record per row), and the heap rows go in whole
 * pages. COPY is one statement, so one transaction, committed (and
 * flushed, synchronous_commit being on) before its result arrives; a
 * request id already stored makes it fail whole (unique_violation) and
 * store nothing, and the batch then goes through the ON CONFLICT insert,
 * which skips what is there. So the outcome is the insert's, only cheaper
 * when nothing is repeated (a repeat comes only from a retried batch or a
 * spool replay). */

static const char copy_sql[] =
    "COPY ledger (request_id, ts_ms, tenant, key_id, model, endpoint,"
    " prompt_tokens, completion_tokens, cost_nano, status, usage_counted,"
    " queue_us, ttft_us, total_us) FROM STDIN (FORMAT binary)";

/* COPY's binary format: the server reads each field by its length and its
 * type's binary form, with no text to split, unescape or convert to
 * numbers (that parsing was an eighth of the server's CPU a record). The
 * columns' types are the schema's: TEXT, BIGINT (8 bytes) and INTEGER (4),
 * all big-endian. */
#define COPY_FIELDS 14

/* Bytes of COPY data handed to libpq at once. */
#define COPY_BUF (64 * 1024)
/* Longest row: the field count, a length per field, the texts (each at most
 * its array less the NUL), nine BIGINTs and two INTEGERs. */
#define COPY_ROW_MAX \
  (2 + COPY_FIELDS * 4 + 40 + 128 + 16 + 128 + 256 + 9 * 8 + 2 * 4)

static const char copy_header[19] = "PGCOPY\n\377\r\n\0" /* signature */
                                    "\0\0\0\0"              /* flags */
                                    "\0\0\0\0";             /* no extension */

static size_t bin_be(char *out, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; i++)
    out[i] = (char)(v >> (8 * (n - 1 - i)));
  return n;
}

static size_t bin_text(char *out, const char *s, size_t cap) {
  size_t n = strnlen(s, cap);
  bin_be(out, n, 4);
  memcpy(out + 4, s, n);
  return 4 + n;
}

static size_t bin_int8(char *out, int64_t v) {
  bin_be(out, 8, 4);
  return 4 + bin_be(out + 4, (uint64_t)v, 8);
}

static size_t bin_int4(char *out, int32_t v) {
  bin_be(out, 4, 4);
  return 4 + bin_be(out + 4, (uint32_t)v, 4);
}

/* One record as a binary COPY tuple at out, which has room for
 * COPY_ROW_MAX bytes. Returns its length. */
static size_t copy_row(char *out, const tg_ledger_rec_t *r) {
  size_t o = bin_be(out, COPY_FIELDS, 2);

  o += bin_text(out + o, r->request_id, sizeof(r->request_id) - 1);
  o += bin_int8(out + o, r->ts_ms);
  o += bin_text(out + o, r->tenant, sizeof(r->tenant) - 1);
  o += bin_text(out + o, r->key_id, sizeof(r->key_id) - 1);
  o += bin_text(out + o, r->model, sizeof(r->model) - 1);
  o += bin_text(out + o, r->endpoint, sizeof(r->endpoint) - 1);
  o += bin_int8(out + o, r->prompt_tokens);
  o += bin_int8(out + o, r->completion_tokens);
  o += bin_int8(out + o, r->cost_nano);
  o += bin_int4(out + o, r->status);
  o += bin_int4(out + o, r->usage_counted ? 1 : 0);
  o += bin_int8(out + o, r->queue_us);
  o += bin_int8(out + o, r->ttft_us);
  o += bin_int8(out + o, r->total_us);
  return o;
}

/* The batch by COPY. Returns 0 (committed), 1 (a request id is already
 * stored: nothing was, use the insert), or TG_EDB / TG_ENOMEM (noted). The
 * connection is idle again on return unless it broke. */
static int copy_op(tg__ledger_conn_t *c, const batch_t *b) {
  char *buf = malloc(COPY_BUF);
  PGresult *r;
  size_t used = 0;
  int rc = 0, sent = 1;

  if (buf == NULL)
    return TG_ENOMEM;
  r = tg_db_pg_query(c->pg, copy_sql, 0, NULL, NULL, NULL, &c->wait);
  if (PQresultStatus(r) != PGRES_COPY_IN) {
    free(buf);
    return stmt_error(c, r, "copy");
  }
  PQclear(r);
  memcpy(buf, copy_header, sizeof(copy_header));
  used = sizeof(copy_header);
  for (size_t i = 0; i < b->n && sent == 1; i++) {
    if (COPY_BUF - used < COPY_ROW_MAX) {
      sent = PQputCopyData(c->pg, buf, (int)used);
      used = 0;
    }
    used += copy_row(buf + used, b->recs[i]);
  }
  if (sent == 1 && COPY_BUF - used < 2) {
    sent = PQputCopyData(c->pg, buf, (int)used);
    used = 0;
  }
  used += bin_be(buf + used, 0xFFFF, 2); /* the trailer: a field count of -1 */
  if (sent == 1)
    sent = PQputCopyData(c->pg, buf, (int)used);
  free(buf);
  if (sent == 1)
    sent = PQputCopyEnd(c->pg, NULL);
  if (sent != 1)
    return note(c, "copy", NULL);
  /* The result, then the end of results: the connection is idle after. */
  r = tg_db_pg_result(c->pg, &c->wait);
  if (PQresultStatus(r) == PGRES_COMMAND_OK) {
    PQclear(r);
  } else {
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    if (state != NULL && strcmp(state, "23505") == 0) {
      PQclear(r);
      rc = 1;     /* unique_violation: a repeat; the insert skips it */
    } else {
      rc = write_error(c, r, "copy");
    }
  }
  while ((r = PQgetResult(c->pg)) != NULL)
    PQclear(r);
  return rc;
}

/* COPY first; the ON CONFLICT insert for a batch that repeats a request id
 * (or one too big for a single statement). */
static int write_op(tg__ledger_conn_t *c, void *arg) {
  batch_t *b = arg;
  int rc;

  if (b->n > CHUNK)
    return insert_op(c, arg);
  rc = copy_op(c, b);
  return rc == 1 ? insert_op(c, arg) : rc;
}

static int pg_insert_batch(tg__ledger_conn_t *c,
                           const tg_ledger_rec_t *const *recs, size_t n) {
  batch_t b;
  int rc;

  if (n == 0)
    return 0;
  memset(&b, 0, sizeof(b));
  b.recs = recs;
  b.n = n;
  c->read_only = 0;
  rc = with_conn(c, write_op, &b);
  if (rc != 0 && c->read_only)
    drop(c);
  for (int k = 0; k < N_COLS; k++)
    free(b.a[k].p);
  return rc;
}

/* ---- queries ---- */

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

/* Copies a cell into a fixed field, cut at its size (the gateway never
 * writes longer values; a foreign row is shown cut rather than refused). */
static void copy_cell(char *dst, size_t cap, const PGresult *r, int row,
                      int col) {
  size_t len = (size_t)PQgetlength(r, row, col);
  if (len >= cap)
    len = cap - 1;
  if (len > 0)
    memcpy(dst, PQgetvalue(r, row, col), len);
  dst[len] = '\0';
}

/* A query with text parameters whose rows are read by fill. Fetches at
 * most TG__LEDGER_MAX_ROWS + 1 rows (the SQL says LIMIT), so an
 * unexpected result never fills memory before the bound is checked. */
typedef struct {
  const char *sql, *what;
  int nparams;
  const char *const *params;
  int (*fill)(const PGresult *r, void *out);
  void *out;
} query_t;

static int query_op(tg__ledger_conn_t *c, void *arg) {
  query_t *q = arg;
  PGresult *r = tg_db_pg_query(c->pg, q->sql, q->nparams, q->params, NULL,
                               NULL, &c->wait);
  int rc;
  if (PQresultStatus(r) != PGRES_TUPLES_OK)
    return stmt_error(c, r, q->what);
  rc = q->fill(r, q->out);
  PQclear(r);
  return rc;
}

#define LIMIT_ROWS " LIMIT 1048577"
_Static_assert(TG__LEDGER_MAX_ROWS + 1 == 1048577,
               "LIMIT_ROWS must be TG__LEDGER_MAX_ROWS + 1");

typedef struct {
  void *rows;
  size_t n;
} rows_t;

/* Runs a query over [from_ms, to_ms): its parameters are tenant (when not
 * NULL) then the two bounds. On success *rows and *n take what fill made. */
static int range_query(tg__ledger_conn_t *c, const char *sql, const char *what,
                       const char *tenant, int64_t from_ms, int64_t to_ms,
                       int (*fill)(const PGresult *r, void *out), void **rows,
                       size_t *n) {
  char from[24], to[24];
  const char *params[3];
  int np = 0, rc;
  rows_t o = {0};
  query_t q;

  *rows = NULL;
  *n = 0;
  snprintf(from, sizeof(from), "%" PRId64, from_ms);
  snprintf(to, sizeof(to), "%" PRId64, to_ms);
  if (tenant != NULL)
    params[np++] = tenant;
  params[np++] = from;
  params[np++] = to;
  q = (query_t){sql, what, np, params, fill, &o};
  rc = with_conn(c, query_op, &q);
  if (rc == 0) {
    *rows = o.rows;
    *n = o.n;
  }
  return rc;
}

static int fill_usage(const PGresult *r, void *out) {
  rows_t *o = out;
  tg_usage_row_t *v = NULL;
  size_t cap = 0, cnt = 0;
  int rc = 0;

  for (int i = 0; i < PQntuples(r); i++) {
    if ((rc = grow((void **)&v, &cap, cnt, sizeof(*v))) != 0)
      break;
    copy_cell(v[cnt].model, sizeof(v[cnt].model), r, i, 0);
    if (tg_db_pg_int64(r, i, 1, &v[cnt].requests) != 0 ||
        tg_db_pg_int64(r, i, 2, &v[cnt].prompt_tokens) != 0 ||
        tg_db_pg_int64(r, i, 3, &v[cnt].completion_tokens) != 0 ||
        tg_db_pg_int64(r, i, 4, &v[cnt].cost_nano) != 0) {
      rc = TG_EDB;
      break;
    }
    cnt++;
  }
  if (rc != 0) {
    free(v);
    return rc;
  }
  o->rows = v;
  o->n = cnt;
  return 0;
}

static int pg_usage_by_model(tg__ledger_conn_t *c, const char *tenant,
                             int64_t from_ms, int64_t to_ms,
                             tg_usage_row_t **rows, size_t *n) {
  /* COLLATE "C": byte order, as SQLite sorts, whatever the database's
   * locale. */
  static const char sql[] =
      "SELECT model, COUNT(*), SUM(prompt_tokens)::bigint,"
      " SUM(completion_tokens)::bigint, SUM(cost_nano)::bigint FROM ledger"
      " WHERE tenant = $1 AND ts_ms >= $2::bigint AND ts_ms < $3::bigint"
      " GROUP BY model ORDER BY model COLLATE \"C\"" LIMIT_ROWS;
  return range_query(c, sql, "usage query", tenant, from_ms, to_ms, fill_usage,
                     (void **)rows, n);
}

/* Rows of (tenant[, cost]): a one-column result (the tenant query) gives
 * cost 0. */
static int fill_spend(const PGresult *r, void *out) {
  rows_t *o = out;
  tg_spend_row_t *v = NULL;
  size_t cap = 0, cnt = 0;
  int rc = 0;

  for (int i = 0; i < PQntuples(r); i++) {
    if ((rc = grow((void **)&v, &cap, cnt, sizeof(*v))) != 0)
      break;
    copy_cell(v[cnt].tenant, sizeof(v[cnt].tenant), r, i, 0);
    v[cnt].cost_nano = 0;
    if (PQnfields(r) > 1 && tg_db_pg_int64(r, i, 1, &v[cnt].cost_nano) != 0) {
      rc = TG_EDB;
      break;
    }
    cnt++;
  }
  if (rc != 0) {
    free(v);
    return rc;
  }
  o->rows = v;
  o->n = cnt;
  return 0;
}

/* The tenants with records, one index seek each on (tenant, ts_ms): the
 * queries over every tenant go through it, there being no index on ts_ms
 * alone (migration 4), so none of them reads the whole table. */
#define TENANTS_CTE                                                           \
  "WITH RECURSIVE t(tenant) AS (SELECT MIN(tenant) FROM ledger UNION ALL"     \
  " SELECT (SELECT MIN(l.tenant) FROM ledger l WHERE l.tenant > t.tenant)"    \
  " FROM t WHERE t.tenant IS NOT NULL)"

static int pg_spend_by_tenant(tg__ledger_conn_t *c, int64_t from_ms,
                              int64_t to_ms, tg_spend_row_t **rows,
                              size_t *n) {
  static const char sql[] =
      TENANTS_CTE
      ", v AS MATERIALIZED (SELECT tenant, (SELECT SUM(cost_nano)::bigint"
      " FROM ledger l WHERE l.tenant = t.tenant AND l.ts_ms >= $1::bigint"
      " AND l.ts_ms < $2::bigint) AS s FROM t WHERE tenant IS NOT NULL)"
      " SELECT tenant, s FROM v WHERE s IS NOT NULL ORDER BY tenant COLLATE \"C\""
      LIMIT_ROWS;
  return range_query(c, sql, "spend query", NULL, from_ms, to_ms, fill_spend,
                     (void **)rows, n);
}

static int pg_tenants_before(tg__ledger_conn_t *c, int64_t before_ms,
                             tg_spend_row_t **rows, size_t *n) {
  static const char sql[] =
      TENANTS_CTE
      " SELECT tenant FROM t WHERE tenant IS NOT NULL AND (SELECT MIN(ts_ms)"
      " FROM ledger l WHERE l.tenant = t.tenant) < $1::bigint"
      " ORDER BY tenant COLLATE \"C\"" LIMIT_ROWS;
  char before[24];
  const char *params[1] = {before};
  rows_t o = {0};
  query_t q = {sql, "tenant query", 1, params, fill_spend, &o};
  int rc;

  *rows = NULL;
  *n = 0;
  snprintf(before, sizeof(before), "%" PRId64, before_ms);
  rc = with_conn(c, query_op, &q);
  if (rc == 0) {
    *rows = o.rows;
    *n = o.n;
  }
  return rc;
}

static int fill_count(const PGresult *r, void *out) {
  if (PQntuples(r) != 1 || tg_db_pg_int64(r, 0, 0, out) != 0)
    return TG_EDB;
  return 0;
}

static int pg_count(tg__ledger_conn_t *c, const char *tenant, int64_t *n) {
  const char *params[1] = {tenant};
  query_t q = {tenant ? "SELECT COUNT(*) FROM ledger WHERE tenant = $1"
                      : "SELECT COUNT(*) FROM ledger",
               "count", tenant ? 1 : 0, params, fill_count, n};
  int rc;

  *n = 0;
  rc = with_conn(c, query_op, &q);
  if (rc != 0)
    *n = 0;
  return rc;
}

typedef struct {
  char *out;
  size_t size;
} text_out_t;

static int fill_text(const PGresult *r, void *arg) {
  text_out_t *t = arg;
  if (PQntuples(r) == 0)
    return TG_ENOTFOUND;
  if (PQntuples(r) != 1 || PQgetisnull(r, 0, 0))
    return TG_EDB;
  return (size_t)snprintf(t->out, t->size, "%s", PQgetvalue(r, 0, 0)) < t->size ? 0
                                                                             : TG_ETOOBIG;
}

static int pg_secret(tg__ledger_conn_t *c, const char *name, const char *candidate, char *out,
                     size_t size) {
  /* one statement: the insert's row when it made one, else the stored row
   * (the outer read does not see the insert of its own statement) */
  static const char sql[] =
      "WITH ins AS (INSERT INTO gateway_secrets (name, value) VALUES ($1, $2)"
      " ON CONFLICT (name) DO NOTHING RETURNING value)"
      " SELECT value FROM ins UNION ALL"
      " SELECT value FROM gateway_secrets WHERE name = $1 LIMIT 1";
  const char *params[2] = {name, candidate};
  text_out_t t = {out, size};
  query_t q = {sql, "secret", 2, params, fill_text, &t};
  int rc;

  c->conflict = 0;
  rc = with_conn(c, query_op, &q);
  /* No row: another gateway's insert of the same name committed while
   * ours waited for it, after our statement took its snapshot, which the
   * read of the stored row uses too (under REPEATABLE READ the skipped
   * insert is a serialization failure instead). A new statement sees
   * that row. */
  if (rc == TG_ENOTFOUND || (rc == TG_EDB && c->conflict))
    rc = with_conn(c, query_op, &q);
  if (rc == TG_ENOTFOUND) {
    snprintf(c->err, sizeof(c->err), "secret: %s neither made nor found", name);
    say(c);
    rc = TG_EDB;
  }
  return rc;
}

typedef struct {
  const char *tenant;
  char before[24], chunk[16];
  int64_t total;
} purge_t;

static int purge_op(tg__ledger_conn_t *c, void *arg) {
  /* By row address in chunks, each its own transaction: one DELETE of a
   * year's rows would hold its locks and its WAL for long. The chunk is
   * found through the (tenant, ts_ms, request_id) key. */
  static const char sql[] =
      "DELETE FROM ledger WHERE ctid = ANY (ARRAY(SELECT ctid FROM ledger"
      " WHERE tenant = $3 AND ts_ms < $1::bigint LIMIT $2::integer))";
  purge_t *p = arg;
  const char *params[3] = {p->before, p->chunk, p->tenant};
  int64_t ch;

  do {
    PGresult *r = tg_db_pg_query(c->pg, sql, 3, params, NULL, NULL, &c->wait);
    char *end = NULL;
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
      return stmt_error(c, r, "purge");
    ch = strtoll(PQcmdTuples(r), &end, 10);
    PQclear(r);
    if (ch < 0)
      ch = 0;
    p->total += ch;
  } while (ch > 0);
  return 0;
}

static int pg_purge(tg__ledger_conn_t *c, const char *tenant,
                    int64_t before_ms, int64_t *deleted) {
  purge_t p = {.tenant = tenant};
  int rc;

  snprintf(p.before, sizeof(p.before), "%" PRId64, before_ms);
  snprintf(p.chunk, sizeof(p.chunk), "%d", PURGE_CHUNK);
  rc = with_conn(c, purge_op, &p);
  if (deleted != NULL)
    *deleted = p.total;
  return rc;
}

const tg__ledger_backend_t tg__ledger_backend_pg = {
  .name = "postgres",
  .open = pg_open,
  .insert_batch = pg_insert_batch,
  .probe = pg_probe,
  .errmsg = pg_errmsg,
  .usage_by_model = pg_usage_by_model,
  .spend_by_tenant = pg_spend_by_tenant,
  .purge = pg_purge,
  .count = pg_count,
  .tenants_before = pg_tenants_before,
  .secret = pg_secret,
  .close = pg_close,
};
