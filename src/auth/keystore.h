/* The key store: where virtual keys live at rest, and the watcher that keeps
 * a running gateway's in-memory keyset (key.h) in step with it.
 *
 * The interface names no database: the `database` setting chooses the
 * backend, SQLite in <data_dir>/tollgate.db (keystore.c) by default or a
 * shared PostgreSQL database (keystore_pg.c) for a gateway run as several
 * replicas, behind the same calls. Writers (the `tollgate keys` CLI, the admin API) use a
 * tg_keystore_t; the gateway only reads, through a tg_keywatch_t that polls
 * the store from its own thread and publishes a new immutable keyset when the
 * store changed, so a key created or revoked anywhere is honoured by every
 * worker within one poll interval. */
#ifndef TG_AUTH_KEYSTORE_H
#define TG_AUTH_KEYSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "auth/key.h"

typedef struct tg_keystore_s tg_keystore_t;
typedef struct tg_keywatch_s tg_keywatch_t;

/* What to create. models/n_models: the key's model scope (n_models == 0: all
 * the tenant may use); the caller checks them against the tenant's
 * models_allowed. name may be NULL. expires_at: unix seconds, 0 = never. */
typedef struct {
  const char *tenant;
  const char *name;
  const char *const *models;
  size_t n_models;
  int64_t expires_at;
} tg_key_spec_t;

/* One key as listed: never its secret nor its hash. */
typedef struct {
  char id[TG_KEY_ID_LEN + 1];
  char *tenant;
  char *name;          /* "" when none */
  char *models;        /* comma list; "" = every model the tenant may use */
  int64_t created_at;  /* unix seconds */
  int64_t expires_at;  /* 0 = never */
  int64_t revoked_at;  /* 0 = not revoked */
} tg_key_info_t;

/* Opens the store of data_dir (creating the directory and database when
 * missing, schema migrated). Returns 0 and *out, closed with
 * tg_keystore_close(); or a negative error (TG_EIO, TG_EDB, TG_EINVAL,
 * TG_ENOMEM) with *out NULL. A store handle is used by one thread at a time. */
int tg_keystore_open(const char *data_dir, tg_keystore_t **out);

/* Opens the store that database names: "sqlite", NULL or "" is the SQLite
 * store of data_dir (as tg_keystore_open); a postgres:// or postgresql://
 * URL is that PostgreSQL database (schema migrated, data_dir unused).
 * Returns as tg_keystore_open, and TG_EINVAL for any other database. */
int tg_keystore_open_db(const char *database, const char *data_dir,
                        tg_keystore_t **out);

/* Closes and frees the store. NULL is ignored. */
void tg_keystore_close(tg_keystore_t *ks);

/* Creates a key for spec at time now (unix seconds; created_at). On success
 * returns 0, *key_out holds the full key text — the only time it exists
 * anywhere; the caller prints it once, then wipes and frees it with
 * tg_keystore_key_free() — and id_out the key's id. Returns TG_EINVAL for an
 * empty tenant, a field longer than TG_KEY_MAX_FIELD, a model name with a
 * comma, more than TG_KEY_MAX_MODELS models or a negative expiry; TG_EDB,
 * TG_ENOMEM or TG_EUNAVAIL (random generator) otherwise. */
int tg_keystore_create(tg_keystore_t *ks, const tg_key_spec_t *spec,
                       int64_t now, char **key_out,
                       char id_out[TG_KEY_ID_LEN + 1]);

/* Wipes and frees a key text returned by tg_keystore_create(). */
void tg_keystore_key_free(char *key);

/* Lists every key, ordered by creation time then id. On success returns 0,
 * *out an array of *n entries (NULL when none) that the caller frees with
 * tg_keystore_list_free(). Returns TG_EDB, TG_ENOMEM or TG_ETOOBIG (more
 * than TG_KEYSET_MAX_KEYS keys). */
int tg_keystore_list(tg_keystore_t *ks, tg_key_info_t **out, size_t *n);
void tg_keystore_list_free(tg_key_info_t *list, size_t n);

/* Revokes the key with this id at time now. Returns 0 (also when it was
 * already revoked: the first revocation time is kept), TG_ENOTFOUND when no
 * key has that id, or TG_EDB. */
int tg_keystore_revoke(tg_keystore_t *ks, const char *id, int64_t now);

/* Reads every key into a new keyset with one reference (release with
 * tg_keyset_release()). A row the gateway could not honour (bad id, hash of
 * the wrong size, unreadable model list) is left out — a key that is not in
 * the set is refused — and counted in *skipped if skipped is not NULL.
 * Returns 0, TG_EDB, TG_ENOMEM or TG_ETOOBIG. */
int tg_keystore_load(tg_keystore_t *ks, tg_keyset_t **out, size_t *skipped);

/* ---- watcher: the gateway's view of the store ---- */

/* Opens its own connection to the store of data_dir, loads a first keyset
 * (so acquire never returns NULL after a successful start) and starts a
 * thread that checks the store every interval_ms (the gateway uses 200; 1 to
 * 60000) and publishes a new keyset when it changed. Returns 0 and *out, or a
 * negative error when the store cannot be opened or read or the thread not
 * started. A failed reload later keeps the previous keyset and says why on
 * stderr. Stop with tg_keywatch_stop(). */
