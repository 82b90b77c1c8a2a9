/* The key store (whatever its database), its SQLite backend (table
 * api_keys, created by migration 1 in meter/db_sqlite.c) and the watcher
 * that republishes the gateway's keyset.
 *
 * What does not depend on the database lives here once for both backends:
 * checking a spec, making the key, retrying an id clash, turning rows into
 * keysets and listings (so a malformed row is skipped the same way
 * whichever database holds it), and the watcher. A backend (the SQLite one
 * below, keystore_pg.c) only stores and reads rows and says when the table
 * changed.
 *
 * Writers are short transactions on their own connection (the CLI, later
 * the admin API). The watcher owns a second connection on its own thread and
 * asks the backend every interval for its change marker (in both databases
 * a counter row that triggers bump on every write to api_keys, whoever
 * writes), so a store whose keys do not change costs one tiny query per
 * poll, however busy the ledger in the same database, and a change costs one
 * full read into a fresh keyset. Readers never wait for a reload: they keep whatever
 * keyset they hold until they ask for the new one. */
#include "auth/keystore.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <sqlite3.h>

#include "core/err.h"
#include "core/thread.h"
#include "meter/db_pg.h"
#include "meter/db_sqlite.h"

struct tg_keystore_s {
  const tg__keystore_backend_t *be;
  tg__keystore_conn_t *c;
};

struct tg_keywatch_s {
  tg_keystore_t *store;     /* used by the watcher thread only, once started */
  unsigned interval_ms;
  int64_t marker;           /* the backend's change marker at the last load */
  int failing;              /* a reload failed and was reported */

  pthread_t thread;
  pthread_mutex_t mu;       /* guards current and stopping */
  pthread_cond_t cond;      /* signalled by stop */
  int stopping;
  tg_keyset_t *current;     /* the watcher's reference */
  _Atomic uint64_t gen;
};

/* Bounds of one text field read back from the database; a row beyond them
 * was not written by us and is skipped. */
#define MAX_MODELS_TEXT (TG_KEY_MAX_MODELS * (TG_KEY_MAX_FIELD + 1))

int tg_keystore_open_db(const char *database, const char *data_dir,
                        tg_keystore_t **out) {
  const tg__keystore_backend_t *be;
  tg_keystore_t *ks;
  int rc;

  *out = NULL;
  if (database == NULL || database[0] == '\0' ||
      strcmp(database, "sqlite") == 0)
    be = &tg__keystore_backend_sqlite;
  else if (tg_db_pg_is_url(database))
    be = &tg__keystore_backend_pg;
  else
    return TG_EINVAL;
  ks = calloc(1, sizeof(*ks));
  if (ks == NULL)
    return TG_ENOMEM;
  ks->be = be;
  rc = be->open(database, data_dir, &ks->c);
  if (rc != 0) {
    free(ks);
    return rc;
  }
  *out = ks;
  return 0;
}

int tg_keystore_open(const char *data_dir, tg_keystore_t **out) {
  return tg_keystore_open_db(NULL, data_dir, out);
}

void tg_keystore_close(tg_keystore_t *ks) {
  if (ks == NULL)
    return;
  ks->be->close(ks->c);
  free(ks);
}

void tg_keystore_key_free(char *key) {
  if (key == NULL)
    return;
  OPENSSL_cleanse(key, TG_KEY_LEN + 1);
  free(key);
}

/* A NUL-terminated copy of s[0..len) ("" for NULL). */
static char *dup_n(const char *s, size_t len) {
  char *d;
  if (s == NULL)
    len = 0;
  d = malloc(len + 1);
  if (d != NULL) {
    if (len)
      memcpy(d, s, len);
    d[len] = '\0';
  }
  return d;
}

/* Joins the spec's models into "a,b" in buf; rejects names a comma list
 * cannot carry. */
