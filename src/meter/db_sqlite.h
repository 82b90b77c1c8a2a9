/* The embedded SQLite database: one file, <data_dir>/tollgate.db, shared by
 * the key store, the usage ledger and the audit log. Opening it creates the
 * directory, sets the connection's pragmas and brings the schema up to date
 * from one ordered list of migrations (db_sqlite.c), so every component that
 * opens the database sees the same, current schema. */
#ifndef TG_METER_DB_SQLITE_H
#define TG_METER_DB_SQLITE_H

#include <sqlite3.h>

/* File name of the database inside data_dir. */
#define TG_DB_SQLITE_FILE "tollgate.db"

/* Opens (creating if missing) <data_dir>/tollgate.db. Creates data_dir (and
 * missing parents) with mode 0700 when absent. Sets WAL journal mode, a
 * busy timeout of 5000 ms and foreign keys on, then applies every migration
 * not yet recorded in schema_migrations, all in one transaction (concurrent
 * openers serialise on it; each migration is applied once).
 * On success returns 0 and *db is a connection the caller closes with
 * sqlite3_close(). On failure returns TG_EIO (directory), TG_EDB (SQLite,
 * including a database whose schema is newer than this binary knows) or
 * TG_EINVAL, prints one line saying why on stderr, and *db is NULL. */
int tg_db_sqlite_open(sqlite3 **db, const char *data_dir);

/* The same, for a connection only ever used by one thread at a time (a
 * writer or checkpointer thread's own): opened SQLITE_OPEN_NOMUTEX, so no
 * call takes the connection's mutex. */
int tg_db_sqlite_open_private(sqlite3 **db, const char *data_dir);

/* tg_db_sqlite_open, and the schema version the database had before in
 * *from (0 for a new one; set once it is read). */
int tg_db_sqlite_open_from(sqlite3 **db, const char *data_dir, int *from);

/* Creates data_dir and its missing parents, each with mode 0700 (the
 * database holds key hashes and the ledger); an existing one is left as it
 * is. Returns 0, or TG_EIO / TG_EINVAL with one line on stderr. */
int tg_db_make_data_dir(const char *data_dir);

/* The highest migration version this binary knows (the schema version a
 * freshly opened database has). */
int tg_db_sqlite_schema_version(void);

#endif
