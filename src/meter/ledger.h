/* The usage ledger: one durable record per request that reached an upstream.
 *
 * Loop threads hand records to one writer thread through a port (one per
 * libuv loop). The writer commits them in batches (group commit: one
 * transaction, one fsync for many records) and tells each record's port,
 * which runs the record's callback on its own loop. A response's last byte
 * is sent only from that callback, so a record exists for every response a
 * client saw complete, even across kill -9.
 *
 * When the database fails (unreachable, locked too long, disk error), the
 * writer appends batches to <data_dir>/ledger.spool instead, fsyncs, and
 * reports them durable; it keeps spooling, so order is kept, until the
 * database answers again and the spool has been replayed in order. The
 * request id is unique in the table, so a record replayed twice is stored
 * once. A spool left by a killed gateway is replayed at the next open.
 *
 * A record the database refuses for good (its own rules: a constraint, a
 * trigger, a column's range) is found by halving its batch, and appended to
 * <data_dir>/ledger-rejected.spool instead, fsynced, and reported durable;
 * the batch's other records are stored in order, and nothing waits behind
 * it. So it goes for a refused record met in a spool replay.
 *
 * The queries (invoices, budget rebuild, purge) use their own blocking
 * connection (tg_ledger_db_*): call them from the CLI, at startup, or on a
 * worker thread, never on a loop thread.
 *
 * Time ranges are half-open, [from_ms, to_ms), in unix milliseconds UTC;
 * a record belongs to the day and month of its ts_ms. Money is int64
 * nano-USD throughout. See docs/ledger.md. */
#ifndef TG_METER_LEDGER_H
#define TG_METER_LEDGER_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* File name of the spool inside data_dir. */
#define TG_LEDGER_SPOOL_FILE "ledger.spool"
/* File name, inside data_dir, of the records the database refuses for good
 * (a constraint, a trigger, a value out of a column's range): the spool's
 * line format, so they can be appended to the spool (gateway stopped) once
 * the database takes them. */
#define TG_LEDGER_REJECTED_FILE "ledger-rejected.spool"

/* File name, inside data_dir, of the spool lines a replay found damaged (a
 * checksum that does not match, bytes without a line end): skipped, not
 * stored, and kept here as they were, synced, so an operator can read what
 * the record said. */
#define TG_LEDGER_DAMAGED_FILE "ledger-damaged.spool"

/* Default per-tenant retention: a billing year plus the month being billed
 * and some slack for late invoices. */
#define TG_LEDGER_RETENTION_DAYS_DEFAULT 400

typedef struct {
  char request_id[40];      /* NUL-terminated, not empty: the unique key */
  int64_t ts_ms;            /* request arrival, unix ms UTC: decides its day and month */
  char tenant[128], key_id[16], model[128], endpoint[256];   /* NUL-terminated */
  int64_t prompt_tokens, completion_tokens;                  /* >= 0 */
  int64_t cost_nano;        /* tg_nano_t, >= 0 */
  int status;               /* HTTP status the client got (499 = client left) */
  int usage_counted;        /* 1: counted from relayed events, the upstream reported none */
  int64_t queue_us, ttft_us, total_us;   /* -1 = not applicable */
} tg_ledger_rec_t;

typedef struct tg_ledger_s tg_ledger_t;
typedef struct tg_ledger_port_s tg_ledger_port_t;       /* one per libuv loop thread */

/* status 0: the record is durable (committed to the database, or fsynced to
 * the spool or, refused by the database, to the rejected file). Otherwise
 * a negative error (TG_EIO: neither the database nor the spool or the
 * rejected file could keep it; the gateway says so on stderr). */
typedef void (*tg_ledger_cb)(void *arg, int status);

typedef struct {
  size_t max_backlog;       /* records accepted, not yet durable; 0: 100000 */
  size_t batch_max;         /* records per transaction; 0: 512 */
  unsigned linger_us;       /* wait for more records when fewer than batch_max; 0: 500 */
  unsigned busy_timeout_ms; /* SQLite lock wait before a batch goes to the spool; 0: 1000 */
  unsigned retry_ms;        /* while spooling, how often the database is tried; 0: 1000 */
} tg_ledger_opts_t;

/* Opens the ledger: database is "sqlite" (or NULL/""; the file in data_dir,
 * migrations applied) or a postgres:// (postgresql://) URL; anything else
 * is TG_EINVAL. o may be NULL (all defaults). Replays a spool
 * left by an earlier run before returning (a torn last record is dropped:
 * it was never reported durable), so queries made after this call see
 * every record; when the database refuses the replay, the spool is kept and
 * the ledger starts in spool mode. The spool file is created only when the
 * database first fails. One ledger per data_dir. Starts the writer thread.
 * Returns 0 and *out (free with tg_ledger_close), or TG_EINVAL, TG_EDB,
 * TG_EIO, TG_ENOMEM; one line on stderr says why. */
