/* Connecting to PostgreSQL and migrating its schema.
 *
 * The schema is the embedded SQLite database's (db_sqlite.c), table for
 * table and column for column, in PostgreSQL types: every integer is a
 * BIGINT (money is nano-USD), the key hash a BYTEA. Migrations are an
 * ordered, append-only list of SQL scripts numbered from 1; a database
 * records the ones it has in schema_migrations. Opening applies the missing
 * ones in one transaction that first takes a transaction-scoped advisory
 * lock, so gateway replicas starting together against a fresh database wait
 * for each other and each script runs once; a script that fails rolls the
 * whole transaction back (DDL is transactional in PostgreSQL). A published
 * migration is never edited: a change of schema is a new entry at the end.
 *
 * Every connection gets short timeouts by default (connect, TCP keepalive,
 * unacknowledged sends, statements, lock waits), so a server that vanished
 * shows up as an error within seconds and the callers can fall back (the
 * ledger spools, the key watcher keeps its keys) instead of hanging. */
#include "meter/db_pg.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "config/config.h"
#include "core/err.h"

typedef struct {
  int version;
  const char *sql;
} migration_t;

static const migration_t migrations[] = {
  {1,
   /* Virtual keys (src/auth), as SQLite's migration 1: only the SHA-256 of
    * the secret is stored; models is a comma list, '' = every model the
    * tenant may use; times in unix seconds.
    * api_keys_changes is the key watchers' change marker: a statement
    * trigger bumps its one row in the same transaction as any write to
    * api_keys (the CLI's, or an operator's own SQL), so a watcher polls one
    * tiny row instead of reading the table, and never misses a change that
    * a max(created_at)/count(*) marker would (two revocations in one
    * second, a deleted row). */
   "CREATE TABLE api_keys ("
   "  id TEXT PRIMARY KEY,"
   "  tenant TEXT NOT NULL,"
   "  name TEXT,"
   "  models TEXT,"
   "  secret_sha256 BYTEA NOT NULL,"
   "  created_at BIGINT NOT NULL,"
   "  expires_at BIGINT,"
   "  revoked_at BIGINT"
   ");"
   "CREATE INDEX api_keys_tenant ON api_keys(tenant);"
   "CREATE TABLE api_keys_changes ("
   "  singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),"
   "  version BIGINT NOT NULL"
   ");"
   "INSERT INTO api_keys_changes (singleton, version) VALUES (TRUE, 0);"
   "CREATE FUNCTION tg_api_keys_bump() RETURNS trigger LANGUAGE plpgsql AS $$"
   " BEGIN UPDATE api_keys_changes SET version = version + 1; RETURN NULL;"
   " END $$;"
   "CREATE TRIGGER api_keys_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
   " ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION tg_api_keys_bump();"},
  {2,
   /* Budget spend per tenant and period ('day:2026-11-28', 'month:2026-11'),
    * as SQLite's migration 2. */
   "CREATE TABLE tenant_spend ("
   "  tenant TEXT NOT NULL,"
   "  period TEXT NOT NULL,"
   "  spent_nano BIGINT NOT NULL,"
   "  alerted INTEGER NOT NULL DEFAULT 0,"
   "  updated_at BIGINT NOT NULL,"
   "  PRIMARY KEY (tenant, period)"
   ");"},
  {3,
   /* The usage ledger, as SQLite's migration 3: one row per request that
    * reached an upstream, unique by request id so a replayed spool (or a
    * batch retried after a lost COMMIT reply) adds no duplicate. Every
    * figure is an exact BIGINT. (tenant, ts_ms) serves invoices and budget
    * rebuilds, (ts_ms) the purge and the all-tenant spend. */
   "CREATE TABLE ledger ("
   "  request_id TEXT PRIMARY KEY,"
   "  ts_ms BIGINT NOT NULL,"
   "  tenant TEXT NOT NULL,"
   "  key_id TEXT NOT NULL,"
   "  model TEXT NOT NULL,"
   "  endpoint TEXT NOT NULL,"
   "  prompt_tokens BIGINT NOT NULL,"
   "  completion_tokens BIGINT NOT NULL,"
   "  cost_nano BIGINT NOT NULL,"
   "  status INTEGER NOT NULL,"
   "  usage_counted INTEGER NOT NULL DEFAULT 0,"
   "  queue_us BIGINT NOT NULL DEFAULT -1,"
   "  ttft_us BIGINT NOT NULL DEFAULT -1,"
   "  total_us BIGINT NOT NULL DEFAULT -1"
   ");"
   "CREATE INDEX ledger_tenant_ts ON ledger(tenant, ts_ms);"
   "CREATE INDEX ledger_ts ON ledger(ts_ms);"},
  {4,
   /* As SQLite's migration 4: the (ts_ms) index cost every record an
    * index insert; the all-tenant queries walk (tenant, ts_ms). */
   "DROP INDEX IF EXISTS ledger_ts;"},
  {5,
   /* As SQLite's migration 5: one key, (tenant, ts_ms, request_id), in
    * place of the request_id primary key and the (tenant, ts_ms) index:
    * one index insert a record instead of two. */
   "ALTER TABLE ledger DROP CONSTRAINT ledger_pkey;"
   "DROP INDEX IF EXISTS ledger_tenant_ts;"
   "ALTER TABLE ledger ADD CONSTRAINT ledger_pkey PRIMARY KEY (tenant, ts_ms, request_id);"},
  {6,
   /* The text columns of every key and index compare bytes (COLLATE "C",
    * SQLite's BINARY), whatever the database's locale. Under a linguistic
    * collation (en_US.UTF-8, ICU) every comparison of a B-tree insert goes
    * through the locale's rules, which made each ledger record's key insert
    * markedly dearer, and a C library upgrade that changes those rules
    * leaves an index out of order: a unique key that no longer finds its
    * duplicates. Identifiers need neither. The type stays text, so no
    * table is rewritten; the indexes on these columns are rebuilt. */
   "ALTER TABLE ledger ALTER COLUMN tenant TYPE TEXT COLLATE \"C\","
   "  ALTER COLUMN request_id TYPE TEXT COLLATE \"C\";"
   "ALTER TABLE tenant_spend ALTER COLUMN tenant TYPE TEXT COLLATE \"C\","
   "  ALTER COLUMN period TYPE TEXT COLLATE \"C\";"
   "ALTER TABLE api_keys ALTER COLUMN id TYPE TEXT COLLATE \"C\","
   "  ALTER COLUMN tenant TYPE TEXT COLLATE \"C\";"},
  {7,
   /* As SQLite's migration 7: secrets every replica shares, made by the
    * first that needs each (the key of the tenants' cache_salt). */
   "CREATE TABLE IF NOT EXISTS gateway_secrets ("
   "  name TEXT COLLATE \"C\" PRIMARY KEY,"
   "  value TEXT NOT NULL"
   ");"},
};

