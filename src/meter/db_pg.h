/* The PostgreSQL database (`database: postgres://...`): connecting with
 * libpq from the configured URL, with the timeouts a gateway needs so a
 * database that went away costs seconds, not minutes, and bringing the
 * schema up to date from one ordered list of migrations (db_pg.c), the same
 * tables as the embedded SQLite database (db_sqlite.c) so every replica of
 * the gateway shares keys and the usage ledger. See docs/postgres.md. */
#ifndef TG_METER_DB_PG_H
#define TG_METER_DB_PG_H

#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

/* The key of the transaction-scoped advisory lock that serialises schema
 * migrations across replicas ("tollgate" in ASCII). */
#define TG_DB_PG_MIGRATE_LOCK INT64_C(0x746f6c6c67617465)

/* Longest database URL accepted (a bound on what is copied and logged). */
#define TG_DB_PG_URL_MAX 4096

/* 1 when database names PostgreSQL (starts with postgres:// or
 * postgresql://), else 0. NULL gives 0. */
int tg_db_pg_is_url(const char *database);

/* Reads url as libpq will, without connecting: 0 when libpq can read it
 * (a postgres:// or postgresql:// URL of at most TG_DB_PG_URL_MAX bytes,
 * parameters libpq knows, well-formed percent escapes) and its sslmode, if
 * any, is one libpq accepts; else TG_EINVAL (or TG_ENOMEM) and the reason
 * in why[size], one line, with no password in it. For check-config: serve
 * would refuse such a URL the same way. */
int tg_db_pg_url_check(const char *url, char *why, size_t size);

typedef struct {
  unsigned connect_timeout_s;    /* 0: 3 (libpq's floor is 2) */
  unsigned statement_timeout_ms; /* 0: 30000 */
  unsigned lock_timeout_ms;      /* 0: the statement timeout */
  int quiet;                     /* 1: say nothing on stderr on failure */
  char *err;                     /* not NULL: a failure's reason, one line, */
  size_t err_size;               /* is copied here (cut to err_size) */
} tg_db_pg_opts_t;

/* Connects to url (a postgres:// or postgresql:// URL; any parameter libpq
 * knows may follow in its query string). Our defaults for connect_timeout,
 * TCP keepalives, tcp_user_timeout, application_name and the session
 * options (statement_timeout, lock_timeout,
 * idle_in_transaction_session_timeout) apply unless the URL sets them
 * itself. o may be NULL (defaults, not quiet).
 * Returns 0 and *out (the caller frees it with PQfinish), or TG_EINVAL (not
 * a PostgreSQL URL, too long, or libpq cannot parse it), TG_EDB (no server
 * answered within the connect timeout, or one answered and refused:
 * authentication, unknown database, too many connections...) or
 * TG_ENOMEM; unless quiet, one line on stderr says why (the URL is shown
 * without its password). *out is NULL on failure. */
int tg_db_pg_connect(const char *url, const tg_db_pg_opts_t *o,
                     PGconn **out);

/* tg_db_pg_connect for a thread that must be able to stop: libpq does not
 * block, the connect timeout holds, and wake_fd (-1: none) becoming
 * readable gives up at once (TG_ECANCELED). A URL with several hosts
 * connects blocking, for libpq's failover from one to the next. */
int tg_db_pg_connect_wake(const char *url, const tg_db_pg_opts_t *o, int wake_fd,
                          PGconn **out);

/* Starts the same connection as tg_db_pg_connect without waiting for it
 * (for a caller that must not block: it drives the connection with
 * tg_db_pg_connect_step and keeps its own deadline, since libpq applies
 * connect_timeout only to blocking connects). host -1 lets libpq go
 * through the URL's hosts in turn, which without blocking it does only
 * past a host that fails, never past one that does not answer; host i
 * (below tg_db_pg_hosts(url)) connects to the URL's i-th host alone, so
 * the caller can give each host its own time. Returns 0 and *out (free
 * with PQfinish), or as tg_db_pg_connect. */
int tg_db_pg_connect_start(const char *url, const tg_db_pg_opts_t *o,
                           int host, PGconn **out);

/* How many hosts url names (its host or hostaddr list); 1 at least. */
int tg_db_pg_hosts(const char *url);

/* The connect timeout in force on c in milliseconds: the URL's
 * connect_timeout, else ours (as tg_db_pg_connect_start set it), raised to
 * libpq's floor of 2 s, an hour for 0 (libpq's "for ever"). libpq applies
 * it only to blocking connects, so a caller that steps a connection keeps
 * this deadline itself. -1 when c names several hosts: libpq gives each its
 * own timeout and goes on to the next only in a blocking connect, so those
 * must block. */
int tg_db_pg_connect_wait_ms(PGconn *c);

/* Advances a connection started by tg_db_pg_connect_start, waiting for the
 * network at most wait_ms in all (0: not at all), less when wake_fd (-1:
 * none) becomes readable. Returns 0 once it is connected, 1 when the budget
 * ran out first (call again later: the connection keeps its progress),
 * TG_ECANCELED when woken, TG_EDB when it failed (reason in
 * tg_db_pg_errmsg; the caller frees it). */
