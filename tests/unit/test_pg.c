/* The PostgreSQL backends (ledger_pg.c, keystore_pg.c, db_pg.c) against a
 * real PostgreSQL server, started once for the whole file by
 * tests/lib/pgtest.sh (`serve` mode: a fresh cluster in a temporary
 * directory on a free loopback port, stopped and removed when its stdin
 * closes, so even a crashed test leaves nothing behind) and stopped and
 * restarted in the middle to check what an outage does: fast TG_EDB, then a
 * reconnection on the next call. Figures are checked to the nano-USD,
 * including sums that a double could not hold. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "auth/key.h"
#include "auth/keystore.h"
#include "core/err.h"
#include "meter/db_pg.h"
#include "meter/ledger.h"
#include "meter/ledger_backend.h"

/* ---- the server ---------------------------------------------------------- */

typedef struct {
  pid_t pid;          /* pgtest.sh serve */
  int in, out;        /* its stdin (we write), its stdout (we read) */
  char rbuf[4096];
  size_t rlen;
  char url[512], dir[512];
  int port;
} pgsrv_t;

static pgsrv_t srv = {.pid = -1, .in = -1, .out = -1};

static double mono_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* tests/lib/pgtest.sh beside this file's directory, or $TG_PGTEST_SH. */
static void harness_path(char *buf, size_t size) {
  const char *env = getenv("TG_PGTEST_SH");
  const char *slash = strrchr(__FILE__, '/');
  if (env != NULL && *env != '\0')
    snprintf(buf, size, "%s", env);
  else if (slash != NULL)
    snprintf(buf, size, "%.*s/../lib/pgtest.sh", (int)(slash - __FILE__),
             __FILE__);
  else
    snprintf(buf, size, "../lib/pgtest.sh");
}

/* One line from the harness into line[size] (newline dropped), waiting up
 * to timeout_ms. Returns 0, or -1 on timeout or end of output. */
static int srv_line(char *line, size_t size, int timeout_ms) {
  double deadline = mono_now() + timeout_ms / 1000.0;
  for (;;) {
    char *nl = memchr(srv.rbuf, '\n', srv.rlen);
    struct pollfd pfd = {srv.out, POLLIN, 0};
    int wait;
    ssize_t got;
    if (nl != NULL) {
      size_t len = (size_t)(nl - srv.rbuf);
      snprintf(line, size, "%.*s", (int)len, srv.rbuf);
      memmove(srv.rbuf, nl + 1, srv.rlen - len - 1);
      srv.rlen -= len + 1;
      return 0;
    }
    if (srv.rlen == sizeof(srv.rbuf))
      return -1;
    wait = (int)((deadline - mono_now()) * 1000);
    if (wait <= 0 || poll(&pfd, 1, wait) <= 0)
      return -1;
    got = read(srv.out, srv.rbuf + srv.rlen, sizeof(srv.rbuf) - srv.rlen);
    if (got <= 0)
      return -1;
    srv.rlen += (size_t)got;
  }
}

/* Sends cmd and expects the answer want. */
static int srv_cmd(const char *cmd, const char *want) {
  char line[512], msg[64];
  int n = snprintf(msg, sizeof(msg), "%s\n", cmd);
  if (write(srv.in, msg, (size_t)n) != n)
    return -1;
  if (srv_line(line, sizeof(line), 60000) != 0)
    return -1;
  if (strcmp(line, want) != 0) {
    fprintf(stderr, "pgtest.sh answered \"%s\" to %s\n", line, cmd);
    return -1;
  }
  return 0;
}

/* Ends the harness: it stops the server and removes its directory. */
static int srv_quit(void) {
  int status = -1;
  if (srv.pid <= 0)
    return 0;
  close(srv.in);   /* end of input = quit, as when this process dies */
  srv.in = -1;
  waitpid(srv.pid, &status, 0);
  close(srv.out);
  srv.out = -1;
  srv.pid = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int srv_start(void **state) {
  char path[PATH_MAX], line[512];
  int to_child[2], from_child[2];

  (void)state;
  harness_path(path, sizeof(path));
  /* O_CLOEXEC: the harness must not hold our end of its stdin, or it would
   * never see the end of input. */
  if (pipe2(to_child, O_CLOEXEC) != 0 || pipe2(from_child, O_CLOEXEC) != 0)
    return -1;
  srv.pid = fork();
  if (srv.pid < 0)
    return -1;
  if (srv.pid == 0) {
    dup2(to_child[0], 0);
    dup2(from_child[1], 1);
    execl("/bin/bash", "bash", path, "serve", (char *)NULL);
    _exit(127);
  }
  close(to_child[0]);
  close(from_child[1]);
  srv.in = to_child[1];
  srv.out = from_child[0];
  for (;;) {
    if (srv_line(line, sizeof(line), 120000) != 0) {
      fprintf(stderr, "pgtest.sh (%s) did not start a server\n", path);
      srv_quit();
      return -1;
    }
    if (strncmp(line, "url ", 4) == 0)
      snprintf(srv.url, sizeof(srv.url), "%s", line + 4);
    else if (strncmp(line, "dir ", 4) == 0)
      snprintf(srv.dir, sizeof(srv.dir), "%s", line + 4);
    else if (strncmp(line, "port ", 5) == 0)
      srv.port = (int)strtol(line + 5, NULL, 10);
    else if (strcmp(line, "ready") == 0)
      break;
    else if (strncmp(line, "error", 5) == 0) {
      fprintf(stderr, "pgtest.sh: %s\n", line);
      srv_quit();
      return -1;
    }
  }
  return srv.url[0] && srv.dir[0] && srv.port > 0 ? 0 : -1;
}

static int srv_teardown(void **state) {
  (void)state;
  srv_quit();
  return 0;
}

/* The URL of another database on the same server. */
static void db_url(char *buf, size_t size, const char *db) {
  snprintf(buf, size, "postgresql://postgres@127.0.0.1:%d/%s", srv.port, db);
}

/* A plain libpq connection for the test's own SQL. */
static PGconn *sql_conn(const char *url) {
  PGconn *c = PQconnectdb(url);
  if (PQstatus(c) != CONNECTION_OK)
    fail_msg("cannot connect to %s: %s", url, PQerrorMessage(c));
  return c;
}

static void sql_ok(PGconn *c, const char *q) {
  PGresult *r = PQexec(c, q);
  if (PQresultStatus(r) != PGRES_COMMAND_OK &&
      PQresultStatus(r) != PGRES_TUPLES_OK)
    fail_msg("%s: %s", q, PQerrorMessage(c));
  PQclear(r);
}

/* The first cell of q as text, into buf. */
static const char *sql_val(PGconn *c, const char *q, char *buf, size_t size) {
  PGresult *r = PQexec(c, q);
  if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) < 1)
    fail_msg("%s: %s", q, PQerrorMessage(c));
  snprintf(buf, size, "%s", PQgetvalue(r, 0, 0));
  PQclear(r);
  return buf;
}

static long long sql_int(PGconn *c, const char *q) {
  char buf[64];
  return strtoll(sql_val(c, q, buf, sizeof(buf)), NULL, 10);
}

static int rm_entry(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw) {
  (void)sb; (void)flag; (void)ftw;
  return remove(path);
}

/* ---- helpers without a server --------------------------------------------- */

static void test_url_helpers(void **state) {
  char buf[256];
  PGconn *c = (PGconn *)1;
  tg_keystore_t *ks = (tg_keystore_t *)1;
  tg__ledger_conn_t *lc = (tg__ledger_conn_t *)1;
  tg__ledger_conn_opts_t wo = {.busy_timeout_ms = 1000, .writer = 1};
  tg_db_pg_opts_t quiet = {.quiet = 1};

  (void)state;
  assert_true(tg_db_pg_is_url("postgres://db.internal/tollgate"));
  assert_true(tg_db_pg_is_url("postgresql://u@h:5433/d"));
  assert_false(tg_db_pg_is_url("sqlite"));
  assert_false(tg_db_pg_is_url("postgres:/h/d"));
  assert_false(tg_db_pg_is_url("mysql://h/d"));
  /* The hosts a writer's probe goes through, one at a time. */
  assert_int_equal(tg_db_pg_hosts("postgres://u@h/d"), 1);
  assert_int_equal(tg_db_pg_hosts("postgres://u@pg-a,pg-b:5433/d"), 2);
  assert_int_equal(tg_db_pg_hosts("postgresql:///d?host=/run/pg"), 1);
  assert_int_equal(
      tg_db_pg_hosts("postgresql:///d?hostaddr=10.0.0.1,10.0.0.2,10.0.0.3"), 3);
  assert_false(tg_db_pg_is_url(NULL));

  /* Passwords never reach a log line, in the user info or the query. */
  assert_string_equal(
      tg_db_pg_redact("postgres://bob:s3cr%40t@db.example:5432/ledger"
                      "?sslmode=require&password=other&x=1", buf, sizeof(buf)),
      "postgres://bob:***@db.example:5432/ledger"
      "?sslmode=require&password=***&x=1");
  /* user info without ':' may be a password written alone: all hidden */
  assert_string_equal(tg_db_pg_redact("postgresql://bob@h/db?application_"
                                      "name=a", buf, sizeof(buf)),
                      "postgresql://***@h/db?application_name=a");
  /* a password holding '/' (base64) ends at the last '@' */
  assert_string_equal(tg_db_pg_redact("postgresql://u:Ab3/x+Q==@h/db", buf, sizeof(buf)),
                      "postgresql://u:***@h/db");
  assert_string_equal(tg_db_pg_redact("postgresql://a:b:c@d@h/x", buf,
                                      sizeof(buf)),
                      "postgresql://a:***@h/x");

  /* A URL libpq cannot read is a configuration error, found before any
   * network traffic, for every component. */
  assert_int_equal(tg_db_pg_connect("postgresql://127.0.0.1/x?nosuch=1",
                                    &quiet, &c), TG_EINVAL);
  assert_null(c);
  assert_int_equal(tg_db_pg_connect("sqlite", &quiet, &c), TG_EINVAL);
  assert_int_equal(tg__ledger_backend_pg.open("postgresql://h/x?nosuch=1",
                                              NULL, &wo, &lc), TG_EINVAL);
  assert_null(lc);
  assert_int_equal(tg_keystore_open_db("mysql://h/db", "/nonexistent", &ks),
                   TG_EINVAL);
  assert_null(ks);
}