static int join_models(const tg_key_spec_t *spec, char *buf, size_t size) {
  size_t off = 0;
  if (spec->n_models > TG_KEY_MAX_MODELS)
    return TG_EINVAL;
  buf[0] = '\0';
  for (size_t i = 0; i < spec->n_models; i++) {
    const char *m = spec->models[i];
    size_t len = m ? strlen(m) : 0;
    if (len == 0 || len > TG_KEY_MAX_FIELD || strchr(m, ',') != NULL)
      return TG_EINVAL;
    if (off + len + 2 > size)
      return TG_ETOOBIG;
    if (i > 0)
      buf[off++] = ',';
    memcpy(buf + off, m, len);
    off += len;
    buf[off] = '\0';
  }
  return 0;
}

static int validate_spec(const tg_key_spec_t *spec) {
  if (spec == NULL || spec->tenant == NULL || spec->tenant[0] == '\0' ||
      strlen(spec->tenant) > TG_KEY_MAX_FIELD)
    return TG_EINVAL;
  if (spec->name != NULL && strlen(spec->name) > TG_KEY_MAX_FIELD)
    return TG_EINVAL;
  if (spec->expires_at < 0)
    return TG_EINVAL;
  return 0;
}

int tg_keystore_create(tg_keystore_t *ks, const tg_key_spec_t *spec,
                       int64_t now, char **key_out,
                       char id_out[TG_KEY_ID_LEN + 1]) {
  char key[TG_KEY_LEN + 1];
  char id[TG_KEY_ID_LEN + 1];
  uint8_t hash[TG_KEY_HASH_LEN];
  char joined[MAX_MODELS_TEXT + 1];
  char *copy = NULL;
  int rc;

  *key_out = NULL;
  rc = validate_spec(spec);
  if (rc != 0)
    return rc;
  rc = join_models(spec, joined, sizeof(joined));
  if (rc != 0)
    return rc == TG_ETOOBIG ? TG_EINVAL : rc;

  /* Ids are 48 random bits: a clash is rare but possible in a big store,
   * and the primary key turns it into a retry rather than a lost key. */
  for (int attempt = 0; attempt < 4; attempt++) {
    tg__key_row_t row = {
      .id = id, .id_len = TG_KEY_ID_LEN,
      .tenant = spec->tenant, .tenant_len = strlen(spec->tenant),
      .models = joined, .models_len = strlen(joined),
      .hash = hash, .hash_len = TG_KEY_HASH_LEN,
      .created_at = now, .expires_at = spec->expires_at,
    };
    rc = tg_key_generate(key, id, hash);
    if (rc != 0)
      goto out;
    if (spec->name != NULL && spec->name[0] != '\0') {
      row.name = spec->name;
      row.name_len = strlen(spec->name);
    }
    rc = ks->be->insert(ks->c, &row);
    if (rc != TG_EEXISTS)
      break;
  }
  if (rc != 0) {
    fprintf(stderr, "tollgate: keys: cannot store the key: %s\n",
            ks->be->errmsg(ks->c));
    rc = rc == TG_ENOMEM ? rc : TG_EDB;
    goto out;
  }
  copy = malloc(TG_KEY_LEN + 1);
  if (copy == NULL) {
    /* The row exists but nobody will ever see its key: revoke it rather
     * than leave an orphan that counts as active. */
    tg_keystore_revoke(ks, id, now);
    rc = TG_ENOMEM;
    goto out;
  }
  memcpy(copy, key, TG_KEY_LEN + 1);
  memcpy(id_out, id, TG_KEY_ID_LEN + 1);
  *key_out = copy;
  rc = 0;
out:
  OPENSSL_cleanse(key, sizeof(key));
  return rc;
}

void tg_keystore_list_free(tg_key_info_t *list, size_t n) {
  if (list == NULL)
    return;
  for (size_t i = 0; i < n; i++) {
    free(list[i].tenant);
    free(list[i].name);
    free(list[i].models);
  }
  free(list);
}

/* ---- listing: rows into tg_key_info_t ---- */

