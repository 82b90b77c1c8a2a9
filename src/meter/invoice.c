/* Invoices and spend from the ledger, in the seed's shapes:
 *
 *   invoice: {tenant_id, billing_period, generated_at,
 *             summary {total_requests, total_cost_usd, total_cost_nano_usd},
 *             usage_by_model {model: {requests, prompt_tokens,
 *                                     completion_tokens, cost_usd,
 *                                     cost_nano_usd}}}
 *   usage:   a day's spend (the seed's get_tenant_spend_today)
 *
 * Money is summed as int64 nano-USD by the database and printed as exact
 * decimal USD (9 places): JSON numbers are text, so nothing is rounded on
 * the way out. Beside each USD figure, the same sum as an integer count of
 * nano-USD (the *_nano_usd fields, the CSV's cost_nano_usd column), for a
 * reader whose JSON numbers are doubles. */
#include "meter/invoice.h"

#include <ctype.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "config/config.h"
#include "core/cli.h"
#include "core/err.h"
#include "core/money.h"
#include "meter/db_pg.h"
#include "meter/db_sqlite.h"
#include "policy/limits.h"

/* Growable text with a hard bound. */
typedef struct {
  char *s;
  size_t len, cap;
  int err;
} sbuf_t;

#define SBUF_MAX (64u * 1024 * 1024)

