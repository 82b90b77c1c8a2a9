/* The key store's PostgreSQL backend: table api_keys (migration 1 in
 * meter/db_pg.c) in the database every gateway replica shares, so a key
 * created or revoked through any of them (or the CLI) is seen by all.
 *
 * The change marker the watchers poll is api_keys_changes.version, which a
 * statement trigger bumps in the same transaction as any write to api_keys:
 * one primary-key read per poll, and no change is ever missed, whoever
 * wrote it.
 *
 * The server may restart under a long-lived connection (the watcher's).
 * Every call that finds its connection broken reconnects once and runs
 * again; every call here is safe to repeat: a revocation keeps its first
 * time, and a key insert whose reply was lost finds its own row (same id,
 * same hash) and counts as done instead of as an id clash. A call that
 * cannot reach the server fails with TG_EDB within the connect timeout and
 * the next call tries again, without a line on stderr each time (the
 * watcher reports once). */
#include "auth/keystore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/err.h"
#include "core/strbuf.h"
#include "meter/db_pg.h"

struct tg__keystore_conn_s {
  char *url;
  PGconn *pg;          /* NULL while not connected */
  tg_db_pg_opts_t opts;
  tg_db_pg_wait_t wait; /* answers within STATEMENT_MS and a little; its
                         * wake_fd, an eventfd, is written by interrupt() */
  char err[512];       /* the last failure, for errmsg() */
  int migrated;        /* the first connection brought the schema up to date */
};

#define STATEMENT_MS 10000
#define LOCK_MS 5000
/* Past the statement timeout the server's own error is due: one that has
 * not answered by then cannot (stopped, frozen), and is cut. */
#define ANSWER_GRACE_MS 1000

/* ---- connection ---- */

static void drop(tg__keystore_conn_t *c) {
  PQfinish(c->pg);
  c->pg = NULL;
}

/* Records the connection's last error (or what) for errmsg(). */
static int note(tg__keystore_conn_t *c, const char *what) {
  char msg[200];
  if (c->wait.cut)
    snprintf(msg, sizeof(msg), "no answer from the server within %d ms",
             c->wait.wait_ms);
  else
    tg_db_pg_errmsg(c->pg, msg, sizeof(msg));
  snprintf(c->err, sizeof(c->err), "%s: %s", what, msg);
  return TG_EDB;
}

static int ensure(tg__keystore_conn_t *c) {
  char why[256], shown[200];
  int rc;

  if (c->pg != NULL)
    return 0;
  why[0] = '\0';
  c->opts.err = why;
  c->opts.err_size = sizeof(why);
  /* The first connection applies the schema's migrations; a reconnection
   * only connects. A migration's statements do not watch wake_fd, so a
   * server that froze between a reconnection's connect and them held the
   * watcher, and a stop waiting for it, until the statement timeout. */
  rc = c->migrated ? tg_db_pg_connect_wake(c->url, &c->opts, c->wait.wake_fd, &c->pg)
                   : tg_db_pg_open_wake(c->url, &c->opts, c->wait.wake_fd, &c->pg);
  c->opts.err = NULL;
  if (rc == 0)
    c->migrated = 1;
  if (rc != 0) {
    snprintf(c->err, sizeof(c->err), "cannot connect to %s: %s",
             tg_db_pg_redact(c->url, shown, sizeof(shown)), why);
    return rc == TG_ENOMEM || rc == TG_EINVAL ? rc : TG_EDB;
  }
  return 0;
}

/* Runs op on a live connection; when it fails on a connection that was
 * already open and is now broken, reconnects once and runs it again. */
static int with_conn(tg__keystore_conn_t *c,
                     int (*op)(tg__keystore_conn_t *, void *), void *arg) {
  int fresh = c->pg == NULL, rc;

  c->wait.cut = 0;
  rc = ensure(c);
  if (rc != 0)
    return rc;
  rc = op(c, arg);
  if (rc == 0 || !tg_db_pg_broken(c->pg))
    return rc;
  drop(c);
  /* A server that did not answer in time is not asked again at once. */
  if (fresh || c->wait.cut || (rc = ensure(c)) != 0)
    return rc;
  rc = op(c, arg);
  if (rc != 0 && tg_db_pg_broken(c->pg))
    drop(c);
  return rc;
}

static int pg_open(const char *database, const char *data_dir,
                   tg__keystore_conn_t **out) {
  tg__keystore_conn_t *c;
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
  c->wait.wait_ms = STATEMENT_MS + ANSWER_GRACE_MS;
  c->wait.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (c->wait.wake_fd < 0) {
    free(c->url);
    free(c);
    return TG_ENOMEM;
  }
  c->opts.statement_timeout_ms = STATEMENT_MS;
  c->opts.lock_timeout_ms = LOCK_MS;
  /* The first connection says why it fails (the CLI and the gateway's
   * start need that); reconnections later are the watcher's to report. */
  rc = ensure(c);
  c->opts.quiet = 1;
  if (rc != 0) {
    close(c->wait.wake_fd);
    free(c->url);
    free(c);
    return rc;
  }
  *out = c;
  return 0;
}