/* No password in what the gateway prints: libpq quotes the token or the
 * whole URL it could not read, and a password may hold a '?' that libpq
 * takes as part of it. */
static void test_url_secrets_never_printed(void **state) {
  static const char *const urls[] = {
      "postgres://u:pa%zzSECRET@127.0.0.1:1/db",        /* bad %-escape */
      "postgres://127.0.0.1:1/db?password=SEC%zzRET",   /* the same, query */
      "postgres://u:SECRET@[::1/db",                    /* the URL quoted */
      "postgres://u:SECRET@[]/db",
      "postgres://u:SECRET@h:1:2/db",
      "postgres://u:pa?SECRET@127.0.0.1:1/db",          /* '?' in it */
  };
  char err[512], buf[512];
  PGconn *c = NULL;

  (void)state;
  assert_string_equal(tg_db_pg_redact("postgres://u:pa?SECRET@h:1/db", buf,
                                      sizeof(buf)),
                      "postgres://u:***@h:1/db");
  for (size_t i = 0; i < sizeof(urls) / sizeof(urls[0]); i++) {
    tg_db_pg_opts_t o = {.quiet = 1, .err = err, .err_size = sizeof(err),
                         .connect_timeout_s = 1};
    err[0] = '\0';
    assert_int_not_equal(tg_db_pg_connect(urls[i], &o, &c), 0);
    assert_null(c);
    if (strstr(err, "SEC") != NULL)
      fail_msg("%s: the error shows the password: %s", urls[i], err);
    assert_true(err[0] != '\0');
    if (strstr(tg_db_pg_redact(urls[i], buf, sizeof(buf)), "SEC") != NULL)
      fail_msg("%s: redacted as %s", urls[i], buf);
  }
}

/* ---- migrations ----------------------------------------------------------- */

typedef struct {
  const char *url;
  pthread_barrier_t *go;
  int rc;
} racer_t;

static void *race_open(void *arg) {
  racer_t *r = arg;
  tg_db_pg_opts_t o = {.quiet = 1};
  PGconn *c = NULL;
  pthread_barrier_wait(r->go);
  r->rc = tg_db_pg_open(r->url, &o, &c);
  PQfinish(c);
  return NULL;
}

static void test_migrations(void **state) {
  enum { RACERS = 6 };
  char url[256];
  PGconn *c, *s;
  pthread_t th[RACERS];
  racer_t rc[RACERS];
  pthread_barrier_t go;
  tg_db_pg_opts_t quiet = {.quiet = 1};
  int latest = tg_db_pg_schema_version();

  (void)state;
  assert_int_equal(latest, 7);
  /* Opening twice applies nothing twice. */
  for (int round = 0; round < 2; round++) {
    assert_int_equal(tg_db_pg_open(srv.url, NULL, &c), 0);
    PQfinish(c);
  }
  s = sql_conn(srv.url);
  assert_int_equal(sql_int(s, "SELECT COUNT(*) FROM schema_migrations"), 7);
  assert_int_equal(sql_int(s, "SELECT MAX(version) FROM schema_migrations"), 7);
  assert_int_equal(sql_int(s, "SELECT COUNT(*) FROM schema_migrations"
                              " WHERE applied_at > 1600000000"), 7);
  /* The SQLite columns, in exact PostgreSQL types. */
  {
    PGresult *r = PQexec(s, "SELECT string_agg(column_name || ':' ||"
                            " data_type, ',' ORDER BY ordinal_position)"
                            " FROM information_schema.columns WHERE"
                            " table_name = 'ledger'");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0),
                        "request_id:text,ts_ms:bigint,tenant:text,"
                        "key_id:text,model:text,endpoint:text,"
                        "prompt_tokens:bigint,completion_tokens:bigint,"
                        "cost_nano:bigint,status:integer,"
                        "usage_counted:integer,queue_us:bigint,"
                        "ttft_us:bigint,total_us:bigint");
    PQclear(r);
    r = PQexec(s, "SELECT string_agg(column_name || ':' || data_type, ','"
                  " ORDER BY ordinal_position) FROM information_schema.columns"
                  " WHERE table_name = 'api_keys'");
    assert_string_equal(PQgetvalue(r, 0, 0),
                        "id:text,tenant:text,name:text,models:text,"
                        "secret_sha256:bytea,created_at:bigint,"
                        "expires_at:bigint,revoked_at:bigint");
    PQclear(r);
  }
  assert_int_equal(sql_int(s, "SELECT COUNT(*) FROM pg_indexes WHERE"
                              " indexname IN ('api_keys_tenant',"
                              " 'tenant_spend_pkey', 'ledger_pkey',"
                              " 'api_keys_pkey')"), 4);
  /* The ledger has one index, its key: migration 4 dropped (ts_ms) and 5
   * put (tenant, ts_ms, request_id) in place of the request_id key and
   * (tenant, ts_ms); every record paid an insert into each. */
  assert_int_equal(sql_int(s, "SELECT COUNT(*) FROM pg_indexes WHERE"
                              " tablename = 'ledger'"), 1);
  assert_int_equal(sql_int(s, "SELECT COUNT(*) FROM pg_indexes WHERE"
                              " indexname = 'ledger_pkey' AND indexdef LIKE"
                              " '%(tenant, ts_ms, request_id)'"), 1);

  /* Replicas starting together on a fresh database: every one succeeds,
   * each migration is recorded once. */
  sql_ok(s, "CREATE DATABASE race");
  db_url(url, sizeof(url), "race");
  pthread_barrier_init(&go, NULL, RACERS);
  for (int i = 0; i < RACERS; i++) {
    rc[i] = (racer_t){url, &go, -1};
    assert_int_equal(pthread_create(&th[i], NULL, race_open, &rc[i]), 0);
  }
  for (int i = 0; i < RACERS; i++) {
    pthread_join(th[i], NULL);
    assert_int_equal(rc[i].rc, 0);
  }
  pthread_barrier_destroy(&go);
  c = sql_conn(url);
  assert_int_equal(sql_int(c, "SELECT COUNT(*) FROM schema_migrations"), 7);
  assert_int_equal(sql_int(c, "SELECT version FROM api_keys_changes"), 0);

  /* A schema written by a newer binary is refused, not half-used. */
  sql_ok(c, "INSERT INTO schema_migrations VALUES (100000, 1)");
  PQfinish(c);
  c = NULL;
  assert_int_equal(tg_db_pg_open(url, &quiet, &c), TG_EDB);
  assert_null(c);
  /* And says so in words, wherever the refusal is reported: the ledger
   * (the writer, the `usage` and `invoice` commands) used to say only
   * "schema migration: unknown error". */
  {
    char why[256] = "";
    tg_db_pg_opts_t o = {.quiet = 1, .err = why, .err_size = sizeof(why)};
    tg__ledger_conn_opts_t wo = {.writer = 1};
    tg__ledger_conn_t *w = NULL;
    const char *newer = "database schema version 100000 is newer than this"
                        " binary knows (7)";

    assert_int_equal(tg_db_pg_open(url, &o, &c), TG_EDB);
    assert_non_null(strstr(why, newer));
    assert_int_equal(tg__ledger_backend_pg.open(url, NULL, &wo, &w), 0);
    assert_non_null(strstr(tg__ledger_backend_pg.errmsg(w), newer));
    assert_int_not_equal(tg__ledger_backend_pg.probe(w), 0);
    for (int tries = 0; tries < 100 && strstr(tg__ledger_backend_pg.errmsg(w),
                                              "connecting to") != NULL; tries++)
      (void)tg__ledger_backend_pg.probe(w);
    assert_non_null(strstr(tg__ledger_backend_pg.errmsg(w), newer));
    tg__ledger_backend_pg.close(w);
  }
  PQfinish(s);
}

/* Replicas starting together on an empty database whose transactions
 * default to REPEATABLE READ or SERIALIZABLE (set on the database, as some
 * operators do): each one waiting for the migration lock must see the
 * schema the first one committed meanwhile. They used to read
 * schema_migrations through a snapshot taken before the wait, find it
 * empty and fail on "relation api_keys already exists": a replica that
 * did not start. The lock is held here until every racer waits on it, so
 * the race is lost every time, not by chance. */
