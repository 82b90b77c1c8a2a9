/* The configuration loader: reads one YAML file (and optionally the tenants
 * file it names) with libyaml's document API, validates every key against a
 * fixed schema and builds an immutable, refcounted tg_config_t.
 *
 * Validation never stops at the first problem. Each error is recorded as
 * "<file>:<line>: <key path>: <message>" against the file that holds the
 * problem, and the whole list is handed back sorted by file and line, so an
 * operator fixes a broken file in one pass instead of one error per run.
 *
 * The document API is used (rather than the event API) because it keeps a
 * start mark on every node and lets the schema walk look ahead; libyaml does
 * not reject duplicate mapping keys, so this file does. Every list the file
 * can grow (models, tenants, endpoints, headers, errors) has a hard maximum,
 * and the input file itself is bounded in size. */
#include "config/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "core/cli.h"
#include "core/err.h"
#include "core/strbuf.h"
#include "meter/db_pg.h"

#define MAX_FILE_BYTES ((long long)16 << 20)
#define MAX_ERRORS 1000
#define MAX_MODELS 4096
#define MAX_TENANTS 100000
#define MAX_ENDPOINTS 256
#define MAX_PRIORITY_CLASSES 64
#define MAX_FORWARD_HEADERS 64
#define MAX_MODELS_ALLOWED 4096
#define MAX_MODEL_NAME 127 /* fits a ledger record's model field */
#define MAX_TENANT_NAME 64
#define MAX_HEADER_NAME 128
#define MAX_URL TG_CONFIG_URL_MAX
#define MAX_WORKERS 1024
#define MAX_DURATION_MS ((uint64_t)30 * 24 * 3600 * 1000) /* 30 days */
#define MAX_BODY_LIMIT ((int64_t)1 << 30)                  /* 1 GiB */
#define MAX_HEADER_LIMIT ((int64_t)1 << 20)                /* 1 MiB */
#define MAX_TOKENS_CAP 10000000
#define MAX_INFLIGHT 1000000
#define MAX_RATE INT64_C(1000000000000)
#define MAX_CONCURRENT 1000000
/* A priority class value is a fair-queue weight: TG_FQ_WEIGHT_MAX at most. */
#define MAX_CLASS_VALUE 1000000000
#define MAX_GLOBAL_RPS 1000000000
#define PATH_TEXT 512 /* key paths in messages; longer ones are truncated */

/* ---- name -> index hash tables ------------------------------------------ */

/* Open addressing with linear probing. The table is sized once, to twice
 * the number of entries the YAML mapping holds, so it never fills and never
 * rehashes; names point into strings the config owns. */
typedef struct {
  const char *name; /* NULL = empty slot */
  size_t idx;
  unsigned long line; /* where the name was first defined, for duplicates */
} ntab_slot_t;

typedef struct {
  ntab_slot_t *slots;
  size_t mask;
} ntab_t;

struct tg_config_index_s {
  ntab_t models;
  ntab_t tenants;
};

static int ntab_init(ntab_t *t, size_t n) {
  size_t cap = 8;
  while (cap < n * 2)
    cap <<= 1;
  t->slots = calloc(cap, sizeof *t->slots);
  if (t->slots == NULL)
    return TG_ENOMEM;
  t->mask = cap - 1;
  return 0;
}

static const ntab_slot_t *ntab_get(const ntab_t *t, const char *name) {
  if (t->slots == NULL || name == NULL)
    return NULL;
  for (size_t i = tg_hash_str(name) & t->mask;; i = (i + 1) & t->mask) {
    const ntab_slot_t *s = &t->slots[i];
    if (s->name == NULL)
      return NULL;
    if (strcmp(s->name, name) == 0)
      return s;
  }
}

/* Inserts name; returns NULL when inserted, or the existing slot when the
 * name is already present (the caller reports the duplicate). */
static const ntab_slot_t *ntab_put(ntab_t *t, const char *name, size_t idx,
                                   unsigned long line) {
  for (size_t i = tg_hash_str(name) & t->mask;; i = (i + 1) & t->mask) {
    ntab_slot_t *s = &t->slots[i];
    if (s->name == NULL) {
      s->name = name;
      s->idx = idx;
      s->line = line;
      return NULL;
    }
    if (strcmp(s->name, name) == 0)
      return s;
  }
}

/* ---- loader state and error collection ----------------------------------- */

typedef struct {
  char *msg;
  int rank;           /* 0 = the config file, 1 = the tenants file */
  unsigned long line;
  size_t seq;         /* keeps the sort stable */
} err_item_t;

typedef struct {
  tg_config_t *cfg;
  err_item_t *errs;
  size_t n_errs, cap_errs;
  int truncated;
  int nomem;
  char *dir;       /* the config file's directory as given ("." if none) */
  int models_ok;   /* models parsed as a mapping: tenant references checkable */
  int classes_ok;  /* priority_classes usable: tenant priorities checkable */
  ntab_t endpoints; /* URL -> model << 8 | endpoint, sized by models' count */
} loader_t;

typedef struct {
  loader_t *ld;
  yaml_document_t doc;
  int have_doc;
  const char *file; /* name used in messages */
  int rank;
} ydoc_t;

/* Copies src to dst (cap > 0) with its control bytes escaped: C0 and DEL
 * as \n, \r, \t or \xNN, C1 (U+0080..U+009F, two bytes in UTF-8, which
 * some terminals take as CSI) as \u00NN. Values quoted from the file thus
 * cannot end a message's line, start a forged one or drive the terminal.
 * Other UTF-8 (libyaml has checked it) is kept. Cut at cap - 1 bytes, never
 * inside an escape. */
static void escape_text(char *dst, size_t cap, const char *src) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *p = (const unsigned char *)src;
  size_t n = 0;
  for (; *p != '\0'; p++) {
    char e[8];
    size_t k;
    if (*p == '\n' || *p == '\r' || *p == '\t') {
      e[0] = '\\';
      e[1] = *p == '\n' ? 'n' : *p == '\r' ? 'r' : 't';
      k = 2;
    } else if (*p < 0x20 || *p == 0x7f) {
      memcpy(e, "\\x", 2);
      e[2] = hex[*p >> 4];
      e[3] = hex[*p & 15];
      k = 4;
    } else if (*p == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) {
      memcpy(e, "\\u00", 4);
      e[4] = hex[p[1] >> 4];
      e[5] = hex[p[1] & 15];
      k = 6;
      p++;
    } else {
      e[0] = (char)*p;
      k = 1;
    }
    if (n + k >= cap)
      break;
    memcpy(dst + n, e, k);
    n += k;
  }
  dst[n] = '\0';
}

/* Every message passes here: its values come from the file (names, paths,
 * the values refused), and their control bytes are escaped, so a message
 * stays one line of text. */
static void add_err(loader_t *ld, int rank, const char *file,
                    unsigned long line, const char *msg) {
  char raw[1536], full[2048];
  if (ld->n_errs >= MAX_ERRORS) {
    ld->truncated = 1;
    return;
  }
  if (ld->n_errs == ld->cap_errs) {
    size_t cap = ld->cap_errs ? ld->cap_errs * 2 : 16;
    err_item_t *v = realloc(ld->errs, cap * sizeof *v);
    if (v == NULL) {
      ld->nomem = 1;
      return;
    }
    ld->errs = v;
    ld->cap_errs = cap;
  }
  snprintf(raw, sizeof raw, "%s:%lu: %s", file, line, msg);
  escape_text(full, sizeof full, raw);
  char *m = strdup(full);
  if (m == NULL) {
    ld->nomem = 1;
    return;
  }
  ld->errs[ld->n_errs] = (err_item_t){m, rank, line, ld->n_errs};
  ld->n_errs++;
}

static unsigned long yline(const yaml_node_t *n) {
  return (unsigned long)n->start_mark.line + 1;
}

/* Reports a problem at node n. where is the dotted key path ("" at the top
 * level) and prefixes the message so the operator sees which key it is. */
__attribute__((format(printf, 4, 5)))
static void yerr(ydoc_t *d, const yaml_node_t *n, const char *where,
                 const char *fmt, ...) {
  char msg[1024], full[1280];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (where != NULL && where[0] != '\0')
    snprintf(full, sizeof full, "%s: %s", where, msg);
  else
    snprintf(full, sizeof full, "%s", msg);
  add_err(d->ld, d->rank, d->file, n ? yline(n) : 1, full);
}

static char *xstrdup(loader_t *ld, const char *s) {
  char *r = strdup(s);
  if (r == NULL)
    ld->nomem = 1;
  return r;
}

static void *xcalloc(loader_t *ld, size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size);
  if (p == NULL)
    ld->nomem = 1;
  return p;
}

/* Builds "where.key" for messages. Paths longer than the buffer (only
 * possible with absurd names) end in "..." rather than failing. */
static void mark_truncated(char *buf, size_t size, int n) {
  if ((n < 0 || (size_t)n >= size) && size >= 4)
    memcpy(buf + size - 4, "...", 4);
}

static void join_path(char *buf, size_t size, const char *where,
                      const char *key) {
  int n;
  if (where[0] != '\0')
    n = snprintf(buf, size, "%s.%s", where, key);
  else
    n = snprintf(buf, size, "%s", key);
  mark_truncated(buf, size, n);
}

static void index_path(char *buf, size_t size, const char *where, size_t i) {
  mark_truncated(buf, size, snprintf(buf, size, "%s[%zu]", where, i));
}

/* ---- node helpers --------------------------------------------------------- */

static yaml_node_t *ynode(ydoc_t *d, int id) {
  return yaml_document_get_node(&d->doc, id);
}

static const char *yscalar(const yaml_node_t *n) {
  return (const char *)n->data.scalar.value;
}

/* YAML's null: an empty or ~/null plain scalar. A null value means the same
 * as an absent key, so `key:` with nothing after it keeps the default. */