static void pg_interrupt(tg__keystore_conn_t *c) {
  uint64_t one = 1;
  /* Fails only when the counter is full, which leaves it readable too. */
  ssize_t n = write(c->wait.wake_fd, &one, sizeof(one));
  (void)n;
}

static void pg_close(tg__keystore_conn_t *c) {
  if (c == NULL)
    return;
  close(c->wait.wake_fd);
  PQfinish(c->pg);
  free(c->url);
  free(c);
}

static const char *pg_errmsg(tg__keystore_conn_t *c) {
  return c->err[0] ? c->err : "no error";
}

/* ---- writes ---- */

static int insert_op(tg__keystore_conn_t *c, void *arg) {
  const tg__key_row_t *r = arg;
  char id[TG_KEY_ID_LEN + 1], created[24], expires[24];
  char *tenant = NULL, *name = NULL, *models = NULL;
  const char *vals[7];
  int lens[7] = {0}, fmts[7] = {0};
  PGresult *res = NULL;
  int rc = TG_ENOMEM;

  if (r->id_len != TG_KEY_ID_LEN || r->hash == NULL)
    return TG_EINVAL;
  memcpy(id, r->id, TG_KEY_ID_LEN);
  id[TG_KEY_ID_LEN] = '\0';
  /* Parameters are NUL-terminated text (the lengths in the row are what
   * counts, so copy them). */
  tenant = strndup(r->tenant, r->tenant_len);
  name = r->name ? strndup(r->name, r->name_len) : NULL;
  models = strndup(r->models ? r->models : "", r->models_len);
  if (tenant == NULL || models == NULL || (r->name != NULL && name == NULL))
    goto out;
  snprintf(created, sizeof(created), "%lld", (long long)r->created_at);
  snprintf(expires, sizeof(expires), "%lld", (long long)r->expires_at);
  vals[0] = id;
  vals[1] = tenant;
  vals[2] = name;
  vals[3] = models;
  vals[4] = (const char *)r->hash;   /* binary: no hex round trip */
  lens[4] = (int)r->hash_len;
  fmts[4] = 1;
  vals[5] = created;
  vals[6] = r->expires_at != 0 ? expires : NULL;
  res = tg_db_pg_query(c->pg,
                       "INSERT INTO api_keys (id, tenant, name, models,"
                       " secret_sha256, created_at, expires_at, revoked_at)"
                       " VALUES ($1, $2, $3, $4, $5::bytea, $6::bigint,"
                       " $7::bigint, NULL) ON CONFLICT (id) DO NOTHING",
                       7, vals, lens, fmts, &c->wait);
  if (PQresultStatus(res) != PGRES_COMMAND_OK) {
    rc = note(c, "insert");
    goto out;
  }
  if (strcmp(PQcmdTuples(res), "1") == 0) {
    rc = 0;
    goto out;
  }
  /* The id is taken: by this very key when an earlier attempt committed
   * and its reply was lost, or by another key (a real clash). */
  PQclear(res);
  {
    const char *v2[2] = {id, vals[4]};
    int l2[2] = {0, lens[4]}, f2[2] = {0, 1};
    res = tg_db_pg_query(c->pg,
                         "SELECT secret_sha256 = $2::bytea FROM api_keys"
                         " WHERE id = $1", 2, v2, l2, f2, &c->wait);
  }
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    rc = note(c, "insert");
    goto out;
  }
  rc = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0
           ? 0 : TG_EEXISTS;
  if (rc == TG_EEXISTS)
    snprintf(c->err, sizeof(c->err), "key id %s is taken", id);
out:
  PQclear(res);
  free(tenant);
  free(name);
  free(models);
  return rc;
}

static int pg_insert(tg__keystore_conn_t *c, const tg__key_row_t *r) {
  return with_conn(c, insert_op, (void *)r);
}

typedef struct {
  const char *id;
  int64_t now;
} revoke_t;

static int revoke_op(tg__keystore_conn_t *c, void *arg) {
  const revoke_t *a = arg;
  char now[24];
  const char *vals[2] = {now, a->id};
  PGresult *res;
  int rc;

  snprintf(now, sizeof(now), "%lld", (long long)a->now);
  /* COALESCE keeps the first revocation time, as in SQLite: revoking twice
   * is harmless and the moment access really ended is kept. */
  res = tg_db_pg_query(c->pg,
                       "UPDATE api_keys SET revoked_at ="
                       " COALESCE(revoked_at, $1::bigint) WHERE id = $2",
                       2, vals, NULL, NULL, &c->wait);
  if (PQresultStatus(res) != PGRES_COMMAND_OK) {
    PQclear(res);
    return note(c, "revoke");
  }
  rc = strcmp(PQcmdTuples(res), "0") == 0 ? TG_ENOTFOUND : 0;
  PQclear(res);
  return rc;
}

static int pg_revoke(tg__keystore_conn_t *c, const char *id, int64_t now) {
  revoke_t a = {id, now};
  return with_conn(c, revoke_op, &a);
}

/* ---- reads ---- */