static void test_migration_race_under_strict_isolation(void **state) {
  enum { RACERS = 3 };
  static const char *const levels[2] = {"repeatable read", "serializable"};
  char url[256], sql[256], db[32];
  pthread_t th[RACERS];
  racer_t rc[RACERS];
  pthread_barrier_t go;
  PGconn *s, *c;

  (void)state;
  s = sql_conn(srv.url);
  for (int l = 0; l < 2; l++) {
    snprintf(db, sizeof(db), "strict_%d", l);
    snprintf(sql, sizeof(sql), "CREATE DATABASE %s", db);
    sql_ok(s, sql);
    snprintf(sql, sizeof(sql),
             "ALTER DATABASE %s SET default_transaction_isolation = '%s'", db,
             levels[l]);
    sql_ok(s, sql);
    db_url(url, sizeof(url), db);
    c = sql_conn(url);
    snprintf(sql, sizeof(sql), "SELECT pg_advisory_lock(%lld)",
             (long long)TG_DB_PG_MIGRATE_LOCK);
    sql_ok(c, sql);
    pthread_barrier_init(&go, NULL, RACERS);
    for (int i = 0; i < RACERS; i++) {
      rc[i] = (racer_t){url, &go, -1};
      assert_int_equal(pthread_create(&th[i], NULL, race_open, &rc[i]), 0);
    }
    for (int tries = 0; sql_int(c, "SELECT COUNT(*) FROM pg_locks WHERE"
                                   " locktype = 'advisory' AND NOT granted")
                        < RACERS; tries++) {
      assert_true(tries < 1000);
      sleep_ms(10);
    }
    snprintf(sql, sizeof(sql), "SELECT pg_advisory_unlock(%lld)",
             (long long)TG_DB_PG_MIGRATE_LOCK);
    sql_ok(c, sql);
    for (int i = 0; i < RACERS; i++) {
      pthread_join(th[i], NULL);
      assert_int_equal(rc[i].rc, 0);
    }
    pthread_barrier_destroy(&go);
    assert_int_equal(sql_int(c, "SELECT COUNT(*) FROM schema_migrations"),
                     tg_db_pg_schema_version());
    PQfinish(c);
  }
  PQfinish(s);
}

typedef struct {
  const char *url, *name;
  char out[65];
  int rc;
} secret_reader_t;

static void *read_secret(void *arg) {
  secret_reader_t *a = arg;
  tg_ledger_db_t *d = NULL;
  a->rc = tg_ledger_db_open(a->url, srv.dir, &d);
  if (a->rc == 0)
    a->rc = tg_ledger_db_secret(d, a->name, a->out, sizeof(a->out));
  tg_ledger_db_close(d);
  return NULL;
}

/* Two gateways starting together on a fresh database both make the
 * cache_salt key: the second's insert waits for the first's to commit,
 * then finds it there. It used to read the stored row through the
 * snapshot its statement took before that wait, see none, and fail
 * ("cannot read the cache_salt key from the database": a replica that did
 * not start). The first insert is held open here until the second waits
 * on it, so the race is lost every time. */
static void test_secret_made_by_two_at_once(void **state) {
  char url[256];
  PGconn *s, *admin;
  tg_db_pg_opts_t quiet = {.quiet = 1};

  (void)state;
  /* also where transactions default to REPEATABLE READ, under which the
   * skipped insert is a serialization failure instead */
  admin = sql_conn(srv.url);
  sql_ok(admin, "CREATE DATABASE secret_rr");
  sql_ok(admin, "ALTER DATABASE secret_rr SET default_transaction_isolation"
                " = 'repeatable read'");
  PQfinish(admin);
  db_url(url, sizeof(url), "secret_rr");
  assert_int_equal(tg_db_pg_open(url, &quiet, &s), 0);   /* the schema */
  PQfinish(s);
  for (int round = 0; round < 2; round++) {
    secret_reader_t a = {round ? url : srv.url, "race_secret", "", -1};
    pthread_t th;

    s = sql_conn(a.url);
    sql_ok(s, "BEGIN");
    sql_ok(s, "INSERT INTO gateway_secrets (name, value) VALUES ('race_secret',"
              " 'first-replica-value')");
    assert_int_equal(pthread_create(&th, NULL, read_secret, &a), 0);
    for (int tries = 0; sql_int(s, "SELECT COUNT(*) FROM pg_locks WHERE"
                                   " locktype = 'transactionid' AND NOT granted")
                        < 1; tries++) {
      if (tries >= 1000)
        fail_msg("no wait on the held insert (reader: %d)", a.rc);
      sleep_ms(10);
    }
    sql_ok(s, "COMMIT");
    pthread_join(th, NULL);
    assert_int_equal(a.rc, 0);
    assert_string_equal(a.out, "first-replica-value");
    PQfinish(s);
  }
}

/* The key columns' collation, as "table.column:collation" in one line. */
#define KEY_COLLATIONS_SQL                                                   \
  "SELECT string_agg(table_name || '.' || column_name || ':' ||"             \
  " COALESCE(collation_name, 'default'), ',' ORDER BY table_name COLLATE"    \
  " \"C\", column_name COLLATE \"C\") FROM information_schema.columns"       \
  " WHERE (table_name, column_name) IN (('ledger', 'tenant'),"               \
  " ('ledger', 'request_id'), ('tenant_spend', 'tenant'),"                   \
  " ('tenant_spend', 'period'), ('api_keys', 'id'), ('api_keys', 'tenant'))"
#define KEY_COLLATIONS_C                                                     \
  "api_keys.id:C,api_keys.tenant:C,ledger.request_id:C,ledger.tenant:C,"     \
  "tenant_spend.period:C,tenant_spend.tenant:C"

/* Migration 6 on a database whose own collation is linguistic (ICU en-US,
 * where 'a' sorts before 'B'): the keys compare bytes, as SQLite's do; and
 * applied to a ledger that already holds rows, it keeps them and their
 * key's uniqueness. */
static void test_migration_byte_order_keys(void **state) {
  char url[256], buf[512];
  PGconn *s, *c = NULL;
  PGresult *r;

  (void)state;
  s = sql_conn(srv.url);
  sql_ok(s, "CREATE DATABASE icu_en TEMPLATE template0 LOCALE_PROVIDER icu"
            " ICU_LOCALE 'en-US'");
  db_url(url, sizeof(url), "icu_en");
  assert_int_equal(tg_db_pg_open(url, NULL, &c), 0);
  PQfinish(c);
  c = sql_conn(url);
  /* The database sorts linguistically; the keys do not. */
  assert_string_equal(sql_val(c, "SELECT min(t) FROM (VALUES ('B'), ('a')) v(t)",
                              buf, sizeof(buf)), "a");
  assert_string_equal(sql_val(c, KEY_COLLATIONS_SQL, buf, sizeof(buf)),
                      KEY_COLLATIONS_C);
  sql_ok(c, "INSERT INTO ledger (request_id, ts_ms, tenant, key_id, model,"
            " endpoint, prompt_tokens, completion_tokens, cost_nano, status)"
            " VALUES ('req-2', 1, 'a', 'k', 'm', 'e', 1, 1, 1, 200),"
            " ('req-1', 1, 'B', 'k', 'm', 'e', 1, 1, 1, 200)");
  assert_string_equal(sql_val(c, "SELECT tenant FROM ledger ORDER BY tenant"
                                 " LIMIT 1", buf, sizeof(buf)), "B");

  /* Back to the schema of version 5, rows kept; opening migrates again. */
  sql_ok(c, "ALTER TABLE ledger ALTER COLUMN tenant TYPE TEXT COLLATE \"default\","
            " ALTER COLUMN request_id TYPE TEXT COLLATE \"default\";"
            "ALTER TABLE tenant_spend ALTER COLUMN tenant TYPE TEXT COLLATE \"default\","
            " ALTER COLUMN period TYPE TEXT COLLATE \"default\";"
            "ALTER TABLE api_keys ALTER COLUMN id TYPE TEXT COLLATE \"default\","
            " ALTER COLUMN tenant TYPE TEXT COLLATE \"default\";"
            "DELETE FROM schema_migrations WHERE version >= 6");
  assert_string_equal(sql_val(c, "SELECT tenant FROM ledger ORDER BY tenant"
                                 " LIMIT 1", buf, sizeof(buf)), "a");
  PQfinish(c);
  c = NULL;
  assert_int_equal(tg_db_pg_open(url, NULL, &c), 0);
  PQfinish(c);
  c = sql_conn(url);
  assert_string_equal(sql_val(c, KEY_COLLATIONS_SQL, buf, sizeof(buf)),
                      KEY_COLLATIONS_C);
  assert_int_equal(sql_int(c, "SELECT COUNT(*) FROM ledger"), 2);
  assert_string_equal(sql_val(c, "SELECT tenant FROM ledger ORDER BY tenant"
                                 " LIMIT 1", buf, sizeof(buf)), "B");
  r = PQexec(c, "INSERT INTO ledger (request_id, ts_ms, tenant, key_id, model,"
                " endpoint, prompt_tokens, completion_tokens, cost_nano, status)"
                " VALUES ('req-1', 1, 'B', 'k', 'm', 'e', 1, 1, 1, 200)");
  assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
  assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "23505");
  PQclear(r);
  PQfinish(c);
  sql_ok(s, "DROP DATABASE icu_en");
  PQfinish(s);
}