typedef struct {
  tg__key_sink_t sink;   /* first: the backend calls back with &sink */
  tg_key_info_t *arr;
  size_t cnt, cap;
} list_sink_t;

static int list_begin(tg__key_sink_t *s, int64_t count) {
  (void)s;
  return count < 0 || (uint64_t)count > TG_KEYSET_MAX_KEYS ? TG_ETOOBIG : 0;
}

static int list_row(tg__key_sink_t *s, const tg__key_row_t *r) {
  list_sink_t *l = (list_sink_t *)s;
  tg_key_info_t *e;
  size_t idl = r->id ? r->id_len : 0;

  if (l->cnt == l->cap) {
    size_t ncap = l->cap ? l->cap * 2 : 16;
    tg_key_info_t *na;
    if (l->cap >= TG_KEYSET_MAX_KEYS)
      return TG_ETOOBIG;
    if (ncap > TG_KEYSET_MAX_KEYS)
      ncap = TG_KEYSET_MAX_KEYS;
    na = realloc(l->arr, ncap * sizeof(*na));
    if (na == NULL)
      return TG_ENOMEM;
    l->arr = na;
    l->cap = ncap;
  }
  e = &l->arr[l->cnt];
  memset(e, 0, sizeof(*e));
  l->cnt++;
  /* An id of another length was not written by us; show what fits. */
  if (idl > TG_KEY_ID_LEN)
    idl = TG_KEY_ID_LEN;
  if (idl > 0)
    memcpy(e->id, r->id, idl);
  e->id[idl] = '\0';
  e->tenant = dup_n(r->tenant, r->tenant_len);
  e->name = dup_n(r->name, r->name_len);
  e->models = dup_n(r->models, r->models_len);
  if (e->tenant == NULL || e->name == NULL || e->models == NULL)
    return TG_ENOMEM;
  e->created_at = r->created_at;
  e->expires_at = r->expires_at;
  e->revoked_at = r->revoked_at;
  return 0;
}

int tg_keystore_list(tg_keystore_t *ks, tg_key_info_t **out, size_t *n) {
  list_sink_t l = {.sink = {list_begin, list_row}};
  int rc;

  *out = NULL;
  *n = 0;
  rc = ks->be->scan(ks->c, 1, &l.sink);
  if (rc != 0) {
    tg_keystore_list_free(l.arr, l.cnt);
    return rc;
  }
  *out = l.arr;
  *n = l.cnt;
  return 0;
}

int tg_keystore_revoke(tg_keystore_t *ks, const char *id, int64_t now) {
  if (id == NULL)
    return TG_ENOTFOUND;
  return ks->be->revoke(ks->c, id, now);
}

/* ---- loading: rows into a keyset ---- */

/* 1 when a text of the row holds a NUL byte: read as a C string it would
 * end there ("acme\0x" as tenant acme, "\0m" as a scope of every model). */
static int has_nul(const char *s, size_t len) {
  return s != NULL && memchr(s, '\0', len) != NULL;
}

/* Turns a row into a record; TG_EPARSE when the row is unusable (a text
 * with a NUL byte, a revocation or expiry time that is not one), TG_ENOMEM
 * when memory ran out. */
