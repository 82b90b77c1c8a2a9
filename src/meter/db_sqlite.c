/* Opening the embedded SQLite database and migrating its schema.
 *
 * Migrations are an ordered, append-only list of SQL scripts, numbered from
 * 1. A database records the ones it has in schema_migrations; opening applies
 * the missing ones in a single IMMEDIATE transaction, so two processes
 * opening a fresh database at once do not both apply a script, and a script
 * that fails leaves the database as it was. A published migration is never
 * edited: a change of schema is a new entry at the end of the list. */
#include "meter/db_sqlite.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/err.h"

typedef struct {
  int version;
  const char *sql;
} migration_t;

static const migration_t migrations[] = {
  {1,
   /* Virtual keys (src/auth): only the SHA-256 of the secret is stored.
    * models is a comma list; '' means every model the tenant may use. */
   "CREATE TABLE api_keys ("
   "  id TEXT PRIMARY KEY,"
   "  tenant TEXT NOT NULL,"
   "  name TEXT,"
   "  models TEXT,"
   "  secret_sha256 BLOB NOT NULL,"
   "  created_at INTEGER NOT NULL,"
   "  expires_at INTEGER,"
   "  revoked_at INTEGER"
   ");"
   "CREATE INDEX api_keys_tenant ON api_keys(tenant);"},
  {2,
   /* Budget spend of the memory policy backend (src/policy/state_mem.c),
    * per tenant and period ('day:2026-11-28', 'month:2026-11'), so a
    * restart keeps what tenants have spent. alerted: the threshold event of
    * that period was raised. */
   "CREATE TABLE tenant_spend ("
   "  tenant TEXT NOT NULL,"
   "  period TEXT NOT NULL,"
   "  spent_nano INTEGER NOT NULL,"
   "  alerted INTEGER NOT NULL DEFAULT 0,"
   "  updated_at INTEGER NOT NULL,"
   "  PRIMARY KEY (tenant, period)"
   ");"},
  {3,
   /* The usage ledger (src/meter/ledger.c): one row per request that
    * reached an upstream, unique by request id so a replayed spool adds no
    * duplicate. STRICT keeps every figure an exact INTEGER (money is nano-USD,
    * never a REAL). Latencies in microseconds, -1 where not applicable.
    * (tenant, ts_ms) serves invoices and budget rebuilds, (ts_ms) the purge
    * and the all-tenant spend. A rowid table: rows land in arrival order and
    * only the small request_id index takes random inserts. */
   "CREATE TABLE ledger ("
   "  request_id TEXT PRIMARY KEY,"
   "  ts_ms INTEGER NOT NULL,"
   "  tenant TEXT NOT NULL,"
   "  key_id TEXT NOT NULL,"
   "  model TEXT NOT NULL,"
   "  endpoint TEXT NOT NULL,"
   "  prompt_tokens INTEGER NOT NULL,"
   "  completion_tokens INTEGER NOT NULL,"
   "  cost_nano INTEGER NOT NULL,"
   "  status INTEGER NOT NULL,"
   "  usage_counted INTEGER NOT NULL DEFAULT 0,"
   "  queue_us INTEGER NOT NULL DEFAULT -1,"
   "  ttft_us INTEGER NOT NULL DEFAULT -1,"
   "  total_us INTEGER NOT NULL DEFAULT -1"
   ") STRICT;"
   "CREATE INDEX ledger_tenant_ts ON ledger(tenant, ts_ms);"
   "CREATE INDEX ledger_ts ON ledger(ts_ms);"},
  {4,
   /* Every record paid for the (ts_ms) index with one more B-tree insert,
    * for queries that run at start and once a day. They now walk the
    * tenants through (tenant, ts_ms) instead (ledger_sqlite.c). */
   "DROP INDEX IF EXISTS ledger_ts;"},
  {5,
   /* One key instead of two: the request_id primary key and the (tenant,
    * ts_ms) index cost every record two B-tree inserts besides the table's
    * own. A unique (tenant, ts_ms, request_id) index serves the invoices,
    * budget rebuilds and purges as (tenant, ts_ms) did, and keeps a
    * replayed record out (it carries the same tenant, time and id).
    * SQLite cannot drop a primary key: the table is rebuilt, in rowid
    * (arrival) order. */
   "CREATE TABLE ledger_v5 ("
   "  request_id TEXT NOT NULL,"
   "  ts_ms INTEGER NOT NULL,"
   "  tenant TEXT NOT NULL,"
   "  key_id TEXT NOT NULL,"
   "  model TEXT NOT NULL,"
   "  endpoint TEXT NOT NULL,"
   "  prompt_tokens INTEGER NOT NULL,"
   "  completion_tokens INTEGER NOT NULL,"
   "  cost_nano INTEGER NOT NULL,"
   "  status INTEGER NOT NULL,"
   "  usage_counted INTEGER NOT NULL DEFAULT 0,"
   "  queue_us INTEGER NOT NULL DEFAULT -1,"
   "  ttft_us INTEGER NOT NULL DEFAULT -1,"
   "  total_us INTEGER NOT NULL DEFAULT -1"
   ") STRICT;"
   "INSERT INTO ledger_v5 SELECT request_id, ts_ms, tenant, key_id, model, endpoint,"
   "  prompt_tokens, completion_tokens, cost_nano, status, usage_counted, queue_us,"
   "  ttft_us, total_us FROM ledger ORDER BY rowid;"
   "DROP TABLE ledger;"
   "ALTER TABLE ledger_v5 RENAME TO ledger;"
   "CREATE UNIQUE INDEX ledger_key ON ledger(tenant, ts_ms, request_id);"},
  {6,
   /* The key watchers' change marker, as PostgreSQL's api_keys_changes:
    * triggers bump its one row in the same transaction as any write to
    * api_keys (the CLI's or an operator's own SQL). PRAGMA data_version,
    * the marker before, moves on every commit to the file, and the ledger
    * commits many times a second: every poll reloaded every key. */
   "CREATE TABLE api_keys_changes ("
   "  singleton INTEGER PRIMARY KEY CHECK (singleton = 1),"
   "  version INTEGER NOT NULL"
   ");"
   "INSERT INTO api_keys_changes (singleton, version) VALUES (1, 0);"
   "CREATE TRIGGER api_keys_bump_insert AFTER INSERT ON api_keys BEGIN"
   "  UPDATE api_keys_changes SET version = version + 1; END;"
   "CREATE TRIGGER api_keys_bump_update AFTER UPDATE ON api_keys BEGIN"
   "  UPDATE api_keys_changes SET version = version + 1; END;"
   "CREATE TRIGGER api_keys_bump_delete AFTER DELETE ON api_keys BEGIN"
   "  UPDATE api_keys_changes SET version = version + 1; END;"},
  {7,
   /* Secrets every gateway on this database shares, made by the first one
    * that needs each (tg_ledger_db_secret): the key of the tenants'
    * cache_salt. */
   "CREATE TABLE IF NOT EXISTS gateway_secrets ("
   "  name TEXT PRIMARY KEY,"
   "  value TEXT NOT NULL"
   ");"},
};