/* ---- the ledger ------------------------------------------------------------ */

static tg_ledger_rec_t mkrec(const char *id, int64_t ts, const char *tenant,
                             const char *model, int64_t p, int64_t cpl,
                             int64_t cost) {
  tg_ledger_rec_t r;
  memset(&r, 0, sizeof(r));
  snprintf(r.request_id, sizeof(r.request_id), "%s", id);
  r.ts_ms = ts;
  snprintf(r.tenant, sizeof(r.tenant), "%s", tenant);
  snprintf(r.key_id, sizeof(r.key_id), "0123456789ab");
  snprintf(r.model, sizeof(r.model), "%s", model);
  snprintf(r.endpoint, sizeof(r.endpoint), "http://10.0.0.7:8000");
  r.prompt_tokens = p;
  r.completion_tokens = cpl;
  r.cost_nano = cost;
  r.status = 200;
  r.queue_us = 15;
  r.ttft_us = 12000;
  r.total_us = 480000;
  return r;
}

static int insert(tg__ledger_conn_t *c, tg_ledger_rec_t *recs, size_t n) {
  const tg_ledger_rec_t **p = calloc(n, sizeof(*p));
  int rc;
  assert_non_null(p);
  for (size_t i = 0; i < n; i++)
    p[i] = &recs[i];
  rc = tg__ledger_backend_pg.insert_batch(c, p, n);
  free(p);
  return rc;
}

static int64_t count(tg__ledger_conn_t *c, const char *tenant) {
  int64_t n = -1;
  assert_int_equal(tg__ledger_backend_pg.count(c, tenant, &n), 0);
  return n;
}

#define T0 INT64_C(1764547200000)   /* 2025-12-01T00:00:00Z */
#define T1 INT64_C(1767225600000)   /* 2026-01-01T00:00:00Z */
/* 2^62 - 1: two of them sum to INT64_MAX - 1, which no double holds. */
#define BIG INT64_C(4611686018427387903)
#define WEIRD "We\"ird,{model}\\ NULL"

static void test_ledger_exact(void **state) {
  const tg__ledger_backend_t *be = &tg__ledger_backend_pg;
  tg__ledger_conn_opts_t wo = {.busy_timeout_ms = 1000, .writer = 1};
  tg__ledger_conn_opts_t qo = {.busy_timeout_ms = 5000, .writer = 0};
  tg__ledger_conn_t *w = NULL, *q = NULL;
  tg_usage_row_t *u = NULL;
  tg_spend_row_t *sp = NULL;
  size_t n = 0;
  int64_t deleted = -1;
  PGconn *s;
  enum { BULK = 2500 };
  tg_ledger_rec_t *bulk;

  (void)state;
  assert_int_equal(be->open(srv.url, NULL, &wo, &w), 0);
  assert_int_equal(be->open(srv.url, NULL, &qo, &q), 0);
  assert_int_equal(be->insert_batch(w, NULL, 0), 0);

  tg_ledger_rec_t b1[] = {
    mkrec("r-big-1", T0, "big", "m-b", 10, 20, BIG),
    mkrec("r-big-2", T0 + 1, "big", "m-b", 1, 2, BIG),
    mkrec("r-acme-1", T0 + 2, "acme", "a-model", 1000, 2000, 1500000001),
    mkrec("r-acme-2", T0 + 3, "acme", WEIRD, 3, 4, 7),
    mkrec("r-acme-3", T0 + 4, "acme", "a-model", 5, 6, 999999999),
    mkrec("r-null", T0 + 5, "NULL", "m-b", 1, 1, 5),
    /* The same record again in the same batch (its key: tenant, time and
     * id): skipped, the first one counts. */
    mkrec("r-acme-1", T0 + 2, "acme", "a-model", 1, 1, 123456),
    /* At to_ms and before from_ms: outside [T0, T1). */
    mkrec("r-late", T1, "acme", "a-model", 1, 1, 1000),
    mkrec("r-early", T0 - 1, "acme", "a-model", 1, 1, 1000),
    mkrec("r-over-1", T0, "over", "m-o", 1, 1, INT64_C(6000000000000000000)),
    mkrec("r-over-2", T0, "over", "m-o", 1, 1, INT64_C(6000000000000000000)),
  };
  b1[3].status = 499;
  b1[3].usage_counted = 1;
  b1[3].queue_us = -1;
  b1[3].ttft_us = -1;
  assert_int_equal(insert(w, b1, sizeof(b1) / sizeof(b1[0])), 0);
  assert_int_equal(count(q, NULL), 10);

  /* A batch replayed (after a lost COMMIT reply, or from the spool) adds
   * only what is new, and never changes a stored row. */
  {
    tg_ledger_rec_t b2[] = {
      mkrec("r-acme-1", T0 + 2, "acme", "a-model", 7, 7, 7),
      mkrec("r-acme-4", T0 + 7, "acme", "a-model", 0, 0, 0),
    };
    assert_int_equal(insert(w, b2, 2), 0);
    assert_int_equal(count(q, NULL), 11);
    assert_int_equal(count(q, "acme"), 6);
  }

  /* Every field comes back as written, escapes and -1 included. */
  s = sql_conn(srv.url);
  {
    char buf[512];
    assert_string_equal(
        sql_val(s, "SELECT concat_ws('|', request_id, ts_ms, tenant, key_id,"
                   " model, endpoint, prompt_tokens, completion_tokens,"
                   " cost_nano, status, usage_counted, queue_us, ttft_us,"
                   " total_us) FROM ledger WHERE request_id = 'r-acme-2'",
                buf, sizeof(buf)),
        "r-acme-2|1764547200003|acme|0123456789ab|" WEIRD
        "|http://10.0.0.7:8000|3|4|7|499|1|-1|-1|480000");
    assert_string_equal(sql_val(s, "SELECT cost_nano FROM ledger WHERE"
                                   " request_id = 'r-acme-1'", buf,
                                sizeof(buf)), "1500000001");
  }

  /* Per model, byte order, exact sums. */
  assert_int_equal(be->usage_by_model(q, "acme", T0, T1, &u, &n), 0);
  assert_int_equal(n, 2);
  assert_string_equal(u[0].model, WEIRD);
  assert_int_equal(u[0].requests, 1);
  assert_int_equal(u[0].prompt_tokens, 3);
  assert_int_equal(u[0].completion_tokens, 4);
  assert_int_equal(u[0].cost_nano, 7);
  assert_string_equal(u[1].model, "a-model");
  assert_int_equal(u[1].requests, 3);
  assert_int_equal(u[1].prompt_tokens, 1005);
  assert_int_equal(u[1].completion_tokens, 2006);
  assert_int_equal(u[1].cost_nano, INT64_C(2500000000));
  free(u);
  u = NULL;
  assert_int_equal(be->usage_by_model(q, "big", T0, T1, &u, &n), 0);
  assert_int_equal(n, 1);
  assert_int_equal(u[0].requests, 2);
  assert_true(u[0].cost_nano == INT64_MAX - 1);
  assert_true(u[0].cost_nano == INT64_C(9223372036854775806));
  free(u);
  u = NULL;
  assert_int_equal(be->usage_by_model(q, "nobody", T0, T1, &u, &n), 0);
  assert_int_equal(n, 0);
  assert_null(u);

  /* A sum beyond int64 is refused, never rounded. */
  assert_int_equal(be->usage_by_model(q, "over", T0, T1, &u, &n), TG_ETOOBIG);
  assert_null(u);
  assert_int_equal(be->spend_by_tenant(q, T0, T1, &sp, &n), TG_ETOOBIG);
  assert_null(sp);
  assert_int_equal(be->purge(q, "over", T1, &deleted), 0);
  assert_int_equal(deleted, 2);

  assert_int_equal(be->spend_by_tenant(q, T0, T1, &sp, &n), 0);
  assert_int_equal(n, 3);
  assert_string_equal(sp[0].tenant, "NULL");
  assert_int_equal(sp[0].cost_nano, 5);
  assert_string_equal(sp[1].tenant, "acme");
  assert_int_equal(sp[1].cost_nano, INT64_C(2500000007));
  assert_string_equal(sp[2].tenant, "big");
  assert_true(sp[2].cost_nano == INT64_MAX - 1);
  free(sp);
  sp = NULL;

  /* A batch bigger than one statement's chunk is still one call, all or
   * nothing. */
  bulk = calloc(BULK, sizeof(*bulk));
  assert_non_null(bulk);
  for (int i = 0; i < BULK; i++) {
    char id[40];
    snprintf(id, sizeof(id), "bulk-%05d", i);
    bulk[i] = mkrec(id, T0 + 100 + i, "bulk", "m-b", i, 2 * i, i);
  }
  assert_int_equal(insert(w, bulk, BULK), 0);
  assert_int_equal(count(q, "bulk"), BULK);
  assert_int_equal(be->usage_by_model(q, "bulk", T0, T1, &u, &n), 0);
  assert_int_equal(n, 1);
  assert_int_equal(u[0].requests, BULK);
  assert_int_equal(u[0].prompt_tokens, (int64_t)BULK * (BULK - 1) / 2);
  assert_int_equal(u[0].completion_tokens, (int64_t)BULK * (BULK - 1));
  assert_int_equal(u[0].cost_nano, (int64_t)BULK * (BULK - 1) / 2);
  free(u);
  u = NULL;
  /* A second copy of the bulk with one row a CHECK refuses: nothing of it
   * is kept, and the refusal is told from a database that is away. */
  bulk[BULK - 1].ts_ms = T0;
  snprintf(bulk[0].request_id, sizeof(bulk[0].request_id), "bulk-new");
  sql_ok(s, "ALTER TABLE ledger ADD CONSTRAINT no_neg CHECK (queue_us <> 77)");
  snprintf(bulk[BULK - 2].request_id, sizeof(bulk[0].request_id), "bulk-bad");
  bulk[BULK - 2].queue_us = 77;
  assert_int_equal(insert(w, bulk, BULK), TG_EREJECTED);
  assert_non_null(strstr(be->errmsg(w), "no_neg"));
  assert_int_equal(count(q, "bulk"), BULK);
  sql_ok(s, "ALTER TABLE ledger DROP CONSTRAINT no_neg");
  free(bulk);

  /* Tenants with old records, for the retention purge; then the purge. */
  assert_int_equal(be->tenants_before(q, T0 + 1, &sp, &n), 0);
  assert_int_equal(n, 2);
  assert_string_equal(sp[0].tenant, "acme");
  assert_string_equal(sp[1].tenant, "big");
  free(sp);
  sp = NULL;
  assert_int_equal(be->purge(q, "acme", T0, &deleted), 0);
  assert_int_equal(deleted, 1);
  /* every tenant, one at a time, as tg_ledger_purge(NULL) does */
  assert_int_equal(be->tenants_before(q, T0 + 100 + 1000, &sp, &n), 0);
  {
    int64_t all = 0;
    for (size_t i = 0; i < n; i++) {
      assert_int_equal(be->purge(q, sp[i].tenant, T0 + 100 + 1000, &deleted), 0);
      all += deleted;
    }
    assert_int_equal(all, 7 + 1000);
  }
  free(sp);
  sp = NULL;
  assert_int_equal(count(q, NULL), BULK - 1000 + 1);

  PQfinish(s);
  be->close(w);
  be->close(q);
}