static int row_to_rec(const tg__key_row_t *r, tg_key_rec_t *rec) {
  char models[MAX_MODELS_TEXT + 1];
  int rc;

  memset(rec, 0, sizeof(*rec));
  if (has_nul(r->tenant, r->tenant_len) || has_nul(r->name, r->name_len) ||
      has_nul(r->models, r->models_len) || r->expires_at < 0 ||
      r->revoked_at < 0)
    return TG_EPARSE;
  if (r->id == NULL || r->id_len != TG_KEY_ID_LEN ||
      tg_key_id_parse(r->id, TG_KEY_ID_LEN, &rec->id_num) != 0)
    return TG_EPARSE;
  memcpy(rec->id, r->id, TG_KEY_ID_LEN);
  rec->id[TG_KEY_ID_LEN] = '\0';
  if (r->hash == NULL || r->hash_len != TG_KEY_HASH_LEN)
    return TG_EPARSE;
  memcpy(rec->secret_sha256, r->hash, TG_KEY_HASH_LEN);
  if (r->tenant_len > TG_KEY_MAX_FIELD || r->name_len > TG_KEY_MAX_FIELD ||
      r->models_len > MAX_MODELS_TEXT)
    return TG_EPARSE;
  rec->created_at = r->created_at;
  rec->expires_at = r->expires_at;
  rec->revoked_at = r->revoked_at;
  if (r->models != NULL && r->models_len > 0)
    memcpy(models, r->models, r->models_len);
  models[r->models ? r->models_len : 0] = '\0';
  rc = tg__key_models_split(models, &rec->models, &rec->n_models);
  if (rc != 0)
    return rc == TG_ENOMEM ? rc : TG_EPARSE;
  rec->tenant = dup_n(r->tenant, r->tenant_len);
  rec->name = dup_n(r->name, r->name_len);
  if (rec->tenant == NULL || rec->name == NULL) {
    tg__key_rec_clear(rec);
    return TG_ENOMEM;
  }
  if (rec->tenant[0] == '\0') {
    tg__key_rec_clear(rec);
    return TG_EPARSE;
  }
  return 0;
}

typedef struct {
  tg__key_sink_t sink;   /* first: the backend calls back with &sink */
  tg_keyset_t *set;
  size_t bad;
} load_sink_t;

static int load_begin(tg__key_sink_t *s, int64_t count) {
  load_sink_t *l = (load_sink_t *)s;
  if (count < 0 || (uint64_t)count > TG_KEYSET_MAX_KEYS)
    return TG_ETOOBIG;
  return tg__keyset_new((size_t)count, &l->set);
}

static int load_row(tg__key_sink_t *s, const tg__key_row_t *r) {
  load_sink_t *l = (load_sink_t *)s;
  tg_key_rec_t rec;
  int rc;

  if (l->set == NULL)
    return TG_EINVAL;   /* a backend that skipped begin() */
  rc = row_to_rec(r, &rec);
  if (rc == TG_ENOMEM)
    return rc;
  if (rc == 0)
    rc = tg__keyset_add(l->set, &rec);
  if (rc != 0)
    l->bad++;
  return 0;
}

int tg_keystore_load(tg_keystore_t *ks, tg_keyset_t **out, size_t *skipped) {
  load_sink_t l = {.sink = {load_begin, load_row}};
  int rc;

  *out = NULL;
  rc = ks->be->scan(ks->c, 0, &l.sink);
  if (rc == 0 && l.set == NULL)
    rc = TG_EDB;
  if (rc != 0) {
    tg_keyset_release(l.set);
    return rc;
  }
  if (skipped != NULL)
    *skipped = l.bad;
  *out = l.set;
  return 0;
}

/* ---- the SQLite backend ---- */

struct tg__keystore_conn_s {
  sqlite3 *db;
};

static int sq_open(const char *database, const char *data_dir,
                   tg__keystore_conn_t **out) {
  tg__keystore_conn_t *c;
  int rc;

  (void)database;
  *out = NULL;
  c = calloc(1, sizeof(*c));
  if (c == NULL)
    return TG_ENOMEM;
  rc = tg_db_sqlite_open(&c->db, data_dir);
  if (rc != 0) {
    free(c);
    return rc;
  }
  *out = c;
  return 0;
}

static void sq_close(tg__keystore_conn_t *c) {
  if (c == NULL)
    return;
  sqlite3_close(c->db);
  free(c);
}

static const char *sq_errmsg(tg__keystore_conn_t *c) {
  return sqlite3_errmsg(c->db);
}

