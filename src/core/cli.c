/* The one-word commands' option reader (cli.h). A misspelled option, one
 * without its value or one given twice is an error, never ignored nor
 * settled by which copy came last: `serve --config prod.yaml --workers 8`
 * must not start a gateway that silently took no notice of the 8. */
#include "core/cli.h"

#include <stdio.h>
#include <string.h>

static int bad(const char *cmd, const char *what, const char *arg) {
  fprintf(stderr, "tollgate %s: %s '%.200s'\n", cmd, what, arg);
  return -1;
}

int tg_cli_parse(const char *cmd, int argc, char **argv, const tg_cli_opt_t *opts) {
  int i;

  for (i = 1; i < argc; i++)
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
      return TG_CLI_HELP;
  for (i = 1; i < argc; i++) {
    const char *a = argv[i], *val = NULL;
    const tg_cli_opt_t *o;
    size_t n = 0;

    for (o = opts; o->name != NULL; o++) {
      n = strlen(o->name);
      if (strcmp(a, o->name) == 0 || (o->alias != NULL && strcmp(a, o->alias) == 0))
        break;
      if (strncmp(a, o->name, n) == 0 && a[n] == '=') {
        val = a + n + 1;
        break;
      }
    }
    if (o->name == NULL)
      return bad(cmd, a[0] == '-' ? "unknown option" : "unexpected argument", a);
    if (val == NULL) {
      if (i + 1 >= argc) {
        fprintf(stderr, "tollgate %s: %s needs a value\n", cmd, o->name);
        return -1;
      }
      val = argv[++i];
    }
    if (*o->value != NULL) {
      fprintf(stderr, "tollgate %s: %s given twice\n", cmd, o->name);
      return -1;
    }
    *o->value = val;
  }
  return 0;
}