/* A batch of new request ids goes in by COPY (the fast path), one that
 * repeats a stored id by the ON CONFLICT insert: both store every byte of
 * every text as written, COPY's text-format escape characters included,
 * and the repeat adds only its new row. */
static void test_ledger_copy(void **state) {
  const tg__ledger_backend_t *be = &tg__ledger_backend_pg;
  tg__ledger_conn_opts_t wo = {.busy_timeout_ms = 1000, .writer = 1};
  tg__ledger_conn_t *w = NULL;
  char buf[512];
  PGconn *s;
  tg_ledger_rec_t b[] = {
    mkrec("r-copy-1", T0 + 1, "copy-t", "m\\N\t\\.\r\nx", 1, 2, 3),
    mkrec("r-copy-2", T0 + 2, "copy-t", "\\.", 4, 5, 6),
    mkrec("r-copy-3", T0 + 3, "copy-t", "", 0, 0, INT64_MAX),
  };
  tg_ledger_rec_t again[] = {
    mkrec("r-copy-2", T0 + 2, "copy-t", "other", 9, 9, 9),
    mkrec("r-copy-4", T0 + 4, "copy-t", "tab\there", 7, 8, 9),
  };

  (void)state;
  snprintf(b[0].endpoint, sizeof(b[0].endpoint), "%s", "\\\n");
  b[2].queue_us = -1;
  b[2].ttft_us = INT64_MIN;
  assert_int_equal(be->open(srv.url, NULL, &wo, &w), 0);
  s = sql_conn(srv.url);
  assert_int_equal(insert(w, b, 3), 0);
  assert_string_equal(
      sql_val(s, "SELECT count(*) FROM ledger WHERE tenant = 'copy-t'", buf,
              sizeof(buf)), "3");
  assert_string_equal(
      sql_val(s, "SELECT (model = E'm\\\\N\\t\\\\.\\r\\nx' AND"
                 " endpoint = E'\\\\\\n')::text FROM ledger"
                 " WHERE request_id = 'r-copy-1'", buf, sizeof(buf)),
      "true");
  assert_string_equal(
      sql_val(s, "SELECT concat_ws('|', model, cost_nano, queue_us, ttft_us)"
                 " FROM ledger WHERE request_id = 'r-copy-2'", buf,
              sizeof(buf)),
      "\\.|6|15|12000");
  assert_string_equal(
      sql_val(s, "SELECT concat_ws('|', '<' || model || '>', cost_nano,"
                 " queue_us, ttft_us) FROM ledger WHERE request_id ="
                 " 'r-copy-3'", buf, sizeof(buf)),
      "<>|9223372036854775807|-1|-9223372036854775808");
  /* The repeat: r-copy-2 keeps its first values, r-copy-4 is added. */
  assert_int_equal(insert(w, again, 2), 0);
  assert_string_equal(
      sql_val(s, "SELECT string_agg(request_id || ':' || cost_nano, ','"
                 " ORDER BY request_id) FROM ledger WHERE tenant = 'copy-t'",
              buf, sizeof(buf)),
      "r-copy-1:3,r-copy-2:6,r-copy-3:9223372036854775807,r-copy-4:9");
  /* Texts at their longest and in UTF-8, and the INTEGER columns: each
   * field as the binary format carries it. */
  {
    tg_ledger_rec_t big = mkrec("r-copy-5", T0 + 5, "copy-t", "mod\xc3\xa8le-\xcf\x80", 1, 2, 3);
    memset(big.endpoint, 'e', sizeof(big.endpoint) - 1);
    big.endpoint[sizeof(big.endpoint) - 1] = '\0';
    memset(big.request_id + 8, 'x', sizeof(big.request_id) - 9);
    big.request_id[sizeof(big.request_id) - 1] = '\0';
    big.status = 499;
    big.usage_counted = 1;
    big.total_us = -1;
    assert_int_equal(insert(w, &big, 1), 0);
    assert_string_equal(
        sql_val(s, "SELECT concat_ws('|', model, length(endpoint), length(request_id),"
                   " status, usage_counted, total_us) FROM ledger"
                   " WHERE request_id LIKE 'r-copy-5%'", buf, sizeof(buf)),
        "mod\xc3\xa8le-\xcf\x80|255|39|499|1|-1");
  }
  sql_ok(s, "DELETE FROM ledger WHERE tenant = 'copy-t'");
  PQfinish(s);
  be->close(w);
}

/* Stops the server, checks every component fails fast and keeps going,
 * restarts it and checks the very next call reconnects. */
static void test_ledger_outage(void **state) {
  const tg__ledger_backend_t *be = &tg__ledger_backend_pg;
  tg__ledger_conn_opts_t wo = {.busy_timeout_ms = 1000, .writer = 1};
  tg__ledger_conn_opts_t qo = {.busy_timeout_ms = 5000, .writer = 0};
  tg__ledger_conn_t *w = NULL, *idle = NULL, *q = NULL, *lazy = NULL;
  tg__ledger_conn_t *q2 = (tg__ledger_conn_t *)1;
  tg_keystore_t *ks = (tg_keystore_t *)1;
  tg_ledger_rec_t a = mkrec("out-a", T0, "outage", "m", 1, 1, 11);
  tg_ledger_rec_t b = mkrec("out-b", T0, "outage", "m", 1, 1, 13);
  tg_ledger_rec_t c = mkrec("out-c", T0, "outage", "m", 1, 1, 17);
  tg_ledger_rec_t d = mkrec("out-d", T0, "outage", "m", 1, 1, 19);
  int64_t n = -1;
  double t;

  (void)state;
  assert_int_equal(be->open(srv.url, NULL, &wo, &w), 0);
  assert_int_equal(be->open(srv.url, NULL, &wo, &idle), 0);
  assert_int_equal(be->open(srv.url, NULL, &qo, &q), 0);
  assert_int_equal(insert(w, &a, 1), 0);
  assert_int_equal(be->probe(w), 0);

  assert_int_equal(srv_cmd("stop", "stopped"), 0);

  /* Down: a batch fails at once with TG_EDB and says why. */
  t = mono_now();
  assert_int_equal(insert(w, &b, 1), TG_EDB);
  assert_true(mono_now() - t < 1.5);
  assert_true(strlen(be->errmsg(w)) > 0);
  t = mono_now();
  assert_int_equal(insert(w, &b, 1), TG_EDB);
  assert_true(mono_now() - t < 1.5);
  /* The probe never waits. */
  t = mono_now();
  for (int i = 0; i < 5; i++)
    assert_int_equal(be->probe(w), TG_EDB);
  assert_true(mono_now() - t < 0.5);
  /* Queries fail too, and a writer opened now starts lazily while a query
   * connection or a key store cannot open. */
  assert_int_equal(be->count(q, NULL, &n), TG_EDB);
  assert_int_equal(be->open(srv.url, NULL, &wo, &lazy), 0);
  assert_non_null(strstr(be->errmsg(lazy), "cannot connect"));
  assert_int_equal(be->open(srv.url, NULL, &qo, &q2), TG_EDB);
  assert_null(q2);
  assert_int_equal(tg_keystore_open_db(srv.url, NULL, &ks), TG_EDB);
  assert_null(ks);

  assert_int_equal(srv_cmd("start", "started"), 0);

  /* Back: the next call of each reconnects by itself and succeeds, the
   * idle connection that the restart cut included. */
  assert_int_equal(insert(w, &b, 1), 0);
  assert_int_equal(insert(idle, &c, 1), 0);
  assert_int_equal(be->count(q, "outage", &n), 0);
  assert_int_equal(n, 3);
  /* The lazy writer's probe connects step by step without blocking. */
  t = mono_now();
  while (be->probe(lazy) != 0 && mono_now() - t < 5.0)
    sleep_ms(10);
  assert_int_equal(be->probe(lazy), 0);
  assert_int_equal(insert(lazy, &d, 1), 0);
  assert_int_equal(be->count(q, "outage", &n), 0);
  assert_int_equal(n, 4);

  be->close(w);
  be->close(idle);
  be->close(q);
  be->close(lazy);
}