static int sq_insert(tg__keystore_conn_t *c, const tg__key_row_t *r) {
  sqlite3_stmt *st = NULL;
  int step;

  if (sqlite3_prepare_v2(c->db,
                         "INSERT INTO api_keys(id, tenant, name, models, "
                         "secret_sha256, created_at, expires_at, revoked_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                         -1, &st, NULL) != SQLITE_OK)
    return TG_EDB;
  sqlite3_bind_text(st, 1, r->id, (int)r->id_len, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, r->tenant, (int)r->tenant_len, SQLITE_STATIC);
  if (r->name != NULL)
    sqlite3_bind_text(st, 3, r->name, (int)r->name_len, SQLITE_STATIC);
  else
    sqlite3_bind_null(st, 3);
  sqlite3_bind_text(st, 4, r->models ? r->models : "", (int)r->models_len,
                    SQLITE_STATIC);
  sqlite3_bind_blob(st, 5, r->hash, (int)r->hash_len, SQLITE_STATIC);
  sqlite3_bind_int64(st, 6, r->created_at);
  if (r->expires_at != 0)
    sqlite3_bind_int64(st, 7, r->expires_at);
  else
    sqlite3_bind_null(st, 7);
  step = sqlite3_step(st);
  sqlite3_finalize(st);
  if (step == SQLITE_CONSTRAINT_PRIMARYKEY)
    return TG_EEXISTS;
  return step == SQLITE_DONE ? 0 : TG_EDB;
}

static int sq_revoke(tg__keystore_conn_t *c, const char *id, int64_t now) {
  sqlite3_stmt *st = NULL;
  int rc = TG_EDB;

  /* COALESCE keeps the first revocation time: revoking twice is harmless
   * and the audit trail keeps the moment access really ended. */
  if (sqlite3_prepare_v2(c->db,
                         "UPDATE api_keys SET revoked_at = "
                         "COALESCE(revoked_at, ?) WHERE id = ?",
                         -1, &st, NULL) != SQLITE_OK)
    goto out;
  sqlite3_bind_int64(st, 1, now);
  sqlite3_bind_text(st, 2, id, -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st) != SQLITE_DONE)
    goto out;
  rc = sqlite3_changes(c->db) > 0 ? 0 : TG_ENOTFOUND;
out:
  sqlite3_finalize(st);
  return rc;
}

/* An INTEGER column holds what SQL put there: a text or a fraction that
 * does not convert stays as written, and sqlite3_column_int64() would read
 * 'yes' or 0.5 as 0, "none". */
static int64_t col_time(sqlite3_stmt *st, int col) {
  int64_t v;
  switch (sqlite3_column_type(st, col)) {
  case SQLITE_NULL:
    return 0;
  case SQLITE_INTEGER:
    v = (int64_t)sqlite3_column_int64(st, col);
    return v > 0 ? v : TG__KEY_TIME_BAD;
  default:
    return TG__KEY_TIME_BAD;
  }
}

/* Points t/len at a text column (NULL for SQL NULL). */
static void col_text(sqlite3_stmt *st, int col, const char **t, size_t *len) {
  *t = (const char *)sqlite3_column_text(st, col);
  *len = *t ? (size_t)sqlite3_column_bytes(st, col) : 0;
}

static int sq_scan(tg__keystore_conn_t *c, int listing, tg__key_sink_t *sink) {
  sqlite3_stmt *st = NULL;
  sqlite3_int64 count;
  int rc = TG_EDB, step;

  /* One read transaction: the count and the rows come from one snapshot. */
  if (sqlite3_exec(c->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
    return TG_EDB;
  if (sqlite3_prepare_v2(c->db, "SELECT COUNT(*) FROM api_keys", -1, &st,
                         NULL) != SQLITE_OK ||
      sqlite3_step(st) != SQLITE_ROW)
    goto out;
  count = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  st = NULL;
  rc = sink->begin(sink, (int64_t)count);
  if (rc != 0)
    goto out;
  rc = TG_EDB;
  if (sqlite3_prepare_v2(c->db,
                         listing
                             ? "SELECT id, tenant, name, models, NULL, "
                               "created_at, expires_at, revoked_at FROM "
                               "api_keys ORDER BY created_at, id"
                             : "SELECT id, tenant, name, models, "
                               "secret_sha256, created_at, expires_at, "
                               "revoked_at FROM api_keys",
                         -1, &st, NULL) != SQLITE_OK)
    goto out;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    tg__key_row_t row;
    int r;
    memset(&row, 0, sizeof(row));
    col_text(st, 0, &row.id, &row.id_len);
    col_text(st, 1, &row.tenant, &row.tenant_len);
    col_text(st, 2, &row.name, &row.name_len);
    col_text(st, 3, &row.models, &row.models_len);
    if (sqlite3_column_type(st, 4) == SQLITE_BLOB) {
      row.hash = sqlite3_column_blob(st, 4);
      row.hash_len = (size_t)sqlite3_column_bytes(st, 4);
    }
    row.created_at = col_time(st, 5);
    row.expires_at = col_time(st, 6);
    row.revoked_at = col_time(st, 7);
    r = sink->row(sink, &row);
    if (r != 0) {
      rc = r;
      goto out;
    }
  }
  if (step != SQLITE_DONE)
    goto out;
  rc = 0;
out:
  sqlite3_finalize(st);
  sqlite3_exec(c->db, "COMMIT", NULL, NULL, NULL);
  return rc;
}

/* api_keys_changes.version, which triggers bump on every write to api_keys
 * (migration 6). Not PRAGMA data_version: that moves on every commit to the
 * file, the ledger's and the budgets' too, so under traffic every poll
 * reloaded every key. A missing or second row is an error, as in
 * PostgreSQL: a marker that never moves would hide every change. */
static int sq_marker(tg__keystore_conn_t *c, int64_t *out) {
  sqlite3_stmt *st = NULL;
  int rc = TG_EDB;
  if (sqlite3_prepare_v2(c->db, "SELECT version FROM api_keys_changes", -1,
                         &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW) {
    *out = (int64_t)sqlite3_column_int64(st, 0);
    if (sqlite3_step(st) == SQLITE_DONE)
      rc = 0;
  }
  sqlite3_finalize(st);
  return rc;
}

const tg__keystore_backend_t tg__keystore_backend_sqlite = {
  .name = "sqlite",
  .open = sq_open,
  .insert = sq_insert,
  .revoke = sq_revoke,
  .scan = sq_scan,
  .marker = sq_marker,
  .errmsg = sq_errmsg,
  .close = sq_close,
};

/* ---- watcher ---- */

/* Loads a new keyset and publishes it. The marker is read before the load:
 * a commit that lands during the load changes it again, so the next poll
 * loads once more instead of missing that commit. */
static int watch_reload(tg_keywatch_t *w, int64_t marker) {
  tg_keyset_t *set = NULL, *old;
  size_t skipped = 0;
  int rc;

  rc = tg_keystore_load(w->store, &set, &skipped);
  if (rc != 0)
    return rc;
  if (skipped > 0)
    fprintf(stderr, "tollgate: keys: %zu unusable rows in api_keys ignored\n",
            skipped);
  pthread_mutex_lock(&w->mu);
  old = w->current;
  w->current = set;
  atomic_fetch_add_explicit(&w->gen, 1, memory_order_release);
  pthread_mutex_unlock(&w->mu);
  tg_keyset_release(old);
  w->marker = marker;
  return 0;
}

static void watch_poll(tg_keywatch_t *w) {
  tg_keystore_t *ks = w->store;
  int64_t v;
  int rc = ks->be->marker(ks->c, &v);
  if (rc == 0 && v == w->marker && !w->failing)
    return;
  if (rc == 0)
    rc = watch_reload(w, v);
  if (rc != 0) {
    int stopping;
    pthread_mutex_lock(&w->mu);
    stopping = w->stopping;
    pthread_mutex_unlock(&w->mu);
    if (stopping)
      return;   /* cut short by the stop: nothing to report */
  }
  if (rc != 0 && !w->failing) {
    fprintf(stderr, "tollgate: keys: reload failed (%s: %s); keeping the "
            "previous keys\n", tg_strerror(rc), ks->be->errmsg(ks->c));
    w->failing = 1;
  } else if (rc == 0 && w->failing) {
    fprintf(stderr, "tollgate: keys: reload works again\n");
    w->failing = 0;
  }
}

static void *watch_main(void *arg) {
  tg_keywatch_t *w = arg;
  struct timespec deadline;

  tg_thread_name("tg-keywatch");
  pthread_mutex_lock(&w->mu);
  while (!w->stopping) {
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += w->interval_ms / 1000;
    deadline.tv_nsec += (long)(w->interval_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
      deadline.tv_sec++;
      deadline.tv_nsec -= 1000000000L;
    }
    while (!w->stopping &&
           pthread_cond_timedwait(&w->cond, &w->mu, &deadline) != ETIMEDOUT)
      ;
    if (w->stopping)
      break;
    pthread_mutex_unlock(&w->mu);
    watch_poll(w);
    pthread_mutex_lock(&w->mu);
  }
  pthread_mutex_unlock(&w->mu);
  return NULL;
}

static void watch_free(tg_keywatch_t *w) {
  tg_keyset_release(w->current);
  tg_keystore_close(w->store);
  pthread_cond_destroy(&w->cond);
  pthread_mutex_destroy(&w->mu);
  free(w);
}

int tg_keywatch_start_db(const char *database, const char *data_dir,
                         unsigned interval_ms, tg_keywatch_t **out) {
  tg_keywatch_t *w;
  pthread_condattr_t ca;
  int64_t v;
  int rc;

  *out = NULL;
  if (interval_ms < 1 || interval_ms > 60000)
    return TG_EINVAL;
  w = calloc(1, sizeof(*w));
  if (w == NULL)
    return TG_ENOMEM;
  w->interval_ms = interval_ms;
  atomic_init(&w->gen, 0);
  pthread_mutex_init(&w->mu, NULL);
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&w->cond, &ca);
  pthread_condattr_destroy(&ca);

  rc = tg_keystore_open_db(database, data_dir, &w->store);
  if (rc != 0)
    goto out;
  rc = w->store->be->marker(w->store->c, &v);
  if (rc != 0)
    goto out;
  rc = watch_reload(w, v);
  if (rc != 0)
    goto out;
  if (pthread_create(&w->thread, NULL, watch_main, w) != 0)
    rc = TG_EUNAVAIL;
out:
  if (rc != 0) {
    watch_free(w);
    return rc;
  }
  *out = w;
  return 0;
}

int tg_keywatch_start(const char *data_dir, unsigned interval_ms,
                      tg_keywatch_t **out) {
  return tg_keywatch_start_db(NULL, data_dir, interval_ms, out);
}

uint64_t tg_keywatch_generation(const tg_keywatch_t *w) {
  return atomic_load_explicit(&w->gen, memory_order_acquire);
}

tg_keyset_t *tg_keywatch_acquire(tg_keywatch_t *w) {
  tg_keyset_t *set;
  pthread_mutex_lock(&w->mu);
  set = tg_keyset_ref(w->current);
  pthread_mutex_unlock(&w->mu);
  return set;
}

void tg_keywatch_stop(tg_keywatch_t *w) {
  if (w == NULL)
    return;
  pthread_mutex_lock(&w->mu);
  w->stopping = 1;
  pthread_cond_signal(&w->cond);
  pthread_mutex_unlock(&w->mu);
  /* A poll may be waiting for a database that does not answer (a connect
   * up to its timeout, a query for ever): end that wait now. */
  if (w->store->be->interrupt != NULL)
    w->store->be->interrupt(w->store->c);
  pthread_join(w->thread, NULL);
  watch_free(w);
}