static int is_null(const yaml_node_t *n) {
  if (n->type != YAML_SCALAR_NODE ||
      n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
    return 0;
  const char *s = yscalar(n);
  return s[0] == '\0' || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 ||
         strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0;
}

static const char *node_kind(const yaml_node_t *n) {
  switch (n->type) {
  case YAML_MAPPING_NODE: return "a mapping";
  case YAML_SEQUENCE_NODE: return "a list";
  default: return "a scalar";
  }
}

/* A scalar usable as text: no embedded NUL (libyaml allows "\0" escapes). */
static int scalar_text(ydoc_t *d, const yaml_node_t *n, const char *where,
                       const char *expected) {
  if (n->type != YAML_SCALAR_NODE) {
    yerr(d, n, where, "expected %s, got %s", expected, node_kind(n));
    return -1;
  }
  if (strlen(yscalar(n)) != n->data.scalar.length) {
    yerr(d, n, where, "value contains a NUL byte");
    return -1;
  }
  return 0;
}

/* Collects the values of a fixed-schema mapping: vals[i] / keys[i] get the
 * value and key node of names[i], or NULL when absent (or null). Unknown
 * keys, duplicates and non-scalar keys are reported and skipped. Returns -1
 * (reported) when map is not a mapping. */
static int map_fields(ydoc_t *d, yaml_node_t *map, const char *where,
                      const char *const *names, size_t n, yaml_node_t **vals,
                      yaml_node_t **keys) {
  for (size_t i = 0; i < n; i++)
    vals[i] = keys[i] = NULL;
  if (map->type != YAML_MAPPING_NODE) {
    yerr(d, map, where, "expected a mapping, got %s", node_kind(map));
    return -1;
  }
  for (yaml_node_pair_t *p = map->data.mapping.pairs.start;
       p < map->data.mapping.pairs.top; p++) {
    yaml_node_t *k = ynode(d, p->key), *v = ynode(d, p->value);
    size_t i;
    if (k == NULL || v == NULL)
      continue;
    if (k->type != YAML_SCALAR_NODE) {
      yerr(d, k, where, "expected a string key, got %s", node_kind(k));
      continue;
    }
    for (i = 0; i < n; i++)
      if (strcmp(names[i], yscalar(k)) == 0)
        break;
    if (i == n) {
      yerr(d, k, where, "unknown key '%s'", yscalar(k));
      continue;
    }
    if (keys[i] != NULL) {
      yerr(d, k, where, "duplicate key '%s' (first at line %lu)", names[i],
           yline(keys[i]));
      continue;
    }
    keys[i] = k;
    vals[i] = is_null(v) ? NULL : v;
  }
  return 0;
}

/* ---- typed values ----------------------------------------------------------
 * Each getter returns 0 with the value stored, or -1 after reporting. */

static int get_string(ydoc_t *d, const yaml_node_t *n, const char *where,
                      char **out) {
  if (scalar_text(d, n, where, "a string") < 0)
    return -1;
  char *s = xstrdup(d->ld, yscalar(n));
  if (s == NULL)
    return -1;
  free(*out);
  *out = s;
  return 0;
}

/* 1 when the digits at p have a leading zero ("010"): a YAML 1.1 reader
 * (PyYAML, go-yaml v2) takes such a plain integer as octal, 8 here, so
 * read as decimal the file would mean another number to the tools around
 * the gateway than to it. A lone "0" is no such number. */
static int leading_zero(const char *p) {
  return p[0] == '0' && p[1] >= '0' && p[1] <= '9';
}

/* Decimal integers only: no sign but '-', no spaces, no 0x / 1_000 / 1e3,
 * no leading zeros (010). */
static int get_int(ydoc_t *d, const yaml_node_t *n, const char *where,
                   int64_t min, int64_t max, int64_t *out) {
  if (scalar_text(d, n, where, "an integer") < 0)
    return -1;
  const char *s = yscalar(n), *p = s;
  if (*p == '-')
    p++;
  if (*p == '\0' || strspn(p, "0123456789") != strlen(p)) {
    yerr(d, n, where, "expected an integer, got '%s'", s);
    return -1;
  }
  if (leading_zero(p)) {
    yerr(d, n, where,
         "expected a decimal integer without leading zeros, got '%s' (YAML 1.1 "
         "reads it as octal)",
         s);
    return -1;
  }
  errno = 0;
  char *end = NULL;
  long long v = strtoll(s, &end, 10);
  if (errno == ERANGE || v < min || v > max) {
    if (min == 1 && (errno != ERANGE ? v < 1 : s[0] == '-'))
      yerr(d, n, where, "must be a positive integer, got %s", s);
    else
      yerr(d, n, where, "%s is out of range (%lld..%lld)", s, (long long)min,
           (long long)max);
    return -1;
  }
  *out = v;
  return 0;
}

/* Durations: "250ms", "30s", "2m", "1h", or a bare integer of seconds. */
static int get_duration(ydoc_t *d, const yaml_node_t *n, const char *where,
                        int allow_zero, uint64_t *out_ms) {
  if (scalar_text(d, n, where, "a duration") < 0)
    return -1;
  const char *s = yscalar(n), *p = s;
  uint64_t v = 0, mult;
  int ok = *p >= '0' && *p <= '9', big = 0;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (v > MAX_DURATION_MS)
      big = 1;
    else
      v = v * 10 + (uint64_t)(*p - '0');
  }
  if (strcmp(p, "ms") == 0)
    mult = 1;
  else if (*p == '\0' || strcmp(p, "s") == 0)
    mult = 1000;
  else if (strcmp(p, "m") == 0)
    mult = 60 * 1000;
  else if (strcmp(p, "h") == 0)
    mult = 3600 * 1000;
  else
    ok = 0;
  if (!ok) {
    yerr(d, n, where,
         "expected a duration like 250ms, 30s, 2m or 1h, got '%s'", s);
    return -1;
  }
  if (*p == '\0' && leading_zero(s)) {
    /* a bare number of seconds is a YAML integer: 010 is octal to YAML 1.1 */
    yerr(d, n, where,
         "expected a duration like 250ms, 30s, 2m or 1h (without leading zeros), "
         "got '%s'",
         s);
    return -1;
  }
  if (big || v > MAX_DURATION_MS / mult) {
    yerr(d, n, where, "duration '%s' is too long (at most 30 days)", s);
    return -1;
  }
  if (v == 0 && !allow_zero) {
    yerr(d, n, where, "duration must be greater than zero");
    return -1;
  }
  *out_ms = v * mult;
  return 0;
}

static int get_seq(ydoc_t *d, const yaml_node_t *n, const char *where,
                   size_t max) {
  if (n->type != YAML_SEQUENCE_NODE) {
    yerr(d, n, where, "expected a list, got %s", node_kind(n));
    return -1;
  }
  size_t count =
      (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
  if (count > max) {
    yerr(d, n, where, "too many entries (%zu, at most %zu)", count, max);
    return -1;
  }
  return 0;
}

static size_t map_len(const yaml_node_t *n) {
  return (size_t)(n->data.mapping.pairs.top - n->data.mapping.pairs.start);
}

/* ---- paths ---------------------------------------------------------------- */

static char *dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  if (slash == NULL)
    return strdup(".");
  if (slash == path)
    return strdup("/");
  return strndup(path, (size_t)(slash - path));
}

/* rel against the config file's directory, keeping a relative result
 * relative (used for messages and for opening the tenants file). */
static char *resolve_path(loader_t *ld, const char *rel) {
  while (rel[0] == '.' && rel[1] == '/')
    rel += 2;
  if (rel[0] == '/' || (strcmp(ld->dir, ".") == 0 && rel[0] != '\0'))
    return xstrdup(ld, rel);
  if (rel[0] == '\0' || strcmp(rel, ".") == 0)
    return xstrdup(ld, ld->dir);
  size_t dl = strlen(ld->dir), rl = strlen(rel);
  int slash = ld->dir[dl - 1] != '/';
  char *r = malloc(dl + (size_t)slash + rl + 1);
  if (r == NULL) {
    ld->nomem = 1;
    return NULL;
  }
  memcpy(r, ld->dir, dl);
  if (slash)
    r[dl] = '/';
  memcpy(r + dl + (size_t)slash, rel, rl + 1);
  return r;
}

/* Like resolve_path, but absolute, so a data directory or log file stays the
 * same whatever the process's working directory later becomes. */
static char *resolve_abs(loader_t *ld, const char *rel) {
  char *p = resolve_path(ld, rel);
  char cwd[PATH_MAX];
  if (p == NULL || p[0] == '/' || getcwd(cwd, sizeof cwd) == NULL)
    return p;
  size_t cl = strlen(cwd), pl = strlen(p);
  int slash = cwd[cl - 1] != '/';
  int dot = strcmp(p, ".") == 0;
  char *r = malloc(cl + 1 + pl + 1);
  if (r == NULL) {
    ld->nomem = 1;
    free(p);
    return NULL;
  }
  memcpy(r, cwd, cl);
  if (dot) {
    r[cl] = '\0';
  } else {
    if (slash)
      r[cl++] = '/';
    memcpy(r + cl, p, pl + 1);
  }
  free(p);
  return r;
}

/* ---- individual settings -------------------------------------------------- */

static int host_char_ok(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
}

/* Parses an all-digit port 1..65535; returns it or -1. */
static int parse_port(const char *s, size_t len) {
  long v = 0;
  if (len == 0 || len > 5)
    return -1;
  for (size_t i = 0; i < len; i++) {
    if (s[i] < '0' || s[i] > '9')
      return -1;
    v = v * 10 + (s[i] - '0');
  }
  return v >= 1 && v <= 65535 ? (int)v : -1;
}

/* "host:port" or "[v6]:port". The host is a name or an address; brackets
 * are required around IPv6 so the port is unambiguous. Returns 0, -1 when
 * malformed, TG_ENOMEM. */
static int split_hostport(const char *s, char **host, int *port) {
  const char *hs, *he, *colon;
  if (s[0] == '[') {
    hs = s + 1;
    he = strchr(hs, ']');
    if (he == NULL || he == hs || he[1] != ':')
      return -1;
    for (const char *q = hs; q < he; q++)
      if (!((*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'f') ||
            (*q >= 'A' && *q <= 'F') || *q == ':' || *q == '.'))
        return -1;
    colon = he + 1;
  } else {
    hs = s;
    colon = strchr(s, ':');
    if (colon == NULL || colon == s || strchr(colon + 1, ':') != NULL)
      return -1;
    he = colon;
    for (const char *q = hs; q < he; q++)
      if (!host_char_ok(*q))
        return -1;
  }
  int p = parse_port(colon + 1, strlen(colon + 1));
  if (p < 0)
    return -1;
  char *h = strndup(hs, (size_t)(he - hs));
  if (h == NULL)
    return TG_ENOMEM;
  free(*host);
  *host = h;
  *port = p;
  return 0;
}

/* A listener binds an address, and serve does not look names up: the host
 * of listen and admin_listen is an IPv4 or IPv6 literal. */
static int parse_listen(ydoc_t *d, yaml_node_t *n, const char *where,
                        char **host, int *port) {
  unsigned char a[16];
  char *h = NULL;
  int p = 0;
  if (scalar_text(d, n, where, "host:port") < 0)
    return -1;
  int rc = split_hostport(yscalar(n), &h, &p);
  if (rc == TG_ENOMEM)
    d->ld->nomem = 1;
  else if (rc < 0)
    yerr(d, n, where,
         "expected host:port with a port in 1..65535 (IPv6 as [::1]:8080), "
         "got '%s'",
         yscalar(n));
  else if (inet_pton(yscalar(n)[0] == '[' ? AF_INET6 : AF_INET, h, a) != 1)
    yerr(d, n, where,
         "expected an IP address, not a host name (the listener binds an "
         "address: 127.0.0.1, 0.0.0.0, [::1]), got '%s'",
         yscalar(n));
  else {
    free(*host);
    *host = h;
    *port = p;
    return 0;
  }
  free(h);
  return -1;
}

/* 1 when listeners on a and b (IP literals, as parse_listen leaves them)
 * cannot both bind port: the same address, an IPv4 wildcard and an IPv4
 * address, or the IPv6 wildcard (dual-stack on Linux) and any address. */
static int listeners_clash(const char *a, const char *b) {
  unsigned char x[16], y[16];
  int fa = strchr(a, ':') ? AF_INET6 : AF_INET, fb = strchr(b, ':') ? AF_INET6 : AF_INET;
  static const unsigned char any[16];

  if (inet_pton(fa, a, x) != 1 || inet_pton(fb, b, y) != 1)
    return 0;
  if ((fa == AF_INET6 && memcmp(x, any, 16) == 0) ||
      (fb == AF_INET6 && memcmp(y, any, 16) == 0))
    return 1;
  if (fa != fb)
    return 0;
  size_t n = fa == AF_INET ? 4 : 16;
  return memcmp(x, y, n) == 0 || memcmp(x, any, n) == 0 || memcmp(y, any, n) == 0;
}

/* Checks an upstream base URL and returns a copy without trailing '/'.
 * Only what libcurl needs to be unambiguous is enforced: the scheme, a
 * non-empty host, a numeric port, no credentials, query or fragment. */
