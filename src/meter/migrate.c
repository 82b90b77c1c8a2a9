/* `tollgate migrate`: applies the schema migrations a gateway would apply at
 * start, to the database of a config (SQLite in data_dir, or PostgreSQL).
 *
 * A gateway's start migrates under a 300 s statement timeout, so a replica
 * does not hang on a migration that waits; on a very large PostgreSQL
 * ledger an index rebuild can need longer than that. This command is the
 * way to migrate first, in a quiet hour, with no limit or one of the
 * operator's choosing (--timeout). It takes the same advisory lock as a
 * starting replica, so the two never migrate at once. It prints one line
 * on stdout: the version before and after. */
#include "meter/migrate.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "core/cli.h"
#include "core/err.h"
#include "meter/db_pg.h"
#include "meter/db_sqlite.h"

/* Longest --timeout: a week (a bound, not a useful value). */
#define MAX_TIMEOUT_S (7u * 86400u)

static const char usage_text[] =
    "usage: tollgate migrate --config FILE [--timeout SECONDS]\n"
    "  --timeout  PostgreSQL: cancel the migration after SECONDS (default 0: no limit)\n";

static int usage(const char *why) {
  fprintf(stderr, "tollgate migrate: %s\n%s", why, usage_text);
  return 2;
}

static int parse_timeout(const char *s, unsigned *out) {
  char *end;
  unsigned long v;

  if (s == NULL || *s < '0' || *s > '9')
    return -1;
  errno = 0;
  v = strtoul(s, &end, 10);
  if (errno != 0 || *end != '\0' || v > MAX_TIMEOUT_S)
    return -1;
  *out = (unsigned)v;
  return 0;
}

static void report(const char *kind, int from, int to) {
  if (from == to)
    printf("%s schema at version %d: nothing to do\n", kind, to);
  else
    printf("%s schema migrated from version %d to %d\n", kind, from, to);
}

static int migrate_pg(const char *url, unsigned timeout_s) {
  PGconn *c = NULL;
  int from = -1;

  if (tg_db_pg_connect(url, NULL, &c) != 0)
    return 1; /* it said why */
  if (tg_db_pg_migrate_ex(c, NULL, timeout_s, &from) != 0) {
    PQfinish(c);
    return 1;
  }
  PQfinish(c);
  report("postgres", from, tg_db_pg_schema_version());
  return 0;
}

static int migrate_sqlite(const char *data_dir) {
  sqlite3 *db = NULL;
  int from = -1;

  if (tg_db_sqlite_open_from(&db, data_dir, &from) != 0)
    return 1; /* it said why */
  sqlite3_close(db);
  report("sqlite", from, tg_db_sqlite_schema_version());
  return 0;
}

int tg_cmd_migrate(int argc, char **argv) {
  const char *cfg_path = NULL, *timeout = NULL;
  tg_config_t *cfg = NULL;
  tg_config_errors_t errs = {0};
  unsigned timeout_s = 0;
  const tg_cli_opt_t opts[] = {
      {"--config", "-c", &cfg_path}, {"--timeout", NULL, &timeout}, {NULL, NULL, NULL}};
  int r, rc;

  r = tg_cli_parse("migrate", argc, argv, opts);
  if (r == TG_CLI_HELP) {
    fputs(usage_text, stdout);
    return 0;
  }
  if (r != 0) {
    fputs(usage_text, stderr);
    return 2;
  }
  if (cfg_path == NULL || cfg_path[0] == '\0')
    return usage("--config FILE is required");
  if (timeout != NULL && parse_timeout(timeout, &timeout_s) < 0)
    return usage("--timeout wants whole seconds, 0 to 604800");
  if (tg_config_load(cfg_path, &cfg, &errs) < 0) {
    for (size_t k = 0; k < errs.n; k++)
      fprintf(stderr, "%s\n", errs.msgs[k]);
    tg_config_errors_free(&errs);
    return 1;
  }
  if (tg_db_pg_is_url(cfg->database))
    rc = migrate_pg(cfg->database, timeout_s);
  else
    rc = migrate_sqlite(cfg->data_dir);
  tg_config_unref(cfg);
  return rc;
}