int tg_ledger_open(const char *database, const char *data_dir,
                   const tg_ledger_opts_t *o, tg_ledger_t **out);

/* Stops accepting records, writes out everything queued (to the database,
 * or to the spool when the database is down), posts its completions to the
 * ports still open, joins the writer and frees the ledger. Records spooled
 * and not yet replayed stay in the spool for the next open. Ports may be
 * closed before or after this call (each must be closed once); no port may
 * append after it. NULL is a no-op. Returns the bytes of records left in
 * the spool (not yet in the database: the next open replays them), 0 when
 * every record reached the database. */
int64_t tg_ledger_close(tg_ledger_t *l);

/* Creates the port of one loop (an async handle on it). Call on the loop's
 * thread. Returns 0 and *out, TG_ENOMEM, or a libuv error. */
int tg_ledger_port_new(tg_ledger_t *l, uv_loop_t *loop, tg_ledger_port_t **out);

/* From the port's loop thread, once: waits until the writer has delivered
 * every record this port appended (at most the time of the batch being
 * written: a commit, or a lock wait then a spool write), runs the callbacks
 * not yet run, then closes the port's handle (freed with the loop's close
 * callbacks, so run the loop once more before uv_loop_close). So every
 * accepted record's callback runs exactly once, here at the latest. Safe
 * before or after tg_ledger_close. An append from a callback run here is
 * refused (TG_EUNAVAIL). NULL is a no-op. */
void tg_ledger_port_close(tg_ledger_port_t *p);

/* From the port's loop thread: copies rec and queues it. cb(arg, status)
 * runs later ON THE PORT'S LOOP once the record is durable (see
 * tg_ledger_cb); arg must stay valid until then or until the port closes.
 * cb may be NULL. Returns 0; TG_EUNAVAIL when the records accepted and not
 * yet durable reach max_backlog or the ledger is closing (nothing queued,
 * no callback: the caller refuses new requests); TG_EINVAL for an empty or
 * unterminated request_id, an unterminated text field or a negative token
 * count or cost; TG_ENOMEM. */
int tg_ledger_append(tg_ledger_port_t *p, const tg_ledger_rec_t *rec,
                     tg_ledger_cb cb, void *arg);

/* Records accepted and not yet durable (any thread). */
size_t tg_ledger_backlog(const tg_ledger_t *l);
/* Bytes in the spool not yet replayed into the database (any thread). */
int64_t tg_ledger_spool_bytes(const tg_ledger_t *l);
/* 1 while batches go to the database, 0 while they go to the spool. */
int tg_ledger_db_up(const tg_ledger_t *l);
/* 1 when records were lost (neither the database nor the spool kept them:
 * their answers were withheld) in the last TG_LEDGER_LOSING_MS (any
 * thread): /readyz says not ready, so a load balancer sends elsewhere, and
 * after that long it is offered traffic again to find out. */
#define TG_LEDGER_LOSING_MS 5000
int tg_ledger_losing(const tg_ledger_t *l);

/* Counters since open, for metrics and tests (any thread, each read
 * atomically). */
typedef struct {
  uint64_t transactions;      /* batches committed (spool replays included) */
  uint64_t committed;         /* records sent straight to the database */
  uint64_t spooled;           /* records written to the spool */
  uint64_t replayed;          /* records replayed from the spool */
  uint64_t spool_skipped;     /* spool lines dropped: torn or bad checksum */
  uint64_t spool_damaged;     /* of those, damaged (not a torn last line: a
                                 record once durable), kept in the damaged file */
  uint64_t db_failures;       /* batches the database failed (away, locked) */
  uint64_t lost;              /* records neither the database nor the spool kept */
  uint64_t refused;           /* appends refused by the backlog bound */
  uint64_t rejected;          /* records the database refused, kept in the
                                 rejected file */
} tg_ledger_stats_t;
void tg_ledger_stats(const tg_ledger_t *l, tg_ledger_stats_t *out);

/* ---- queries: their own blocking connection ---- */

typedef struct tg_ledger_db_s tg_ledger_db_t;

/* Opens a query connection (database as for tg_ledger_open; migrations are
 * applied). Returns 0 and *out (free with tg_ledger_db_close), TG_EINVAL,
 * TG_EDB, TG_EIO or TG_ENOMEM. */
int tg_ledger_db_open(const char *database, const char *data_dir,
                      tg_ledger_db_t **out);