static const char *check_url(const char *s) {
  const char *auth;
  if (strncmp(s, "http://", 7) == 0)
    auth = s + 7;
  else if (strncmp(s, "https://", 8) == 0)
    auth = s + 8;
  else
    return "expected an http:// or https:// URL";
  if (strlen(s) > MAX_URL)
    return "URL is too long";
  /* ASCII only, as RFC 3986 has it (other characters are percent-encoded):
   * the URL is also the ledger record's endpoint, cut to its field, and a
   * cut inside a multi-byte character would be text PostgreSQL refuses */
  for (const char *q = s; *q; q++)
    if ((unsigned char)*q <= ' ' || (unsigned char)*q >= 0x7f)
      return "URL contains spaces, control or non-ASCII characters (percent-encode them)";
  if (strpbrk(s, "?#") != NULL)
    return "URL must not have a query or fragment";
  size_t alen = strcspn(auth, "/");
  if (memchr(auth, '@', alen) != NULL)
    return "URL must not contain credentials";
  const char *hend, *port = NULL;
  if (auth[0] == '[') {
    hend = memchr(auth, ']', alen);
    if (hend == NULL || hend == auth + 1)
      return "URL has a malformed IPv6 host";
    if (hend + 1 < auth + alen) {
      if (hend[1] != ':')
        return "URL has a malformed IPv6 host";
      port = hend + 2;
    }
  } else {
    hend = memchr(auth, ':', alen);
    if (hend != NULL)
      port = hend + 1;
    else
      hend = auth + alen;
    if (hend == auth)
      return "URL has no host";
    for (const char *q = auth; q < hend; q++)
      if (!host_char_ok(*q))
        return "URL has an invalid host";
  }
  if (port != NULL && parse_port(port, (size_t)(auth + alen - port)) < 0)
    return "URL has an invalid port (1..65535)";
  return NULL;
}

static int header_name_ok(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > MAX_HEADER_NAME)
    return 0;
  for (; *s; s++) {
    char c = *s;
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || strchr("!#$%&'*+-.^_`|~", c) != NULL))
      return 0;
  }
  return 1;
}

/* Headers that must never be copied from a client to an upstream: the
 * client's gateway credentials; hop-by-hop or framing headers and the
 * ones the gateway itself sets for the upstream request (a second copy
 * leaves the upstream to pick one: the request id, the body's type);
 * and codings, since the gateway rewrites the body it sends and reads
 * the answer it gets (a compressed answer's usage could not be read). */
static int header_forbidden(const char *lower) {
  static const char *const deny[] = {
      "authorization", "proxy-authorization", "x-api-key", "host",
      "content-length", "transfer-encoding", "connection", "keep-alive",
      "proxy-connection", "upgrade", "te", "trailer", "expect",
      "x-request-id", "content-type", "content-encoding", "accept-encoding"};
  for (size_t i = 0; i < sizeof deny / sizeof deny[0]; i++)
    if (strcmp(lower, deny[i]) == 0)
      return 1;
  return 0;
}

static void parse_forward_headers(ydoc_t *d, yaml_node_t *n) {
  tg_config_t *cfg = d->ld->cfg;
  if (get_seq(d, n, "forward_headers", MAX_FORWARD_HEADERS) < 0)
    return;
  size_t count =
      (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
  cfg->forward_headers = xcalloc(d->ld, count, sizeof(char *));
  if (cfg->forward_headers == NULL)
    return;
  for (size_t i = 0; i < count; i++) {
    yaml_node_t *it = ynode(d, n->data.sequence.items.start[i]);
    char path[PATH_TEXT];
    char *h = NULL;
    index_path(path, sizeof path, "forward_headers", i);
    if (it == NULL || get_string(d, it, path, &h) < 0)
      continue;
    for (char *q = h; *q; q++)
      if (*q >= 'A' && *q <= 'Z')
        *q = (char)(*q - 'A' + 'a');
    if (!header_name_ok(h)) {
      yerr(d, it, path, "'%s' is not a valid header name", yscalar(it));
      free(h);
    } else if (header_forbidden(h)) {
      yerr(d, it, path,
           "'%s' cannot be forwarded (it carries the gateway credentials or "
           "belongs to the connection)",
           h);
      free(h);
    } else {
      cfg->forward_headers[cfg->n_forward_headers++] = h;
    }
  }
}

static void parse_timeouts(ydoc_t *d, yaml_node_t *n) {
  static const char *const names[] = {
      "client_request",      "client_keepalive", "client_send",
      "upstream_connect",    "upstream_first_byte", "upstream_idle",
      "drain",               "queue",            "worker_stall"};
  enum { NT = sizeof names / sizeof names[0] };
  tg_config_t *cfg = d->ld->cfg;
  uint64_t *dst[NT] = {
      &cfg->client_request_timeout_ms,      &cfg->client_keepalive_timeout_ms,
      &cfg->client_send_timeout_ms,         &cfg->upstream_connect_timeout_ms,
      &cfg->upstream_first_byte_timeout_ms, &cfg->upstream_idle_timeout_ms,
      &cfg->drain_timeout_ms, &cfg->queue_timeout_ms, &cfg->worker_stall_timeout_ms};
  yaml_node_t *v[NT], *k[NT];
  if (map_fields(d, n, "timeouts", names, NT, v, k) < 0)
    return;
  for (size_t i = 0; i < NT; i++) {
    char path[PATH_TEXT];
    if (v[i] == NULL)
      continue;
    join_path(path, sizeof path, "timeouts", names[i]);
    /* A drain of 0 means "close at once"; every other timeout must be real. */
    get_duration(d, v[i], path, strcmp(names[i], "drain") == 0, dst[i]);
  }
}

static void parse_global_rate_limit(ydoc_t *d, yaml_node_t *n) {
  static const char *const names[] = {"requests_per_second"};
  yaml_node_t *v[1], *k[1];
  int64_t rps;
  if (map_fields(d, n, "global_rate_limit", names, 1, v, k) < 0)
    return;
  if (v[0] != NULL &&
      get_int(d, v[0], "global_rate_limit.requests_per_second", 0,
              MAX_GLOBAL_RPS, &rps) == 0)
    d->ld->cfg->global_requests_per_second = rps;
}

static int class_name_ok(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > MAX_TENANT_NAME)
    return 0;
  for (; *s; s++)
    if (!host_char_ok(*s))
      return 0;
  return 1;
}

static void free_classes(tg_config_t *cfg) {
  for (size_t i = 0; i < cfg->n_priority_classes; i++)
    free(cfg->priority_classes[i].name);
  free(cfg->priority_classes);
  cfg->priority_classes = NULL;
  cfg->n_priority_classes = 0;
}

static void parse_priority_classes(ydoc_t *d, yaml_node_t *n) {
  loader_t *ld = d->ld;
  tg_config_t *cfg = ld->cfg;
  const char *where = "priority_classes";
  if (n->type != YAML_MAPPING_NODE) {
    yerr(d, n, where, "expected a mapping, got %s", node_kind(n));
    ld->classes_ok = 0;
    return;
  }
  size_t count = map_len(n);
  if (count == 0 || count > MAX_PRIORITY_CLASSES) {
    yerr(d, n, where, "expected 1..%d priority classes, got %zu",
         MAX_PRIORITY_CLASSES, count);
    ld->classes_ok = 0;
    return;
  }
  free_classes(cfg);
  cfg->priority_classes = xcalloc(ld, count, sizeof *cfg->priority_classes);
  if (cfg->priority_classes == NULL)
    return;
  for (yaml_node_pair_t *p = n->data.mapping.pairs.start;
       p < n->data.mapping.pairs.top; p++) {
    yaml_node_t *k = ynode(d, p->key), *v = ynode(d, p->value);
    char path[PATH_TEXT];
    int dup = 0;
    if (k == NULL || v == NULL || scalar_text(d, k, where, "a string key") < 0)
      continue;
    const char *name = yscalar(k);
    if (!class_name_ok(name)) {
      yerr(d, k, where,
           "invalid class name '%s' (letters, digits, '.', '_', '-'; at most "
           "%d)",
           name, MAX_TENANT_NAME);
      continue;
    }
    for (size_t i = 0; i < cfg->n_priority_classes; i++)
      if (strcmp(cfg->priority_classes[i].name, name) == 0)
        dup = 1;
    if (dup) {
      yerr(d, k, where, "duplicate key '%s'", name);
      continue;
    }
    tg_priority_class_t *c = &cfg->priority_classes[cfg->n_priority_classes];
    c->name = xstrdup(ld, name);
    if (c->name == NULL)
      return;
    cfg->n_priority_classes++;
    join_path(path, sizeof path, where, name);
    if (is_null(v))
      yerr(d, v, path, "expected an integer weight");
    else
      get_int(d, v, path, 1, MAX_CLASS_VALUE, &c->value);
  }
}

static const tg_priority_class_t *find_class(const tg_config_t *cfg,
                                             const char *name) {
  for (size_t i = 0; i < cfg->n_priority_classes; i++)
    if (strcmp(cfg->priority_classes[i].name, name) == 0)
      return &cfg->priority_classes[i];
  return NULL;
}

/* ---- models --------------------------------------------------------------- */

static int model_name_ok(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > MAX_MODEL_NAME)
    return 0;
  for (; *s; s++)
    if (!host_char_ok(*s) && strchr(":/@+", *s) == NULL)
      return 0;
  return 1;
}

static void parse_price(ydoc_t *d, yaml_node_t *n, const char *path,
                        tg_nano_t *out) {
  if (scalar_text(d, n, path, "a decimal price") < 0)
    return;
  int rc = tg_money_parse_per_1k(yscalar(n), out);
  if (rc == TG_ETOOBIG || (rc == 0 && *out > TG_PRICE_NANO_PER_TOKEN_MAX))
    yerr(d, n, path, "price '%s' is too large (at most 1000 USD per 1K tokens)", yscalar(n));
  else if (rc < 0 && tg_money_parse_usd(yscalar(n), &(tg_nano_t){0}) == 0)
    yerr(d, n, path,
         "price '%s' is not a whole number of nano-USD per token (at most 6 "
         "decimal places in USD per 1K tokens)",
         yscalar(n));
  else if (rc < 0)
    yerr(d, n, path,
         "expected an exact decimal USD amount per 1K tokens like \"0.0005\", "
         "got '%s'",
         yscalar(n));
}

/* Writes an upstream URL's scheme and host in lower case (RFC 3986: both
 * are case-insensitive), so one server is one endpoint however its URL is
 * written: "http://GPU-1:8000" and "http://gpu-1:8000" share one slot
 * count. The path keeps its case. */
static void url_lower_host(char *url) {
  char *p = strstr(url, "://");
  char *end;
  if (p == NULL)
    return;
  end = p + 3 + strcspn(p + 3, "/");
  for (p = url; p < end; p++)
    if (*p >= 'A' && *p <= 'Z')
      *p = (char)(*p - 'A' + 'a');
}

/* An endpoint is one server with one max_inflight (the gateway keeps one
 * slot count per URL, shared by every model that lists it, as a vLLM
 * serving several LoRA adapters under several model names shares its
 * sequences): a URL listed twice in one model, or under two models with
 * different caps, is refused. e is m's next endpoint, not yet counted.
 * Returns 1 when e may be added. */
static int endpoint_unique(ydoc_t *d, const tg_model_cfg_t *m, const tg_endpoint_cfg_t *e,
                           yaml_node_t *at, const char *path) {
  const tg_config_t *cfg = d->ld->cfg;
  size_t mi = (size_t)(m - cfg->models);
  const ntab_slot_t *prev;
  const tg_model_cfg_t *pm;
  const tg_endpoint_cfg_t *pe;

  if (d->ld->endpoints.slots == NULL)
    return 1; /* no table (out of memory, noted): not checked */
  prev = ntab_put(&d->ld->endpoints, e->url, mi << 8 | m->n_endpoints, yline(at));
  if (prev == NULL)
    return 1;
  pm = &cfg->models[prev->idx >> 8];
  pe = &pm->endpoints[prev->idx & 0xff];
  if (pm == m) {
    yerr(d, at, path, "endpoint '%s' is listed twice for this model (first at line %lu)",
         e->url, prev->line);
    return 0;
  }
  if (pe->max_inflight != e->max_inflight) {
    yerr(d, at, path,
         "endpoint '%s' has max_inflight %d here and %d under model '%s' (line %lu): "
         "one server has one cap, shared by the models it serves",
         e->url, e->max_inflight, pe->max_inflight, pm->name, prev->line);
    return 0;
  }
  return 1;
}

