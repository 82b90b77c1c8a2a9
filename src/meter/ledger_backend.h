/* The ledger's storage backends, behind one small table of functions
 * (internal to src/meter). ledger.c owns the writer thread, the spool and
 * the public API; a backend only stores and reads records. SQLite is
 * ledger_sqlite.c; a PostgreSQL backend fills the same table.
 *
 * Every function is blocking and is called by one thread at a time on a
 * given connection (the writer thread, or a query caller). */
#ifndef TG_METER_LEDGER_BACKEND_H
#define TG_METER_LEDGER_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "meter/ledger.h"

typedef struct tg__ledger_conn_s tg__ledger_conn_t;   /* a backend's connection */

typedef struct {
  unsigned busy_timeout_ms;  /* how long to wait for a lock before failing */
  int writer;                /* 1: the writer thread's connection */
  const int *wake_fd;        /* NULL, or a descriptor whose readability
                              * ends any wait for the server at once (a
                              * query connection a stop must not wait for) */
} tg__ledger_conn_opts_t;

typedef struct {
  const char *name;

  /* Opens a connection and brings the schema up to date (versioned
   * migrations). A backend whose server may be away may connect lazily and
   * reconnect inside insert_batch. Returns 0 and *out (freed by close), or
   * TG_EINVAL, TG_EIO, TG_EDB, TG_ENOMEM; says why on stderr. */
  int (*open)(const char *database, const char *data_dir,
              const tg__ledger_conn_opts_t *o, tg__ledger_conn_t **out);

  /* Stores n records in ONE transaction, durably (committed and synced)
   * before returning 0; a record whose request_id is already stored is
   * skipped silently. On any failure nothing is stored. It returns
   * TG_EREJECTED when the database's own rules refuse a record of the
   * batch (a constraint, a trigger, a value out of a column's range: the
   * same records would be refused again; the caller isolates them), else
   * TG_EDB (away, slow, locked, disk full...: the caller spools and retries
   * later) or TG_ENOMEM. */
  int (*insert_batch)(tg__ledger_conn_t *c, const tg_ledger_rec_t *const *recs,
                      size_t n);

  /* Optional (may be NULL): says without waiting whether a write would go
   * through now (SQLite: the write lock is free; a server: it answers).
   * The writer asks before each replay attempt, so a database that stays
   * away does not hold new batches back for a lock wait every retry.
   * Returns 0 when it would. */
  int (*probe)(tg__ledger_conn_t *c);

  /* Text of the last insert_batch or probe failure (owned by c, valid until
   * its next call); never NULL. insert_batch and probe print nothing: the
   * writer says once when the database goes away and comes back. */
  const char *(*errmsg)(tg__ledger_conn_t *c);

  /* The queries of ledger.h, same contracts; rows are malloc'd. */
  int (*usage_by_model)(tg__ledger_conn_t *c, const char *tenant,
                        int64_t from_ms, int64_t to_ms, tg_usage_row_t **rows,
                        size_t *n);
  int (*spend_by_tenant)(tg__ledger_conn_t *c, int64_t from_ms, int64_t to_ms,
                         tg_spend_row_t **rows, size_t *n);
  /* Deletes tenant's records with ts_ms < before_ms (tenant is never
   * NULL: ledger.c walks the tenants), in chunks so the writer is not locked
   * out for long. No policy here: ledger.c has already bounded before_ms. */
  int (*purge)(tg__ledger_conn_t *c, const char *tenant, int64_t before_ms,
               int64_t *deleted);
  int (*count)(tg__ledger_conn_t *c, const char *tenant, int64_t *n);
  /* The tenants with records before before_ms, sorted, in rows' tenant
   * field (cost_nano 0): whom a retention purge must look at. */
  int (*tenants_before)(tg__ledger_conn_t *c, int64_t before_ms,
                        tg_spend_row_t **rows, size_t *n);
  /* The value of secret name: candidate is stored first when there is
   * none, so the first caller's stands for every later one. */
  int (*secret)(tg__ledger_conn_t *c, const char *name, const char *candidate, char *out,
                size_t size);

  void (*close)(tg__ledger_conn_t *c);
} tg__ledger_backend_t;

/* Most rows a query returns (a hard bound on its buffer): beyond it the
 * query fails with TG_ETOOBIG. */
#define TG__LEDGER_MAX_ROWS ((size_t)1 << 20)

extern const tg__ledger_backend_t tg__ledger_backend_sqlite;
extern const tg__ledger_backend_t tg__ledger_backend_pg;

/* Called first by each thread of the ledger (writer, checkpointer): they
 * yield to the loop threads (ledger.c). */
void tg__ledger_thread_background(void);

/* Tests only: while on is non-zero, the SQLite backend's insert_batch fails
 * as an unreachable database would (TG_EDB, nothing stored), so a test can
 * have the database "down" across a restart, which a held lock cannot do
 * (opening migrates, which needs the lock). */
void tg__ledger_sqlite_fail_inserts(int on);

#endif