/* The ledger core on PostgreSQL: records durable while the server is up,
 * spooled (and still reported durable) while it is down, replayed in order
 * once it is back, and billed exactly once each. */
typedef struct {
  int called, status;
} done_t;

static void on_durable(void *arg, int status) {
  done_t *d = arg;
  d->called++;
  d->status = status;
}

/* Runs the loop until done[from, to) were all called, or 10 s. */
static void await_durable(uv_loop_t *loop, done_t *done, int from, int to) {
  double t0 = mono_now();
  for (;;) {
    int all = 1;
    uv_run(loop, UV_RUN_NOWAIT);
    for (int i = from; i < to; i++)
      all &= done[i].called == 1;
    if (all)
      break;
    if (mono_now() - t0 > 10.0)
      fail_msg("records %d..%d not durable after 10 s", from, to - 1);
    sleep_ms(5);
  }
  for (int i = from; i < to; i++)
    assert_int_equal(done[i].status, 0);
}

static void append_range(tg_ledger_port_t *port, done_t *done, int from,
                         int to) {
  for (int i = from; i < to; i++) {
    char id[40];
    tg_ledger_rec_t r;
    snprintf(id, sizeof(id), "core-%02d", i);
    r = mkrec(id, T0 + i, "core", "m", i, 2 * i, INT64_C(1000000000) + i);
    assert_int_equal(tg_ledger_append(port, &r, on_durable, &done[i]), 0);
  }
}

static void test_ledger_core(void **state) {
  enum { N = 30 };
  char dir[] = "/tmp/tg-pgledger-XXXXXX";
  tg_ledger_opts_t o = {.retry_ms = 100};
  tg_ledger_t *l = NULL;
  tg_ledger_db_t *d = NULL;
  tg_ledger_port_t *port = NULL;
  tg_ledger_stats_t st;
  tg_usage_row_t *u = NULL;
  uv_loop_t loop;
  done_t done[N];
  size_t n = 0;
  int64_t cnt = -1;
  double t0;

  (void)state;
  memset(done, 0, sizeof(done));
  assert_non_null(mkdtemp(dir));
  assert_int_equal(tg_ledger_open(srv.url, dir, &o, &l), 0);
  assert_int_equal(tg_ledger_db_up(l), 1);
  assert_int_equal(uv_loop_init(&loop), 0);
  assert_int_equal(tg_ledger_port_new(l, &loop, &port), 0);

  append_range(port, done, 0, 10);
  await_durable(&loop, done, 0, 10);

  /* Down: records still become durable (in the spool), quickly. */
  assert_int_equal(srv_cmd("stop", "stopped"), 0);
  t0 = mono_now();
  append_range(port, done, 10, 20);
  await_durable(&loop, done, 10, 20);
  assert_true(mono_now() - t0 < 3.0);
  assert_int_equal(tg_ledger_db_up(l), 0);
  assert_true(tg_ledger_spool_bytes(l) > 0);

  /* Back: the spool is replayed, then the database takes batches again. */
  assert_int_equal(srv_cmd("start", "started"), 0);
  t0 = mono_now();
  while ((tg_ledger_db_up(l) == 0 || tg_ledger_spool_bytes(l) > 0) &&
         mono_now() - t0 < 10.0)
    sleep_ms(20);
  assert_int_equal(tg_ledger_db_up(l), 1);
  assert_int_equal(tg_ledger_spool_bytes(l), 0);
  append_range(port, done, 20, N);
  await_durable(&loop, done, 20, N);
  tg_ledger_stats(l, &st);
  assert_int_equal(st.spooled, 10);
  assert_int_equal(st.replayed, 10);
  assert_int_equal(st.committed, 20);
  assert_int_equal(st.lost, 0);

  tg_ledger_port_close(port);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
  tg_ledger_close(l);

  /* Every record once, to the nano-USD. */
  assert_int_equal(tg_ledger_db_open(srv.url, dir, &d), 0);
  {
    /* a gateway-wide secret: one value for every connection */
    char s1[65], s2[65];
    tg_ledger_db_t *d2 = NULL;
    assert_int_equal(tg_ledger_db_secret(d, "cache_salt", s1, sizeof(s1)), 0);
    assert_int_equal(strlen(s1), 64);
    assert_int_equal(tg_ledger_db_open(srv.url, dir, &d2), 0);
    assert_int_equal(tg_ledger_db_secret(d2, "cache_salt", s2, sizeof(s2)), 0);
    assert_string_equal(s1, s2);
    assert_int_equal(tg_ledger_db_secret(d2, "other", s2, sizeof(s2)), 0);
    assert_string_not_equal(s1, s2);
    tg_ledger_db_close(d2);
  }
  assert_int_equal(tg_ledger_count(d, "core", &cnt), 0);
  assert_int_equal(cnt, N);
  assert_int_equal(tg_ledger_usage_by_model(d, "core", T0, T1, &u, &n), 0);
  assert_int_equal(n, 1);
  assert_int_equal(u[0].requests, N);
  assert_int_equal(u[0].prompt_tokens, N * (N - 1) / 2);
  assert_int_equal(u[0].completion_tokens, N * (N - 1));
  assert_int_equal(u[0].cost_nano, INT64_C(1000000000) * N + N * (N - 1) / 2);
  free(u);
  tg_ledger_db_close(d);
  nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- the key store -------------------------------------------------------- */

static const char *const SCOPE_8B[] = {"llama-3.1-8b", "nomic-embed-text"};

static void test_keystore(void **state) {
  tg_keystore_t *st = NULL;
  tg_key_info_t *list = NULL;
  tg_keyset_t *set = NULL;
  const tg_key_rec_t *rec;
  char *ka = NULL, *kb = NULL, ida[TG_KEY_ID_LEN + 1], idb[TG_KEY_ID_LEN + 1];
  size_t n, skipped = 99;
  const int64_t now = 1700000000;
  PGconn *s;

  (void)state;
  assert_int_equal(tg_keystore_open_db(srv.url, NULL, &st), 0);
  {
    tg_key_spec_t a = {.tenant = "acme-corp", .name = "ci", .models = SCOPE_8B,
                       .n_models = 2};
    tg_key_spec_t b = {.tenant = "startup-xyz", .expires_at = now + 3600};
    char *k = NULL, id[TG_KEY_ID_LEN + 1];
    tg_key_spec_t bad = {.tenant = ""};
    assert_int_equal(tg_keystore_create(st, &a, now, &ka, ida), 0);
    assert_int_equal(tg_keystore_create(st, &b, now + 1, &kb, idb), 0);
    assert_int_equal(tg_keystore_create(st, &bad, now, &k, id), TG_EINVAL);
    assert_null(k);
  }

  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, 2);
  assert_string_equal(list[0].id, ida);
  assert_string_equal(list[0].tenant, "acme-corp");
  assert_string_equal(list[0].name, "ci");
  assert_string_equal(list[0].models, "llama-3.1-8b,nomic-embed-text");
  assert_int_equal(list[0].created_at, now);
  assert_int_equal(list[0].expires_at, 0);
  assert_string_equal(list[1].id, idb);
  assert_string_equal(list[1].name, "");
  assert_string_equal(list[1].models, "");
  assert_int_equal(list[1].expires_at, now + 3600);
  tg_keystore_list_free(list, n);

  assert_int_equal(tg_keystore_revoke(st, ida, now + 10), 0);
  assert_int_equal(tg_keystore_revoke(st, ida, now + 20), 0);
  assert_int_equal(tg_keystore_revoke(st, "000000000000", now), TG_ENOTFOUND);
  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(list[0].revoked_at, now + 10);
  assert_int_equal(list[1].revoked_at, 0);
  tg_keystore_list_free(list, n);

  /* Only the SHA-256 of a secret is stored, as bytes. */
  s = sql_conn(srv.url);
  {
    uint8_t hash[TG_KEY_HASH_LEN];
    char hex[2 * TG_KEY_HASH_LEN + 1], q[160], buf[128];
    PGresult *r;
    assert_int_equal(tg_key_hash_secret(ka + 16, 48, hash), 0);
    for (int i = 0; i < TG_KEY_HASH_LEN; i++)
      snprintf(hex + 2 * i, 3, "%02x", hash[i]);
    snprintf(q, sizeof(q), "SELECT encode(secret_sha256, 'hex') FROM api_keys"
             " WHERE id = '%s'", ida);
    assert_string_equal(sql_val(s, q, buf, sizeof(buf)), hex);
    r = PQexec(s, "SELECT t::text FROM api_keys t");
    assert_int_equal(PQntuples(r), 2);
    for (int i = 0; i < 2; i++) {
      assert_null(strstr(PQgetvalue(r, i, 0), ka + 16));
      assert_null(strstr(PQgetvalue(r, i, 0), kb + 16));
    }
    PQclear(r);
  }

  /* Rows the gateway cannot honour are skipped, not fatal. */
  sql_ok(s, "INSERT INTO api_keys VALUES ('NOTHEX000000', 'acme-corp', NULL,"
            " '', '\\x00'::bytea, 1, NULL, NULL), ('aaaaaaaaaaaa', 'acme-corp',"
            " NULL, '', '\\x0102'::bytea, 1, NULL, NULL)");
  assert_int_equal(tg_keystore_load(st, &set, &skipped), 0);
  assert_int_equal(skipped, 2);
  assert_int_equal(tg_keyset_count(set), 2);
  assert_int_equal(tg_keyset_verify(set, ka, strlen(ka), now + 30, &rec),
                   TG_KEY_REVOKED);
  assert_int_equal(tg_keyset_verify(set, kb, strlen(kb), now + 30, &rec),
                   TG_KEY_OK);
  assert_string_equal(rec->tenant, "startup-xyz");
  assert_int_equal(tg_keyset_verify(set, kb, strlen(kb), now + 3600, &rec),
                   TG_KEY_EXPIRED);
  rec = tg_keyset_find(set, ida, 12);
  assert_non_null(rec);
  assert_int_equal(rec->n_models, 2);
  assert_string_equal(rec->models[1], "nomic-embed-text");
  tg_keyset_release(set);
  sql_ok(s, "DELETE FROM api_keys WHERE id IN ('NOTHEX000000',"
            " 'aaaaaaaaaaaa')");

  /* A revocation at 0 (other SQL's "yes") is not read as no revocation:
   * the key is left out, refused. */
  {
    char q[128];
    snprintf(q, sizeof(q), "UPDATE api_keys SET revoked_at = 0 WHERE id = '%s'", idb);
    sql_ok(s, q);
    assert_int_equal(tg_keystore_load(st, &set, &skipped), 0);
    assert_int_equal(skipped, 1);
    assert_int_equal(tg_keyset_verify(set, kb, strlen(kb), now + 30, &rec),
                     TG_KEY_UNKNOWN);
    tg_keyset_release(set);
    snprintf(q, sizeof(q), "UPDATE api_keys SET revoked_at = NULL WHERE id = '%s'", idb);
    sql_ok(s, q);
  }

  /* An insert repeated after a lost reply finds its own row and succeeds;
   * the same id with another hash is a clash. */
  {
    const tg__keystore_backend_t *be = &tg__keystore_backend_pg;
    tg__keystore_conn_t *c = NULL;
    uint8_t h1[TG_KEY_HASH_LEN], h2[TG_KEY_HASH_LEN];
    tg__key_row_t row = {.id = "0a0b0c0d0e0f", .id_len = 12,
                         .tenant = "acme-corp", .tenant_len = 9,
                         .models = "", .hash = h1,
                         .hash_len = TG_KEY_HASH_LEN, .created_at = now};
    memset(h1, 0x11, sizeof(h1));
    memset(h2, 0x22, sizeof(h2));
    assert_int_equal(be->open(srv.url, NULL, &c), 0);
    assert_int_equal(be->insert(c, &row), 0);
    assert_int_equal(be->insert(c, &row), 0);
    row.hash = h2;
    assert_int_equal(be->insert(c, &row), TG_EEXISTS);
    assert_int_equal(sql_int(s, "SELECT COUNT(*) FROM api_keys WHERE"
                                " id = '0a0b0c0d0e0f'"), 1);
    be->close(c);
    sql_ok(s, "DELETE FROM api_keys WHERE id = '0a0b0c0d0e0f'");
  }
  PQfinish(s);
  tg_keystore_key_free(ka);
  tg_keystore_key_free(kb);
  tg_keystore_close(st);
}