static void parse_endpoints(ydoc_t *d, tg_model_cfg_t *m, yaml_node_t *n,
                            const char *where) {
  static const char *const names[] = {"url", "max_inflight"};
  if (get_seq(d, n, where, MAX_ENDPOINTS) < 0)
    return;
  size_t count =
      (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
  if (count == 0) {
    yerr(d, n, where, "no endpoints (at least one is required)");
    return;
  }
  m->endpoints = xcalloc(d->ld, count, sizeof *m->endpoints);
  if (m->endpoints == NULL)
    return;
  for (size_t i = 0; i < count; i++) {
    yaml_node_t *it = ynode(d, n->data.sequence.items.start[i]);
    yaml_node_t *v[2], *k[2];
    char path[PATH_TEXT], fpath[PATH_TEXT];
    index_path(path, sizeof path, where, i);
    if (it == NULL || map_fields(d, it, path, names, 2, v, k) < 0)
      continue;
    tg_endpoint_cfg_t *e = &m->endpoints[m->n_endpoints];
    int ok = 1;
    e->max_inflight = 256;
    if (v[1] != NULL) {
      int64_t mi;
      join_path(fpath, sizeof fpath, path, "max_inflight");
      if (get_int(d, v[1], fpath, 1, MAX_INFLIGHT, &mi) == 0)
        e->max_inflight = (int)mi;
      else
        ok = 0;
    }
    join_path(fpath, sizeof fpath, path, "url");
    if (v[0] == NULL) {
      yerr(d, k[0] ? k[0] : it, path, "missing required key 'url'");
      ok = 0;
    } else if (get_string(d, v[0], fpath, &e->url) < 0) {
      ok = 0;
    } else {
      const char *why;
      url_lower_host(e->url);
      why = check_url(e->url);
      if (why != NULL) {
        yerr(d, v[0], fpath, "%s, got '%s'", why, e->url);
        ok = 0;
      } else if (d->ld->cfg->upstream_native == TG_UPSTREAM_CLIENT_NATIVE &&
                 strncmp(e->url, "https://", 8) == 0) {
        /* The native client speaks plain HTTP/1.1 only; a silent fallback
         * would hide which client serves the endpoint. */
        yerr(d, v[0], fpath,
             "upstream_client 'native' serves only http:// endpoints, got '%s'", e->url);
        ok = 0;
      }
    }
    if (!ok) {
      /* The slot is reused by the next endpoint. */
      free(e->url);
      e->url = NULL;
      continue;
    }
    for (size_t l = strlen(e->url); l > 0 && e->url[l - 1] == '/'; l--)
      e->url[l - 1] = '\0';
    if (!endpoint_unique(d, m, e, v[1] ? v[1] : v[0], path)) {
      free(e->url);
      e->url = NULL;
      continue;
    }
    m->n_endpoints++;
  }
}

/* A scalar that is one of two words: *out becomes 0 for a, 1 for b (the
 * values of the enums it fills: TG_MODEL_CHAT/EMBEDDING,
 * TG_CACHE_SALT_TENANT/OFF); anything else is reported at n. */
static void get_either(ydoc_t *d, yaml_node_t *n, const char *path, const char *a,
                       const char *b, int *out) {
  const char *s;
  if (scalar_text(d, n, path, "a string") != 0)
    return;
  s = yscalar(n);
  if (strcmp(s, a) == 0 || strcmp(s, b) == 0)
    *out = strcmp(s, b) == 0;
  else
    yerr(d, n, path, "expected '%s' or '%s', got '%s'", a, b, s);
}

static void parse_model(ydoc_t *d, tg_model_cfg_t *m, yaml_node_t *key,
                        yaml_node_t *n, const char *where) {
  static const char *const names[] = {"kind", "max_tokens", "endpoints",
                                      "pricing", "cache_salt", "media_tokens"};
  enum { F_KIND, F_MAX_TOKENS, F_ENDPOINTS, F_PRICING, F_CACHE_SALT, F_MEDIA_TOKENS, NF };
  static const char *const pnames[] = {"prompt_per_1k_usd",
                                       "completion_per_1k_usd"};
  yaml_node_t *v[NF], *k[NF];
  char path[PATH_TEXT];

  if (is_null(n)) {
    yerr(d, key, where, "no endpoints (at least one is required)");
    return;
  }
  if (map_fields(d, n, where, names, NF, v, k) < 0)
    return;
  if (v[F_KIND] != NULL) {
    join_path(path, sizeof path, where, "kind");
    get_either(d, v[F_KIND], path, "chat", "embedding", &m->kind);
  }
  if (v[F_MAX_TOKENS] != NULL) {
    join_path(path, sizeof path, where, "max_tokens");
    get_int(d, v[F_MAX_TOKENS], path, 1, MAX_TOKENS_CAP, &m->max_tokens);
  }
  if (v[F_MEDIA_TOKENS] != NULL) {
    join_path(path, sizeof path, where, "media_tokens");
    get_int(d, v[F_MEDIA_TOKENS], path, 0, MAX_TOKENS_CAP, &m->media_tokens);
  }
  if (v[F_CACHE_SALT] != NULL) {
    join_path(path, sizeof path, where, "cache_salt");
    get_either(d, v[F_CACHE_SALT], path, "tenant", "off", &m->cache_salt);
  }
  join_path(path, sizeof path, where, "endpoints");
  if (v[F_ENDPOINTS] == NULL)
    yerr(d, k[F_ENDPOINTS] ? k[F_ENDPOINTS] : key, where,
         "no endpoints (at least one is required)");
  else
    parse_endpoints(d, m, v[F_ENDPOINTS], path);
  if (v[F_PRICING] != NULL) {
    yaml_node_t *pv[2], *pk[2];
    join_path(path, sizeof path, where, "pricing");
    if (map_fields(d, v[F_PRICING], path, pnames, 2, pv, pk) == 0) {
      tg_nano_t *dst[2] = {&m->prompt_nano_per_token,
                           &m->completion_nano_per_token};
      for (size_t i = 0; i < 2; i++) {
        char ppath[PATH_TEXT];
        if (pv[i] == NULL) {
          yerr(d, v[F_PRICING], path, "missing required key '%s'", pnames[i]);
          continue;
        }
        join_path(ppath, sizeof ppath, path, pnames[i]);
        parse_price(d, pv[i], ppath, dst[i]);
      }
    }
  }
}

/* How many endpoints the models mapping n lists (each list counted up to
 * its bound): the size of the loader's endpoint table. */
static size_t count_endpoints(ydoc_t *d, yaml_node_t *n) {
  size_t total = 0;
  for (yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top; p++) {
    yaml_node_t *v = ynode(d, p->value);
    if (v == NULL || v->type != YAML_MAPPING_NODE)
      continue;
    for (yaml_node_pair_t *q = v->data.mapping.pairs.start; q < v->data.mapping.pairs.top; q++) {
      yaml_node_t *k = ynode(d, q->key), *e = ynode(d, q->value);
      if (k != NULL && e != NULL && k->type == YAML_SCALAR_NODE &&
          strcmp(yscalar(k), "endpoints") == 0 && e->type == YAML_SEQUENCE_NODE) {
        size_t c = (size_t)(e->data.sequence.items.top - e->data.sequence.items.start);
        total += c < MAX_ENDPOINTS ? c : MAX_ENDPOINTS;
      }
    }
  }
  return total;
}

static void parse_models(ydoc_t *d, yaml_node_t *key, yaml_node_t *n) {
  loader_t *ld = d->ld;
  tg_config_t *cfg = ld->cfg;
  const char *where = "models";
  if (n == NULL) {
    yerr(d, key, where, "at least one model is required");
    return;
  }
  if (n->type != YAML_MAPPING_NODE) {
    yerr(d, n, where, "expected a mapping, got %s", node_kind(n));
    return;
  }
  size_t count = map_len(n);
  if (count == 0) {
    yerr(d, n, where, "at least one model is required");
    return;
  }
  if (count > MAX_MODELS) {
    yerr(d, n, where, "too many models (%zu, at most %d)", count, MAX_MODELS);
    return;
  }
  cfg->models = xcalloc(ld, count, sizeof *cfg->models);
  if (cfg->models == NULL || ntab_init(&cfg->index->models, count) < 0 ||
      ntab_init(&ld->endpoints, count_endpoints(d, n)) < 0) {
    ld->nomem = 1;
    return;
  }
  ld->models_ok = 1;
  for (yaml_node_pair_t *p = n->data.mapping.pairs.start;
       p < n->data.mapping.pairs.top; p++) {
    yaml_node_t *k = ynode(d, p->key), *v = ynode(d, p->value);
    char path[PATH_TEXT];
    if (k == NULL || v == NULL || scalar_text(d, k, where, "a string key") < 0)
      continue;
    const char *name = yscalar(k);
    if (!model_name_ok(name)) {
      yerr(d, k, where,
           "invalid model name '%s' (letters, digits and . _ - : / @ +; at "
           "most %d)",
           name, MAX_MODEL_NAME);
      continue;
    }
    if (strcasecmp(name, "TOTAL") == 0) {
      /* the CSV invoice's last line is the total, with TOTAL as its model */
      yerr(d, k, where,
           "model name '%s' is reserved (the CSV invoice's total line)", name);
      continue;
    }
    if (strcmp(name, TG_METRICS_OTHER) == 0) {
      yerr(d, k, where, "model name '%s' is reserved (the metrics' overflow series)", name);
      continue;
    }
    tg_model_cfg_t *m = &cfg->models[cfg->n_models];
    m->name = xstrdup(ld, name);
    if (m->name == NULL)
      return;
    const ntab_slot_t *prev =
        ntab_put(&cfg->index->models, m->name, cfg->n_models, yline(k));
    if (prev != NULL) {
      yerr(d, k, where, "duplicate key '%s' (first at line %lu)", name,
           prev->line);
      free(m->name);
      m->name = NULL;
      continue;
    }
    m->max_tokens = 4096;
    m->media_tokens = 2048;
    m->kind = TG_MODEL_CHAT;
    cfg->n_models++;
    join_path(path, sizeof path, where, name);
    parse_model(d, m, k, v, path);
  }
}

/* ---- tenants -------------------------------------------------------------- */

static int tenant_name_ok(const char *s) {
  return class_name_ok(s); /* same alphabet: names end up in keys and labels */
}

int tg_config_tenant_name_ok(const char *name) {
  return tenant_name_ok(name);
}

static void parse_budget(ydoc_t *d, tg_tenant_cfg_t *t, yaml_node_t *n,
                         const char *where) {
  static const char *const names[] = {"daily_limit_usd", "monthly_limit_usd",
                                      "alert_threshold_percent"};
  yaml_node_t *v[3], *k[3];
  char path[PATH_TEXT];
  if (map_fields(d, n, where, names, 3, v, k) < 0)
    return;
  tg_nano_t *dst[2] = {&t->daily_limit_nano, &t->monthly_limit_nano};
  for (size_t i = 0; i < 2; i++) {
    if (v[i] == NULL)
      continue;
    join_path(path, sizeof path, where, names[i]);
    if (scalar_text(d, v[i], path, "a decimal USD amount") < 0)
      continue;
    tg_nano_t amount = 0;
    int rc = tg_money_parse_usd(yscalar(v[i]), &amount);
    if (rc == TG_ETOOBIG)
      yerr(d, v[i], path, "amount '%s' is too large", yscalar(v[i]));
    else if (rc < 0)
      yerr(d, v[i], path,
           "expected an exact decimal USD amount like 500.00 (at most 9 "
           "decimal places), got '%s'",
           yscalar(v[i]));
    else if (amount == 0)
      yerr(d, v[i], path, "must be greater than 0 (omit it for no limit)");
    else
      *dst[i] = amount;
  }
  if (v[2] != NULL) {
    int64_t pct;
    join_path(path, sizeof path, where, names[2]);
    if (get_int(d, v[2], path, 1, 100, &pct) == 0)
      t->alert_threshold_percent = (int)pct;
  }
}

static void parse_rate_limits(ydoc_t *d, tg_tenant_cfg_t *t, yaml_node_t *n,
                              const char *where) {
  static const char *const names[] = {"requests_per_minute",
                                      "tokens_per_minute",
                                      "concurrent_requests"};
  const int64_t max[] = {MAX_RATE, MAX_RATE, MAX_CONCURRENT};
  int64_t *dst[] = {&t->requests_per_minute, &t->tokens_per_minute,
                    &t->concurrent_requests};
  yaml_node_t *v[3], *k[3];
  if (map_fields(d, n, where, names, 3, v, k) < 0)
    return;
  for (size_t i = 0; i < 3; i++) {
    char path[PATH_TEXT];
    if (v[i] == NULL)
      continue;
    /* 0 would be ambiguous (block everything? no limit?): omit the key for
     * no limit. */
    join_path(path, sizeof path, where, names[i]);
    get_int(d, v[i], path, 1, max[i], dst[i]);
  }
}

static void parse_models_allowed(ydoc_t *d, tg_tenant_cfg_t *t,
                                 yaml_node_t *n, const char *where) {
  loader_t *ld = d->ld;
  if (get_seq(d, n, where, MAX_MODELS_ALLOWED) < 0)
    return;
  size_t count =
      (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
  t->models_allowed = xcalloc(ld, count, sizeof(char *));
  if (t->models_allowed == NULL)
    return;
  for (size_t i = 0; i < count; i++) {
    yaml_node_t *it = ynode(d, n->data.sequence.items.start[i]);
    char *name = NULL;
    if (it == NULL || get_string(d, it, where, &name) < 0)
      continue;
    if (ld->models_ok && ntab_get(&ld->cfg->index->models, name) == NULL) {
      yerr(d, it, where, "unknown model '%s' (not defined in models)", name);
      free(name);
      continue;
    }
    t->models_allowed[t->n_models_allowed++] = name;
  }
}

static void class_list(const tg_config_t *cfg, char *buf, size_t size) {
  size_t used = 0;
  buf[0] = '\0';
  for (size_t i = 0; i < cfg->n_priority_classes && used < size; i++) {
    int w = snprintf(buf + used, size - used, "%s%s", i ? ", " : "",
                     cfg->priority_classes[i].name);
    if (w < 0)
      break;
    used += (size_t)w;
  }
}

static void parse_tenant(ydoc_t *d, tg_tenant_cfg_t *t, yaml_node_t *key,
                         yaml_node_t *n, const char *where) {
  static const char *const names[] = {"tier", "models_allowed", "rate_limits",
                                      "budget", "priority", "retention_days"};
  enum { F_TIER, F_MODELS, F_RATES, F_BUDGET, F_PRIORITY, F_RETENTION, NF };
  loader_t *ld = d->ld;
  yaml_node_t *v[NF], *k[NF];
  char path[PATH_TEXT];

  if (is_null(n)) {
    yerr(d, key, where, "missing required key 'models_allowed'");
    return;
  }
  if (map_fields(d, n, where, names, NF, v, k) < 0)
    return;
  if (v[F_TIER] != NULL) {
    join_path(path, sizeof path, where, "tier");
    get_string(d, v[F_TIER], path, &t->tier);
  }
  join_path(path, sizeof path, where, "models_allowed");
  if (v[F_MODELS] == NULL)
    yerr(d, k[F_MODELS] ? k[F_MODELS] : key, where,
         "missing required key 'models_allowed'");
  else
    parse_models_allowed(d, t, v[F_MODELS], path);
  if (v[F_RATES] != NULL) {
    join_path(path, sizeof path, where, "rate_limits");
    parse_rate_limits(d, t, v[F_RATES], path);
  }
  if (v[F_BUDGET] != NULL) {
    join_path(path, sizeof path, where, "budget");
    parse_budget(d, t, v[F_BUDGET], path);
  }
  if (v[F_RETENTION] != NULL) {
    int64_t days;
    join_path(path, sizeof path, where, "retention_days");
    /* at least the current and previous month are always kept anyway */
    if (get_int(d, v[F_RETENTION], path, 1, 36500, &days) == 0)
      t->retention_days = (int)days;
  }

  join_path(path, sizeof path, where, "priority");
  if (v[F_PRIORITY] != NULL) {
    if (get_string(d, v[F_PRIORITY], path, &t->priority) < 0)
      return;
  } else {
    t->priority = xstrdup(ld, "medium");
    if (t->priority == NULL)
      return;
  }
  if (!ld->classes_ok)
    return;
  const tg_priority_class_t *c = find_class(ld->cfg, t->priority);
  if (c != NULL) {
    t->priority_weight = c->value;
  } else {
    char known[512];
    class_list(ld->cfg, known, sizeof known);
    if (v[F_PRIORITY] != NULL)
      yerr(d, v[F_PRIORITY], path,
           "unknown priority class '%s' (priority_classes has: %s)",
           t->priority, known);
    else
      yerr(d, key, where,
           "no priority set and there is no 'medium' priority class "
           "(priority_classes has: %s)",
           known);
  }
}

static void parse_tenants(ydoc_t *d, yaml_node_t *n) {
  loader_t *ld = d->ld;
  tg_config_t *cfg = ld->cfg;
  const char *where = "tenants";
  if (n->type != YAML_MAPPING_NODE) {
    yerr(d, n, where, "expected a mapping, got %s", node_kind(n));
    return;
  }
  size_t count = map_len(n);
  if (count > MAX_TENANTS) {
    yerr(d, n, where, "too many tenants (%zu, at most %d)", count,
         MAX_TENANTS);
    return;
  }
  cfg->tenants = xcalloc(ld, count, sizeof *cfg->tenants);
  if (cfg->tenants == NULL || ntab_init(&cfg->index->tenants, count) < 0) {
    ld->nomem = 1;
    return;
  }
  for (yaml_node_pair_t *p = n->data.mapping.pairs.start;
       p < n->data.mapping.pairs.top; p++) {
    yaml_node_t *k = ynode(d, p->key), *v = ynode(d, p->value);
    char path[PATH_TEXT];
    if (k == NULL || v == NULL || scalar_text(d, k, where, "a string key") < 0)
      continue;
    const char *name = yscalar(k);
    if (!tenant_name_ok(name)) {
      yerr(d, k, where,
           "invalid tenant name '%s' (letters, digits, '.', '_', '-'; at "
           "most %d)",
           name, MAX_TENANT_NAME);
      continue;
    }
    if (strcmp(name, TG_METRICS_OTHER) == 0) {
      /* the tenant of the series past a full metrics table */
      yerr(d, k, where, "tenant name '%s' is reserved (the metrics' overflow series)", name);
      continue;
    }
    tg_tenant_cfg_t *t = &cfg->tenants[cfg->n_tenants];
    t->name = xstrdup(ld, name);
    if (t->name == NULL)
      return;
    const ntab_slot_t *prev =
        ntab_put(&cfg->index->tenants, t->name, cfg->n_tenants, yline(k));
    if (prev != NULL) {
      yerr(d, k, where, "duplicate key '%s' (first at line %lu)", name,
           prev->line);
      free(t->name);
      t->name = NULL;
      continue;
    }
    t->alert_threshold_percent = 80;
    t->retention_days = TG_DEFAULT_RETENTION_DAYS;
    cfg->n_tenants++;
    join_path(path, sizeof path, where, name);
    parse_tenant(d, t, k, v, path);
  }
}

/* Frees the tenants and their index, leaving none. */
static void free_tenants(tg_config_t *cfg) {
  for (size_t i = 0; i < cfg->n_tenants; i++) {
    tg_tenant_cfg_t *t = &cfg->tenants[i];
    for (size_t j = 0; j < t->n_models_allowed; j++)
      free(t->models_allowed[j]);
    free(t->models_allowed);
    free(t->name);
    free(t->tier);
    free(t->priority);
  }
  free(cfg->tenants);
  cfg->tenants = NULL;
  cfg->n_tenants = 0;
  if (cfg->index != NULL) {
    free(cfg->index->tenants.slots);
    cfg->index->tenants = (ntab_t){0};
  }
}

/* ---- files ---------------------------------------------------------------- */

/* Reads the whole file into *buf, at most MAX_FILE_BYTES whatever its size
 * said: a file of /proc says 0, and a file may grow while it is read.
 * Returns 0, or -1 with why set. */
static int read_bounded(FILE *f, char **buf, size_t *len, char *why,
                        size_t whysz) {
  size_t cap = 0, n = 0;
  char *b = NULL;
  for (;;) {
    if (n == cap) {
      /* one byte past the bound tells a too-big file from one just at it */
      size_t ncap = cap ? cap * 2 : 65536;
      if (ncap > (size_t)MAX_FILE_BYTES + 1)
        ncap = (size_t)MAX_FILE_BYTES + 1;
      if (n == ncap) {
        snprintf(why, whysz, "file is larger than %lld bytes", MAX_FILE_BYTES);
        free(b);
        return -1;
      }
      char *nb = realloc(b, ncap);
      if (nb == NULL) {
        snprintf(why, whysz, "%s", strerror(ENOMEM));
        free(b);
        return -1;
      }
      b = nb;
      cap = ncap;
    }
    size_t got = fread(b + n, 1, cap - n, f);
    n += got;
    if (got == 0) {
      if (ferror(f)) {
        snprintf(why, whysz, "%s", strerror(errno ? errno : EIO));
        free(b);
        return -1;
      }
      break;
    }
  }
  *buf = b;
  *len = n;
  return 0;
}

/* libyaml's scanner keeps one possible simple key per flow level and checks
 * them all for every token, and its loader looks anchors up in a flat list,
 * so nesting and anchors cost quadratic time (a 1 MiB file of '[' takes
 * most of an hour, while a reload holds the main loop and its SIGTERM);
 * and aliases multiply what the schema walk visits (a 4 MB tenants file
 * aliasing one 4096-model list from 100000 tenants asks for 400 million
 * copies). This pass reads events only, so it stops at the first excess
 * after work linear in what it read, and refuses nesting deeper than
 * MAX_DEPTH, more than MAX_ANCHORS anchors, and aliases that expand the
 * file beyond MAX_NODES nodes (more than a file of MAX_FILE_BYTES holds
 * without them). A YAML error is left to the load that follows, which
 * meets the same one. Returns 0, or -1 after reporting. */
#define MAX_DEPTH 64    /* the schema itself needs 5 */
#define MAX_ANCHORS 256
#define MAX_NODES ((uint64_t)MAX_FILE_BYTES / 2) /* 8388608: "a," per node */

typedef struct {
  char *name;
  uint64_t start; /* nodes counted when its node began */
  uint64_t size;  /* nodes it stands for; 0 while its node is still open */
} anchor_t;

/* Adds a node that starts with ev; returns why it is refused, or NULL. */
static const char *prescan_node(const yaml_event_t *ev, anchor_t *anchors,
                                size_t *n_anchors, size_t *open, int *depth,
                                uint64_t nodes, int *nomem) {
  const yaml_char_t *anchor = ev->type == YAML_SCALAR_EVENT
                                  ? ev->data.scalar.anchor
                              : ev->type == YAML_SEQUENCE_START_EVENT
                                  ? ev->data.sequence_start.anchor
                                  : ev->data.mapping_start.anchor;
  size_t slot = SIZE_MAX;
  if (anchor != NULL) {
    if (*n_anchors == MAX_ANCHORS)
      return "more than 256 YAML anchors" /* MAX_ANCHORS */;
    char *name = strdup((const char *)anchor);
    if (name == NULL) {
      *nomem = 1;
      return NULL;
    }
    slot = (*n_anchors)++;
    anchors[slot] = (anchor_t){name, nodes, 1};
  }
  if (ev->type == YAML_SCALAR_EVENT)
    return NULL;
  if (*depth == MAX_DEPTH)
    return "YAML nesting deeper than 64 levels" /* MAX_DEPTH */;
  open[(*depth)++] = slot;
  if (slot != SIZE_MAX)
    anchors[slot].size = 0;
  return NULL;
}

static int yaml_prescan(ydoc_t *d, const char *buf, size_t len) {
  yaml_parser_t parser;
  yaml_event_t ev;
  anchor_t anchors[MAX_ANCHORS];
  size_t n_anchors = 0, open[MAX_DEPTH];
  int depth = 0, nomem = 0, done = 0;
  uint64_t nodes = 0;
  const char *why = NULL;

  if (!yaml_parser_initialize(&parser)) {
    d->ld->nomem = 1;
    return -1;
  }
  yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
  while (!done && why == NULL && !nomem && yaml_parser_parse(&parser, &ev)) {
    switch (ev.type) {
    case YAML_STREAM_END_EVENT:
      done = 1;
      break;
    case YAML_ALIAS_EVENT: {
      uint64_t size = 1; /* an undefined alias is the load's to report */
      for (size_t i = n_anchors; i-- > 0;)
        if (strcmp(anchors[i].name, (const char *)ev.data.alias.anchor) == 0) {
          size = anchors[i].size ? anchors[i].size : 1;
          break;
        }
      nodes += size;
      break;
    }
    case YAML_SCALAR_EVENT:
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT:
      why = prescan_node(&ev, anchors, &n_anchors, open, &depth, nodes, &nomem);
      nodes++;
      break;
    case YAML_SEQUENCE_END_EVENT:
    case YAML_MAPPING_END_EVENT:
      depth--;
      if (open[depth] != SIZE_MAX)
        anchors[open[depth]].size = nodes - anchors[open[depth]].start;
      break;
    default:
      break;
    }
    if (why == NULL && nodes > MAX_NODES)
      why = "aliases expand the file beyond 8388608 nodes" /* MAX_NODES */;
    if (why != NULL)
      add_err(d->ld, d->rank, d->file, (unsigned long)ev.start_mark.line + 1,
              why);
    yaml_event_delete(&ev);
  }
  yaml_parser_delete(&parser);
  for (size_t i = 0; i < n_anchors; i++)
    free(anchors[i].name);
  if (nomem)
    d->ld->nomem = 1;
  return why != NULL || nomem ? -1 : 0;
}

/* The line of byte off in UTF-8 text, counting line breaks as libyaml
 * does: LF, CR, CR LF, and NEL, LS and PS. */
static unsigned long line_of(const char *buf, size_t off) {
  const unsigned char *p = (const unsigned char *)buf;
  unsigned long line = 1;
  for (size_t i = 0; i < off; i++) {
    if (p[i] == '\n' || (p[i] == '\r' && (i + 1 >= off || p[i + 1] != '\n')))
      line++;
    else if (i + 1 < off && p[i] == 0xC2 && p[i + 1] == 0x85)
      line++;
    else if (i + 2 < off && p[i] == 0xE2 && p[i + 1] == 0x80 &&
             (p[i + 2] == 0xA8 || p[i + 2] == 0xA9))
      line++;
  }
  return line;
}

/* Loads path into d->doc. Returns 0 when a document was loaded (its root
 * may still be NULL for an empty file), -1 when the file cannot be read
 * (why holds the reason; the caller reports it where the file was named),
 * -2 on a YAML syntax error or a refused shape (reported here, against the
 * file itself). */
static int ydoc_load(ydoc_t *d, const char *path, char *why, size_t whysz) {
  yaml_parser_t parser;
  struct stat st;
  int rc = -1;
  char *buf = NULL;
  size_t len = 0;
  FILE *f = NULL;
  /* O_NONBLOCK: opening a FIFO would wait for a writer, for ever */
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);

  if (fd < 0) {
    snprintf(why, whysz, "%s", strerror(errno));
    return -1;
  }
  if (fstat(fd, &st) != 0) {
    snprintf(why, whysz, "%s", strerror(errno));
    close(fd);
    return -1;
  }
  if (!S_ISREG(st.st_mode)) {
    /* a FIFO, a terminal or a socket can keep a read waiting for ever (on
     * a reload, the main loop), and none gives a reload the same text */
    snprintf(why, whysz, "%s",
             S_ISDIR(st.st_mode) ? strerror(EISDIR)
             : S_ISFIFO(st.st_mode) ? "not a regular file (a FIFO)"
             : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "not a regular file (a device)"
                                                           : "not a regular file");
    close(fd);
    return -1;
  }
  if ((long long)st.st_size > MAX_FILE_BYTES) {
    snprintf(why, whysz, "file is larger than %lld bytes", MAX_FILE_BYTES);
    close(fd);
    return -1;
  }
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0 ||
      (f = fdopen(fd, "rb")) == NULL) {
    snprintf(why, whysz, "%s", strerror(errno));
    close(fd);
    return -1;
  }
  rc = read_bounded(f, &buf, &len, why, whysz);
  fclose(f);
  if (rc < 0)
    return -1;
  if (yaml_prescan(d, buf, len) < 0) {
    free(buf);
    return -2;
  }
  if (!yaml_parser_initialize(&parser)) {
    d->ld->nomem = 1;
    free(buf);
    return -2;
  }
  yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
  if (!yaml_parser_load(&parser, &d->doc)) {
    goto syntax;
  }
  d->have_doc = 1;
  /* A second document would be silently ignored by a naive loader; an
   * operator who appended one most likely expected it to count. */
  yaml_document_t extra;
  if (!yaml_parser_load(&parser, &extra))
    goto syntax;
  if (yaml_document_get_root_node(&extra) != NULL)
    add_err(d->ld, d->rank, d->file,
            (unsigned long)extra.start_mark.line + 1,
            "only one YAML document is allowed in the file");
  yaml_document_delete(&extra);
  rc = 0;
  goto out;

syntax:
  if (parser.error == YAML_MEMORY_ERROR) {
    d->ld->nomem = 1;
  } else {
    char msg[768];
    unsigned long line = (unsigned long)parser.problem_mark.line + 1;
    if (parser.error == YAML_READER_ERROR) {
      snprintf(msg, sizeof msg, "YAML error: %s at byte %zu",
               parser.problem ? parser.problem : "unreadable input",
               parser.problem_offset);
      /* libyaml gives the byte, not the line, of an undecodable one */
      size_t at = parser.problem_offset < len ? parser.problem_offset : len;
      line = parser.encoding == YAML_UTF8_ENCODING ? line_of(buf, at) : 1;
    } else if (parser.context != NULL) {
      snprintf(msg, sizeof msg, "YAML syntax error: %s (%s at line %lu)",
               parser.problem ? parser.problem : "invalid YAML",
               parser.context,
               (unsigned long)parser.context_mark.line + 1);
    } else {
      snprintf(msg, sizeof msg, "YAML syntax error: %s",
               parser.problem ? parser.problem : "invalid YAML");
    }
    add_err(d->ld, d->rank, d->file, line, msg);
  }
  rc = -2;
out:
  yaml_parser_delete(&parser);
  free(buf);
  return rc;
}

