/* `tollgate keys create|list|revoke`: the operator's tool for virtual keys.
 *
 * It reads the same config file as the gateway, so the tenant and model
 * checks are the ones the gateway will apply, and it writes to the store the
 * gateway watches, so a change here is live in a running gateway within its
 * poll interval. Output is for scripts: `create` prints the key alone on
 * stdout (everything else goes to stderr), `list --json` prints one JSON
 * object per line. Exit status: 0 done, 1 refused or failed, 2 bad usage. */
#include "auth/keystore.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "config/config.h"
#include "core/err.h"
#include "meter/db_pg.h"

enum {
  EXIT_DONE = 0,
  EXIT_FAIL = 1,
  EXIT_USAGE = 2,
};

/* Which options a subcommand takes. */
enum {
  OPT_CONFIG = 1 << 0,
  OPT_TENANT = 1 << 1,
  OPT_MODELS = 1 << 2,
  OPT_EXPIRES = 1 << 3,
  OPT_NAME = 1 << 4,
  OPT_JSON = 1 << 5,
  OPT_ADMIN = 1 << 6,
};

#define MAX_POSITIONAL 4
/* Longest span --expires accepts: a key meant to outlive this is "never". */
#define MAX_EXPIRY_SECS (INT64_C(100) * 366 * 86400)

typedef struct {
  const char *config;
  const char *tenant;
  const char *models;
  const char *expires;
  const char *name;
  int json;
  int admin; /* --admin: a key for the admin API, not for a tenant */
  int help;  /* --help was given: print usage, do nothing else */
  const char *pos[MAX_POSITIONAL];
  int npos;
} opts_t;

static const char usage_text[] =
  "usage: tollgate keys create --config FILE --tenant T [--models a,b]\n"
  "                            [--expires 30d|12h|YYYY-MM-DD] [--name N]\n"
  "       tollgate keys create --config FILE --admin [--expires ...] [--name N]\n"
  "       tollgate keys list   --config FILE [--tenant T] [--json]\n"
  "       tollgate keys revoke --config FILE ID\n";

static int usage(const char *why) {
  if (why != NULL)
    fprintf(stderr, "tollgate keys: %s\n", why);
  fputs(usage_text, stderr);
  return EXIT_USAGE;
}

/* Parses argv[first..argc) into o, allowing only the options in allowed.
 * Accepts "--opt value" and "--opt=value", and "-c FILE" for --config.
 * Returns 0 or EXIT_USAGE (after printing why). */