#define N_MIGRATIONS (sizeof(migrations) / sizeof(migrations[0]))

int tg_db_sqlite_schema_version(void) {
  return migrations[N_MIGRATIONS - 1].version;
}

/* mkdir -p, with 0700 for every directory it creates: the database holds key
 * hashes and the ledger, which are nobody else's business. */
static int make_dirs(const char *dir) {
  char path[PATH_MAX];
  size_t len = strlen(dir);
  struct stat st;

  if (len == 0 || len >= sizeof(path))
    return TG_EINVAL;
  memcpy(path, dir, len + 1);
  for (size_t i = 1; i <= len; i++) {
    if (path[i] != '/' && path[i] != '\0')
      continue;
    path[i] = '\0';
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
      fprintf(stderr, "tollgate: cannot create %s: %s\n", path,
              strerror(errno));
      return TG_EIO;
    }
    if (i < len)
      path[i] = '/';
  }
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
    fprintf(stderr, "tollgate: data_dir %s is not a directory\n", dir);
    return TG_EIO;
  }
  return 0;
}

int tg_db_make_data_dir(const char *data_dir) {
  return make_dirs(data_dir);
}

/* Once, before SQLite initializes: no count of its memory use. The count
 * takes a global mutex around every allocation, several per inserted row,
 * and nothing here reads it (sqlite3_memory_used). Fails harmlessly
 * (SQLITE_MISUSE) when something already initialized SQLite. */
static pthread_once_t config_once = PTHREAD_ONCE_INIT;

static void config_sqlite(void) {
  (void)sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
}

static int exec(sqlite3 *db, const char *sql) {
  char *msg = NULL;
  if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
    fprintf(stderr, "tollgate: database: %s\n",
            msg ? msg : sqlite3_errmsg(db));
    sqlite3_free(msg);
    return TG_EDB;
  }
  return 0;
}

static int set_wal(sqlite3 *db) {
  sqlite3_stmt *st = NULL;
  int rc = TG_EDB;
  if (sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL) !=
      SQLITE_OK)
    goto out;
  if (sqlite3_step(st) == SQLITE_ROW) {
    const unsigned char *mode = sqlite3_column_text(st, 0);
    if (mode != NULL && strcmp((const char *)mode, "wal") == 0)
      rc = 0;
  }