/* ---- the watcher --------------------------------------------------------- */

typedef struct {
  tg_keywatch_t *w;
  tg_keyset_t *set;
  uint64_t gen;
} worker_t;

/* What a gateway worker does per request. */
static tg_key_verdict_t worker_check(worker_t *wk, const char *key) {
  uint64_t g = tg_keywatch_generation(wk->w);
  if (g != wk->gen || wk->set == NULL) {
    tg_keyset_release(wk->set);
    wk->set = tg_keywatch_acquire(wk->w);
    wk->gen = g;
  }
  return tg_keyset_verify(wk->set, key, strlen(key), (int64_t)time(NULL),
                          NULL);
}

/* Seconds until the worker sees want for key, or -1 after limit_s. */
static double wait_for(worker_t *wk, const char *key, tg_key_verdict_t want,
                       double limit_s) {
  double t0 = mono_now();
  while (mono_now() - t0 < limit_s) {
    if (worker_check(wk, key) == want)
      return mono_now() - t0;
    sleep_ms(10);
  }
  return -1.0;
}

static void test_keywatch(void **state) {
  tg_keystore_t *writer = NULL;
  worker_t wk = {0};
  tg_key_spec_t spec = {.tenant = "acme-corp", .name = "live"};
  char *k1 = NULL, *k2 = NULL, *k3 = NULL, id1[13], id2[13], id3[13];
  int64_t now = (int64_t)time(NULL);
  tg_keywatch_t *bad = (tg_keywatch_t *)1;
  char url[256];
  uint64_t g0;
  double took;

  (void)state;
  /* A database that does not exist: the watcher cannot start. */
  db_url(url, sizeof(url), "no_such_db");
  assert_true(tg_keywatch_start_db(url, NULL, 200, &bad) < 0);
  assert_null(bad);

  assert_int_equal(tg_keystore_open_db(srv.url, NULL, &writer), 0);
  assert_int_equal(tg_keystore_create(writer, &spec, now, &k1, id1), 0);
  assert_int_equal(tg_keywatch_start_db(srv.url, NULL, 200, &wk.w), 0);
  g0 = tg_keywatch_generation(wk.w);
  assert_int_equal(g0, 1);
  assert_int_equal(worker_check(&wk, k1), TG_KEY_OK);
  /* Idle: no reload. */
  sleep_ms(500);
  assert_int_equal(tg_keywatch_generation(wk.w), g0);

  /* A new key is honoured within 1 s, a revocation too. */
  assert_int_equal(tg_keystore_create(writer, &spec, now, &k2, id2), 0);
  took = wait_for(&wk, k2, TG_KEY_OK, 2.0);
  assert_true(took >= 0.0 && took < 1.0);
  assert_int_equal(tg_keystore_revoke(writer, id2, now), 0);
  took = wait_for(&wk, k2, TG_KEY_REVOKED, 2.0);
  assert_true(took >= 0.0 && took < 1.0);
  /* A second revocation in the same second, of a key created in that
   * second, changes no time and no count: the change counter sees it. */
  assert_int_equal(tg_keystore_revoke(writer, id1, now), 0);
  took = wait_for(&wk, k1, TG_KEY_REVOKED, 2.0);
  assert_true(took >= 0.0 && took < 1.0);

  /* The server goes away: the gateway keeps the keys it has. */
  assert_int_equal(tg_keystore_create(writer, &spec, now, &k3, id3), 0);
  took = wait_for(&wk, k3, TG_KEY_OK, 2.0);
  assert_true(took >= 0.0 && took < 1.0);
  assert_int_equal(srv_cmd("stop", "stopped"), 0);
  sleep_ms(600);
  assert_int_equal(worker_check(&wk, k3), TG_KEY_OK);
  assert_int_equal(worker_check(&wk, k2), TG_KEY_REVOKED);
  assert_int_equal(srv_cmd("start", "started"), 0);
  /* Back: the writer's next call reconnects, and the watcher picks the
   * change up within a poll or two of its own reconnection. */
  assert_int_equal(tg_keystore_revoke(writer, id3, now), 0);
  took = wait_for(&wk, k3, TG_KEY_REVOKED, 3.0);
  assert_true(took >= 0.0 && took < 2.0);

  tg_keywatch_stop(wk.w);
  tg_keyset_release(wk.set);
  tg_keystore_key_free(k1);
  tg_keystore_key_free(k2);
  tg_keystore_key_free(k3);
  tg_keystore_close(writer);
}

/* SIGSTOP (or SIGCONT) to the server and every backend: a frozen server,
 * whose kernel still accepts connections and acknowledges every byte. */
static void srv_freeze(int sig) {
  char path[PATH_MAX + 32], cmd[64], line[32];
  FILE *f;
  long pm = 0;

  snprintf(path, sizeof(path), "%s/data/postmaster.pid", srv.dir);
  f = fopen(path, "r");
  assert_non_null(f);
  assert_non_null(fgets(line, sizeof(line), f));
  fclose(f);
  pm = strtol(line, NULL, 10);
  assert_true(pm > 1);
  snprintf(cmd, sizeof(cmd), "pgrep -P %ld", pm);
  f = popen(cmd, "r");
  assert_non_null(f);
  while (fgets(line, sizeof(line), f) != NULL)
    kill((pid_t)strtol(line, NULL, 10), sig);
  pclose(f);
  kill((pid_t)pm, sig);
}

/* A frozen server holds every wait of the watcher: a query for ever (no
 * TCP timeout fires), a new connection for the connect timeout (3 s). A
 * stop ends the wait at once, whichever it is. */