static void load_tenants_file(ydoc_t *d, yaml_node_t *n, ydoc_t *td,
                              char **td_name) {
  static const char *const names[] = {"tenants"};
  loader_t *ld = d->ld;
  char why[256];
  char *rel = NULL;

  if (get_string(d, n, "tenants_file", &rel) < 0)
    return;
  if (rel[0] == '\0') {
    yerr(d, n, "tenants_file", "must not be empty");
    free(rel);
    return;
  }
  *td_name = resolve_path(ld, rel);
  free(rel);
  if (*td_name == NULL)
    return;
  free(ld->cfg->tenants_file);
  ld->cfg->tenants_file = xstrdup(ld, *td_name); /* watched for changes by serve */
  td->ld = ld;
  td->file = *td_name;
  td->rank = 1;
  int rc = ydoc_load(td, *td_name, why, sizeof why);
  if (rc == -1)
    yerr(d, n, "tenants_file", "cannot read '%s': %s", *td_name, why);
  if (rc != 0 && !td->have_doc)
    return;
  yaml_node_t *root = yaml_document_get_root_node(&td->doc);
  if (root == NULL) {
    add_err(ld, td->rank, td->file, 1,
            "empty file: expected a top-level 'tenants:' mapping");
    return;
  }
  yaml_node_t *v[1], *k[1];
  if (map_fields(td, root, "", names, 1, v, k) < 0)
    return;
  if (v[0] != NULL)
    parse_tenants(td, v[0]);
  else if (k[0] == NULL)
    yerr(td, root, "", "missing required key 'tenants'");
}