out:
  if (rc != 0)
    fprintf(stderr, "tollgate: database: cannot enable WAL mode: %s\n",
            sqlite3_errmsg(db));
  sqlite3_finalize(st);
  return rc;
}

static int migrate(sqlite3 *db, int *from) {
  sqlite3_stmt *st = NULL;
  int current = 0, rc, said = 0;

  rc = exec(db, "BEGIN IMMEDIATE");
  if (rc != 0)
    return rc;
  rc = exec(db, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, applied_at INTEGER)");
  if (rc != 0) {
    said = 1;  /* exec() said why */
    goto out;
  }
  rc = TG_EDB;
  if (sqlite3_prepare_v2(db, "SELECT COALESCE(MAX(version), 0) "
                             "FROM schema_migrations", -1, &st, NULL) !=
          SQLITE_OK ||
      sqlite3_step(st) != SQLITE_ROW)
    goto out;
  current = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  st = NULL;
  if (from != NULL)
    *from = current;
  if (current > tg_db_sqlite_schema_version()) {
    fprintf(stderr, "tollgate: database schema version %d is newer than this "
            "binary knows (%d)\n", current, tg_db_sqlite_schema_version());
    said = 1;
    goto out;
  }
  if (sqlite3_prepare_v2(db, "INSERT INTO schema_migrations(version, "
                             "applied_at) VALUES (?, ?)", -1, &st, NULL) !=
      SQLITE_OK)
    goto out;
  for (size_t i = 0; i < N_MIGRATIONS; i++) {
    if (migrations[i].version <= current)
      continue;
    if (exec(db, migrations[i].sql) != 0) {
      fprintf(stderr, "tollgate: database migration %d failed\n",
              migrations[i].version);
      said = 1;
      goto out;
    }
    sqlite3_reset(st);
    sqlite3_bind_int(st, 1, migrations[i].version);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)time(NULL));
    if (sqlite3_step(st) != SQLITE_DONE)
      goto out;
  }
  sqlite3_finalize(st);
  st = NULL;
  rc = exec(db, "COMMIT");
  said = rc != 0;
out:
  if (st != NULL)
    sqlite3_finalize(st);
  if (rc != 0) {
    if (!said)
      fprintf(stderr, "tollgate: database migration failed: %s\n",
              sqlite3_errmsg(db));
    if (sqlite3_get_autocommit(db) == 0)
      sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
  }
  return rc;
}

static int open_flags(sqlite3 **db, const char *data_dir, int flags, int *from) {
  char path[PATH_MAX];
  sqlite3 *conn = NULL;
  int rc, n;

  *db = NULL;
  if (data_dir == NULL || *data_dir == '\0')
    return TG_EINVAL;
  n = snprintf(path, sizeof(path), "%s/%s", data_dir, TG_DB_SQLITE_FILE);
  if (n < 0 || (size_t)n >= sizeof(path))
    return TG_EINVAL;
  rc = make_dirs(data_dir);
  if (rc != 0)
    return rc;

  /* Made private before SQLite makes it with the umask's mode (its -wal
   * and -shm files take the database file's mode): key hashes and every
   * tenant's usage are in it. */
  if ((n = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) >= 0)
    close(n);

  pthread_once(&config_once, config_sqlite);
  rc = TG_EDB;
  if (sqlite3_open_v2(path, &conn, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | flags,
                      NULL) != SQLITE_OK) {
    fprintf(stderr, "tollgate: cannot open %s: %s\n", path,
            conn ? sqlite3_errmsg(conn) : "out of memory");
    goto out;
  }
  sqlite3_extended_result_codes(conn, 1);
  if (sqlite3_busy_timeout(conn, 5000) != SQLITE_OK)
    goto out;
  if ((rc = set_wal(conn)) != 0)
    goto out;
  if ((rc = exec(conn, "PRAGMA foreign_keys=ON")) != 0)
    goto out;
  rc = migrate(conn, from);
out:
  if (rc != 0) {
    sqlite3_close(conn);
    return rc;
  }
  *db = conn;
  return 0;
}

int tg_db_sqlite_open(sqlite3 **db, const char *data_dir) {
  return open_flags(db, data_dir, 0, NULL);
}

int tg_db_sqlite_open_private(sqlite3 **db, const char *data_dir) {
  return open_flags(db, data_dir, SQLITE_OPEN_NOMUTEX, NULL);
}

int tg_db_sqlite_open_from(sqlite3 **db, const char *data_dir, int *from) {
  return open_flags(db, data_dir, 0, from);
}