#define N_MIGRATIONS (sizeof(migrations) / sizeof(migrations[0]))

/* Migrations may rebuild an index on a big ledger: at start they get more
 * time than a gateway statement (`tollgate migrate` chooses its own), and
 * wait longer for a replica that migrates. */
#define MIGRATE_TIMEOUT_S 300

int tg_db_pg_schema_version(void) {
  return migrations[N_MIGRATIONS - 1].version;
}

int tg_db_pg_is_url(const char *database) {
  if (database == NULL)
    return 0;
  return strncmp(database, "postgres://", 11) == 0 ||
         strncmp(database, "postgresql://", 13) == 0;
}

/* libpq's messages end in a newline and may add hint lines: the first line
 * says what failed, which is what a log line needs. */
static const char *first_line(const char *m, char *buf, size_t size) {
  size_t len;

  if (size == 0)
    return buf;
  if (m == NULL || *m == '\0')
    m = "unknown error";
  len = strcspn(m, "\n");
  if (len >= size)
    len = size - 1;
  memcpy(buf, m, len);
  buf[len] = '\0';
  return buf;
}

const char *tg_db_pg_errmsg(PGconn *c, char *buf, size_t size) {
  return first_line(c ? PQerrorMessage(c) : "not connected", buf, size);
}

int tg_db_pg_broken(PGconn *c) {
  return c == NULL || PQstatus(c) != CONNECTION_OK;
}

const char *tg_db_pg_redact(const char *url, char *buf, size_t size) {
  return tg_config_url_redact(url, buf, size);
}