/* Decodes a hash sent as hex; 0 when it is exactly TG_KEY_HASH_LEN bytes. */
static int unhex_hash(const char *s, int len, uint8_t out[TG_KEY_HASH_LEN]) {
  if (len != 2 * TG_KEY_HASH_LEN)
    return TG_EPARSE;
  for (int i = 0; i < TG_KEY_HASH_LEN; i++) {
    int hi = tg_hex_val(s[2 * i]), lo = tg_hex_val(s[2 * i + 1]);
    if (hi < 0 || lo < 0)
      return TG_EPARSE;
    out[i] = (uint8_t)(hi << 4 | lo);
  }
  return 0;
}

static void cell_text(const PGresult *res, int row, int col, const char **t,
                      size_t *len) {
  if (PQgetisnull(res, row, col)) {
    *t = NULL;
    *len = 0;
    return;
  }
  *t = PQgetvalue(res, row, col);
  *len = (size_t)PQgetlength(res, row, col);
}

/* 0 for NULL; a value that is not a positive number of seconds (0 or
 * less, written by other SQL) is TG__KEY_TIME_BAD, never "none". */
static int64_t cell_time(const PGresult *res, int row, int col) {
  int64_t v = 0;
  if (PQgetisnull(res, row, col))
    return 0;
  if (tg_db_pg_int64(res, row, col, &v) != 0 || v <= 0)
    return TG__KEY_TIME_BAD;
  return v;
}

typedef struct {
  int listing;
  tg__key_sink_t *sink;
} scan_t;

static int scan_op(tg__keystore_conn_t *c, void *arg) {
  /* One statement is one snapshot. The hash travels as hex text whatever
   * the server's bytea_output. LIMIT: one row past the keyset's bound is
   * enough to refuse, and keeps a runaway table out of memory. */
  static const char sql_list[] =
      "SELECT id, tenant, name, models, NULL, created_at, expires_at,"
      " revoked_at FROM api_keys ORDER BY created_at, id COLLATE \"C\""
      " LIMIT 1048577";
  static const char sql_load[] =
      "SELECT id, tenant, name, models, encode(secret_sha256, 'hex'),"
      " created_at, expires_at, revoked_at FROM api_keys LIMIT 1048577";
  _Static_assert(TG_KEYSET_MAX_KEYS + 1 == 1048577,
                 "the LIMIT must be TG_KEYSET_MAX_KEYS + 1");
  scan_t *a = arg;
  PGresult *res = tg_db_pg_query(c->pg, a->listing ? sql_list : sql_load, 0,
                                 NULL, NULL, NULL, &c->wait);
  int rc, n;

  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    PQclear(res);
    return note(c, "read api_keys");
  }
  n = PQntuples(res);
  rc = a->sink->begin(a->sink, n);
  for (int i = 0; i < n && rc == 0; i++) {
    tg__key_row_t row;
    uint8_t hash[TG_KEY_HASH_LEN];
    const char *hex;
    size_t hexlen;

    memset(&row, 0, sizeof(row));
    cell_text(res, i, 0, &row.id, &row.id_len);
    cell_text(res, i, 1, &row.tenant, &row.tenant_len);
    cell_text(res, i, 2, &row.name, &row.name_len);
    cell_text(res, i, 3, &row.models, &row.models_len);
    cell_text(res, i, 4, &hex, &hexlen);
    if (hex != NULL && unhex_hash(hex, (int)hexlen, hash) == 0) {
      row.hash = hash;
      row.hash_len = sizeof(hash);
    }
    row.created_at = cell_time(res, i, 5);
    row.expires_at = cell_time(res, i, 6);
    row.revoked_at = cell_time(res, i, 7);
    rc = a->sink->row(a->sink, &row);
  }
  PQclear(res);
  return rc;
}

static int pg_scan(tg__keystore_conn_t *c, int listing, tg__key_sink_t *sink) {
  scan_t a = {listing, sink};
  return with_conn(c, scan_op, &a);
}

static int marker_op(tg__keystore_conn_t *c, void *arg) {
  PGresult *res = tg_db_pg_query(c->pg, "SELECT version FROM api_keys_changes",
                                 0, NULL, NULL, NULL, &c->wait);
  int rc = 0;

  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    rc = note(c, "read api_keys_changes");
  } else if (PQntuples(res) != 1 || tg_db_pg_int64(res, 0, 0, arg) != 0) {
    /* Without its row no change would ever show: say so, loudly, rather
     * than watch a marker that never moves. */
    snprintf(c->err, sizeof(c->err),
             "api_keys_changes must hold exactly one row");
    rc = TG_EDB;
  }
  PQclear(res);
  return rc;
}

static int pg_marker(tg__keystore_conn_t *c, int64_t *out) {
  return with_conn(c, marker_op, out);
}

const tg__keystore_backend_t tg__keystore_backend_pg = {
  .name = "postgres",
  .open = pg_open,
  .insert = pg_insert,
  .revoke = pg_revoke,
  .scan = pg_scan,
  .marker = pg_marker,
  .errmsg = pg_errmsg,
  .interrupt = pg_interrupt,
  .close = pg_close,
};