/* An `on` / `off` switch: *off becomes 1 for "off", 0 for "on". */
static void get_off(ydoc_t *d, yaml_node_t *n, const char *where, int *off) {
  char *s = NULL;
  if (n == NULL || get_string(d, n, where, &s) < 0)
    return;
  if (strcmp(s, "on") == 0 || strcmp(s, "off") == 0)
    *off = s[1] == 'f';
  else
    yerr(d, n, where, "expected 'on' or 'off', got '%s'", s);
  free(s);
}

static const char *const top_names[] = {
    "listen",          "admin_listen",     "workers",
    "data_dir",        "state",            "state_failure",
    "database",        "max_body_bytes",   "max_header_bytes",
    "access_log",      "forward_headers",  "health_check_interval",
    "timeouts",        "global_rate_limit", "priority_classes",
    "tenants_file",    "tenants",          "models",
    "ledger",          "metrics",          "upstream_client",
    "queue_max"};
enum {
  T_LISTEN, T_ADMIN_LISTEN, T_WORKERS, T_DATA_DIR, T_STATE, T_STATE_FAILURE,
  T_DATABASE, T_MAX_BODY, T_MAX_HEADER, T_ACCESS_LOG, T_FORWARD_HEADERS,
  T_HEALTH, T_TIMEOUTS, T_GLOBAL_RL, T_PRIORITY, T_TENANTS_FILE, T_TENANTS,
  T_MODELS, T_LEDGER, T_METRICS, T_UPSTREAM_CLIENT, T_QUEUE_MAX, T__N
};
_Static_assert(sizeof top_names / sizeof top_names[0] == T__N,
               "top_names and the T_ enum must match");

static int redis_url_int(const char *s, size_t n, long lo, long hi, int *out) {
  char tmp[16];
  char *end;
  if (n == 0 || n >= sizeof tmp)
    return TG_EINVAL;
  memcpy(tmp, s, n);
  tmp[n] = '\0';
  for (size_t i = 0; i < n; i++)
    if (tmp[i] < '0' || tmp[i] > '9')
      return TG_EINVAL;
  long v = strtol(tmp, &end, 10);
  if (*end != '\0' || v < lo || v > hi)
    return TG_EINVAL;
  *out = (int)v;
  return 0;
}

static int redis_url_part(char *dst, size_t size, const char *s, size_t n) {
  if (n >= size)
    return TG_ETOOBIG;
  memcpy(dst, s, n);
  dst[n] = '\0';
  return 0;
}