int tg_db_pg_int64(const PGresult *r, int row, int col, int64_t *out) {
  const char *s;
  char *end = NULL;
  long long v;

  if (PQgetisnull(r, row, col))
    return TG_EPARSE;
  s = PQgetvalue(r, row, col);
  if (s == NULL || *s == '\0')
    return TG_EPARSE;
  errno = 0;
  v = strtoll(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0')
    return TG_EPARSE;
  *out = (int64_t)v;
  return 0;
}

int tg_db_pg_exec(PGconn *c, const char *sql) {
  PGresult *r = PQexec(c, sql);
  ExecStatusType st = PQresultStatus(r);
  int rc = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK ? 0 : TG_EDB;
  PQclear(r);
  return rc;
}

/* Server notices (a CREATE ... IF NOT EXISTS that skipped, ...) are not the
 * operator's business; warnings are. */
static void on_notice(void *arg, const PGresult *r) {
  const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
  char msg[256];
  (void)arg;
  if (sev != NULL && strcmp(sev, "WARNING") == 0)
    fprintf(stderr, "tollgate: database warning: %s\n",
            first_line(PQresultErrorMessage(r), msg, sizeof(msg)));
}

/* libpq's sslmode values: it checks them only when it connects. */
static const char *const sslmodes[] = {"disable", "allow", "prefer", "require",
                                       "verify-ca", "verify-full"};

int tg_db_pg_url_check(const char *url, char *why, size_t size) {
  PQconninfoOption *parsed;
  char *perr = NULL, msg[256];
  int rc = 0;

  if (!tg_db_pg_is_url(url) || strlen(url) >= TG_DB_PG_URL_MAX) {
    snprintf(why, size, "not a postgres:// URL, or longer than 4 KiB");
    return TG_EINVAL;
  }
  parsed = PQconninfoParse(url, &perr);
  if (parsed == NULL) {
    /* libpq quotes the token it could not read, or the whole URL */
    tg_config_url_scrub(url, perr ? first_line(perr, msg, sizeof(msg))
                                  : "out of memory", why, size);
    rc = perr ? TG_EINVAL : TG_ENOMEM;
    PQfreemem(perr);
    return rc;
  }
  for (PQconninfoOption *o = parsed; o->keyword != NULL; o++) {
    size_t k = 0;
    if (strcmp(o->keyword, "sslmode") != 0 || o->val == NULL)
      continue;
    while (k < sizeof(sslmodes) / sizeof(sslmodes[0]) &&
           strcmp(o->val, sslmodes[k]) != 0)
      k++;
    if (k == sizeof(sslmodes) / sizeof(sslmodes[0])) {
      snprintf(why, size, "invalid sslmode value \"%.64s\" (disable, allow,"
               " prefer, require, verify-ca or verify-full)", o->val);
      rc = TG_EINVAL;
    }
  }
  PQconninfoFree(parsed);
  return rc;
}

/* Reports a failure: one line on stderr unless quiet, and the reason in
 * o->err when the caller gave a buffer. */
static void report(const tg_db_pg_opts_t *o, const char *url, const char *why) {
  char shown[256], said[512];
  /* libpq quotes the token it could not read, or the whole URL */
  why = tg_config_url_scrub(url, why, said, sizeof(said));
  if (o->err != NULL && o->err_size > 0)
    snprintf(o->err, o->err_size, "%s", why);
  if (!o->quiet)
    fprintf(stderr, "tollgate: cannot connect to %s: %s\n",
            tg_db_pg_redact(url, shown, sizeof(shown)), why);
}

/* libpq's connection keywords: our defaults first, the URL last (libpq
 * keeps the last value of a keyword, so whatever the URL says wins). */
typedef struct {
  char connect_s[16], user_timeout[16], options[160];
  char host[256], hostaddr[64], port[16];   /* one of the URL's hosts */
  const char *keys[13], *vals[13];
} params_t;

/* Elements in a comma list (1 for a value without a comma). */
static int list_len(const char *v) {
  int n = 1;
  while (v != NULL && (v = strchr(v, ',')) != NULL) {
    n++;
    v++;
  }
  return n;
}

/* The i-th element of a comma list into buf (a value without a comma is
 * every element). 0, or -1 when it does not fit. */
static int list_at(const char *v, int i, char *buf, size_t size) {
  size_t len;
  if (strchr(v, ',') != NULL)
    for (; i > 0 && v != NULL; i--)
      if ((v = strchr(v, ',')) != NULL)
        v++;
  if (v == NULL)
    v = "";
  len = strcspn(v, ",");
  if (len >= size)
    return -1;
  memcpy(buf, v, len);
  buf[len] = '\0';
  return 0;
}

/* The URL's host number host (its host, hostaddr and port) as keywords
 * after the URL's, which they override; nothing when the URL names one
 * host, or host is -1. */
static void pick_host(const PQconninfoOption *parsed, int host, params_t *p,
                      int *i) {
  const char *vals[3] = {NULL, NULL, NULL};
  static const char *const keys[3] = {"host", "hostaddr", "port"};
  char *bufs[3] = {p->host, p->hostaddr, p->port};
  size_t sizes[3] = {sizeof(p->host), sizeof(p->hostaddr), sizeof(p->port)};

  for (const PQconninfoOption *o = parsed; o->keyword != NULL; o++)
    for (int k = 0; k < 3; k++)
      if (strcmp(o->keyword, keys[k]) == 0)
        vals[k] = o->val;
  if (host < 0 || (list_len(vals[0]) < 2 && list_len(vals[1]) < 2))
    return;
  for (int k = 0; k < 3; k++) {
    if (vals[k] == NULL || list_at(vals[k], host, bufs[k], sizes[k]) != 0)
      continue;
    p->keys[*i] = keys[k];
    p->vals[*i] = bufs[k];
    (*i)++;
  }
}

int tg_db_pg_hosts(const char *url) {
  PQconninfoOption *parsed = url ? PQconninfoParse(url, NULL) : NULL;
  int n = 1;

  for (PQconninfoOption *o = parsed; o != NULL && o->keyword != NULL; o++)
    if (strcmp(o->keyword, "host") == 0 || strcmp(o->keyword, "hostaddr") == 0)
      if (list_len(o->val) > n)
        n = list_len(o->val);
  PQconninfoFree(parsed);
  return n;
}

static int make_params(const char *url, const tg_db_pg_opts_t *o, int host,
                       params_t *p) {
  unsigned conn_s = o->connect_timeout_s ? o->connect_timeout_s : 3;
  unsigned stmt_ms = o->statement_timeout_ms ? o->statement_timeout_ms : 30000;
  unsigned lock_ms = o->lock_timeout_ms ? o->lock_timeout_ms : stmt_ms;
  PQconninfoOption *parsed;
  char why[256];
  int rc, i = 0;

  /* A URL libpq cannot read is a configuration error, not an outage. */
  if ((rc = tg_db_pg_url_check(url, why, sizeof(why))) != 0) {
    report(o, url, why);
    return rc;
  }
  parsed = PQconninfoParse(url, NULL);
  if (parsed == NULL) {
    report(o, url, "out of memory");
    return TG_ENOMEM;
  }

  snprintf(p->connect_s, sizeof(p->connect_s), "%u", conn_s);
  /* Sent data unacknowledged this long means the peer is gone. */
  snprintf(p->user_timeout, sizeof(p->user_timeout), "%u",
           conn_s * 1000u + 2000u);
  /* A session left inside a transaction by a frozen client must not hold
   * locks for ever. */
  snprintf(p->options, sizeof(p->options),
           "-c statement_timeout=%u -c lock_timeout=%u"
           " -c idle_in_transaction_session_timeout=60000",
           stmt_ms, lock_ms);
#define KV(k, v) (p->keys[i] = (k), p->vals[i] = (v), i++)
  KV("connect_timeout", p->connect_s);
  KV("keepalives", "1");
  KV("keepalives_idle", "10");
  KV("keepalives_interval", "3");
  KV("keepalives_count", "3");
  KV("tcp_user_timeout", p->user_timeout);
  KV("application_name", "tollgate");
  KV("options", p->options);
  KV("dbname", url);
#undef KV
  pick_host(parsed, host, p, &i);
  p->keys[i] = p->vals[i] = NULL;
  PQconninfoFree(parsed);
  return 0;
}

int tg_db_pg_connect(const char *url, const tg_db_pg_opts_t *o,
                     PGconn **out) {
  static const tg_db_pg_opts_t defaults = {0};
  char msg[256];
  params_t p;
  PGconn *c;
  int rc;

  *out = NULL;
  if (o == NULL)
    o = &defaults;
  if ((rc = make_params(url, o, -1, &p)) != 0)
    return rc;
  c = PQconnectdbParams(p.keys, p.vals, 1);
  if (c == NULL) {
    report(o, url, "out of memory");
    return TG_ENOMEM;
  }
  if (PQstatus(c) != CONNECTION_OK) {
    report(o, url, tg_db_pg_errmsg(c, msg, sizeof(msg)));
    PQfinish(c);
    return TG_EDB;
  }
  PQsetNoticeReceiver(c, on_notice, NULL);
  *out = c;
  return 0;
}

int tg_db_pg_connect_start(const char *url, const tg_db_pg_opts_t *o,
                           int host, PGconn **out) {
  static const tg_db_pg_opts_t defaults = {0};
  char msg[256];
  params_t p;
  PGconn *c;
  int rc;

  *out = NULL;
  if (o == NULL)
    o = &defaults;
  if ((rc = make_params(url, o, host, &p)) != 0)
    return rc;
  c = PQconnectStartParams(p.keys, p.vals, 1);
  if (c == NULL) {
    report(o, url, "out of memory");
    return TG_ENOMEM;
  }
  if (PQstatus(c) == CONNECTION_BAD) {
    report(o, url, tg_db_pg_errmsg(c, msg, sizeof(msg)));
    PQfinish(c);
    return TG_EDB;
  }
  PQsetNoticeReceiver(c, on_notice, NULL);
  *out = c;
  return 0;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits until fd is ready for events, until deadline (monotonic ms) at the
 * latest, or until wake_fd (-1: none) is readable. Returns 0 (ready), 1
 * (the time is up), TG_ECANCELED (woken) or TG_EDB (poll failed). */
static int wait_fd(int fd, short events, int64_t deadline, int wake_fd) {
  struct pollfd p[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
  for (;;) {
    int64_t left = deadline - now_ms();
    int r = poll(p, 2, left <= 0 ? 0 : left > INT_MAX ? INT_MAX : (int)left);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return TG_EDB;
    if (p[1].revents != 0)
      return TG_ECANCELED;
    return r == 0 ? 1 : 0;
  }
}

int tg_db_pg_connect_step(PGconn *c, int wait_ms, int wake_fd) {
  int64_t deadline = now_ms() + (wait_ms > 0 ? wait_ms : 0);
  for (;;) {
    PostgresPollingStatusType st = PQconnectPoll(c);
    int r;

    if (st == PGRES_POLLING_OK)
      return 0;
    if (st == PGRES_POLLING_FAILED || PQsocket(c) < 0)
      return TG_EDB;
    r = wait_fd(PQsocket(c), st == PGRES_POLLING_READING ? POLLIN : POLLOUT,
                deadline, wake_fd);
    if (r != 0)
      return r;
  }
}

/* Ends a connection whose server did not answer in time: libpq reads the
 * end of the stream and marks it broken, as if the server had hung up. */
static void cut(PGconn *c, tg_db_pg_wait_t *w) {
  if (PQsocket(c) >= 0)
    shutdown(PQsocket(c), SHUT_RDWR);
  PQconsumeInput(c);
  w->cut = 1;
}

PGresult *tg_db_pg_result(PGconn *c, tg_db_pg_wait_t *w) {
  int64_t deadline = w->wait_ms > 0 ? now_ms() + w->wait_ms : INT64_MAX;
  PGresult *last = NULL, *r;

  for (;;) {
    ExecStatusType st;
    while (PQisBusy(c) && PQsocket(c) >= 0) {
      if (wait_fd(PQsocket(c), POLLIN, deadline, w->wake_fd) != 0) {
        cut(c, w);
        PQclear(last);
        return NULL;
      }
      if (!PQconsumeInput(c))
        break;   /* broken: PQgetResult says so */
    }
    r = PQgetResult(c);
    if (r == NULL)
      return last;
    PQclear(last);
    last = r;
    st = PQresultStatus(r);
    if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH ||
        PQstatus(c) == CONNECTION_BAD)
      return last;
  }
}

PGresult *tg_db_pg_query(PGconn *c, const char *sql, int nparams,
                         const char *const *vals, const int *lens,
                         const int *fmts, tg_db_pg_wait_t *w) {
  int sent = vals != NULL ? PQsendQueryParams(c, sql, nparams, NULL, vals,
                                              lens, fmts, 0)
                          : PQsendQuery(c, sql);
  return sent ? tg_db_pg_result(c, w) : NULL;
}

/* Reports why a migration failed: one line on stderr unless o is quiet,
 * and the same words in o->err when the caller gave a buffer. why NULL:
 * the connection's last error. o may be NULL (not quiet, no buffer). */
static int mfail(PGconn *c, const tg_db_pg_opts_t *o, const char *what,
                 const char *why) {
  char msg[256];
  if (why == NULL)
    why = tg_db_pg_errmsg(c, msg, sizeof(msg));
  if (o == NULL || !o->quiet)
    fprintf(stderr, "tollgate: database migration: %s: %s\n", what, why);
  if (o != NULL && o->err != NULL && o->err_size > 0)
    snprintf(o->err, o->err_size, "%s: %s", what, why);
  return TG_EDB;
}

/* 1 when the schema is at this binary's version, read without the lock.
 * A server that does not answer in SCHEMA_READ_MS has its connection cut,
 * so the migration that follows fails at once instead of waiting for it. */
#define SCHEMA_READ_MS 10000
static int schema_current(PGconn *c) {
  tg_db_pg_wait_t w = {SCHEMA_READ_MS, -1, 0};
  PGresult *r = tg_db_pg_query(
      c, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations", 0, NULL,
      NULL, NULL, &w);
  int64_t v = -1;
  int ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
           tg_db_pg_int64(r, 0, 0, &v) == 0 && v == tg_db_pg_schema_version();
  PQclear(r);
  return ok;
}

int tg_db_pg_migrate(PGconn *c, const tg_db_pg_opts_t *o) {
  /* Every gateway connection comes here, reconnections included (a server
   * restart, a dropped connection). With the schema current there is
   * nothing to take the lock for, and a `tollgate migrate` in progress may
   * hold it for long: the ledger's writer would hold every answer waiting
   * for its record, and the key watcher a stop, meanwhile. */
  if (schema_current(c))
    return 0;
  return tg_db_pg_migrate_ex(c, o, MIGRATE_TIMEOUT_S, NULL);
}

int tg_db_pg_migrate_ex(PGconn *c, const tg_db_pg_opts_t *o, unsigned timeout_s,
                        int *from) {
  char lock[80], timeouts[96], ver[16], at[24];
  PGresult *r = NULL;
  int64_t current = 0;
  int rc = TG_EDB;

  /* READ COMMITTED whatever the database's default_transaction_isolation:
   * a replica that waited for the lock must read what the one before it
   * committed meanwhile. Under REPEATABLE READ or SERIALIZABLE the
   * snapshot, taken by the lock's statement before the wait, showed an
   * empty schema_migrations, and the scripts failed on the tables the
   * first replica had made. */
  if (tg_db_pg_exec(c, "BEGIN ISOLATION LEVEL READ COMMITTED") != 0)
    return mfail(c, o, "BEGIN", NULL);
  snprintf(lock, sizeof(lock), "SELECT pg_advisory_xact_lock(%lld)",
           (long long)TG_DB_PG_MIGRATE_LOCK);
  snprintf(timeouts, sizeof(timeouts),
           "SET LOCAL statement_timeout = '%llds'; SET LOCAL lock_timeout = '60s'",
           (long long)timeout_s);
  /* The lock before anything else: a second replica waits here until the
   * first has committed, then finds nothing left to do. */
  if (tg_db_pg_exec(c, timeouts) != 0 || tg_db_pg_exec(c, lock) != 0) {
    mfail(c, o, "cannot take the migration lock", NULL);
    goto out;
  }
  if (tg_db_pg_exec(c, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version INTEGER PRIMARY KEY,"
                       " applied_at BIGINT NOT NULL)") != 0) {
    mfail(c, o, "cannot create schema_migrations", NULL);
    goto out;
  }
  r = PQexec(c, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
  if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 ||
      tg_db_pg_int64(r, 0, 0, &current) != 0) {
    mfail(c, o, "cannot read schema_migrations", NULL);
    goto out;
  }
  PQclear(r);
  r = NULL;
  if (from != NULL)
    *from = (int)current;
  if (current > tg_db_pg_schema_version()) {
    char what[96];
    snprintf(what, sizeof(what), "database schema version %lld is newer than"
             " this binary knows (%d)", (long long)current,
             tg_db_pg_schema_version());
    mfail(c, o, what, "roll the gateway forward, not back");
    goto out;
  }
  snprintf(at, sizeof(at), "%lld", (long long)time(NULL));
  for (size_t i = 0; i < N_MIGRATIONS; i++) {
    const char *params[2] = {ver, at};
    if (migrations[i].version <= current)
      continue;
    if (tg_db_pg_exec(c, migrations[i].sql) != 0) {
      char what[48];
      snprintf(what, sizeof(what), "migration %d failed",
               migrations[i].version);
      mfail(c, o, what, NULL);
      goto out;
    }
    snprintf(ver, sizeof(ver), "%d", migrations[i].version);
    r = PQexecParams(c, "INSERT INTO schema_migrations (version, applied_at)"
                        " VALUES ($1::integer, $2::bigint)",
                     2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
      mfail(c, o, "cannot record a migration", NULL);
      goto out;
    }
    PQclear(r);
    r = NULL;
  }
  if (tg_db_pg_exec(c, "COMMIT") != 0) {
    mfail(c, o, "COMMIT", NULL);
    goto out;
  }
  rc = 0;
out:
  PQclear(r);
  if (rc != 0 && PQtransactionStatus(c) != PQTRANS_IDLE)
    tg_db_pg_exec(c, "ROLLBACK");
  return rc;
}

int tg_db_pg_connect_wait_ms(PGconn *c) {
  PQconninfoOption *opts = PQconninfo(c);
  long s = 3;
  int several = 0;

  for (PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++) {
    if (o->val == NULL)
      continue;
    if (strcmp(o->keyword, "connect_timeout") == 0)
      s = strtol(o->val, NULL, 10);
    else if (strcmp(o->keyword, "host") == 0 ||
             strcmp(o->keyword, "hostaddr") == 0)
      several |= strchr(o->val, ',') != NULL;
  }
  PQconninfoFree(opts);
  if (several)
    return -1;
  if (s <= 0 || s > 3600)
    s = 3600;   /* 0 is libpq's "for ever": an hour is bound enough */
  return (int)(s < 2 ? 2 : s) * 1000;   /* libpq's floor is 2 s */
}

int tg_db_pg_connect_wake(const char *url, const tg_db_pg_opts_t *o, int wake_fd,
                          PGconn **out) {
  char msg[256];
  PGconn *c = NULL;
  int rc = tg_db_pg_connect_start(url, o, -1, &c), wait;

  *out = NULL;
  if (rc != 0)
    return rc;
  if ((wait = tg_db_pg_connect_wait_ms(c)) < 0) {
    PQfinish(c);
    return tg_db_pg_connect(url, o, out);
  }
  rc = tg_db_pg_connect_step(c, wait, wake_fd);
  if (rc != 0) {
    report(o, url, rc == 1 ? "timeout expired"
                   : rc == TG_ECANCELED ? "interrupted"
                   : tg_db_pg_errmsg(c, msg, sizeof(msg)));
    PQfinish(c);
    return rc == TG_ECANCELED ? rc : TG_EDB;
  }
  *out = c;
  return 0;
}

static int open_db(const char *url, const tg_db_pg_opts_t *o, int wake,
                   int wake_fd, PGconn **out) {
  PGconn *c = NULL;
  int rc = wake ? tg_db_pg_connect_wake(url, o, wake_fd, &c)
                : tg_db_pg_connect(url, o, &c);

  *out = NULL;
  if (rc != 0)
    return rc;
  rc = tg_db_pg_migrate(c, o);
  if (rc != 0) {
    if (o != NULL && o->err != NULL && o->err_size > 0) {
      char why[256];
      snprintf(why, sizeof(why), "%s", o->err);
      snprintf(o->err, o->err_size, "schema migration: %s", why);
    }
    PQfinish(c);
    return rc;
  }
  *out = c;
  return 0;
}

int tg_db_pg_open(const char *url, const tg_db_pg_opts_t *o, PGconn **out) {
  return open_db(url, o, 0, -1, out);
}

int tg_db_pg_open_wake(const char *url, const tg_db_pg_opts_t *o, int wake_fd,
                       PGconn **out) {
  static const tg_db_pg_opts_t defaults = {0};
  return open_db(url, o ? o : &defaults, 1, wake_fd, out);
}