static void sb_add(sbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_add(sbuf_t *b, const char *fmt, ...) {
  va_list ap;
  int n;

  if (b->err)
    return;
  for (;;) {
    size_t room = b->cap - b->len;
    va_start(ap, fmt);
    n = vsnprintf(b->s ? b->s + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n < 0) {
      b->err = TG_EINVAL;
      return;
    }
    if ((size_t)n < room) {
      b->len += (size_t)n;
      return;
    }
    {
      size_t cap = b->cap ? b->cap * 2 : 1024;
      char *ns;
      while (cap < b->len + (size_t)n + 1)
        cap *= 2;
      if (cap > SBUF_MAX) {
        b->err = TG_ETOOBIG;
        return;
      }
      ns = realloc(b->s, cap);
      if (ns == NULL) {
        b->err = TG_ENOMEM;
        return;
      }
      b->s = ns;
      b->cap = cap;
    }
  }
}

/* s is exactly the pattern, 'd' a digit and any other byte itself: "dddd-dd"
 * takes "2026-01", not "2026-+1" or " 2026-1", which sscanf's %d would. */
static int shaped(const char *s, const char *pattern) {
  for (; *pattern; s++, pattern++)
    if (*pattern == 'd' ? !isdigit((unsigned char)*s) : *s != *pattern)
      return 0;
  return *s == '\0';
}

int tg_month_range(const char *month, int64_t *from_ms, int64_t *to_ms) {
  struct tm tm;
  int y, m;

  if (month == NULL || !shaped(month, "dddd-dd") || sscanf(month, "%4d-%2d", &y, &m) != 2 ||
      y < 1970 || m < 1 || m > 12)
    return TG_EPARSE;
  memset(&tm, 0, sizeof(tm));
  tm.tm_year = y - 1900;
  tm.tm_mon = m - 1;
  tm.tm_mday = 1;
  *from_ms = (int64_t)timegm(&tm) * 1000;
  tm.tm_mon += 1;
  *to_ms = (int64_t)timegm(&tm) * 1000;
  return 0;
}

int tg_day_range(const char *day, int64_t *from_ms, int64_t *to_ms) {
  struct tm tm, chk;
  int y, m, d;
  time_t t;

  if (day == NULL || !shaped(day, "dddd-dd-dd") ||
      sscanf(day, "%4d-%2d-%2d", &y, &m, &d) != 3 || y < 1970 || m < 1 || m > 12 || d < 1 ||
      d > 31)
    return TG_EPARSE;
  memset(&tm, 0, sizeof(tm));
  tm.tm_year = y - 1900;
  tm.tm_mon = m - 1;
  tm.tm_mday = d;
  t = timegm(&tm);
  gmtime_r(&t, &chk);
  if (chk.tm_mday != d) /* 2026-02-30 */
    return TG_EPARSE;
  *from_ms = (int64_t)t * 1000;
  *to_ms = *from_ms + 86400000;
  return 0;
}

int tg_period_range(const char *period, int month, int64_t now_ms, int64_t *from_ms,
                    int64_t *to_ms) {
  int r = month ? tg_month_range(period, from_ms, to_ms) : tg_day_range(period, from_ms, to_ms);
  if (r < 0)
    return r;
  /* a record may be dated ahead of now by a clock stepped back since (the
   * budgets' allowance, docs/limits.md); none further ahead */
  if (*from_ms > now_ms + TG_CLOCK_STEP_BACK_MAX_MS)
    return TG_EINVAL;
  return 0;
}

static void usd(char *buf, size_t size, int64_t nano) {
  if (tg_money_format_usd(nano, buf, size) < 0)
    snprintf(buf, size, "0");
}

/* The bytes a config's model name may hold (config.c's model_name_ok); a
 * tenant's are a subset. */
#define NAME_BYTES                                                          \
  "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/@+"

/* One CSV cell of a name from the ledger. A name the config could have
 * given is written as it is, one starting with - + or @ too (decisions.md,
 * "CSV invoice"). Any other (a row some other program wrote) is quoted as
 * RFC 4180 says when it holds a comma, a quote or a line break, and begins
 * with ' when it starts as a formula does (= + - @ TAB CR), so that it
 * stays one cell of one line and no spreadsheet runs it. */
static void csv_name(sbuf_t *b, const char *s) {
  if (s[strspn(s, NAME_BYTES)] == '\0') {
    sb_add(b, "%s", s);
    return;
  }
  sb_add(b, "\"%s", s[0] != '\0' && strchr("=+-@\t\r", s[0]) != NULL ? "'" : "");
  while (*s) {
    size_t n = strcspn(s, "\"");
    sb_add(b, "%.*s", (int)n, s);
    s += n;
    if (*s == '"') {
      sb_add(b, "\"\"");
      s++;
    }
  }
  sb_add(b, "\"");
}

int tg_invoice_build(tg_ledger_db_t *db, const char *tenant, const char *month, int csv,
                     char **out) {
  tg_usage_row_t *rows = NULL;
  size_t n = 0, i;
  int64_t from, to, total_req = 0, total_cost = 0;
  char q[600], money[48], when[32];
  sbuf_t b = {0};
  struct tm tm;
  time_t now = time(NULL);
  int r;

  if ((r = tg_month_range(month, &from, &to)) < 0)
    return r;
  if ((r = tg_ledger_usage_by_model(db, tenant, from, to, &rows, &n)) < 0)
    return r;
  for (i = 0; i < n; i++)
    if (__builtin_add_overflow(total_req, rows[i].requests, &total_req) ||
        __builtin_add_overflow(total_cost, rows[i].cost_nano, &total_cost)) {
      free(rows);
      return TG_ETOOBIG; /* no total to print: refused, never wrapped */
    }
  gmtime_r(&now, &tm);
  strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (csv) {
    sb_add(&b, "tenant_id,billing_period,model,requests,prompt_tokens,completion_tokens,"
               "cost_usd,cost_nano_usd\n");
    for (i = 0; i < n; i++) {
      usd(money, sizeof(money), rows[i].cost_nano);
      csv_name(&b, tenant);
      sb_add(&b, ",%s,", month);
      csv_name(&b, rows[i].model);
      sb_add(&b, ",%lld,%lld,%lld,%s,%lld\n", (long long)rows[i].requests,
             (long long)rows[i].prompt_tokens, (long long)rows[i].completion_tokens, money,
             (long long)rows[i].cost_nano);
    }
    usd(money, sizeof(money), total_cost);
    csv_name(&b, tenant);
    sb_add(&b, ",%s,TOTAL,%lld,,,%s,%lld\n", month, (long long)total_req, money,
           (long long)total_cost);
  } else {
    if (tg_json_quote(q, sizeof(q), tenant) < 0)
      b.err = TG_ETOOBIG; /* q is not a string: print nothing */
    usd(money, sizeof(money), total_cost);
    sb_add(&b,
           "{\"tenant_id\":%s,\"billing_period\":\"%s\",\"generated_at\":\"%s\","
           "\"summary\":{\"total_requests\":%lld,\"total_cost_usd\":%s,"
           "\"total_cost_nano_usd\":%lld},\"usage_by_model\":{",
           q, month, when, (long long)total_req, money, (long long)total_cost);
    for (i = 0; i < n; i++) {
      if (tg_json_quote(q, sizeof(q), rows[i].model) < 0)
        b.err = TG_ETOOBIG;
      usd(money, sizeof(money), rows[i].cost_nano);
      sb_add(&b,
             "%s%s:{\"requests\":%lld,\"prompt_tokens\":%lld,\"completion_tokens\":%lld,"
             "\"cost_usd\":%s,\"cost_nano_usd\":%lld}",
             i ? "," : "", q, (long long)rows[i].requests, (long long)rows[i].prompt_tokens,
             (long long)rows[i].completion_tokens, money, (long long)rows[i].cost_nano);
    }
    sb_add(&b, "}}\n");
  }
  free(rows);
  if (b.err) {
    free(b.s);
    return b.err;
  }
  *out = b.s;
  return 0;
}

int tg_usage_build(tg_ledger_db_t *db, const char *tenant, const char *day, char **out) {
  tg_usage_row_t *rows = NULL;
  size_t n = 0, i;
  int64_t from, to, req = 0, pt = 0, ct = 0, cost = 0;
  char q[600], money[48];
  sbuf_t b = {0};
  int r;

  if ((r = tg_day_range(day, &from, &to)) < 0)
    return r;
  if ((r = tg_ledger_usage_by_model(db, tenant, from, to, &rows, &n)) < 0)
    return r;
  for (i = 0; i < n; i++)
    if (__builtin_add_overflow(req, rows[i].requests, &req) ||
        __builtin_add_overflow(pt, rows[i].prompt_tokens, &pt) ||
        __builtin_add_overflow(ct, rows[i].completion_tokens, &ct) ||
        __builtin_add_overflow(cost, rows[i].cost_nano, &cost)) {
      free(rows);
      return TG_ETOOBIG;
    }
  free(rows);
  if (tg_json_quote(q, sizeof(q), tenant) < 0)
    return TG_ETOOBIG; /* q is not a string */
  usd(money, sizeof(money), cost);
  sb_add(&b,
         "{\"tenant_id\":%s,\"day\":\"%s\",\"requests\":%lld,\"prompt_tokens\":%lld,"
         "\"completion_tokens\":%lld,\"spend_usd\":%s,\"spend_nano_usd\":%lld}\n",
         q, day, (long long)req, (long long)pt, (long long)ct, money, (long long)cost);
  if (b.err) {
    free(b.s);
    return b.err;
  }
  *out = b.s;
  return 0;
}

/* ---- CLI ------------------------------------------------------------------ */

/* Opens the ledger of the config at cfg_path; *listed tells whether tenant
 * is one of its tenants. */
static int open_db(const char *cfg_path, const char *tenant, tg_ledger_db_t **db, int *listed) {
  tg_config_t *cfg = NULL;
  tg_config_errors_t errs = {0};
  size_t i;
  int r;

  if (tg_config_load(cfg_path, &cfg, &errs) < 0) {
    for (i = 0; i < errs.n; i++)
      fprintf(stderr, "%s\n", errs.msgs[i]);
    tg_config_errors_free(&errs);
    return TG_ECONFIG;
  }
  if (!tg_db_pg_is_url(cfg->database)) {
    /* a read: a data_dir that holds no ledger (a typo, another config's
     * copy) is an error, not an empty ledger made there */
    char path[PATH_MAX];
    int n = snprintf(path, sizeof(path), "%s/%s", cfg->data_dir, TG_DB_SQLITE_FILE);
    if (n < 0 || (size_t)n >= sizeof(path) || access(path, F_OK) != 0) {
      fprintf(stderr, "tollgate: no ledger in %s (no %s there): is data_dir right?\n",
              cfg->data_dir, TG_DB_SQLITE_FILE);
      tg_config_unref(cfg);
      return TG_ENOTFOUND;
    }
  }
  *listed = tg_config_tenant(cfg, tenant) != NULL;
  r = tg_ledger_db_open(cfg->database, cfg->data_dir, db);
  tg_config_unref(cfg);
  if (r < 0)
    fprintf(stderr, "tollgate: cannot open the ledger: %s\n", tg_strerror(r));
  return r;
}

typedef struct {
  const char *tenant, *period;
  int csv;
  int64_t from_ms, to_ms;
} q_t;

static int run(const char *cfg_path, int (*build)(tg_ledger_db_t *, char **, const void *),
               const q_t *q) {
  tg_ledger_db_t *db = NULL;
  char *text = NULL;
  int r, listed = 0;

  if (open_db(cfg_path, q->tenant, &db, &listed) < 0)
    return 1;
  if (!listed) {
    /* as the admin API: a tenant taken out of the config is still billed
     * for what its rows hold; a name with none in the period is unknown
     * (a misspelled tenant gets no empty invoice) */
    tg_usage_row_t *rows = NULL;
    size_t n = 0;
    r = tg_ledger_usage_by_model(db, q->tenant, q->from_ms, q->to_ms, &rows, &n);
    free(rows);
    if (r == 0 && n == 0) {
      tg_ledger_db_close(db);
      fprintf(stderr, "tollgate: no tenant '%s' in the configuration, and none in the "
                      "ledger for %s\n", q->tenant, q->period);
      return 1;
    }
  }
  r = build(db, &text, q);
  tg_ledger_db_close(db);
  if (r == TG_ETOOBIG) {
    fprintf(stderr, "tollgate: the period's totals do not fit 64-bit integers (nano-USD, "
                    "tokens or requests): a record holds an implausible figure\n");
    return 1;
  }
  if (r < 0) {
    fprintf(stderr, "tollgate: %s\n", tg_strerror(r));
    return 1;
  }
  fputs(text, stdout);
  free(text);
  return 0;
}

static int build_invoice(tg_ledger_db_t *db, char **out, const void *arg) {
  const q_t *q = arg;
  return tg_invoice_build(db, q->tenant, q->period, q->csv, out);
}

static int build_usage(tg_ledger_db_t *db, char **out, const void *arg) {
  const q_t *q = arg;
  return tg_usage_build(db, q->tenant, q->period, out);
}

/* `tollgate invoice` (a month, JSON or CSV) and `tollgate usage` (a day). */
static int query_cmd(int argc, char **argv, int invoice) {
  const char *cmd = invoice ? "invoice" : "usage";
  const char *text =
      invoice ? "usage: tollgate invoice --config FILE --tenant T --month YYYY-MM "
                "[--format json|csv]\n"
              : "usage: tollgate usage --config FILE --tenant T --day YYYY-MM-DD\n";
  const char *cfg = NULL, *format = NULL;
  q_t q = {NULL, NULL, 0, 0, 0};
  /* usage's list ends before --format */
  const tg_cli_opt_t opts[] = {{"--config", "-c", &cfg},
                               {"--tenant", NULL, &q.tenant},
                               {invoice ? "--month" : "--day", NULL, &q.period},
                               {invoice ? "--format" : NULL, NULL, &format},
                               {NULL, NULL, NULL}};
  int r = tg_cli_parse(cmd, argc, argv, opts);

  if (r == TG_CLI_HELP) {
    fputs(text, stdout);
    return 0;
  }
  q.csv = format != NULL && strcmp(format, "csv") == 0;
  if (r == 0 && format != NULL && !q.csv && strcmp(format, "json") != 0) {
    fprintf(stderr, "tollgate invoice: --format wants json or csv, not '%.40s'\n", format);
    r = -1;
  }
  if (r != 0 || cfg == NULL || cfg[0] == '\0' || q.tenant == NULL || q.period == NULL) {
    fputs(text, stderr);
    return 2;
  }
  if (!tg_config_tenant_name_ok(q.tenant)) {
    fprintf(stderr, "tollgate: --tenant: '%s' is not a tenant name\n", q.tenant);
    return 2;
  }
  r = tg_period_range(q.period, invoice, (int64_t)time(NULL) * 1000, &q.from_ms, &q.to_ms);
  if (r == TG_EINVAL) {
    fprintf(stderr, "tollgate: %s %s has not begun (UTC): no record can be in it yet\n",
            invoice ? "--month" : "--day", q.period);
    return 2;
  }
  if (r < 0) {
    fprintf(stderr, "tollgate: %s wants %s, not '%s'\n", invoice ? "--month" : "--day",
            invoice ? "YYYY-MM" : "YYYY-MM-DD", q.period);
    return 2;
  }
  return run(cfg, invoice ? build_invoice : build_usage, &q);
}

int tg_cmd_invoice(int argc, char **argv) {
  return query_cmd(argc, argv, 1);
}

int tg_cmd_usage(int argc, char **argv) {
  return query_cmd(argc, argv, 0);
}