/* redis://[[user]:password@]host[:port][/db]; host may be [v6]. */
int tg_config_redis_url(const char *url, tg_redis_url_t *r) {
  static const char scheme[] = "redis://";
  const char *p, *end, *at, *hs, *he, *slash;
  int rc;

  memset(r, 0, sizeof *r);
  if (strncmp(url, scheme, sizeof scheme - 1) != 0)
    return TG_EINVAL;
  p = url + sizeof scheme - 1;
  end = p + strlen(p);
  slash = memchr(p, '/', (size_t)(end - p));
  if (slash == NULL)
    slash = end;
  r->port = 6379;
  r->db = 0;
  at = NULL;
  for (const char *q = p; q < slash; q++)
    if (*q == '@')
      at = q;
  if (at != NULL) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (colon == NULL)
      return TG_EINVAL; /* a password is required with a user */
    if ((rc = redis_url_part(r->user, sizeof r->user, p, (size_t)(colon - p))) < 0 ||
        (rc = redis_url_part(r->pass, sizeof r->pass, colon + 1, (size_t)(at - colon - 1))) < 0)
      return rc;
    r->has_pass = 1;
    p = at + 1;
  }
  if (*p == '[') {
    hs = p + 1;
    he = memchr(hs, ']', (size_t)(slash - hs));
    if (he == NULL)
      return TG_EINVAL;
    p = he + 1;
  } else {
    hs = p;
    he = memchr(p, ':', (size_t)(slash - p));
    if (he == NULL)
      he = slash;
    p = he;
  }
  if (he == hs)
    return TG_EINVAL;
  if ((rc = redis_url_part(r->host, sizeof r->host, hs, (size_t)(he - hs))) < 0)
    return rc;
  if (p < slash) {
    if (*p != ':' || redis_url_int(p + 1, (size_t)(slash - p - 1), 1, 65535, &r->port) < 0)
      return TG_EINVAL;
  }
  if (slash < end && slash + 1 < end) {
    if (redis_url_int(slash + 1, (size_t)(end - slash - 1), 0, 1000000, &r->db) < 0)
      return TG_EINVAL;
  }
  return 0;
}

/* Appends s[0..n) to buf at *off, cut at size - 1. */
static void redact_put(char *buf, size_t size, size_t *off, const char *s, size_t n) {
  if (*off + 1 >= size)
    return;
  if (n > size - 1 - *off)
    n = size - 1 - *off;
  memcpy(buf + *off, s, n);
  *off += n;
  buf[*off] = '\0';
}

/* The secret parts of url, in order: the user info's password (from its
 * first ':' up to the '@' that ends it; all of it when it has no ':') and
 * the value of every password= query parameter. The user info ends at the
 * last '@' before the query (a password may hold '@' and '/' itself:
 * base64), or further at the first '@' before any '/', which is where
 * libpq ends it (a password with a '?' in it). Returns how many were
 * found, at most max. */
typedef struct {
  const char *s;
  size_t n;
} url_span_t;

static int url_secrets(const char *url, url_span_t *out, int max) {
  const char *p = strstr(url, "://"), *auth, *auth_end, *at = NULL, *colon,
             *q;
  int n = 0;

  if (p == NULL)
    return 0;
  auth = p + 3;
  auth_end = auth + strcspn(auth, "?");
  for (q = auth; q < auth_end; q++)
    if (*q == '@')
      at = q;
  q = auth + strcspn(auth, "@/");
  if (*q == '@' && (at == NULL || q > at))
    at = q;
  if (at != NULL) {
    colon = memchr(auth, ':', (size_t)(at - auth));
    p = colon != NULL ? colon + 1 : auth;
    out[n++] = (url_span_t){p, (size_t)(at - p)};
    auth = at;
  }
  for (q = auth; n < max && (q = strstr(q, "password=")) != NULL; q += 9)
    if (q[-1] == '?' || q[-1] == '&')
      out[n++] = (url_span_t){q + 9, strcspn(q + 9, "&")};
  return n;
}

#define URL_SECRETS_MAX 8

const char *tg_config_url_redact(const char *url, char *buf, size_t size) {
  url_span_t sec[URL_SECRETS_MAX];
  const char *p = url;
  size_t off = 0;
  int n;

  if (size == 0)
    return buf;
  buf[0] = '\0';
  if (url == NULL)
    return buf;
  n = url_secrets(url, sec, URL_SECRETS_MAX);
  for (int i = 0; i < n; i++) {
    redact_put(buf, size, &off, p, (size_t)(sec[i].s - p));
    redact_put(buf, size, &off, "***", 3);
    p = sec[i].s + sec[i].n;
  }
  redact_put(buf, size, &off, p, strlen(p));
  return buf;
}

const char *tg_config_url_scrub(const char *url, const char *text, char *buf,
                                size_t size) {
  url_span_t sec[URL_SECRETS_MAX];
  size_t off = 0;
  int n;

  if (size == 0)
    return buf;
  buf[0] = '\0';
  if (text == NULL)
    return buf;
  n = url != NULL ? url_secrets(url, sec, URL_SECRETS_MAX) : 0;
  while (*text != '\0') {
    size_t hit = 0;
    for (int i = 0; i < n && hit == 0; i++)
      if (sec[i].n > 0 && strncmp(text, sec[i].s, sec[i].n) == 0)
        hit = sec[i].n;
    if (hit > 0) {
      redact_put(buf, size, &off, "***", 3);
      text += hit;
    } else {
      redact_put(buf, size, &off, text++, 1);
    }
  }
  return buf;
}

static int has_url_rest(const char *s, const char *prefix) {
  size_t n = strlen(prefix);
  return strncmp(s, prefix, n) == 0 && s[n] != '\0';
}

static void parse_scalars(ydoc_t *d, yaml_node_t **v) {
  loader_t *ld = d->ld;
  tg_config_t *cfg = ld->cfg;
  int64_t i64;
  char *s = NULL;

  int listen_bad = 0;

  if (v[T_LISTEN])
    listen_bad |= parse_listen(d, v[T_LISTEN], "listen", &cfg->listen_host,
                               &cfg->listen_port);
  if (v[T_ADMIN_LISTEN])
    listen_bad |= parse_listen(d, v[T_ADMIN_LISTEN], "admin_listen",
                               &cfg->admin_host, &cfg->admin_port);
  if (!listen_bad && cfg->listen_port == cfg->admin_port &&
      cfg->listen_host != NULL && cfg->admin_host != NULL &&
      listeners_clash(cfg->listen_host, cfg->admin_host))
    yerr(d, v[T_ADMIN_LISTEN] ? v[T_ADMIN_LISTEN] : v[T_LISTEN],
         v[T_ADMIN_LISTEN] ? "admin_listen" : "listen",
         "listen '%s' and admin_listen '%s' cannot both be bound: give them "
         "different ports",
         v[T_LISTEN] ? yscalar(v[T_LISTEN]) : "127.0.0.1:8080",
         v[T_ADMIN_LISTEN] ? yscalar(v[T_ADMIN_LISTEN]) : "127.0.0.1:8081");
  if (v[T_WORKERS] &&
      get_int(d, v[T_WORKERS], "workers", 0, MAX_WORKERS, &i64) == 0)
    cfg->workers = (int)i64;
  if (v[T_DATA_DIR] && get_string(d, v[T_DATA_DIR], "data_dir", &s) == 0) {
    if (s[0] == '\0') {
      yerr(d, v[T_DATA_DIR], "data_dir", "must not be empty");
    } else {
      char *abs = resolve_abs(ld, s);
      if (abs != NULL) {
        free(cfg->data_dir);
        cfg->data_dir = abs;
      }
    }
  }
  free(s);
  s = NULL;
  if (v[T_STATE] && get_string(d, v[T_STATE], "state", &s) == 0) {
    tg_redis_url_t ru;
    if (strcmp(s, "memory") != 0 &&
        (!has_url_rest(s, "redis://") || tg_config_redis_url(s, &ru) < 0)) {
      char shown[512];
      yerr(d, v[T_STATE], "state",
           "expected 'memory' or a redis://[[user]:password@]host[:port][/db] URL "
           "(port 1-65535, db a number), got '%s'", tg_config_url_redact(s, shown, sizeof(shown)));
    } else {
      free(cfg->state);
      cfg->state = s;
      s = NULL;
    }
  }
  free(s);
  s = NULL;
  get_off(d, v[T_METRICS], "metrics", &cfg->metrics_off);
  if (v[T_UPSTREAM_CLIENT] &&
      get_string(d, v[T_UPSTREAM_CLIENT], "upstream_client", &s) == 0) {
    if (strcmp(s, "curl") == 0)
      cfg->upstream_native = TG_UPSTREAM_CLIENT_CURL;
    else if (strcmp(s, "native") == 0)
      cfg->upstream_native = TG_UPSTREAM_CLIENT_NATIVE;
    else if (strcmp(s, "auto") == 0)
      cfg->upstream_native = TG_UPSTREAM_CLIENT_AUTO;
    else
      yerr(d, v[T_UPSTREAM_CLIENT], "upstream_client",
           "expected 'auto', 'curl' or 'native', got '%s'", s);
  }
  free(s);
  s = NULL;
  get_off(d, v[T_LEDGER], "ledger", &cfg->ledger_off);
  if (v[T_STATE_FAILURE] &&
      get_string(d, v[T_STATE_FAILURE], "state_failure", &s) == 0) {
    if (strcmp(s, "closed") != 0 && strcmp(s, "open") != 0)
      yerr(d, v[T_STATE_FAILURE], "state_failure",
           "expected 'closed' or 'open', got '%s'", s);
    else {
      free(cfg->state_failure);
      cfg->state_failure = s;
      s = NULL;
    }
  }
  free(s);
  s = NULL;
  if (v[T_DATABASE] && get_string(d, v[T_DATABASE], "database", &s) == 0) {
    char shown[512], why[256];
    if (strcmp(s, "sqlite") != 0 && !has_url_rest(s, "postgres://") &&
        !has_url_rest(s, "postgresql://"))
      yerr(d, v[T_DATABASE], "database",
           "expected 'sqlite' or a postgres:// URL, got '%s'",
           tg_config_url_redact(s, shown, sizeof(shown)));
    else if (strcmp(s, "sqlite") != 0 &&
             tg_db_pg_url_check(s, why, sizeof(why)) == TG_EINVAL)
      yerr(d, v[T_DATABASE], "database", "%s, in '%s'", why,
           tg_config_url_redact(s, shown, sizeof(shown)));
    else {
      free(cfg->database);
      cfg->database = s;
      s = NULL;
    }
  }
  free(s);
  s = NULL;
  if (v[T_QUEUE_MAX] && get_int(d, v[T_QUEUE_MAX], "queue_max", 0, 1000000, &i64) == 0)
    cfg->queue_max = (size_t)i64;
  if (v[T_MAX_BODY] && get_int(d, v[T_MAX_BODY], "max_body_bytes", 1,
                               MAX_BODY_LIMIT, &i64) == 0)
    cfg->max_body_bytes = (size_t)i64;
  if (v[T_MAX_HEADER] && get_int(d, v[T_MAX_HEADER], "max_header_bytes", 1,
                                 MAX_HEADER_LIMIT, &i64) == 0)
    cfg->max_header_bytes = (size_t)i64;
  if (v[T_ACCESS_LOG] &&
      get_string(d, v[T_ACCESS_LOG], "access_log", &s) == 0) {
    char *val = NULL;
    if (s[0] == '\0')
      yerr(d, v[T_ACCESS_LOG], "access_log",
           "expected 'stdout', 'off' or a file path");
    else if (strcmp(s, "stdout") == 0 || strcmp(s, "off") == 0)
      val = xstrdup(ld, s);
    else
      val = resolve_abs(ld, s);
    if (val != NULL) {
      free(cfg->access_log);
      cfg->access_log = val;
    }
  }
  free(s);
  if (v[T_FORWARD_HEADERS])
    parse_forward_headers(d, v[T_FORWARD_HEADERS]);
  if (v[T_HEALTH])
    get_duration(d, v[T_HEALTH], "health_check_interval", 1,
                 &cfg->health_check_interval_ms);
  if (v[T_TIMEOUTS])
    parse_timeouts(d, v[T_TIMEOUTS]);
  if (v[T_GLOBAL_RL])
    parse_global_rate_limit(d, v[T_GLOBAL_RL]);
}

