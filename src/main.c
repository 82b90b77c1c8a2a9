/* tollgate: one binary, subcommands. Each takes --config FILE. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <sqlite3.h>

#include "auth/keystore.h"
#include "config/config.h"
#include "core/app.h"
#include "core/json.h"
#include "meter/invoice.h"
#include "meter/migrate.h"


static void usage(FILE *f) {
  fprintf(f,
          "usage: tollgate <command> [options]\n"
          "  serve --config FILE          run the gateway\n"
          "  check-config --config FILE   validate a config; print every error\n"
          "  keys create --config FILE --tenant T [--models a,b] [--expires 30d] [--name N]\n"
          "  keys list --config FILE [--tenant T] [--json]\n"
          "  keys revoke --config FILE ID\n"
          "  invoice --config FILE --tenant T --month YYYY-MM [--format json|csv]\n"
          "  usage --config FILE --tenant T --day YYYY-MM-DD\n"
          "  migrate --config FILE [--timeout SECONDS]   bring the database's schema up to date\n");
}

/* What a command printed must reach its reader: an invoice sent to a full
 * disk or a closed stdout is a failure, not a success that left an empty
 * file. A command that failed has said why already and keeps its status. */
static int stdout_written(int rc) {
  int e = fflush(stdout) != 0 ? errno : 0;
  if ((e == 0 && !ferror(stdout)) || rc != 0)
    return rc;
  fprintf(stderr, "tollgate: cannot write to stdout%s%s\n", e ? ": " : "", e ? strerror(e) : "");
  return 1;
}

static int run(int argc, char **argv) {
  /* SQLite counts every allocation under a global mutex, for
   * sqlite3_status(), which nothing here reads; the ledger's writer
   * allocates for every record (about 7% of its CPU per row). Must come
   * before any other SQLite call. */
  sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
  /* cJSON's allocation hooks, before any thread is started. */
  tg_json_init();
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (strcmp(argv[1], "serve") == 0)
    return tg_cmd_serve(argc - 1, argv + 1);
  if (strcmp(argv[1], "check-config") == 0)
    return tg_cmd_check_config(argc - 1, argv + 1);
  if (strcmp(argv[1], "keys") == 0)
    return tg_cmd_keys(argc - 1, argv + 1);
  if (strcmp(argv[1], "invoice") == 0)
    return tg_cmd_invoice(argc - 1, argv + 1);
  if (strcmp(argv[1], "usage") == 0)
    return tg_cmd_usage(argc - 1, argv + 1);
  if (strcmp(argv[1], "migrate") == 0)
    return tg_cmd_migrate(argc - 1, argv + 1);
  if (strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0) {
    usage(stdout);
    return 0;
  }
  fprintf(stderr, "tollgate: unknown command '%s'\n", argv[1]);
  usage(stderr);
  return 2;
}

int main(int argc, char **argv) {
  return stdout_written(run(argc, argv));
}