int tg_db_pg_connect_step(PGconn *c, int wait_ms, int wake_fd);

/* How long a caller waits for the server's answer, and what cuts the wait
 * short. libpq's own calls wait for as long as the connection stands, and a
 * server that is stopped (SIGSTOP), frozen, or stuck on its disk keeps it
 * standing: its kernel acknowledges every byte and every keepalive, so no
 * TCP timeout ends the wait, and the server's statement_timeout cannot fire
 * either. */
typedef struct {
  int wait_ms;   /* the server's whole answer within this; 0: no bound */
  int wake_fd;   /* -1, or a descriptor whose readability ends the wait */
  int cut;       /* set to 1 (never back to 0) when a wait was cut */
} tg_db_pg_wait_t;

/* The answer to what was just sent on c (PQsendQuery, PQsendQueryParams,
 * PQsendPrepare, PQsendQueryPrepared, or PQputCopyEnd), as PQexec gives
 * it: the last result, or the one that starts a COPY. When w's time runs
 * out or its wake_fd becomes readable first, the connection is cut (it
 * reads as broken from then on: replace it), w->cut is set and NULL is
 * returned. */
PGresult *tg_db_pg_result(PGconn *c, tg_db_pg_wait_t *w);

/* Sends sql (with nparams parameters when vals is not NULL, as
 * PQsendQueryParams; else as PQsendQuery, which takes several statements)
 * and returns tg_db_pg_result's answer. NULL when it could not be sent
 * (the reason in tg_db_pg_errmsg) or the wait was cut. The caller clears
 * the result. */
PGresult *tg_db_pg_query(PGconn *c, const char *sql, int nparams,
                         const char *const *vals, const int *lens,
                         const int *fmts, tg_db_pg_wait_t *w);

/* tg_db_pg_open for a connection that a thread must be able to stop:
 * the connection is made without blocking inside libpq, given up after the
 * connect timeout (the URL's connect_timeout, else o's), or at once when
 * wake_fd (-1: none) becomes readable. A URL that names several hosts
 * connects as tg_db_pg_open does (libpq moves on to the next host after a
 * timeout only when it blocks). Returns as tg_db_pg_open, with
 * TG_ECANCELED when woken. */
int tg_db_pg_open_wake(const char *url, const tg_db_pg_opts_t *o, int wake_fd,
                       PGconn **out);

/* Applies every migration not yet recorded in schema_migrations, all in one
 * transaction under the advisory lock TG_DB_PG_MIGRATE_LOCK, so replicas
 * starting together migrate once and a migration that fails leaves the
 * database as it was. A schema already at this binary's version returns 0
 * at once, without the lock. Returns 0, or TG_EDB (including a schema newer
 * than this binary knows), saying why on stderr unless o is quiet and in
 * o->err when o gives a buffer (o's other fields are not used; NULL: not
 * quiet, no buffer). */
int tg_db_pg_migrate(PGconn *c, const tg_db_pg_opts_t *o);

/* tg_db_pg_migrate with its statement timeout chosen: timeout_s seconds
 * (0: none; a gateway's start gives 300), and the version the database had
 * before in *from when from is not NULL (0 for an empty database; set once
 * it is read, also when the migration then fails). */
int tg_db_pg_migrate_ex(PGconn *c, const tg_db_pg_opts_t *o, unsigned timeout_s,
                        int *from);

/* tg_db_pg_connect then tg_db_pg_migrate; on a migration failure the
 * connection is closed and *out is NULL. Returns as those two. */
int tg_db_pg_open(const char *url, const tg_db_pg_opts_t *o, PGconn **out);

/* The highest migration version this binary knows. */
int tg_db_pg_schema_version(void);

/* Runs sql (one or more statements, no parameters, no rows wanted).
 * Returns 0 or TG_EDB. Says nothing: read the reason with tg_db_pg_errmsg. */
int tg_db_pg_exec(PGconn *c, const char *sql);

/* The connection's last error as one line (libpq's text up to its first
 * newline) copied into buf[size]; returns buf. c may be NULL ("not
 * connected"). */
const char *tg_db_pg_errmsg(PGconn *c, char *buf, size_t size);

/* 1 when c is NULL or its connection is gone (a call on it can only fail
 * until it is replaced), else 0. */
int tg_db_pg_broken(PGconn *c);

/* Copies url into buf[size] with any password replaced by "***" (in the
 * user-info part and in a password= query parameter), for messages.
 * Returns buf (cut to size, always NUL-terminated when size > 0). */
const char *tg_db_pg_redact(const char *url, char *buf, size_t size);

/* Parses a result cell holding a decimal int64 (as PostgreSQL prints
 * bigint). Returns 0 and *out, or TG_EPARSE for an empty, NULL, malformed
 * or out-of-range value. */
int tg_db_pg_int64(const PGresult *r, int row, int col, int64_t *out);

#endif