static void parse_top(ydoc_t *d, yaml_node_t *root, ydoc_t *td,
                      char **td_name) {
  loader_t *ld = d->ld;
  yaml_node_t *v[T__N], *k[T__N];

  if (map_fields(d, root, "", top_names, T__N, v, k) < 0)
    return;
  parse_scalars(d, v);
  /* Order matters from here: tenants refer to priority classes and models. */
  if (v[T_PRIORITY])
    parse_priority_classes(d, v[T_PRIORITY]);
  if (k[T_MODELS] == NULL)
    yerr(d, root, "",
         "missing required key 'models' (at least one model is required)");
  else
    parse_models(d, k[T_MODELS], v[T_MODELS]);

  if (k[T_TENANTS] != NULL && k[T_TENANTS_FILE] != NULL) {
    yaml_node_t *later = yline(k[T_TENANTS]) > yline(k[T_TENANTS_FILE])
                             ? k[T_TENANTS]
                             : k[T_TENANTS_FILE];
    yerr(d, later, "",
         "both 'tenants' and 'tenants_file' are set; use one of them");
  }
  if (v[T_TENANTS] != NULL)
    parse_tenants(d, v[T_TENANTS]);
  if (v[T_TENANTS_FILE] != NULL) {
    /* Next to inline tenants (an error already reported, so this config is
     * not used) the file is still read and checked: every mistake of both
     * shows now, whichever key the operator then removes. */
    if (v[T_TENANTS] != NULL)
      free_tenants(ld->cfg);
    load_tenants_file(d, v[T_TENANTS_FILE], td, td_name);
  }

  tg_config_t *cfg = ld->cfg;
  if (cfg->workers == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    cfg->workers = n < 1 ? 1 : n > MAX_WORKERS ? MAX_WORKERS : (int)n;
  }
}

/* ---- snapshot lifetime ---------------------------------------------------- */

static void config_free(tg_config_t *cfg) {
  if (cfg == NULL)
    return;
  free(cfg->path);
  free(cfg->tenants_file);
  free(cfg->listen_host);
  free(cfg->admin_host);
  free(cfg->data_dir);
  free(cfg->state);
  free(cfg->state_failure);
  free(cfg->database);
  free(cfg->access_log);
  for (size_t i = 0; i < cfg->n_forward_headers; i++)
    free(cfg->forward_headers[i]);
  free(cfg->forward_headers);
  free_classes(cfg);
  for (size_t i = 0; i < cfg->n_models; i++) {
    tg_model_cfg_t *m = &cfg->models[i];
    for (size_t j = 0; j < m->n_endpoints; j++)
      free(m->endpoints[j].url);
    free(m->endpoints);
    free(m->name);
  }
  free(cfg->models);
  free_tenants(cfg);
  if (cfg->index != NULL) {
    free(cfg->index->models.slots);
    free(cfg->index);
  }
  free(cfg);
}

static tg_config_t *config_new(const char *path) {
  static const tg_priority_class_t defaults[] = {
      {"high", 1000}, {"medium", 500}, {"low", 100}};
  tg_config_t *cfg = calloc(1, sizeof *cfg);
  if (cfg == NULL)
    return NULL;
  cfg->refs = 1;
  cfg->listen_port = 8080;
  cfg->admin_port = 8081;
  cfg->max_body_bytes = 1048576;
  cfg->max_header_bytes = 16384;
  cfg->client_request_timeout_ms = 30000;
  cfg->client_keepalive_timeout_ms = 60000;
  cfg->client_send_timeout_ms = 60000;
  cfg->upstream_connect_timeout_ms = 2000;
  cfg->upstream_first_byte_timeout_ms = 60000;
  cfg->upstream_idle_timeout_ms = 30000;
  cfg->drain_timeout_ms = 30000;
  cfg->worker_stall_timeout_ms = 5000;
  cfg->queue_timeout_ms = 30000;
  cfg->upstream_native = TG_UPSTREAM_CLIENT_AUTO;
  cfg->queue_max = 1024;
  cfg->health_check_interval_ms = 2000;
  cfg->path = strdup(path);
  cfg->listen_host = strdup("127.0.0.1");
  cfg->admin_host = strdup("127.0.0.1");
  cfg->state = strdup("memory");
  cfg->state_failure = strdup("closed");
  cfg->database = strdup("sqlite");
  cfg->access_log = strdup("stdout");
  cfg->index = calloc(1, sizeof *cfg->index);
  cfg->priority_classes = calloc(3, sizeof *cfg->priority_classes);
  if (!cfg->path || !cfg->listen_host || !cfg->admin_host || !cfg->state ||
      !cfg->state_failure || !cfg->database || !cfg->access_log ||
      !cfg->index || !cfg->priority_classes)
    goto fail;
  for (size_t i = 0; i < 3; i++) {
    cfg->priority_classes[i].name = strdup(defaults[i].name);
    if (cfg->priority_classes[i].name == NULL)
      goto fail;
    cfg->priority_classes[i].value = defaults[i].value;
    cfg->n_priority_classes++;
  }
  return cfg;
fail:
  config_free(cfg);
  return NULL;
}

static int err_cmp(const void *a, const void *b) {
  const err_item_t *x = a, *y = b;
  if (x->rank != y->rank)
    return x->rank < y->rank ? -1 : 1;
  if (x->line != y->line)
    return x->line < y->line ? -1 : 1;
  return x->seq < y->seq ? -1 : x->seq > y->seq;
}

int tg_config_load(const char *path, tg_config_t **out,
                   tg_config_errors_t *errs) {
  loader_t ld = {0};
  ydoc_t main_doc = {0}, tenants_doc = {0};
  char *tenants_name = NULL;
  char why[256];
  int rc;

  if (errs != NULL) {
    errs->msgs = NULL;
    errs->n = 0;
    errs->tenants_file = NULL;
  }
  if (out != NULL)
    *out = NULL;
  if (path == NULL || out == NULL)
    return TG_EINVAL;

  ld.cfg = config_new(path);
  ld.dir = dir_of(path);
  ld.classes_ok = 1;
  if (ld.cfg == NULL || ld.dir == NULL ||
      (ld.cfg->data_dir = resolve_abs(&ld, "data")) == NULL) {
    rc = TG_ENOMEM;
    goto out;
  }
  main_doc.ld = &ld;
  main_doc.file = path;
  main_doc.rank = 0;
  rc = ydoc_load(&main_doc, path, why, sizeof why);
  if (rc == -1) {
    char msg[512];
    snprintf(msg, sizeof msg, "cannot read configuration: %s", why);
    add_err(&ld, 0, path, 1, msg);
  }
  if (main_doc.have_doc) {
    yaml_node_t *root = yaml_document_get_root_node(&main_doc.doc);
    if (root == NULL)
      add_err(&ld, 0, path, 1,
              "empty configuration (at least one model is required)");
    else
      parse_top(&main_doc, root, &tenants_doc, &tenants_name);
  }

  if (ld.n_errs > 1)
    qsort(ld.errs, ld.n_errs, sizeof *ld.errs, err_cmp);
  if (ld.truncated) {
    /* The list is at its maximum: the last slot says so instead. */
    char msg[PATH_TEXT + 128];
    snprintf(msg, sizeof msg, "%s: too many errors; only the first %d are shown",
             path, MAX_ERRORS - 1);
    char *m = strdup(msg);
    if (m == NULL) {
      ld.nomem = 1;
    } else {
      free(ld.errs[ld.n_errs - 1].msg);
      ld.errs[ld.n_errs - 1].msg = m;
    }
  }
  if (ld.nomem)
    rc = TG_ENOMEM;
  else if (ld.n_errs > 0)
    rc = TG_ECONFIG;
  else
    rc = 0;

  if (errs != NULL && ld.n_errs > 0) {
    errs->msgs = calloc(ld.n_errs, sizeof *errs->msgs);
    if (errs->msgs != NULL) {
      for (size_t i = 0; i < ld.n_errs; i++) {
        errs->msgs[i] = ld.errs[i].msg;
        ld.errs[i].msg = NULL;
      }
      errs->n = ld.n_errs;
    } else {
      rc = TG_ENOMEM;
    }
  }
  if (rc != 0 && errs != NULL) {
    /* what the config tried to name, for serve to watch */
    errs->tenants_file = ld.cfg->tenants_file;
    ld.cfg->tenants_file = NULL;
  }

out:
  if (rc == 0) {
    *out = ld.cfg;
    ld.cfg = NULL;
  }
  config_free(ld.cfg);
  for (size_t i = 0; i < ld.n_errs; i++)
    free(ld.errs[i].msg);
  free(ld.errs);
  free(ld.dir);
  free(ld.endpoints.slots);
  if (main_doc.have_doc)
    yaml_document_delete(&main_doc.doc);
  if (tenants_doc.have_doc)
    yaml_document_delete(&tenants_doc.doc);
  free(tenants_name);
  return rc;
}

void tg_config_errors_free(tg_config_errors_t *errs) {
  if (errs == NULL)
    return;
  for (size_t i = 0; i < errs->n; i++)
    free(errs->msgs[i]);
  free(errs->msgs);
  free(errs->tenants_file);
  errs->msgs = NULL;
  errs->n = 0;
  errs->tenants_file = NULL;
}

tg_config_t *tg_config_ref(tg_config_t *cfg) {
  if (cfg != NULL)
    __atomic_fetch_add(&cfg->refs, 1, __ATOMIC_RELAXED);
  return cfg;
}

void tg_config_unref(tg_config_t *cfg) {
  /* acq_rel: the thread that frees must see every other holder's reads
   * finished before the count reached zero. */
  if (cfg != NULL && __atomic_fetch_sub(&cfg->refs, 1, __ATOMIC_ACQ_REL) == 1)
    config_free(cfg);
}

const tg_model_cfg_t *tg_config_model(const tg_config_t *cfg,
                                      const char *name) {
  if (cfg == NULL || cfg->index == NULL)
    return NULL;
  const ntab_slot_t *s = ntab_get(&cfg->index->models, name);
  return s ? &cfg->models[s->idx] : NULL;
}

const tg_tenant_cfg_t *tg_config_tenant(const tg_config_t *cfg,
                                        const char *name) {
  if (cfg == NULL || cfg->index == NULL)
    return NULL;
  const ntab_slot_t *s = ntab_get(&cfg->index->tenants, name);
  return s ? &cfg->tenants[s->idx] : NULL;
}

int tg_tenant_allows(const tg_tenant_cfg_t *t, const char *model) {
  if (t == NULL || model == NULL)
    return 0;
  for (size_t i = 0; i < t->n_models_allowed; i++)
    if (strcmp(t->models_allowed[i], model) == 0)
      return 1;
  return 0;
}

/* ---- tollgate check-config ------------------------------------------------ */

static void check_usage(FILE *f) {
  fprintf(f, "usage: tollgate check-config --config FILE\n");
}

int tg_cmd_check_config(int argc, char **argv) {
  const char *path = NULL;
  const tg_cli_opt_t opts[] = {{"--config", "-c", &path}, {NULL, NULL, NULL}};
  tg_config_errors_t errs = {0};
  tg_config_t *cfg = NULL;
  int r = tg_cli_parse("check-config", argc, argv, opts);

  if (r == TG_CLI_HELP) {
    check_usage(stdout);
    return 0;
  }
  if (r != 0 || path == NULL || path[0] == '\0') {
    check_usage(stderr);
    return 2;
  }
  int rc = tg_config_load(path, &cfg, &errs);
  if (rc == 0) {
    printf("config OK: %zu models, %zu tenants\n", cfg->n_models,
           cfg->n_tenants);
    fflush(stdout);
    tg_config_unref(cfg);
    return 0;
  }
  for (size_t i = 0; i < errs.n; i++)
    fprintf(stderr, "%s\n", errs.msgs[i]);
  if (errs.n == 0)
    fprintf(stderr, "%s: %s\n", path, tg_strerror(rc));
  tg_config_errors_free(&errs);
  return 1;
}