static int parse_opts(int argc, char **argv, int first, int allowed,
                      opts_t *o) {
  static const struct {
    const char *name;
    int bit;
    size_t off;
  } table[] = {
    {"config", OPT_CONFIG, offsetof(opts_t, config)},
    {"tenant", OPT_TENANT, offsetof(opts_t, tenant)},
    {"models", OPT_MODELS, offsetof(opts_t, models)},
    {"expires", OPT_EXPIRES, offsetof(opts_t, expires)},
    {"name", OPT_NAME, offsetof(opts_t, name)},
  };
  char msg[160];

  int only_pos = 0;

  memset(o, 0, sizeof(*o));
  for (int i = first; i < argc; i++) {
    const char *a = argv[i], *eq, *val = NULL;
    size_t nlen;
    size_t t;

    if (!only_pos && strcmp(a, "--") == 0) {
      only_pos = 1;
      continue;
    }
    if (!only_pos && (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)) {
      o->help = 1;
      return 0;
    }
    if (only_pos || a[0] != '-' || a[1] == '\0') {
      if (o->npos == MAX_POSITIONAL)
        return usage("too many arguments");
      o->pos[o->npos++] = a;
      continue;
    }
    if (strcmp(a, "-c") == 0)
      a = "--config"; /* the alias every command takes: "-c FILE" */
    if (a[1] != '-') {
      snprintf(msg, sizeof(msg), "unknown option %.40s", a);
      return usage(msg);
    }
    a += 2;
    eq = strchr(a, '=');
    nlen = eq ? (size_t)(eq - a) : strlen(a);
    if (nlen == 4 && strncmp(a, "json", 4) == 0 && (allowed & OPT_JSON)) {
      if (eq != NULL)
        return usage("--json takes no value");
      o->json = 1;
      continue;
    }
    if (nlen == 5 && strncmp(a, "admin", 5) == 0 && (allowed & OPT_ADMIN)) {
      if (eq != NULL)
        return usage("--admin takes no value");
      o->admin = 1;
      continue;
    }
    for (t = 0; t < sizeof(table) / sizeof(table[0]); t++)
      if (strlen(table[t].name) == nlen && strncmp(a, table[t].name, nlen) == 0)
        break;
    if (t == sizeof(table) / sizeof(table[0]) || !(allowed & table[t].bit)) {
      snprintf(msg, sizeof(msg), "unknown option --%.*s",
               (int)(nlen > 40 ? 40 : nlen), a);
      return usage(msg);
    }
    if (eq != NULL) {
      val = eq + 1;
    } else if (i + 1 < argc) {
      val = argv[++i];
    } else {
      snprintf(msg, sizeof(msg), "--%s needs a value", table[t].name);
      return usage(msg);
    }
    {
      const char **slot = (const char **)((char *)o + table[t].off);
      if (*slot != NULL) {
        snprintf(msg, sizeof(msg), "--%s given twice", table[t].name);
        return usage(msg);
      }
      *slot = val;
    }
  }
  if ((allowed & OPT_CONFIG) && o->config == NULL)
    return usage("--config FILE is required");
  return 0;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (exact integer
 * arithmetic, no time zone involved). */
static int64_t days_from_civil(int64_t y, int m, int d) {
  int64_t era, yoe, doy, doe;
  y -= m <= 2;
  era = (y >= 0 ? y : y - 399) / 400;
  yoe = y - era * 400;
  doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

static int days_in_month(int y, int m) {
  static const int dm[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
    return 29;
  return dm[m - 1];
}

/* --expires: "N" followed by s, m, h or d (relative to now), or YYYY-MM-DD
 * (UTC midnight). Returns 0 and *at, or TG_EPARSE. */
static int parse_expires(const char *s, int64_t now, int64_t *at) {
  size_t len = strlen(s);

  if (len == 10 && s[4] == '-' && s[7] == '-') {
    int y = 0, m = 0, d = 0;
    for (size_t i = 0; i < 10; i++) {
      if (i == 4 || i == 7)
        continue;
      if (s[i] < '0' || s[i] > '9')
        return TG_EPARSE;
    }
    y = (s[0] - '0') * 1000 + (s[1] - '0') * 100 + (s[2] - '0') * 10 +
        (s[3] - '0');
    m = (s[5] - '0') * 10 + (s[6] - '0');
    d = (s[8] - '0') * 10 + (s[9] - '0');
    if (y < 1970 || m < 1 || m > 12 || d < 1 || d > days_in_month(y, m))
      return TG_EPARSE;
    *at = days_from_civil(y, m, d) * 86400;
    return 0;
  }
  if (len >= 2 && len <= 12 && s[0] >= '0' && s[0] <= '9') {
    char *end = NULL;
    long long n;
    int64_t unit;
    errno = 0;
    n = strtoll(s, &end, 10);
    if (errno != 0 || end != s + len - 1 || n <= 0)
      return TG_EPARSE;
    switch (s[len - 1]) {
    case 's': unit = 1; break;
    case 'm': unit = 60; break;
    case 'h': unit = 3600; break;
    case 'd': unit = 86400; break;
    default: return TG_EPARSE;
    }
    if (n > MAX_EXPIRY_SECS / unit)
      return TG_EPARSE;
    *at = now + (int64_t)n * unit;
    return 0;
  }
  return TG_EPARSE;
}

/* "2025-01-31T00:00:00Z", "never" for 0, "?" for a time the store could
 * not read (the gateway refuses such a key). */
static void fmt_time(int64_t t, char *buf, size_t size) {
  struct tm tm;
  time_t tt = (time_t)t;
  if (t <= 0 || gmtime_r(&tt, &tm) == NULL ||
      strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
    snprintf(buf, size, "%s", t == 0 ? "never" : "?");
}

static const char *status_of(const tg_key_info_t *k, int64_t now) {
  if (k->revoked_at != 0)
    return "revoked";
  if (k->expires_at != 0 && now >= k->expires_at)
    return "expired";
  return "active";
}

static int printable_byte(char c) {
  return (unsigned char)c >= 0x20 && (unsigned char)c <= 0x7e;
}

/* A name is printed in a table and logs: printable ASCII only. */
static int name_ok(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > TG_KEY_MAX_FIELD)
    return 0;
  for (size_t i = 0; i < n; i++)
    if (!printable_byte(s[i]))
      return 0;
  return 1;
}

/* A row the CLI did not write (an operator's SQL) may hold any bytes. Each
 * one outside printable ASCII, which no id, tenant, name or model of ours
 * has, is shown as '?': a listing stays valid JSON (jansson refuses text
 * that is not UTF-8) and never hands a terminal bytes it would act on. */
static void make_printable(char *s) {
  for (; *s != '\0'; s++)
    if (!printable_byte(*s))
      *s = '?';
}

static int load_config(const char *path, tg_config_t **cfg) {
  tg_config_errors_t errs = {0};
  int rc = tg_config_load(path, cfg, &errs);
  if (rc != 0) {
    for (size_t i = 0; i < errs.n; i++)
      fprintf(stderr, "%s\n", errs.msgs[i]);
    if (errs.n == 0)
      fprintf(stderr, "tollgate keys: cannot load %s: %s\n", path,
              tg_strerror(rc));
    tg_config_errors_free(&errs);
    return EXIT_FAIL;
  }
  tg_config_errors_free(&errs);
  return 0;
}

/* Opens the store the config names: the SQLite file of data_dir, or the
 * PostgreSQL database every gateway replica shares. */
static int open_store(const tg_config_t *cfg, tg_keystore_t **ks) {
  char where[320];
  int rc = tg_keystore_open_db(cfg->database, cfg->data_dir, ks);
  if (rc != 0) {
    if (tg_db_pg_is_url(cfg->database)) {
      char shown[256];
      snprintf(where, sizeof(where), "at %s",
               tg_db_pg_redact(cfg->database, shown, sizeof(shown)));
    } else {
      snprintf(where, sizeof(where), "in %s", cfg->data_dir);
    }
    fprintf(stderr, "tollgate keys: cannot open the key store %s: %s\n",
            where, tg_strerror(rc));
    return EXIT_FAIL;
  }
  return 0;
}

static int cmd_create(const opts_t *o) {
  tg_config_t *cfg = NULL;
  tg_keystore_t *ks = NULL;
  const tg_tenant_cfg_t *tenant;
  char **models = NULL;
  size_t n_models = 0;
  char *key = NULL, id[TG_KEY_ID_LEN + 1], when[32];
  int64_t now = (int64_t)time(NULL), expires_at = 0;
  int ex, rc;

  if (o->npos != 0)
    return usage("create takes no positional argument");
  if (o->admin && (o->tenant != NULL || o->models != NULL))
    return usage("--admin keys have no --tenant or --models");
  if (o->tenant == NULL && !o->admin)
    return usage("create needs --tenant T (or --admin)");
  /* A name no config can hold is not echoed: it may carry bytes a
   * terminal acts on, or be any length. */
  if (o->tenant != NULL && !tg_config_tenant_name_ok(o->tenant))
    return usage("--tenant takes a tenant name of the config (letters, "
                 "digits, '.', '_', '-')");
  if (o->name != NULL && !name_ok(o->name))
    return usage("--name must be 1 to 256 printable ASCII characters");
  if (o->expires != NULL && parse_expires(o->expires, now, &expires_at) != 0)
    return usage("--expires takes Ns, Nm, Nh, Nd (e.g. 30d) or YYYY-MM-DD");
  if (o->models != NULL) {
    rc = tg__key_models_split(o->models, &models, &n_models);
    if (rc == TG_ENOMEM) {
      fprintf(stderr, "tollgate keys: out of memory\n");
      return EXIT_FAIL;
    }
    if (rc != 0 || n_models == 0)
      return usage("--models takes a comma list of model names, e.g. a,b");
  }

  ex = load_config(o->config, &cfg);
  if (ex != 0)
    goto out;
  ex = EXIT_FAIL;
  /* An admin key's tenant is "@admin", a name no tenant can have. */
  tenant = o->admin ? NULL : tg_config_tenant(cfg, o->tenant);
  if (tenant == NULL && !o->admin) {
    fprintf(stderr, "tollgate keys: tenant \"%s\" is not in %s\n", o->tenant,
            o->config);
    goto out;
  }
  for (size_t i = 0; i < n_models; i++) {
    if (!tg_tenant_allows(tenant, models[i])) {
      fprintf(stderr, "tollgate keys: tenant \"%s\" may not use model "
              "\"%s\" (not in its models_allowed)\n", o->tenant, models[i]);
      goto out;
    }
  }
  /* Tested on o->expires, not on expires_at: 1970-01-01 is 0, which the
   * store reads as "never". */
  if (o->expires != NULL && expires_at <= now) {
    fprintf(stderr, "tollgate keys: --expires %s is in the past\n",
            o->expires);
    goto out;
  }
  if (open_store(cfg, &ks) != 0)
    goto out;
  {
    tg_key_spec_t spec = {
      .tenant = o->admin ? TG_ADMIN_TENANT : o->tenant,
      .name = o->name,
      .models = (const char *const *)models,
      .n_models = n_models,
      .expires_at = expires_at,
    };
    rc = tg_keystore_create(ks, &spec, now, &key, id);
  }
  if (rc != 0) {
    fprintf(stderr, "tollgate keys: cannot create the key: %s\n",
            tg_strerror(rc));
    goto out;
  }
  /* The key is shown here once. When stdout cannot take it (a full disk, a
   * reader gone: EPIPE, not a SIGPIPE death) nobody will ever hold it, so
   * it is revoked rather than left active and unaccounted for. */
  signal(SIGPIPE, SIG_IGN);
  if (printf("%s\n", key) < 0 || fflush(stdout) != 0) {
    rc = tg_keystore_revoke(ks, id, now);
    fprintf(stderr, "tollgate keys: cannot write the key to stdout; key %s %s\n", id,
            rc == 0 ? "revoked" : "NOT revoked: revoke it");
    goto out;
  }
  fmt_time(expires_at, when, sizeof(when));
  fprintf(stderr, "created key %s for tenant %s (models: %s, expires: %s)\n",
          id, o->admin ? TG_ADMIN_TENANT : o->tenant, n_models ? o->models : "all the tenant may use",
          when);
  ex = EXIT_DONE;
out:
  tg_keystore_key_free(key);
  for (size_t i = 0; i < n_models; i++)
    free(models[i]);
  free(models);
  tg_keystore_close(ks);
  tg_config_unref(cfg);
  return ex;
}

static int print_json(const tg_key_info_t *k, int64_t now) {
  char created[32], expires[32], revoked[32];
  json_t *obj, *models = json_array();
  char **names = NULL;
  size_t n = 0;
  char *line;
  int rc = -1;

  if (models == NULL)
    return -1;
  /* A list the gateway could not read shows as its raw text. */
  if (tg__key_models_split(k->models, &names, &n) == 0) {
    for (size_t i = 0; i < n; i++) {
      json_array_append_new(models, json_string(names[i]));
      free(names[i]);
    }
    free(names);
  } else {
    json_array_append_new(models, json_string(k->models));
  }
  fmt_time(k->created_at, created, sizeof(created));
  fmt_time(k->expires_at, expires, sizeof(expires));
  fmt_time(k->revoked_at, revoked, sizeof(revoked));
  obj = json_pack("{s:s, s:s, s:s?, s:o, s:s, s:s?, s:s?, s:s}",
                  "id", k->id, "tenant", k->tenant,
                  "name", k->name[0] ? k->name : NULL,
                  "models", models,
                  "created", created,
                  "expires", k->expires_at ? expires : NULL,
                  "revoked", k->revoked_at ? revoked : NULL,
                  "status", status_of(k, now));
  if (obj == NULL)
    return -1;  /* json_pack's "o" consumed models */
  line = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
  if (line != NULL && printf("%s\n", line) >= 0)
    rc = 0;
  free(line);
  json_decref(obj);
  return rc;
}

static void widen(int *w, const char *s) {
  int n = (int)strlen(s);
  if (n > *w)
    *w = n;
}

static int print_table(const tg_key_info_t *list, size_t n,
                       const char *tenant, int64_t now) {
  int wt = 6, wn = 4, wm = 6;
  const int wtime = 20;

  for (size_t i = 0; i < n; i++) {
    if (tenant != NULL && strcmp(list[i].tenant, tenant) != 0)
      continue;
    widen(&wt, list[i].tenant);
    widen(&wn, list[i].name[0] ? list[i].name : "-");
    widen(&wm, list[i].models[0] ? list[i].models : "*");
  }
  if (printf("%-12s  %-*s  %-*s  %-*s  %-*s  %-*s  %s\n", "ID", wt, "TENANT",
             wn, "NAME", wm, "MODELS", wtime, "CREATED", wtime, "EXPIRES",
             "STATUS") < 0)
    return -1;
  for (size_t i = 0; i < n; i++) {
    const tg_key_info_t *k = &list[i];
    char created[32], expires[32];
    if (tenant != NULL && strcmp(k->tenant, tenant) != 0)
      continue;
    fmt_time(k->created_at, created, sizeof(created));
    fmt_time(k->expires_at, expires, sizeof(expires));
    if (printf("%-12s  %-*s  %-*s  %-*s  %-*s  %-*s  %s\n", k->id, wt,
               k->tenant, wn, k->name[0] ? k->name : "-", wm,
               k->models[0] ? k->models : "*", wtime, created, wtime,
               expires, status_of(k, now)) < 0)
      return -1;
  }
  return 0;
}

static int cmd_list(const opts_t *o) {
  tg_config_t *cfg = NULL;
  tg_keystore_t *ks = NULL;
  tg_key_info_t *list = NULL;
  size_t n = 0;
  int64_t now = (int64_t)time(NULL);
  int ex, rc;

  if (o->npos != 0)
    return usage("list takes no positional argument");
  ex = load_config(o->config, &cfg);
  if (ex != 0)
    goto out;
  ex = EXIT_FAIL;
  if (open_store(cfg, &ks) != 0)
    goto out;
  rc = tg_keystore_list(ks, &list, &n);
  if (rc != 0) {
    fprintf(stderr, "tollgate keys: cannot list keys: %s\n", tg_strerror(rc));
    goto out;
  }
  for (size_t i = 0; i < n; i++) {
    make_printable(list[i].id);
    make_printable(list[i].tenant);
    make_printable(list[i].name);
    make_printable(list[i].models);
  }
  if (o->json) {
    for (size_t i = 0; i < n && rc == 0; i++)
      if (o->tenant == NULL || strcmp(list[i].tenant, o->tenant) == 0)
        rc = print_json(&list[i], now);
  } else {
    rc = print_table(list, n, o->tenant, now);
  }
  if (rc != 0 || fflush(stdout) != 0) {
    fprintf(stderr, "tollgate keys: cannot write the listing\n");
    goto out;
  }
  ex = EXIT_DONE;
out:
  tg_keystore_list_free(list, n);
  tg_keystore_close(ks);
  tg_config_unref(cfg);
  return ex;
}

static int cmd_revoke(const opts_t *o) {
  tg_config_t *cfg = NULL;
  tg_keystore_t *ks = NULL;
  tg_key_parts_t parts;
  char id[TG_KEY_ID_LEN + 1];
  const char *arg;
  int ex, rc;

  if (o->npos != 1)
    return usage("revoke takes exactly one key ID");
  arg = o->pos[0];
  /* A whole key pasted by mistake is revoked by its id; its secret is never
   * echoed. */
  if (tg_key_parse(arg, strlen(arg), &parts) == 0) {
    memcpy(id, parts.id, TG_KEY_ID_LEN);
    id[TG_KEY_ID_LEN] = '\0';
  } else if (tg_key_id_parse(arg, strlen(arg), &parts.id_num) == 0) {
    memcpy(id, arg, TG_KEY_ID_LEN + 1);
  } else {
    /* Not an id (12 lowercase hex characters) nor a whole key. Such an
     * argument is never echoed nor sent to the database: it may be a key
     * spoiled in the pasting (a trailing CR, a character more, upper case),
     * a bare secret, or bytes a terminal would act on. */
    id[0] = '\0';
  }
  ex = load_config(o->config, &cfg);
  if (ex != 0)
    goto out;
  ex = EXIT_FAIL;
  if (open_store(cfg, &ks) != 0)
    goto out;
  rc = id[0] ? tg_keystore_revoke(ks, id, (int64_t)time(NULL))
             : TG_ENOTFOUND;
  if (rc == TG_ENOTFOUND) {
    if (id[0])
      fprintf(stderr, "tollgate keys: no key with id \"%s\"\n", id);
    else
      fprintf(stderr, "tollgate keys: not a key id (12 lowercase hex "
              "characters) nor a whole key; nothing revoked\n");
    goto out;
  }
  if (rc != 0) {
    fprintf(stderr, "tollgate keys: cannot revoke %s: %s\n", id,
            tg_strerror(rc));
    goto out;
  }
  printf("revoked %s\n", id);
  ex = EXIT_DONE;
out:
  tg_keystore_close(ks);
  tg_config_unref(cfg);
  return ex;
}

/* Runs one subcommand once its options parsed. */
static int run(int rc, const opts_t *o, int (*cmd)(const opts_t *)) {
  if (rc != 0)
    return rc;
  if (o->help) {
    fputs(usage_text, stdout);
    return EXIT_DONE;
  }
  return cmd(o);
}

int tg_cmd_keys(int argc, char **argv) {
  opts_t o;
  const char *sub;
  int rc;

  if (argc < 2)
    return usage(NULL);
  sub = argv[1];
  if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0 ||
      strcmp(sub, "help") == 0) {
    fputs(usage_text, stdout);
    return EXIT_DONE;
  }
  if (strcmp(sub, "create") == 0) {
    rc = parse_opts(argc, argv, 2, OPT_CONFIG | OPT_TENANT | OPT_MODELS |
                    OPT_EXPIRES | OPT_NAME | OPT_ADMIN, &o);
    return run(rc, &o, cmd_create);
  }
  if (strcmp(sub, "list") == 0) {
    rc = parse_opts(argc, argv, 2, OPT_CONFIG | OPT_TENANT | OPT_JSON, &o);
    return run(rc, &o, cmd_list);
  }
  if (strcmp(sub, "revoke") == 0) {
    rc = parse_opts(argc, argv, 2, OPT_CONFIG, &o);
    return run(rc, &o, cmd_revoke);
  }
  {
    char msg[96];
    snprintf(msg, sizeof(msg), "unknown subcommand \"%.40s\"", sub);
    return usage(msg);
  }
}