/* The same, for a caller another thread must be able to stop: once wake_fd
 * (-1: none) is readable, every wait for a PostgreSQL server (connecting,
 * or for an answer) ends at once and the call fails; a frozen server would
 * otherwise hold a query for its whole time bound (60 s). */
int tg_ledger_db_open_wake(const char *database, const char *data_dir, int wake_fd,
                           tg_ledger_db_t **out);
void tg_ledger_db_close(tg_ledger_db_t *d);

typedef struct {
  char model[128];
  int64_t requests, prompt_tokens, completion_tokens, cost_nano;
} tg_usage_row_t;

/* One tenant's usage per model over [from_ms, to_ms), sorted by model.
 * Every record counts (whatever its status), as billed. *rows is malloc'd
 * (the caller frees it; NULL when *n is 0). Returns 0, TG_ETOOBIG when a sum
 * would overflow int64 (never a wrong figure), TG_EDB or TG_ENOMEM. */
int tg_ledger_usage_by_model(tg_ledger_db_t *d, const char *tenant,
                             int64_t from_ms, int64_t to_ms,
                             tg_usage_row_t **rows, size_t *n);

typedef struct {
  char tenant[128];
  int64_t cost_nano;
} tg_spend_row_t;

/* Spend per tenant over [from_ms, to_ms), sorted by tenant; only tenants
 * with records appear. For rebuilding the day and month budget windows at
 * start. *rows as above. Returns as tg_ledger_usage_by_model. */
int tg_ledger_spend_by_tenant(tg_ledger_db_t *d, int64_t from_ms, int64_t to_ms,
                              tg_spend_row_t **rows, size_t *n);

/* Deletes the records of tenant (NULL = every tenant, one after another)
 * with ts_ms < before_ms, but never one of the current or previous UTC month
 * (before_ms is lowered to the previous month's first millisecond, by the
 * wall clock). *deleted (may be NULL) gets the count. Returns 0 or TG_EDB;
 * with NULL also TG_ENOMEM or TG_ETOOBIG (listing the tenants), and some
 * tenants may have been purged already. */
int tg_ledger_purge(tg_ledger_db_t *d, const char *tenant, int64_t before_ms,
                    int64_t *deleted);

/* Records of tenant (NULL = all). Returns 0 or TG_EDB. */
int tg_ledger_count(tg_ledger_db_t *d, const char *tenant, int64_t *n);

/* The gateway-wide secret called name (64 hex digits), made at random and
 * stored by the first gateway that asks for it, the same for every gateway
 * on this database from then on. Returns 0, TG_EDB, TG_EIO or TG_ETOOBIG
 * (out too small). */
int tg_ledger_db_secret(tg_ledger_db_t *d, const char *name, char *out, size_t size);

/* The purge bound for a retention of retention_days (<= 0: the default) at
 * now_ms: now - days, but no later than the first millisecond of the month
 * before now's. Pure. */
int64_t tg_ledger_retention_cutoff_ms(int64_t now_ms, int retention_days);

/* A tenant's retention in days (<= 0: TG_LEDGER_RETENTION_DAYS_DEFAULT).
 * Called for every tenant that has records old enough to matter, including
 * tenants no longer configured (give them the default). */
typedef int (*tg_ledger_retention_fn)(void *arg, const char *tenant);

/* Applies retention once: for each tenant with records before the previous
 * month, deletes those older than tg_ledger_retention_cutoff_ms(now_ms,
 * days_of(arg, tenant)); days_of NULL gives everyone the default. *deleted
 * (may be NULL) gets the total. Returns 0, TG_EDB, TG_ETOOBIG or TG_ENOMEM
 * (some tenants may have been purged already). */
int tg_ledger_purge_expired(tg_ledger_db_t *d, int64_t now_ms,
                            tg_ledger_retention_fn days_of, void *arg,
                            int64_t *deleted);


/* ---- the spool's line format (for tests and the fuzz target) ---- */

/* Longest spool line (without its newline) a replay reads; a longer one is
 * damage. The encoder's lines stay far below it. */
#define TG_LEDGER_LINE_MAX 4096

/* Writes r's spool line, newline included, at out. Returns its length, or
 * TG_ETOOBIG when size is too small. */
int tg__ledger_line_encode(const tg_ledger_rec_t *r, char *out, size_t size);

/* Decodes one spool line of len bytes (without its newline) into *r.
 * Returns 0, or TG_EPARSE for a line that is torn, damaged (its CRC-32
 * does not match) or not the format. */
int tg__ledger_line_decode(const char *line, size_t len, tg_ledger_rec_t *r);

#endif