static void test_keywatch_stop_while_frozen(void **state) {
  tg_keywatch_t *w = NULL;
  PGconn *s = sql_conn(srv.url);
  double t;

  (void)state;
  for (int reconnect = 0; reconnect < 2; reconnect++) {
    assert_int_equal(tg_keywatch_start_db(srv.url, NULL, 50, &w), 0);
    if (reconnect)   /* the watcher's connection is gone: it connects anew */
      sql_ok(s, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'tollgate'");
    srv_freeze(SIGSTOP);
    sleep_ms(300);   /* a poll is waiting on the server now */
    t = mono_now();
    tg_keywatch_stop(w);
    t = mono_now() - t;
    srv_freeze(SIGCONT);
    if (t >= 0.5)
      fail_msg("the stop took %.2f s (reconnect %d)", t, reconnect);
  }
  PQfinish(s);
}

static void *write_later(void *arg) {
  ssize_t n;
  sleep_ms(300);
  n = write(*(int *)arg, "x", 1);
  (void)n;
  return NULL;
}

/* The retention purge runs on a query connection of its own while the
 * gateway serves; a server frozen under it would hold a stop for the
 * query's whole bound (60 s). Opened with a wake descriptor, the purge
 * gives up as soon as the descriptor is readable. */
static void test_purge_stop_while_frozen(void **state) {
  tg_ledger_db_t *d = NULL;
  int64_t n = 0;
  int p[2], rc;
  pthread_t th;
  double t;

  (void)state;
  assert_int_equal(pipe(p), 0);
  assert_int_equal(tg_ledger_db_open_wake(srv.url, srv.dir, p[0], &d), 0);
  srv_freeze(SIGSTOP);
  assert_int_equal(pthread_create(&th, NULL, write_later, &p[1]), 0);
  t = mono_now();
  rc = tg_ledger_purge(d, NULL, 0, &n);
  t = mono_now() - t;
  pthread_join(th, NULL);
  srv_freeze(SIGCONT);
  assert_int_not_equal(rc, 0);
  if (t < 0.25 || t >= 1.5)
    fail_msg("the purge returned after %.2f s", t);
  tg_ledger_db_close(d);
  close(p[0]);
  close(p[1]);
}

/* ---- the CLI -------------------------------------------------------------- */

typedef struct {
  int status;
  char out[8192], err[8192];
} cli_result_t;

static void slurp(const char *path, char *buf, size_t cap) {
  FILE *f = fopen(path, "rb");
  size_t n = 0;
  if (f != NULL) {
    n = fread(buf, 1, cap - 1, f);
    fclose(f);
  }
  buf[n] = '\0';
}

/* `tollgate keys ...` in-process (NULL-terminated arguments), stdout and
 * stderr captured. */
static void run_cli(const char *dir, cli_result_t *r, ...) {
  char *argv[16], outp[PATH_MAX], errp[PATH_MAX];
  int argc = 0, fo, fe, so, se;
  va_list ap;

  va_start(ap, r);
  argv[argc++] = (char *)"keys";
  for (char *a; (a = va_arg(ap, char *)) != NULL && argc < 15;)
    argv[argc++] = a;
  va_end(ap);
  argv[argc] = NULL;
  snprintf(outp, sizeof(outp), "%s/cli.out", dir);
  snprintf(errp, sizeof(errp), "%s/cli.err", dir);
  fflush(stdout);
  fflush(stderr);
  fo = open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  fe = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  assert_true(fo >= 0 && fe >= 0);
  so = dup(1);
  se = dup(2);
  dup2(fo, 1);
  dup2(fe, 2);
  r->status = tg_cmd_keys(argc, argv);
  fflush(stdout);
  fflush(stderr);
  dup2(so, 1);
  dup2(se, 2);
  close(so);
  close(se);
  close(fo);
  close(fe);
  slurp(outp, r->out, sizeof(r->out));
  slurp(errp, r->err, sizeof(r->err));
}

static void write_cfg(const char *path, const char *database) {
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fprintf(f,
          "data_dir: ./data\n"
          "database: \"%s\"\n"
          "tenants:\n"
          "  acme-corp:\n"
          "    models_allowed: [llama-3.1-8b]\n"
          "models:\n"
          "  llama-3.1-8b:\n"
          "    endpoints: [{url: \"http://127.0.0.1:8000\"}]\n"
          "    pricing: {prompt_per_1k_usd: \"0.0005\","
          " completion_per_1k_usd: \"0.0015\"}\n", database);
  fclose(f);
}

static void test_cli(void **state) {
  char dir[] = "/tmp/tg-pgcli-XXXXXX", cfg[PATH_MAX], key[TG_KEY_LEN + 1];
  char id[TG_KEY_ID_LEN + 1], bad[PATH_MAX];
  cli_result_t *r = calloc(1, sizeof(*r));
  tg_keystore_t *st = NULL;
  tg_keyset_t *set = NULL;
  const tg_key_rec_t *rec;

  (void)state;
  assert_non_null(r);
  assert_non_null(mkdtemp(dir));
  snprintf(cfg, sizeof(cfg), "%s/tollgate.yaml", dir);
  write_cfg(cfg, srv.url);

  run_cli(dir, r, "create", "--config", cfg, "--tenant", "acme-corp",
          "--name", "pg-cli", NULL);
  assert_int_equal(r->status, 0);
  assert_int_equal(strlen(r->out), TG_KEY_LEN + 1);
  memcpy(key, r->out, TG_KEY_LEN);
  key[TG_KEY_LEN] = '\0';
  memcpy(id, key + 3, TG_KEY_ID_LEN);
  id[TG_KEY_ID_LEN] = '\0';

  /* It landed in PostgreSQL, where every replica looks, and no SQLite
   * file was made. */
  assert_int_equal(tg_keystore_open_db(srv.url, NULL, &st), 0);
  assert_int_equal(tg_keystore_load(st, &set, NULL), 0);
  assert_int_equal(tg_keyset_verify(set, key, TG_KEY_LEN, (int64_t)time(NULL),
                                    &rec), TG_KEY_OK);
  assert_string_equal(rec->name, "pg-cli");
  tg_keyset_release(set);
  {
    char data[PATH_MAX];
    struct stat sb;
    snprintf(data, sizeof(data), "%s/data/tollgate.db", dir);
    assert_int_not_equal(stat(data, &sb), 0);
  }

  run_cli(dir, r, "list", "--config", cfg, "--json", NULL);
  assert_int_equal(r->status, 0);
  assert_non_null(strstr(r->out, id));
  assert_non_null(strstr(r->out, "\"status\":\"active\""));
  run_cli(dir, r, "revoke", "--config", cfg, id, NULL);
  assert_int_equal(r->status, 0);
  assert_int_equal(tg_keystore_load(st, &set, NULL), 0);
  assert_int_equal(tg_keyset_verify(set, key, TG_KEY_LEN, (int64_t)time(NULL),
                                    NULL), TG_KEY_REVOKED);
  tg_keyset_release(set);
  tg_keystore_close(st);

  /* A database nobody serves: a clear failure, the password not shown. */
  snprintf(bad, sizeof(bad), "%s/bad.yaml", dir);
  {
    char url[256];
    snprintf(url, sizeof(url),
             "postgresql://postgres:hunter2@127.0.0.1:%d/nope", srv.port);
    write_cfg(bad, url);
  }
  run_cli(dir, r, "list", "--config", bad, NULL);
  assert_int_equal(r->status, 1);
  assert_non_null(strstr(r->err, "cannot open the key store"));
  assert_null(strstr(r->err, "hunter2"));

  nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
  free(r);
}

/* Last: the harness stops the server and leaves nothing behind. */
static void test_harness_cleans_up(void **state) {
  struct stat sb;
  PGconn *c;
  char dir[sizeof(srv.dir)];

  (void)state;
  memcpy(dir, srv.dir, sizeof(dir));
  assert_int_equal(stat(dir, &sb), 0);
  assert_int_equal(srv_quit(), 0);
  assert_int_not_equal(stat(dir, &sb), 0);
  assert_int_equal(errno, ENOENT);
  c = PQconnectdb(srv.url);
  assert_int_not_equal(PQstatus(c), CONNECTION_OK);
  PQfinish(c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_url_helpers),
    cmocka_unit_test(test_url_secrets_never_printed),
    cmocka_unit_test(test_migrations),
    cmocka_unit_test(test_migration_race_under_strict_isolation),
    cmocka_unit_test(test_secret_made_by_two_at_once),
    cmocka_unit_test(test_migration_byte_order_keys),
    cmocka_unit_test(test_ledger_exact),
    cmocka_unit_test(test_ledger_copy),
    cmocka_unit_test(test_ledger_outage),
    cmocka_unit_test(test_ledger_core),
    cmocka_unit_test(test_keystore),
    cmocka_unit_test(test_keywatch),
    cmocka_unit_test(test_keywatch_stop_while_frozen),
    cmocka_unit_test(test_purge_stop_while_frozen),
    cmocka_unit_test(test_cli),
    cmocka_unit_test(test_harness_cleans_up),
  };
  /* A write to the harness after it died must fail, not kill us. */
  signal(SIGPIPE, SIG_IGN);
  return cmocka_run_group_tests(tests, srv_start, srv_teardown);
}