int tg_keywatch_start(const char *data_dir, unsigned interval_ms,
                      tg_keywatch_t **out);

/* tg_keywatch_start on the store that database names (as
 * tg_keystore_open_db). With PostgreSQL the watcher polls one change
 * counter row that a trigger bumps on every write to api_keys; a poll that
 * finds the server gone keeps the current keys, reconnects at the next
 * poll and reloads once it answers. */
int tg_keywatch_start_db(const char *database, const char *data_dir,
                         unsigned interval_ms, tg_keywatch_t **out);

/* A counter bumped each time a new keyset is published (the first load is
 * generation 1). One atomic load; meant for each request: a worker keeps the
 * keyset it acquired with the generation it read *before* acquiring, and
 * acquires again only when this value differs. */
uint64_t tg_keywatch_generation(const tg_keywatch_t *w);

/* Returns a new reference to the current keyset (never NULL while the
 * watcher runs); the caller releases it with tg_keyset_release(), also after
 * the watcher stopped. Takes a short mutex. */
tg_keyset_t *tg_keywatch_acquire(tg_keywatch_t *w);

/* Stops the thread (waking it at once), joins it, closes its connection and
 * drops the watcher's reference to the current keyset; keysets acquired by
 * callers stay valid until they release them. NULL is ignored. */
void tg_keywatch_stop(tg_keywatch_t *w);

/* ---- backends (internal: keystore.c holds SQLite's, keystore_pg.c
 * PostgreSQL's) ----
 *
 * keystore.c does everything that does not depend on the database (checks,
 * key generation, turning rows into keysets and listings, the watcher); a
 * backend only stores and reads rows. */

typedef struct tg__keystore_conn_s tg__keystore_conn_t;

/* One api_keys row as a backend read it. Texts are views, valid during the
 * call that passes the row, not NUL-terminated (lengths given); NULL for an
 * SQL NULL. hash is NULL when the stored value is not a byte string (and
 * always in a listing). Times are unix seconds, 0 for NULL and
 * TG__KEY_TIME_BAD for a value that is not a positive whole number (written
 * by other SQL than ours): such a revocation or expiry is not read as none. */
#define TG__KEY_TIME_BAD INT64_C(-1)
typedef struct {
  const char *id, *tenant, *name, *models;
  size_t id_len, tenant_len, name_len, models_len;
  const uint8_t *hash;
  size_t hash_len;
  int64_t created_at, expires_at, revoked_at;
} tg__key_row_t;

/* Where a scan delivers rows. begin(count) comes first, with the number of
 * rows that follow; row() once per row. A non-zero return stops the scan,
 * which returns it. */
typedef struct tg__key_sink_s tg__key_sink_t;
struct tg__key_sink_s {
  int (*begin)(tg__key_sink_t *s, int64_t count);
  int (*row)(tg__key_sink_t *s, const tg__key_row_t *r);
};

typedef struct {
  const char *name;
  /* Opens a connection, schema migrated. Returns 0 and *out, or TG_EIO,
   * TG_EDB, TG_EINVAL, TG_ENOMEM (saying why on stderr). */
  int (*open)(const char *database, const char *data_dir,
              tg__keystore_conn_t **out);
  /* Stores a new row (revoked_at and a zero expires_at stored as NULL, a
   * NULL name as NULL). Returns 0, TG_EEXISTS when the id is taken, TG_EDB. */
  int (*insert)(tg__keystore_conn_t *c, const tg__key_row_t *r);
  /* Sets revoked_at to now unless it is set. Returns 0, TG_ENOTFOUND when
   * no row has that id, TG_EDB. */
  int (*revoke)(tg__keystore_conn_t *c, const char *id, int64_t now);
  /* Reads every row from one snapshot into sink: listing = 1 orders them
   * by created_at then id (bytewise) and leaves hashes out. Returns 0,
   * TG_EDB, or what the sink returned. */
  int (*scan)(tg__keystore_conn_t *c, int listing, tg__key_sink_t *sink);
  /* A value that changes whenever any connection or process has committed
   * a change to api_keys. Returns 0 or TG_EDB, quietly (the watcher calls
   * it every interval and says once when it starts failing). */
  int (*marker)(tg__keystore_conn_t *c, int64_t *out);
  /* The last error as text for a log line (never NULL). */
  const char *(*errmsg)(tg__keystore_conn_t *c);
  /* Optional; may be called from another thread while a call runs on c:
   * that call, and every later one, gives up waiting for the database at
   * once (TG_EDB or TG_ECANCELED). For a stop; then close c. */
  void (*interrupt)(tg__keystore_conn_t *c);
  void (*close)(tg__keystore_conn_t *c);
} tg__keystore_backend_t;

extern const tg__keystore_backend_t tg__keystore_backend_sqlite;
extern const tg__keystore_backend_t tg__keystore_backend_pg;

/* ---- CLI (cmd_keys.c) ---- */

/* `tollgate keys create|list|revoke ...`, argv starting at "keys". Reads
 * data_dir from the --config file. `create` prints the new key alone on
 * stdout. Returns the process exit status: 0 done, 1 refused or failed (with
 * a message on stderr), 2 bad arguments (with usage on stderr). */
int tg_cmd_keys(int argc, char **argv);

#endif
