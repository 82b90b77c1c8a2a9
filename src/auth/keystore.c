/* The key store on SQLite (table api_keys, created by migration 1 in
 * meter/db_sqlite.c) and the watcher that republishes the gateway's keyset.
 *
 * Writers are short transactions on their own connection (the CLI, later the
 * admin API). The watcher owns a second connection on its own thread and asks
 * SQLite every interval whether anyone else committed (`PRAGMA data_version`
 * changes only then, across connections and processes alike), so an idle
 * store costs one tiny query per poll and a change costs one full read into a
 * fresh keyset. Readers never wait for a reload: they keep whatever keyset
 * they hold until they ask for the new one. */
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
#include "meter/db_sqlite.h"

struct tg_keystore_s {
  sqlite3 *db;
};

struct tg_keywatch_s {
  tg_keystore_t *store;     /* used by the watcher thread only, once started */
  unsigned interval_ms;
  int64_t data_version;     /* as of the last successful load */
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

int tg_keystore_open(const char *data_dir, tg_keystore_t **out) {
  tg_keystore_t *ks;
  int rc;

  *out = NULL;
  ks = calloc(1, sizeof(*ks));
  if (ks == NULL)
    return TG_ENOMEM;
  rc = tg_db_sqlite_open(&ks->db, data_dir);
  if (rc != 0) {
    free(ks);
    return rc;
  }
  *out = ks;
  return 0;
}

void tg_keystore_close(tg_keystore_t *ks) {
  if (ks == NULL)
    return;
  sqlite3_close(ks->db);
  free(ks);
}

void tg_keystore_key_free(char *key) {
  if (key == NULL)
    return;
  OPENSSL_cleanse(key, TG_KEY_LEN + 1);
  free(key);
}

static char *dup_text(const unsigned char *s) {
  size_t len = s ? strlen((const char *)s) : 0;
  char *d = malloc(len + 1);
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
  sqlite3_stmt *st = NULL;
  char *copy = NULL;
  int rc, step = SQLITE_ERROR;

  *key_out = NULL;
  rc = validate_spec(spec);
  if (rc != 0)
    return rc;

  {
    char joined[MAX_MODELS_TEXT + 1];
    rc = join_models(spec, joined, sizeof(joined));
    if (rc != 0)
      return rc == TG_ETOOBIG ? TG_EINVAL : rc;

    if (sqlite3_prepare_v2(ks->db,
                           "INSERT INTO api_keys(id, tenant, name, models, "
                           "secret_sha256, created_at, expires_at, revoked_at)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                           -1, &st, NULL) != SQLITE_OK) {
      rc = TG_EDB;
      goto out;
    }
    /* Ids are 48 random bits: a clash is rare but possible in a big store,
     * and the primary key turns it into a retry rather than a lost key. */
    for (int attempt = 0; attempt < 4; attempt++) {
      rc = tg_key_generate(key, id, hash);
      if (rc != 0)
        goto out;
      sqlite3_reset(st);
      sqlite3_clear_bindings(st);
      sqlite3_bind_text(st, 1, id, TG_KEY_ID_LEN, SQLITE_TRANSIENT);
      sqlite3_bind_text(st, 2, spec->tenant, -1, SQLITE_TRANSIENT);
      if (spec->name != NULL && spec->name[0] != '\0')
        sqlite3_bind_text(st, 3, spec->name, -1, SQLITE_TRANSIENT);
      else
        sqlite3_bind_null(st, 3);
      sqlite3_bind_text(st, 4, joined, -1, SQLITE_TRANSIENT);
      sqlite3_bind_blob(st, 5, hash, TG_KEY_HASH_LEN, SQLITE_TRANSIENT);
      sqlite3_bind_int64(st, 6, now);
      if (spec->expires_at != 0)
        sqlite3_bind_int64(st, 7, spec->expires_at);
      else
        sqlite3_bind_null(st, 7);
      step = sqlite3_step(st);
      if (step != SQLITE_CONSTRAINT_PRIMARYKEY)
        break;
    }
  }
  if (step != SQLITE_DONE) {
    fprintf(stderr, "tollgate: keys: cannot store the key: %s\n",
            sqlite3_errmsg(ks->db));
    rc = TG_EDB;
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
  sqlite3_finalize(st);
  OPENSSL_cleanse(key, sizeof(key));
  return rc;
}

static int64_t col_time(sqlite3_stmt *st, int col) {
  if (sqlite3_column_type(st, col) == SQLITE_NULL)
    return 0;
  return (int64_t)sqlite3_column_int64(st, col);
}

/* Reads the id column; 0 when it is a well-formed id. */
static int col_id(sqlite3_stmt *st, int col, char id[TG_KEY_ID_LEN + 1],
                  uint64_t *num) {
  const unsigned char *t = sqlite3_column_text(st, col);
  if (t == NULL || sqlite3_column_bytes(st, col) != TG_KEY_ID_LEN ||
      tg_key_id_parse((const char *)t, TG_KEY_ID_LEN, num) != 0)
    return TG_EPARSE;
  memcpy(id, t, TG_KEY_ID_LEN);
  id[TG_KEY_ID_LEN] = '\0';
  return 0;
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

int tg_keystore_list(tg_keystore_t *ks, tg_key_info_t **out, size_t *n) {
  sqlite3_stmt *st = NULL;
  tg_key_info_t *arr = NULL;
  size_t cnt = 0, cap = 0;
  int rc = TG_EDB, step;

  *out = NULL;
  *n = 0;
  if (sqlite3_prepare_v2(ks->db,
                         "SELECT id, tenant, name, models, created_at, "
                         "expires_at, revoked_at FROM api_keys "
                         "ORDER BY created_at, id",
                         -1, &st, NULL) != SQLITE_OK)
    goto out;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    tg_key_info_t *e;
    const unsigned char *id = sqlite3_column_text(st, 0);
    if (cnt == cap) {
      size_t ncap = cap ? cap * 2 : 16;
      tg_key_info_t *na;
      if (cap >= TG_KEYSET_MAX_KEYS) {
        rc = TG_ETOOBIG;
        goto out;
      }
      if (ncap > TG_KEYSET_MAX_KEYS)
        ncap = TG_KEYSET_MAX_KEYS;
      na = realloc(arr, ncap * sizeof(*arr));
      if (na == NULL) {
        rc = TG_ENOMEM;
        goto out;
      }
      arr = na;
      cap = ncap;
    }
    e = &arr[cnt];
    memset(e, 0, sizeof(*e));
    cnt++;
    /* An id of another length was not written by us; show what fits. */
    snprintf(e->id, sizeof(e->id), "%s", id ? (const char *)id : "");
    e->tenant = dup_text(sqlite3_column_text(st, 1));
    e->name = dup_text(sqlite3_column_text(st, 2));
    e->models = dup_text(sqlite3_column_text(st, 3));
    if (e->tenant == NULL || e->name == NULL || e->models == NULL) {
      rc = TG_ENOMEM;
      goto out;
    }
    e->created_at = col_time(st, 4);
    e->expires_at = col_time(st, 5);
    e->revoked_at = col_time(st, 6);
  }
  if (step != SQLITE_DONE)
    goto out;
  rc = 0;
out:
  sqlite3_finalize(st);
  if (rc != 0) {
    tg_keystore_list_free(arr, cnt);
    return rc;
  }
  *out = arr;
  *n = cnt;
  return 0;
}

int tg_keystore_revoke(tg_keystore_t *ks, const char *id, int64_t now) {
  sqlite3_stmt *st = NULL;
  int rc = TG_EDB;

  if (id == NULL)
    return TG_ENOTFOUND;
  /* COALESCE keeps the first revocation time: revoking twice is harmless
   * and the audit trail keeps the moment access really ended. */
  if (sqlite3_prepare_v2(ks->db,
                         "UPDATE api_keys SET revoked_at = "
                         "COALESCE(revoked_at, ?) WHERE id = ?",
                         -1, &st, NULL) != SQLITE_OK)
    goto out;
  sqlite3_bind_int64(st, 1, now);
  sqlite3_bind_text(st, 2, id, -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st) != SQLITE_DONE)
    goto out;
  rc = sqlite3_changes(ks->db) > 0 ? 0 : TG_ENOTFOUND;
out:
  sqlite3_finalize(st);
  return rc;
}

/* Turns the current row into a record; TG_EPARSE when the row is unusable,
 * TG_ENOMEM when memory ran out. */
static int row_to_rec(sqlite3_stmt *st, tg_key_rec_t *rec) {
  const unsigned char *models;
  int rc;

  memset(rec, 0, sizeof(*rec));
  if (col_id(st, 0, rec->id, &rec->id_num) != 0)
    return TG_EPARSE;
  if (sqlite3_column_bytes(st, 4) != TG_KEY_HASH_LEN ||
      sqlite3_column_type(st, 4) != SQLITE_BLOB)
    return TG_EPARSE;
  memcpy(rec->secret_sha256, sqlite3_column_blob(st, 4), TG_KEY_HASH_LEN);
  if (sqlite3_column_bytes(st, 1) > TG_KEY_MAX_FIELD ||
      sqlite3_column_bytes(st, 2) > TG_KEY_MAX_FIELD ||
      sqlite3_column_bytes(st, 3) > MAX_MODELS_TEXT)
    return TG_EPARSE;
  rec->created_at = col_time(st, 5);
  rec->expires_at = col_time(st, 6);
  rec->revoked_at = col_time(st, 7);
  models = sqlite3_column_text(st, 3);
  rc = tg__key_models_split(models ? (const char *)models : "", &rec->models,
                            &rec->n_models);
  if (rc != 0)
    return rc == TG_ENOMEM ? rc : TG_EPARSE;
  rec->tenant = dup_text(sqlite3_column_text(st, 1));
  rec->name = dup_text(sqlite3_column_text(st, 2));
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

int tg_keystore_load(tg_keystore_t *ks, tg_keyset_t **out, size_t *skipped) {
  sqlite3_stmt *st = NULL;
  tg_keyset_t *set = NULL;
  sqlite3_int64 count;
  size_t bad = 0;
  int rc = TG_EDB, step;

  *out = NULL;
  /* One read transaction: the count and the rows come from one snapshot. */
  if (sqlite3_exec(ks->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK)
    return TG_EDB;
  if (sqlite3_prepare_v2(ks->db, "SELECT COUNT(*) FROM api_keys", -1, &st,
                         NULL) != SQLITE_OK ||
      sqlite3_step(st) != SQLITE_ROW)
    goto out;
  count = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  st = NULL;
  if (count < 0 || (uint64_t)count > TG_KEYSET_MAX_KEYS) {
    rc = TG_ETOOBIG;
    goto out;
  }
  rc = tg__keyset_new((size_t)count, &set);
  if (rc != 0)
    goto out;
  rc = TG_EDB;
  if (sqlite3_prepare_v2(ks->db,
                         "SELECT id, tenant, name, models, secret_sha256, "
                         "created_at, expires_at, revoked_at FROM api_keys",
                         -1, &st, NULL) != SQLITE_OK)
    goto out;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    tg_key_rec_t rec;
    int r = row_to_rec(st, &rec);
    if (r == TG_ENOMEM) {
      rc = r;
      goto out;
    }
    if (r == 0)
      r = tg__keyset_add(set, &rec);
    if (r != 0)
      bad++;
  }
  if (step != SQLITE_DONE)
    goto out;
  rc = 0;
out:
  sqlite3_finalize(st);
  sqlite3_exec(ks->db, "COMMIT", NULL, NULL, NULL);
  if (rc != 0) {
    tg_keyset_release(set);
    return rc;
  }
  if (skipped != NULL)
    *skipped = bad;
  *out = set;
  return 0;
}

/* ---- watcher ---- */

static int read_data_version(sqlite3 *db, int64_t *out) {
  sqlite3_stmt *st = NULL;
  int rc = TG_EDB;
  if (sqlite3_prepare_v2(db, "PRAGMA data_version", -1, &st, NULL) ==
          SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW) {
    *out = (int64_t)sqlite3_column_int64(st, 0);
    rc = 0;
  }
  sqlite3_finalize(st);
  return rc;
}

/* Loads a new keyset and publishes it. The version is read before the load:
 * a commit that lands during the load changes it again, so the next poll
 * loads once more instead of missing that commit. */
static int watch_reload(tg_keywatch_t *w, int64_t version) {
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
  w->data_version = version;
  return 0;
}

static void watch_poll(tg_keywatch_t *w) {
  int64_t v;
  int rc = read_data_version(w->store->db, &v);
  if (rc == 0 && v == w->data_version && !w->failing)
    return;
  if (rc == 0)
    rc = watch_reload(w, v);
  if (rc != 0 && !w->failing) {
    fprintf(stderr, "tollgate: keys: reload failed (%s: %s); keeping the "
            "previous keys\n", tg_strerror(rc), sqlite3_errmsg(w->store->db));
    w->failing = 1;
  } else if (rc == 0 && w->failing) {
    fprintf(stderr, "tollgate: keys: reload works again\n");
    w->failing = 0;
  }
}

static void *watch_main(void *arg) {
  tg_keywatch_t *w = arg;
  struct timespec deadline;

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

int tg_keywatch_start(const char *data_dir, unsigned interval_ms,
                      tg_keywatch_t **out) {
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

  rc = tg_keystore_open(data_dir, &w->store);
  if (rc != 0)
    goto out;
  rc = read_data_version(w->store->db, &v);
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
  pthread_join(w->thread, NULL);
  watch_free(w);
}
