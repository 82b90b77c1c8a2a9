/* Tenant limits driven by an injected clock: every test states the time of
 * each call, and every assertion is on a number a tenant sees (admitted or
 * refused, which limit, Retry-After, x-ratelimit-* values) or on money and
 * tokens that end up on an invoice. Expected times come from timegm(), not
 * from the calendar code under test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "core/money.h"
#include "policy/limits.h"
#include "policy/state.h"

#define USD(x) ((tg_nano_t)(x) * TG_NANO_PER_USD)

static int64_t utc(int y, int mo, int d, int h, int mi, int s, int ms) {
  struct tm tm;
  memset(&tm, 0, sizeof tm);
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = s;
  return (int64_t)timegm(&tm) * 1000 + ms;
}

/* 2026-03-10 12:00:00.000 UTC: mid-day, mid-month. */
static int64_t t0(void) {
  return utc(2026, 3, 10, 12, 0, 0, 0);
}

static tg_limits_t unlimited(void) {
  tg_limits_t l;
  memset(&l, 0, sizeof l);
  l.alert_pct = 80;
  return l;
}

static tg_verdict_t admit(tg_tenant_state_t *s, const tg_limits_t *lim, int64_t tokens,
                          tg_nano_t cost, int64_t now) {
  tg_verdict_t v;
  tg_reserve_t r = {tokens, cost};
  assert_int_equal(tg_limits_admit(s, lim, &r, now, &v), 0);
  return v;
}

static void settle(tg_tenant_state_t *s, const tg_limits_t *lim, int64_t tokens,
                   tg_nano_t cost, const tg_verdict_t *v, int64_t actual_tokens,
                   tg_nano_t actual_cost, int64_t now, int *ad, int *am) {
  tg_reserve_t r = {tokens, cost};
  tg_limits_settle(s, lim, &r, v, actual_tokens, actual_cost, now, ad, am);
}

/* ---- names and calendar ------------------------------------------------ */

static void test_names(void **state) {
  (void)state;
  assert_string_equal(tg_limit_name(TG_LIMIT_NONE), "none");
  assert_string_equal(tg_limit_name(TG_LIMIT_GLOBAL), "global");
  assert_string_equal(tg_limit_name(TG_LIMIT_CONCURRENCY), "concurrency");
  assert_string_equal(tg_limit_name(TG_LIMIT_REQUESTS), "requests");
  assert_string_equal(tg_limit_name(TG_LIMIT_TOKENS), "tokens");
  assert_string_equal(tg_limit_name(TG_LIMIT_DAILY_BUDGET), "budget");
  assert_string_equal(tg_limit_name(TG_LIMIT_MONTHLY_BUDGET), "budget");
  assert_string_equal(tg_limit_name(TG_LIMIT_UNAVAILABLE), "unavailable");
  assert_string_equal(tg_limit_detail(TG_LIMIT_DAILY_BUDGET), "daily_budget");
  assert_string_equal(tg_limit_detail(TG_LIMIT_MONTHLY_BUDGET), "monthly_budget");
  assert_string_equal(tg_limit_detail(TG_LIMIT_REQUESTS), "requests");
  assert_string_equal(tg_limit_detail(TG_LIMIT_GLOBAL), "global");
  assert_string_equal(tg_limit_detail(TG_LIMIT_UNAVAILABLE), "unavailable");
}

static void test_calendar_fixed_points(void **state) {
  (void)state;
  char buf[32];
  assert_int_equal(tg_day_of(0), 0);
  assert_int_equal(tg_day_of(86399999), 0);
  assert_int_equal(tg_day_of(86400000), 1);
  assert_int_equal(tg_day_of(-1), -1);
  assert_int_equal(tg_month_of(0), 0);
  assert_int_equal(tg_month_of(-1), -1);
  assert_string_equal(tg_month_str(-1, buf, sizeof buf), "1969-12");
  assert_string_equal(tg_day_str(-1, buf, sizeof buf), "1969-12-31");

  int64_t t = t0();
  assert_int_equal(tg_day_of(t), 20522);
  assert_string_equal(tg_day_str(tg_day_of(t), buf, sizeof buf), "2026-03-10");
  assert_int_equal(tg_month_of(t), 674);
  assert_string_equal(tg_month_str(tg_month_of(t), buf, sizeof buf), "2026-03");
  assert_int_equal(tg_day_end_ms(tg_day_of(t)), utc(2026, 3, 11, 0, 0, 0, 0));
  assert_int_equal(tg_month_end_ms(tg_month_of(t)), utc(2026, 4, 1, 0, 0, 0, 0));

  /* Month ends the tests below cross. */
  assert_int_equal(tg_month_of(utc(2026, 1, 31, 23, 59, 59, 999)), 672);
  assert_int_equal(tg_month_of(utc(2026, 2, 1, 0, 0, 0, 0)), 673);
  assert_int_equal(tg_month_end_ms(672), utc(2026, 2, 1, 0, 0, 0, 0));
  assert_int_equal(tg_month_end_ms(673), utc(2026, 3, 1, 0, 0, 0, 0));
  assert_int_equal(tg_month_of(utc(2024, 2, 29, 12, 0, 0, 0)), 649);
  assert_int_equal(tg_month_end_ms(649), utc(2024, 3, 1, 0, 0, 0, 0));
  assert_string_equal(tg_day_str(tg_day_of(utc(2024, 2, 29, 23, 59, 59, 999)), buf, sizeof buf),
                      "2024-02-29");
  assert_int_equal(tg_month_of(utc(2026, 12, 31, 23, 59, 59, 999)), 683);
  assert_int_equal(tg_month_of(utc(2027, 1, 1, 0, 0, 0, 0)), 684);
  assert_int_equal(tg_month_end_ms(683), utc(2027, 1, 1, 0, 0, 0, 0));
  assert_string_equal(tg_month_str(683, buf, sizeof buf), "2026-12");
  assert_string_equal(tg_month_str(684, buf, sizeof buf), "2027-01");

  /* A short buffer truncates and stays terminated. */
  char small[5];
  assert_string_equal(tg_day_str(20522, small, sizeof small), "2026");
}

/* Every day from 1900 to 2200 against gmtime_r(). */
static void test_calendar_matches_gmtime(void **state) {
  (void)state;
  int64_t first = utc(1900, 1, 1, 0, 0, 0, 0) / 86400000;
  int64_t last = utc(2200, 1, 1, 0, 0, 0, 0) / 86400000;
  for (int64_t day = first; day < last; day++) {
    time_t secs = (time_t)(day * 86400);
    struct tm tm;
    char want[32], got[32];
    assert_non_null(gmtime_r(&secs, &tm));
    snprintf(want, sizeof want, "%04d-%02d-%02d", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday);
    assert_string_equal(tg_day_str(day, got, sizeof got), want);
    int64_t ms = day * 86400000 + 43200000;
    int64_t month = (int64_t)(tm.tm_year + 1900 - 1970) * 12 + tm.tm_mon;
    assert_int_equal(tg_day_of(ms), day);
    assert_int_equal(tg_month_of(ms), month);
    assert_int_equal(tg_month_of(day * 86400000), month);
    assert_int_equal(tg_month_of(day * 86400000 + 86399999), month);
    if (tm.tm_mday == 1) {
      assert_int_equal(tg_month_end_ms(month - 1), day * 86400000);
      snprintf(want, sizeof want, "%04d-%02d", tm.tm_year + 1900, tm.tm_mon + 1);
      assert_string_equal(tg_month_str(month, got, sizeof got), want);
    }
  }
}

/* ---- requests per minute ---------------------------------------------- */

static void test_rpm_limit_and_retry(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.rpm = 60;
  int64_t t = t0();

  for (int i = 0; i < 60; i++) {
    tg_verdict_t v = admit(&s, &lim, 0, 0, t + i * 100);
    assert_int_equal(v.refused, TG_LIMIT_NONE);
    assert_int_equal(v.limit_requests, 60);
    assert_int_equal(v.remaining_requests, 59 - i);
    /* the first admission, at t, leaves the window at t + 60000 */
    assert_int_equal(v.reset_requests_ms, 60000 - i * 100);
  }
  tg_verdict_t v = admit(&s, &lim, 0, 0, t + 6000);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 54000);
  assert_int_equal(v.remaining_requests, 0);
  assert_int_equal(v.reset_requests_ms, 54000);
  v = admit(&s, &lim, 0, 0, t + 59999);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 1);
  /* Refusals were not counted: at t + 60000 exactly one slot is back. */
  v = admit(&s, &lim, 0, 0, t + 60000);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.remaining_requests, 0);
  assert_int_equal(v.reset_requests_ms, 100); /* t + 100 leaves at t + 60100 */
  v = admit(&s, &lim, 0, 0, t + 60000);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 100);
  assert_int_equal(s.rpm.total, 60);
  tg_tenant_state_free(&s);
}

/* Many admissions in the same millisecond are one log entry. */
static void test_rpm_same_millisecond(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.rpm = 60;
  int64_t t = t0();
  for (int i = 0; i < 60; i++)
    assert_int_equal(admit(&s, &lim, 0, 0, t).refused, TG_LIMIT_NONE);
  assert_int_equal(s.rpm.count, 1);
  assert_int_equal(s.rpm.total, 60);
  tg_verdict_t v = admit(&s, &lim, 0, 0, t);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 60000);
  v = admit(&s, &lim, 0, 0, t + 59999);
  assert_int_equal(v.retry_after_ms, 1);
  /* All 60 leave together. */
  for (int i = 0; i < 60; i++) {
    v = admit(&s, &lim, 0, 0, t + 60000);
    assert_int_equal(v.refused, TG_LIMIT_NONE);
    assert_int_equal(v.remaining_requests, 59 - i);
  }
  assert_int_equal(admit(&s, &lim, 0, 0, t + 60000).refused, TG_LIMIT_REQUESTS);
  tg_tenant_state_free(&s);
}

/* Greedy client: tries at every millisecond. Returns the number admitted;
 * admitted times go to out (ms offsets from start), and each refusal's
 * retry_after is checked against the next admission. */
typedef int (*try_fn)(void *ctx, int64_t now, int64_t *retry);

static size_t greedy(try_fn fn, void *ctx, int64_t start, int64_t span_ms, int64_t *out,
                     size_t max) {
  size_t n = 0;
  int64_t promised = -1; /* time the last refusal said to come back */
  for (int64_t now = start; now < start + span_ms; now++) {
    int64_t retry = -1;
    if (fn(ctx, now, &retry)) {
      assert_true(n < max);
      /* A refusal's retry_after is exact: success comes no earlier... */
      if (promised >= 0)
        assert_int_equal(now, promised);
      promised = -1;
      out[n++] = now - start;
    } else {
      assert_true(retry >= 1);
      /* ... and every refusal in between names the same moment. */
      if (promised >= 0)
        assert_int_equal(now + retry, promised);
      promised = now + retry;
    }
  }
  return n;
}

/* Largest number of admissions in any span [a, a + window), trying every
 * start a from one window before the first to the last millisecond, with
 * prefix sums of a per-millisecond histogram (the admission times are
 * offsets in [0, span_ms)). */
static int64_t max_in_any_span(const int64_t *at, size_t n, int64_t span_ms, int64_t window) {
  int64_t len = span_ms + 2 * window; /* index = offset + window */
  int64_t *prefix = calloc((size_t)len + 1, sizeof *prefix);
  assert_non_null(prefix);
  for (size_t i = 0; i < n; i++) {
    assert_true(at[i] >= 0 && at[i] < span_ms);
    prefix[at[i] + window + 1]++;
  }
  for (int64_t k = 1; k <= len; k++)
    prefix[k] += prefix[k - 1];
  int64_t best = 0;
  for (int64_t a = 0; a + window <= len; a++) {
    int64_t c = prefix[a + window] - prefix[a];
    if (c > best)
      best = c;
  }
  free(prefix);
  return best;
}

typedef struct {
  tg_tenant_state_t s;
  tg_limits_t lim;
} rpm_ctx_t;

static int rpm_try(void *ctx, int64_t now, int64_t *retry) {
  rpm_ctx_t *c = ctx;
  tg_verdict_t v = admit(&c->s, &c->lim, 0, 0, now);
  *retry = v.retry_after_ms;
  if (v.refused != TG_LIMIT_NONE)
    assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  return v.refused == TG_LIMIT_NONE;
}

static void test_rpm_greedy_three_minutes(void **state) {
  (void)state;
  rpm_ctx_t c;
  tg_tenant_state_init(&c.s);
  c.lim = unlimited();
  c.lim.rpm = 60;
  int64_t at[1000];
  size_t n = greedy(rpm_try, &c, t0(), 180000, at, 1000);
  /* Exactly 60 per minute, and they come back one by one: 60 at ms 0..59,
   * the next at 60000..60059 as each old one leaves, and so on. */
  assert_int_equal(n, 180);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(at[i], (int64_t)(i / 60) * 60000 + (int64_t)(i % 60));
  assert_int_equal(max_in_any_span(at, n, 180000, 60000), 60);
  /* A fixed minute window would have allowed 120 in a 60 s span here:
   * 60 at the end of one minute, 60 at the start of the next. */
  tg_tenant_state_free(&c.s);
}

/* Spread out: one attempt every 7 ms never exceeds 60 in any span. */
typedef struct {
  rpm_ctx_t r;
  int step;
} sparse_ctx_t;

static void test_rpm_spread_never_exceeds(void **state) {
  (void)state;
  sparse_ctx_t c;
  tg_tenant_state_init(&c.r.s);
  c.r.lim = unlimited();
  c.r.lim.rpm = 60;
  c.step = 7;
  int64_t at[1000];
  size_t n = 0;
  for (int64_t now = t0(); now < t0() + 180000; now += c.step) {
    int64_t retry;
    if (rpm_try(&c.r, now, &retry))
      at[n++] = now - t0();
  }
  assert_int_equal(max_in_any_span(at, n, 180000, 60000), 60);
  /* 60 at 0..413 (every 7 ms), then each one freed 60000 ms later is
   * taken at the next multiple of 7. */
  assert_int_equal(at[59], 413);
  assert_int_equal(at[60], 60004); /* 60000 rounded up to a multiple of 7 */
  assert_int_equal(n, 180);
  tg_tenant_state_free(&c.r.s);
}

static void test_rpm_reload_shrink_grow(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.rpm = 60;
  int64_t t = t0();
  for (int i = 0; i < 40; i++)
    assert_int_equal(admit(&s, &lim, 0, 0, t + i).refused, TG_LIMIT_NONE);

  /* Grow to 100: the 40 still count. */
  lim.rpm = 100;
  tg_verdict_t v = admit(&s, &lim, 0, 0, t + 100);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.limit_requests, 100);
  assert_int_equal(v.remaining_requests, 59);
  assert_int_equal(v.reset_requests_ms, 59900);

  /* Shrink to 50, above the 41 held: they still count. */
  lim.rpm = 50;
  v = admit(&s, &lim, 0, 0, t + 200);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.remaining_requests, 8);
  assert_int_equal(s.rpm.total, 42);

  /* Shrink to 30, below the 42 held (t+0..t+39, t+100, t+200): refused
   * until 13 have left, i.e. when the one at t+12 leaves. */
  lim.rpm = 30;
  v = admit(&s, &lim, 0, 0, t + 300);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 12 + 60000 - 300);
  assert_int_equal(v.remaining_requests, 0);
  assert_int_equal(v.reset_requests_ms, 12 + 60000 - 300);
  assert_int_equal(s.rpm.total, 42); /* a refusal forgets nothing */

  /* Grown back to 60 within the minute: all 42 still count, 18 more fit. */
  lim.rpm = 60;
  for (int i = 0; i < 18; i++) {
    v = admit(&s, &lim, 0, 0, t + 400);
    assert_int_equal(v.refused, TG_LIMIT_NONE);
    assert_int_equal(v.remaining_requests, 17 - i);
  }
  v = admit(&s, &lim, 0, 0, t + 400);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 60000 - 400);

  /* Shrink to 10 inside one millisecond's entry: the 51st oldest is one of
   * the 18 at t+400. */
  lim.rpm = 10;
  v = admit(&s, &lim, 0, 0, t + 500);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 400 + 60000 - 500);
  v = admit(&s, &lim, 0, 0, t + 60399);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, 1);
  v = admit(&s, &lim, 0, 0, t + 60400);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.remaining_requests, 9);
  assert_int_equal(v.reset_requests_ms, 60000); /* only itself is left */
  assert_true(s.rpm.cap <= 10);                 /* the block shrank too */

  /* Unlimited: everything passes, headers say -1, the log is freed. */
  lim.rpm = 0;
  v = admit(&s, &lim, 0, 0, t + 60600);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.limit_requests, -1);
  assert_int_equal(v.remaining_requests, -1);
  assert_int_equal(v.reset_requests_ms, -1);
  assert_null(s.rpm.ts);
  assert_int_equal(s.rpm.total, 0);
  tg_tenant_state_free(&s);
}

/* The trimming primitive keeps the newest admissions. */
static void test_slog_reserve_trims(void **state) {
  (void)state;
  tg_slog_t log;
  memset(&log, 0, sizeof log);
  int64_t t = t0();
  for (int i = 0; i < 20; i++)
    assert_int_equal(tg_global_admit(&log, 100, t + i / 4, NULL), 1); /* 4 per ms */
  assert_int_equal(log.count, 5);
  assert_int_equal(log.total, 20);
  assert_int_equal(tg_slog_reserve(&log, 10), 0);
  assert_int_equal(log.total, 10);
  assert_int_equal(log.count, 3); /* 2 left at t+2, 4 at t+3, 4 at t+4 */
  assert_int_equal(log.ts[log.head], t + 2);
  assert_int_equal(log.n[log.head], 2);
  assert_true(log.cap <= 10);
  assert_int_equal(tg_slog_reserve(&log, 10), 0); /* nothing more to drop */
  assert_int_equal(log.total, 10);
  assert_int_equal(tg_slog_reserve(&log, 0), 0);
  assert_null(log.ts);
  assert_int_equal(log.total, 0);
  assert_int_equal(log.count, 0);
  tg_slog_free(&log);
}

/* Memory is bounded by the window, not by the limit. */
static void test_rpm_memory_bounded(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.rpm = INT64_C(1000000000000);
  int64_t t = t0();
  for (int64_t ms = 0; ms < 61000; ms++)
    for (int k = 0; k < 3; k++)
      assert_int_equal(admit(&s, &lim, 0, 0, t + ms).refused, TG_LIMIT_NONE);
  assert_int_equal(s.rpm.total, 180000);
  assert_int_equal(s.rpm.count, 60000);
  assert_true(s.rpm.cap <= TG_SLOG_MAX_ENTRIES);
  tg_verdict_t v = admit(&s, &lim, 0, 0, t + 61000);
  /* t+1000's three left the window, three came in */
  assert_int_equal(v.remaining_requests, INT64_C(1000000000000) - 180000 + 3 - 1);
  assert_int_equal(s.rpm.cap, TG_SLOG_MAX_ENTRIES);
  /* An idle minute gives the memory back. */
  v = admit(&s, &lim, 0, 0, t + 200000);
  assert_int_equal(s.rpm.total, 1);
  assert_true(s.rpm.cap <= 8);
  tg_tenant_state_free(&s);
}

static void test_headers_unlimited_and_refused(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  tg_verdict_t v = admit(&s, &lim, 500, USD(1), t0());
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.limit_requests, -1);
  assert_int_equal(v.remaining_requests, -1);
  assert_int_equal(v.reset_requests_ms, -1);
  assert_int_equal(v.limit_tokens, -1);
  assert_int_equal(v.remaining_tokens, -1);
  assert_int_equal(v.reset_tokens_ms, -1);
  assert_int_equal(v.day, tg_day_of(t0()));
  assert_int_equal(v.month, tg_month_of(t0()));
  /* Unlimited still counts leases and money, for a reload that limits. */
  assert_int_equal(s.inflight, 1);
  assert_int_equal(s.day.reserved, USD(1));
  assert_int_equal(s.month.reserved, USD(1));

  /* Refused by concurrency: the other headers show the state as it stands. */
  lim.concurrency = 1;
  lim.rpm = 60;
  lim.tpm = 1000;
  v = admit(&s, &lim, 10, 0, t0() + 5);
  assert_int_equal(v.refused, TG_LIMIT_CONCURRENCY);
  assert_int_equal(v.retry_after_ms, 1000);
  assert_int_equal(v.limit_requests, 60);
  assert_int_equal(v.remaining_requests, 60);
  assert_int_equal(v.reset_requests_ms, 0);
  assert_int_equal(v.limit_tokens, 1000);
  assert_int_equal(v.remaining_tokens, 1000);
  assert_int_equal(v.reset_tokens_ms, 0);
  tg_tenant_state_free(&s);
}

/* ---- global per second ------------------------------------------------- */

typedef struct {
  tg_slog_t log;
  int64_t rps;
} global_ctx_t;

static int global_try(void *ctx, int64_t now, int64_t *retry) {
  global_ctx_t *c = ctx;
  return tg_global_admit(&c->log, c->rps, now, retry);
}

static void test_global_greedy(void **state) {
  (void)state;
  global_ctx_t c;
  memset(&c, 0, sizeof c);
  c.rps = 100;
  int64_t at[1000];
  size_t n = greedy(global_try, &c, t0(), 3000, at, 1000);
  assert_int_equal(n, 300);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(at[i], (int64_t)(i / 100) * 1000 + (int64_t)(i % 100));
  assert_int_equal(max_in_any_span(at, n, 3000, 1000), 100);
  tg_slog_free(&c.log);
}

/* An admission given back (its tenant's limits refused the request) frees
 * its place at once: with 100 rps, 100 admitted and given back leave room
 * for 100 more in the same millisecond; entries emptied are dropped. */
static void test_global_unadmit(void **state) {
  (void)state;
  tg_slog_t log;
  memset(&log, 0, sizeof log);
  int64_t t = t0();
  for (int i = 0; i < 100; i++) {
    assert_int_equal(tg_global_admit(&log, 100, t + i % 3, NULL), 1);
    tg_global_unadmit(&log, t + i % 3);
  }
  assert_int_equal(log.total, 0);
  assert_int_equal(log.count, 0);
  for (int i = 0; i < 100; i++)
    assert_int_equal(tg_global_admit(&log, 100, t + 5, NULL), 1);
  assert_int_equal(tg_global_admit(&log, 100, t + 5, NULL), 0);
  tg_global_unadmit(&log, t + 5);
  assert_int_equal(log.total, 99);
  assert_int_equal(tg_global_admit(&log, 100, t + 5, NULL), 1);
  tg_slog_free(&log);
  tg_global_unadmit(&log, t + 5); /* an empty log: nothing to give back */
  assert_int_equal(log.total, 0);
}

/* A give-back takes the admission's own entry, not the newest: when
 * another thread was admitted in a later millisecond in between, its
 * admission keeps its own time. Taking the newest left the older time
 * standing for it, leaving the window early: rps + 1 in one second. */
static void test_global_unadmit_keeps_later_admissions(void **state) {
  (void)state;
  tg_slog_t log;
  memset(&log, 0, sizeof log);
  int64_t t = t0();
  assert_int_equal(tg_global_admit(&log, 2, t, NULL), 1);       /* A */
  assert_int_equal(tg_global_admit(&log, 2, t + 500, NULL), 1); /* B, another thread */
  tg_global_unadmit(&log, t);                                   /* A's tenant refused it */
  assert_int_equal(tg_global_admit(&log, 2, t + 700, NULL), 1); /* C */
  /* A's time has left the window, B's and C's have not: full */
  assert_int_equal(tg_global_admit(&log, 2, t + 1001, NULL), 0);
  assert_int_equal(tg_global_admit(&log, 2, t + 1499, NULL), 0);
  assert_int_equal(tg_global_admit(&log, 2, t + 1500, NULL), 1);
  /* a give-back of an admission already gone changes nothing */
  tg_global_unadmit(&log, t + 3);
  assert_int_equal(log.total, 2);
  tg_slog_free(&log);
}

static void test_global_burst_and_unlimited(void **state) {
  (void)state;
  tg_slog_t log;
  memset(&log, 0, sizeof log);
  int64_t retry = -1, t = t0();
  for (int i = 0; i < 100; i++)
    assert_int_equal(tg_global_admit(&log, 100, t + 250, &retry), 1);
  assert_int_equal(tg_global_admit(&log, 100, t + 250, &retry), 0);
  assert_int_equal(retry, 1000);
  assert_int_equal(tg_global_admit(&log, 100, t + 1249, &retry), 0);
  assert_int_equal(retry, 1);
  assert_int_equal(tg_global_admit(&log, 100, t + 1250, &retry), 1);
  assert_int_equal(log.total, 1);
  /* 0 is no limit. */
  for (int i = 0; i < 1000; i++)
    assert_int_equal(tg_global_admit(&log, 0, t + 1250, &retry), 1);
  assert_null(log.ts);
  /* A huge limit keeps at most one entry per millisecond of the window. */
  for (int64_t ms = 0; ms < 2000; ms++)
    for (int k = 0; k < 5; k++)
      assert_int_equal(tg_global_admit(&log, 1000000000, t + ms, NULL), 1);
  assert_int_equal(log.total, 5000);
  assert_int_equal(log.count, 1000);
  assert_true(log.cap <= 1024);
  tg_slog_free(&log);
}

/* ---- tokens per minute ------------------------------------------------- */

static void test_tpm_boundaries(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.tpm = 60000; /* 1 token per ms */
  int64_t t = t0();

  /* Starts full: 59999 then 1 fit exactly; one more does not. */
  tg_verdict_t v = admit(&s, &lim, 59999, 0, t);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.limit_tokens, 60000);
  assert_int_equal(v.remaining_tokens, 1);
  assert_int_equal(v.reset_tokens_ms, 59999);
  v = admit(&s, &lim, 1, 0, t);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.remaining_tokens, 0);
  assert_int_equal(v.reset_tokens_ms, 60000);
  v = admit(&s, &lim, 1, 0, t);
  assert_int_equal(v.refused, TG_LIMIT_TOKENS);
  assert_int_equal(v.retry_after_ms, 1);
  assert_int_equal(v.remaining_tokens, 0);
  assert_int_equal(v.reset_tokens_ms, 60000);
  v = admit(&s, &lim, 500, 0, t);
  assert_int_equal(v.retry_after_ms, 500);
  /* 250 ms later: 250 tokens back. */
  v = admit(&s, &lim, 251, 0, t + 250);
  assert_int_equal(v.refused, TG_LIMIT_TOKENS);
  assert_int_equal(v.retry_after_ms, 1);
  assert_int_equal(v.remaining_tokens, 250);
  assert_int_equal(v.reset_tokens_ms, 59750);
  v = admit(&s, &lim, 250, 0, t + 250);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.remaining_tokens, 0);
  /* A whole idle minute refills to full and no further. */
  v = admit(&s, &lim, 0, 0, t + 250 + 120000);
  assert_int_equal(v.remaining_tokens, 60000);
  assert_int_equal(v.reset_tokens_ms, 0);
  assert_int_equal(s.tpm.level_mt, 60000000);
  tg_tenant_state_free(&s);
}

static void test_tpm_refill_exact(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.tpm = 100000; /* 1666.67 tokens per second: not a whole rate per ms */
  int64_t t = t0();
  assert_int_equal(admit(&s, &lim, 100000, 0, t).refused, TG_LIMIT_NONE);
  assert_int_equal(s.tpm.level_mt, 0);

  /* After 7 ms: floor(7 * 100000 / 60) = 11666 milli-tokens. */
  tg_verdict_t v = admit(&s, &lim, 0, 0, t + 7);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.tpm.level_mt, 11666);
  assert_int_equal(v.remaining_tokens, 11);
  assert_int_equal(v.reset_tokens_ms, 59994);

  /* Start again from empty and wait 600 ms in one step: exactly 1000 tokens. */
  assert_int_equal(admit(&s, &lim, 11, 0, t + 7).refused, TG_LIMIT_NONE);
  s.tpm.level_mt = 0;
  v = admit(&s, &lim, 1001, 0, t + 607);
  assert_int_equal(v.refused, TG_LIMIT_TOKENS);
  /* 1001000 milli-tokens need ceil(600.6) = 601 ms */
  assert_int_equal(v.retry_after_ms, 1);
  assert_int_equal(v.remaining_tokens, 1000);
  v = admit(&s, &lim, 1001, 0, t + 608);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.tpm.level_mt, 1001666 - 1001000);
  tg_tenant_state_free(&s);
}

static void test_tpm_settle_up_and_down(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.tpm = 60000;
  int64_t t = t0();

  /* Reserved 1000, used 400: 600 come back. */
  tg_verdict_t v = admit(&s, &lim, 1000, 0, t);
  assert_int_equal(v.remaining_tokens, 59000);
  settle(&s, &lim, 1000, 0, &v, 400, 0, t, NULL, NULL);
  assert_int_equal(s.tpm.level_mt, 59600000);

  /* Reserved 1000, used 3000: 2000 more are charged. */
  v = admit(&s, &lim, 1000, 0, t);
  settle(&s, &lim, 1000, 0, &v, 3000, 0, t, NULL, NULL);
  assert_int_equal(s.tpm.level_mt, 56600000);

  /* A give-back stops at capacity. */
  v = admit(&s, &lim, 10000, 0, t + 3000); /* 56600 + 3000 refilled - 10000 */
  assert_int_equal(v.remaining_tokens, 49600);
  settle(&s, &lim, 10000, 0, &v, 0, 0, t + 20000, NULL, NULL);
  assert_int_equal(s.tpm.level_mt, 60000000);
  assert_int_equal(s.inflight, 0);

  /* An admission made while tokens were unlimited gives nothing back. */
  tg_limits_t open = unlimited();
  v = admit(&s, &open, 5000, 0, t + 20000);
  assert_int_equal(v.limit_tokens, -1);
  assert_int_equal(admit(&s, &lim, 30000, 0, t + 20000).refused, TG_LIMIT_NONE);
  settle(&s, &lim, 5000, 0, &v, 0, 0, t + 20000, NULL, NULL);
  assert_int_equal(s.tpm.level_mt, 30000000);
  tg_tenant_state_free(&s);
}

static void test_tpm_oversized_and_negative(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.tpm = 1000;
  int64_t t = t0();

  /* Bigger than a whole minute: only from a full bucket, which goes
   * negative by the excess. */
  tg_verdict_t v = admit(&s, &lim, 5000, 0, t);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.tpm.level_mt, -4000000);
  assert_int_equal(v.remaining_tokens, 0);
  assert_int_equal(v.reset_tokens_ms, 300000); /* 5000 tokens at 1000 per minute */

  /* Even one token waits for the debt: 4001 tokens at 1000/min. */
  v = admit(&s, &lim, 1, 0, t);
  assert_int_equal(v.refused, TG_LIMIT_TOKENS);
  assert_int_equal(v.retry_after_ms, 240060);
  v = admit(&s, &lim, 1, 0, t + 240059);
  assert_int_equal(v.refused, TG_LIMIT_TOKENS);
  assert_int_equal(v.retry_after_ms, 1);
  v = admit(&s, &lim, 1, 0, t + 240060);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.tpm.level_mt, 0);

  /* Not full: an oversized request waits for a full bucket. */
  v = admit(&s, &lim, 5000, 0, t + 240060 + 1000);
  assert_int_equal(v.refused, TG_LIMIT_TOKENS);
  assert_int_equal(v.retry_after_ms, 59000);
  v = admit(&s, &lim, 5000, 0, t + 240060 + 60000);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.tpm.level_mt, -4000000);

  /* Settled at 100 actual tokens: the level recovers to 900. */
  settle(&s, &lim, 5000, 0, &v, 100, 0, t + 240060 + 60000, NULL, NULL);
  assert_int_equal(s.tpm.level_mt, 900000);

  /* Absurd usage from an upstream saturates instead of wrapping. */
  v = admit(&s, &lim, 1, 0, t + 400000);
  settle(&s, &lim, 1, 0, &v, INT64_MAX, 0, t + 400000, NULL, NULL);
  assert_true(s.tpm.level_mt < 0);
  v = admit(&s, &lim, 1, 0, t + 400000);
  assert_int_equal(v.refused, TG_LIMIT_TOKENS);
  assert_true(v.retry_after_ms > 0);
  tg_tenant_state_free(&s);
}

/* ---- concurrency ------------------------------------------------------- */

static void test_concurrency(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.concurrency = 2;
  int64_t t = t0();
  tg_verdict_t a = admit(&s, &lim, 0, 0, t);
  tg_verdict_t b = admit(&s, &lim, 0, 0, t);
  assert_int_equal(a.refused, TG_LIMIT_NONE);
  assert_int_equal(b.refused, TG_LIMIT_NONE);
  tg_verdict_t c = admit(&s, &lim, 0, 0, t);
  assert_int_equal(c.refused, TG_LIMIT_CONCURRENCY);
  assert_int_equal(c.retry_after_ms, 1000);
  assert_int_equal(s.inflight, 2);
  /* Settling a refused verdict gives nothing back. */
  settle(&s, &lim, 0, 0, &c, 0, 0, t, NULL, NULL);
  assert_int_equal(s.inflight, 2);
  settle(&s, &lim, 0, 0, &a, 0, 0, t, NULL, NULL);
  assert_int_equal(s.inflight, 1);
  assert_int_equal(admit(&s, &lim, 0, 0, t).refused, TG_LIMIT_NONE);
  assert_int_equal(admit(&s, &lim, 0, 0, t).refused, TG_LIMIT_CONCURRENCY);
  /* Extra settlements never take the count below zero. */
  for (int i = 0; i < 5; i++)
    settle(&s, &lim, 0, 0, &b, 0, 0, t, NULL, NULL);
  assert_int_equal(s.inflight, 0);
  assert_int_equal(admit(&s, &lim, 0, 0, t).refused, TG_LIMIT_NONE);
  assert_int_equal(admit(&s, &lim, 0, 0, t).refused, TG_LIMIT_NONE);
  assert_int_equal(admit(&s, &lim, 0, 0, t).refused, TG_LIMIT_CONCURRENCY);
  tg_tenant_state_free(&s);
}

/* ---- budgets ----------------------------------------------------------- */

static void test_budget_exact_boundary(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(50);
  lim.month_limit = USD(1000);
  int64_t t = utc(2026, 3, 10, 15, 0, 0, 0);

  tg_verdict_t v = admit(&s, &lim, 0, USD(30), t);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  /* One nano more than what is left: refused until midnight UTC. */
  v = admit(&s, &lim, 0, USD(20) + 1, t);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_string_equal(tg_limit_name(v.refused), "budget");
  assert_int_equal(v.retry_after_ms, 9 * 3600 * 1000);
  /* Exactly what is left: admitted. */
  v = admit(&s, &lim, 0, USD(20), t);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.day.reserved, USD(50));
  assert_int_equal(s.month.reserved, USD(50));
  v = admit(&s, &lim, 0, 1, t + 1);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_int_equal(v.retry_after_ms, 9 * 3600 * 1000 - 1);
  /* A request that costs nothing still fits: 50 + 0 <= 50. */
  v = admit(&s, &lim, 0, 0, t + 1);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  tg_tenant_state_free(&s);
}

static void test_budget_monthly(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.month_limit = USD(100);
  int64_t t = utc(2026, 3, 31, 22, 0, 0, 0);
  tg_verdict_t v = admit(&s, &lim, 0, USD(99), utc(2026, 3, 2, 0, 0, 0, 0));
  settle(&s, &lim, 0, USD(99), &v, 0, USD(99), utc(2026, 3, 2, 0, 0, 1, 0), NULL, NULL);
  v = admit(&s, &lim, 0, USD(1) + 1, t);
  assert_int_equal(v.refused, TG_LIMIT_MONTHLY_BUDGET);
  assert_string_equal(tg_limit_detail(v.refused), "monthly_budget");
  assert_int_equal(v.retry_after_ms, 2 * 3600 * 1000); /* to April 1st 00:00 UTC */
  v = admit(&s, &lim, 0, USD(1), t);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.month.spent, USD(99));
  assert_int_equal(s.month.reserved, USD(1));
  tg_tenant_state_free(&s);
}

/* Lifts the i-th limit of test_check_order's order. */
static void lift(tg_limits_t *lim, int i) {
  switch (i) {
  case 0: lim->concurrency = 0; break;
  case 1: lim->rpm = 0; break;
  case 2: lim->tpm = 0; break;
  case 3: lim->day_limit = 0; break;
  default: lim->month_limit = 0; break;
  }
}

/* Every limit refuses at once; lifting them one by one shows the order. */
static void test_check_order(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.concurrency = 1;
  lim.rpm = 1;
  lim.tpm = 10;
  lim.day_limit = USD(1);
  lim.month_limit = USD(1);
  int64_t t = t0();
  assert_int_equal(admit(&s, &lim, 10, USD(1), t).refused, TG_LIMIT_NONE);
  const tg_limit_kind_t order[] = {TG_LIMIT_CONCURRENCY, TG_LIMIT_REQUESTS, TG_LIMIT_TOKENS,
                                   TG_LIMIT_DAILY_BUDGET, TG_LIMIT_MONTHLY_BUDGET};
  const int64_t retry[] = {1000, 60000, 6000, 12 * 3600 * 1000,
                           utc(2026, 4, 1, 0, 0, 0, 0) - t};
  /* The first refusal names the limit, the wait is the longest of those
   * still refusing: the request passes only once they all do. Lifted from
   * the first, the month's end stays the wait; lifted from the last, each
   * step shows the longest wait left. */
  const tg_limits_t all = lim;
  for (int i = 0; i < 5; i++) {
    tg_verdict_t v = admit(&s, &lim, 1, 1, t);
    assert_int_equal(v.refused, order[i]);
    assert_int_equal(v.retry_after_ms, retry[4]);
    lift(&lim, i);
  }
  lim = all;
  for (int i = 4; i >= 0; i--) {
    tg_verdict_t v = admit(&s, &lim, 1, 1, t);
    int64_t longest = 0;
    for (int j = 0; j <= i; j++)
      longest = retry[j] > longest ? retry[j] : longest;
    assert_int_equal(v.refused, order[0]);
    assert_int_equal(v.retry_after_ms, longest);
    lift(&lim, i);
  }
  assert_int_equal(admit(&s, &lim, 1, 1, t).refused, TG_LIMIT_NONE);
  assert_int_equal(s.inflight, 2);
  assert_int_equal(s.day.reserved, USD(1) + 1);
  tg_tenant_state_free(&s);
}

static void test_budget_settle_replaces_reservation(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(50);
  lim.month_limit = USD(1000);
  int64_t t = t0();
  tg_verdict_t a = admit(&s, &lim, 0, USD(30), t);
  tg_verdict_t b = admit(&s, &lim, 0, USD(20), t);
  assert_int_equal(admit(&s, &lim, 0, 1, t).refused, TG_LIMIT_DAILY_BUDGET);
  /* a used 25 of its 30: 5 of the day come back. */
  settle(&s, &lim, 0, USD(30), &a, 0, USD(25), t + 1000, NULL, NULL);
  assert_int_equal(s.day.spent, USD(25));
  assert_int_equal(s.day.reserved, USD(20));
  assert_int_equal(s.month.spent, USD(25));
  assert_int_equal(s.month.reserved, USD(20));
  assert_int_equal(admit(&s, &lim, 0, USD(5) + 1, t + 1000).refused, TG_LIMIT_DAILY_BUDGET);
  tg_verdict_t c = admit(&s, &lim, 0, USD(5), t + 1000);
  assert_int_equal(c.refused, TG_LIMIT_NONE);
  /* b used more than it reserved: spend can exceed the limit, and then
   * nothing more is admitted that costs anything. */
  settle(&s, &lim, 0, USD(20), &b, 0, USD(24), t + 2000, NULL, NULL);
  assert_int_equal(s.day.spent, USD(49));
  assert_int_equal(s.day.reserved, USD(5));
  settle(&s, &lim, 0, USD(5), &c, 0, 0, t + 3000, NULL, NULL);
  assert_int_equal(s.day.spent, USD(49));
  assert_int_equal(s.day.reserved, 0);
  assert_int_equal(s.month.spent, USD(49));
  assert_int_equal(s.month.reserved, 0);
  tg_verdict_t v = admit(&s, &lim, 0, USD(1), t + 3000);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(admit(&s, &lim, 0, 1, t + 3000).refused, TG_LIMIT_DAILY_BUDGET);
  tg_tenant_state_free(&s);
}

/* Spends the day's limit just before a boundary and checks the first
 * millisecond after it starts a new window. */
static void check_rollover(int64_t before, int64_t after, int month_changes) {
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(10);
  lim.month_limit = USD(15);
  assert_int_equal(after - before, 1);
  tg_verdict_t v = admit(&s, &lim, 0, USD(10), before);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  v = admit(&s, &lim, 0, 1, before);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_int_equal(v.retry_after_ms, 1);
  v = admit(&s, &lim, 0, USD(10), after);
  if (month_changes) {
    assert_int_equal(v.refused, TG_LIMIT_NONE);
    assert_int_equal(v.month, tg_month_of(before) + 1);
    assert_int_equal(s.month.reserved, USD(10));
  } else {
    /* Same month: the month still holds the 10 from yesterday. */
    assert_int_equal(v.refused, TG_LIMIT_MONTHLY_BUDGET);
    assert_int_equal(v.retry_after_ms, tg_month_end_ms(tg_month_of(after)) - after);
    v = admit(&s, &lim, 0, USD(5), after);
    assert_int_equal(v.refused, TG_LIMIT_NONE);
    assert_int_equal(v.month, tg_month_of(before));
    assert_int_equal(s.month.reserved, USD(15));
  }
  assert_int_equal(v.day, tg_day_of(before) + 1);
  assert_int_equal(s.day.period, tg_day_of(after));
  tg_tenant_state_free(&s);
}

static void test_budget_rollover(void **state) {
  (void)state;
  char buf[16];
  /* UTC midnight inside a month. */
  check_rollover(utc(2026, 3, 10, 23, 59, 59, 999), utc(2026, 3, 11, 0, 0, 0, 0), 0);
  /* Month ends: 31-day month, the leap day, the year end. */
  check_rollover(utc(2026, 1, 31, 23, 59, 59, 999), utc(2026, 2, 1, 0, 0, 0, 0), 1);
  check_rollover(utc(2024, 2, 28, 23, 59, 59, 999), utc(2024, 2, 29, 0, 0, 0, 0), 0);
  check_rollover(utc(2024, 2, 29, 23, 59, 59, 999), utc(2024, 3, 1, 0, 0, 0, 0), 1);
  check_rollover(utc(2026, 12, 31, 23, 59, 59, 999), utc(2027, 1, 1, 0, 0, 0, 0), 1);
  assert_string_equal(tg_day_str(tg_day_of(utc(2027, 1, 1, 0, 0, 0, 0)), buf, sizeof buf),
                      "2027-01-01");

  /* The monthly refusal's retry_after runs to the first of next month. */
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.month_limit = USD(1);
  int64_t t = utc(2024, 2, 29, 23, 59, 59, 999);
  assert_int_equal(admit(&s, &lim, 0, USD(1), utc(2024, 2, 1, 0, 0, 0, 0)).refused,
                   TG_LIMIT_NONE);
  tg_verdict_t v = admit(&s, &lim, 0, 1, t);
  assert_int_equal(v.refused, TG_LIMIT_MONTHLY_BUDGET);
  assert_int_equal(v.retry_after_ms, 1);
  v = admit(&s, &lim, 0, 1, utc(2024, 2, 10, 0, 0, 0, 0));
  assert_int_equal(v.retry_after_ms, utc(2024, 3, 1, 0, 0, 0, 0) - utc(2024, 2, 10, 0, 0, 0, 0));
  assert_int_equal(admit(&s, &lim, 0, USD(1), t + 1).refused, TG_LIMIT_NONE);
  assert_int_equal(s.month.period, 650);
  assert_int_equal(s.month.reserved, USD(1));
  tg_tenant_state_free(&s);
}

static void test_budget_settle_after_rollover(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(10);
  lim.month_limit = USD(100);
  int ad = -1, am = -1;

  /* Across midnight in the same month: the day window is new, the month's
   * is not. */
  int64_t before = utc(2026, 3, 10, 23, 59, 59, 0);
  int64_t after = utc(2026, 3, 11, 0, 0, 1, 0);
  tg_verdict_t a = admit(&s, &lim, 0, USD(5), before);
  tg_verdict_t b = admit(&s, &lim, 0, USD(3), after);
  assert_int_equal(s.day.reserved, USD(3));
  settle(&s, &lim, 0, USD(5), &a, 0, USD(9), after + 10, &ad, &am);
  assert_int_equal(s.day.period, tg_day_of(after));
  assert_int_equal(s.day.spent, 0);
  assert_int_equal(s.day.reserved, USD(3));
  assert_int_equal(s.day.alerted, 0);
  assert_int_equal(ad, 0);
  assert_int_equal(s.month.spent, USD(9));
  assert_int_equal(s.month.reserved, USD(3));
  assert_int_equal(am, 0);
  settle(&s, &lim, 0, USD(3), &b, 0, USD(2), after + 20, &ad, &am);
  assert_int_equal(s.day.spent, USD(2));
  assert_int_equal(s.day.reserved, 0);
  assert_int_equal(s.month.spent, USD(11));

  /* Across a month end: both windows are new and both are left alone. */
  before = utc(2026, 3, 31, 23, 0, 0, 0);
  after = utc(2026, 4, 1, 0, 0, 0, 0);
  a = admit(&s, &lim, 0, USD(5), before);
  assert_int_equal(s.month.reserved, USD(5));
  b = admit(&s, &lim, 0, USD(1), after);
  settle(&s, &lim, 0, USD(5), &a, 0, USD(10), after, &ad, &am);
  assert_int_equal(s.day.spent, 0);
  assert_int_equal(s.day.reserved, USD(1));
  assert_int_equal(s.month.spent, 0);
  assert_int_equal(s.month.reserved, USD(1));
  assert_int_equal(ad, 0);
  assert_int_equal(am, 0);

  /* A settlement after midnight with no admission since still counts for
   * the day it was admitted in: that is the window stored. */
  tg_verdict_t c = admit(&s, &lim, 0, USD(2), utc(2026, 4, 1, 23, 0, 0, 0));
  settle(&s, &lim, 0, USD(2), &c, 0, USD(8), utc(2026, 4, 2, 0, 30, 0, 0), &ad, &am);
  assert_int_equal(s.day.period, tg_day_of(utc(2026, 4, 1, 0, 0, 0, 0)));
  assert_int_equal(s.day.spent, USD(8));
  assert_int_equal(ad, 1); /* 8 of 10 is the 80 % threshold of April 1st */
  tg_tenant_state_free(&s);
}

/* A wall clock stepped back across midnight (an NTP correction) must not
 * reopen the day it had closed with nothing spent: that gave the tenant a
 * whole daily budget again (a whole monthly one at a month end), and the
 * day's spend, reserved and settled, was lost when the clock came forward
 * again. The open window keeps being charged, and so do its settlements. */
static void test_budget_clock_stepped_back(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(10);
  lim.month_limit = USD(15);
  int ad = -1, am = -1;
  int64_t before = utc(2026, 3, 31, 23, 59, 59, 0);
  int64_t after = utc(2026, 4, 1, 0, 0, 2, 0);
  int64_t back = utc(2026, 3, 31, 23, 59, 59, 500);   /* the clock came back 2.5 s */
  int64_t apr1 = tg_day_of(after), april = tg_month_of(after);

  tg_verdict_t v = admit(&s, &lim, 0, USD(10), before);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  settle(&s, &lim, 0, USD(10), &v, 0, USD(10), before, &ad, &am);
  tg_verdict_t inflight = admit(&s, &lim, 0, USD(1), after);
  assert_int_equal(inflight.refused, TG_LIMIT_NONE);
  assert_int_equal(inflight.day, apr1);

  /* Stepped back into March 31st, whose 10 USD are spent: no fresh day. */
  v = admit(&s, &lim, 0, USD(10), back);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_int_equal(v.retry_after_ms, tg_day_end_ms(apr1) - back);
  assert_int_equal(s.day.period, apr1);
  assert_int_equal(s.day.reserved, USD(1));
  assert_int_equal(s.month.period, april);

  /* The request in flight settles into April 1st's windows. */
  settle(&s, &lim, 0, USD(1), &inflight, 0, USD(1), back + 100, &ad, &am);
  assert_int_equal(s.day.spent, USD(1));
  assert_int_equal(s.day.reserved, 0);
  assert_int_equal(s.month.spent, USD(1));

  /* What fits in the open windows is charged to them, and stays charged
   * when the clock passes midnight again. */
  v = admit(&s, &lim, 0, USD(9), back + 200);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.day, apr1);
  assert_int_equal(v.month, april);
  settle(&s, &lim, 0, USD(9), &v, 0, USD(9), back + 300, &ad, &am);
  assert_int_equal(ad, 1);   /* 10 of 10: April 1st's threshold, once */
  v = admit(&s, &lim, 0, 1, utc(2026, 4, 1, 0, 0, 3, 0));
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_int_equal(s.day.spent, USD(10));
  assert_int_equal(s.month.spent, USD(10));
  assert_int_equal(admit(&s, &lim, 0, USD(4), utc(2026, 4, 2, 0, 0, 0, 0)).refused,
                   TG_LIMIT_NONE);

  /* A clock far behind the open window (one that ran ahead by days and was
   * set right) starts now's window: a window is never held for longer than
   * a step back of TG_CLOCK_STEP_BACK_MAX_MS. */
  int64_t wrong = utc(2026, 4, 20, 12, 0, 0, 0), right = utc(2026, 4, 2, 12, 0, 0, 0);
  assert_int_equal(admit(&s, &lim, 0, 1, wrong).refused, TG_LIMIT_NONE);
  v = admit(&s, &lim, 0, 1, right);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.day, tg_day_of(right));
  assert_int_equal(s.day.period, tg_day_of(right));
  int64_t held = tg_day_end_ms(tg_day_of(right)) - TG_CLOCK_STEP_BACK_MAX_MS;
  assert_int_equal(admit(&s, &lim, 0, 1, tg_day_end_ms(tg_day_of(right))).day,
                   tg_day_of(right) + 1);
  assert_int_equal(admit(&s, &lim, 0, 1, held).day, tg_day_of(right) + 1);
  assert_int_equal(admit(&s, &lim, 0, 1, held - 1).day, tg_day_of(right));
  tg_tenant_state_free(&s);
}

static void test_budget_alerts(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(100);
  lim.month_limit = USD(1000);
  lim.alert_pct = 80;
  int64_t t = t0();
  int ad = -1, am = -1;

  /* One nano short of 80 %: no event. */
  tg_verdict_t v = admit(&s, &lim, 0, USD(90), t);
  settle(&s, &lim, 0, USD(90), &v, 0, USD(80) - 1, t, &ad, &am);
  assert_int_equal(ad, 0);
  assert_int_equal(am, 0);
  assert_int_equal(s.day.alerted, 0);
  /* Reaching exactly 80 %: one event. */
  v = admit(&s, &lim, 0, 1, t);
  settle(&s, &lim, 0, 1, &v, 0, 1, t, &ad, &am);
  assert_int_equal(ad, 1);
  assert_int_equal(am, 0);
  assert_int_equal(s.day.alerted, 1);
  assert_int_equal(s.day.spent, USD(80));
  /* Spending on to the limit: no second event today. */
  for (int i = 0; i < 2; i++) {
    v = admit(&s, &lim, 0, USD(5), t + i);
    assert_int_equal(v.refused, TG_LIMIT_NONE);
    settle(&s, &lim, 0, USD(5), &v, 0, USD(10), t + i, &ad, &am);
    assert_int_equal(ad, 0);
  }
  assert_int_equal(s.day.spent, USD(100));
  v = admit(&s, &lim, 0, 1, t + 5);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);

  /* Next day: a new window, a new event at its crossing. */
  int64_t next = t + 86400000;
  v = admit(&s, &lim, 0, USD(85), next);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.day.alerted, 0);
  settle(&s, &lim, 0, USD(85), &v, 0, USD(85), next, &ad, &am);
  assert_int_equal(ad, 1);
  assert_int_equal(am, 0); /* month: 185 of 1000 */
  assert_int_equal(s.month.spent, USD(185));

  /* The month crosses its 80 % (800) once. */
  for (int d = 2; d <= 8; d++) {
    int64_t now = t + d * INT64_C(86400000);
    v = admit(&s, &lim, 0, USD(100), now);
    assert_int_equal(v.refused, TG_LIMIT_NONE);
    settle(&s, &lim, 0, USD(100), &v, 0, USD(100), now, &ad, &am);
    assert_int_equal(ad, 1);
    assert_int_equal(am, d == 8 ? 1 : 0); /* 785 on day 7, 885 on day 8 */
  }
  v = admit(&s, &lim, 0, USD(100), t + 9 * INT64_C(86400000));
  settle(&s, &lim, 0, USD(100), &v, 0, USD(100), t + 9 * INT64_C(86400000), &ad, &am);
  assert_int_equal(am, 0);
  assert_int_equal(s.month.spent, USD(985));
  tg_tenant_state_free(&s);
}

static void test_budget_alert_threshold_exact(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(10);  /* internal-dev: 10 USD a day, alert at 90 % */
  lim.alert_pct = 90;
  int ad = -1;
  tg_verdict_t v = admit(&s, &lim, 0, USD(9), t0());
  settle(&s, &lim, 0, USD(9), &v, 0, USD(9), t0(), &ad, NULL);
  assert_int_equal(ad, 1);
  /* No month limit: never a month event. */
  int am = -1;
  v = admit(&s, &lim, 0, 0, t0());
  settle(&s, &lim, 0, 0, &v, 0, 0, t0(), &ad, &am);
  assert_int_equal(ad, 0);
  assert_int_equal(am, 0);

  /* Amounts near the int64 limit neither overflow nor wrap. */
  tg_tenant_state_t big;
  tg_tenant_state_init(&big);
  lim.day_limit = INT64_MAX;
  lim.month_limit = INT64_MAX;
  lim.alert_pct = 100;
  v = admit(&big, &lim, 0, INT64_MAX, t0());
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(admit(&big, &lim, 0, 1, t0()).refused, TG_LIMIT_DAILY_BUDGET);
  settle(&big, &lim, 0, INT64_MAX, &v, 0, INT64_MAX, t0(), &ad, &am);
  assert_int_equal(ad, 1);
  assert_int_equal(am, 1);
  assert_int_equal(big.day.spent, INT64_MAX);
  assert_int_equal(big.day.reserved, 0);
  tg_tenant_state_free(&big);
  tg_tenant_state_free(&s);
}

/* ---- all or nothing ---------------------------------------------------- */

typedef struct {
  tg_tenant_state_t s;
  int64_t ts[64], n[64];
} snapshot_t;

static void snap(const tg_tenant_state_t *s, snapshot_t *out) {
  memset(out, 0, sizeof *out);
  out->s = *s;
  assert_true(s->rpm.count <= 64);
  for (uint32_t i = 0; i < s->rpm.count; i++) {
    uint32_t j = (s->rpm.head + i) % s->rpm.cap;
    out->ts[i] = s->rpm.ts[j];
    out->n[i] = s->rpm.n[j];
  }
}

static void assert_unchanged(const snapshot_t *before, const tg_tenant_state_t *s) {
  snapshot_t now;
  snap(s, &now);
  assert_int_equal(now.s.rpm.count, before->s.rpm.count);
  assert_int_equal(now.s.rpm.total, before->s.rpm.total);
  assert_memory_equal(now.ts, before->ts, sizeof now.ts);
  assert_memory_equal(now.n, before->n, sizeof now.n);
  assert_int_equal(now.s.tpm.level_mt, before->s.tpm.level_mt);
  assert_int_equal(now.s.tpm.updated_ms, before->s.tpm.updated_ms);
  assert_int_equal(now.s.tpm.init, before->s.tpm.init);
  assert_int_equal(now.s.inflight, before->s.inflight);
  const tg_budget_t *a[2] = {&now.s.day, &now.s.month};
  const tg_budget_t *b[2] = {&before->s.day, &before->s.month};
  for (int i = 0; i < 2; i++) {
    assert_int_equal(a[i]->period, b[i]->period);
    assert_int_equal(a[i]->spent, b[i]->spent);
    assert_int_equal(a[i]->reserved, b[i]->reserved);
    assert_int_equal(a[i]->alerted, b[i]->alerted);
  }
}

static void test_refusal_changes_nothing(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_tenant_state_init(&s);
  tg_limits_t lim = unlimited();
  lim.rpm = 10;
  lim.tpm = 6000; /* 100 milli-tokens per ms */
  lim.concurrency = 5;
  lim.day_limit = USD(50);
  lim.month_limit = USD(60);
  int64_t t = t0();
  snapshot_t before;

  /* A tenant with something in every counter. */
  for (int i = 0; i < 4; i++)
    assert_int_equal(admit(&s, &lim, 1000, USD(10), t + i).refused, TG_LIMIT_NONE);
  tg_verdict_t v = admit(&s, &lim, 0, 0, t + 4);
  settle(&s, &lim, 0, 0, &v, 0, USD(5), t + 4, NULL, NULL);
  /* inflight 4, 5 admissions in the log, 45 USD of the day's 50 used */
  assert_int_equal(s.inflight, 4);
  assert_int_equal(s.tpm.level_mt, 2000400);

  struct {
    tg_limits_t lim;
    int64_t tokens;
    tg_nano_t cost;
    tg_limit_kind_t want;
  } cases[6];
  for (int i = 0; i < 6; i++) {
    cases[i].lim = lim;
    cases[i].tokens = 100;
    cases[i].cost = USD(1);
  }
  cases[0].lim.concurrency = 4;    cases[0].want = TG_LIMIT_CONCURRENCY;
  cases[1].lim.rpm = 5;            cases[1].want = TG_LIMIT_REQUESTS;
  cases[2].tokens = 3000;          cases[2].want = TG_LIMIT_TOKENS; /* 2010 held */
  cases[3].cost = USD(5) + 1;      cases[3].want = TG_LIMIT_DAILY_BUDGET;
  cases[4].lim.day_limit = 0;
  cases[4].cost = USD(15) + 1;     cases[4].want = TG_LIMIT_MONTHLY_BUDGET;
  cases[5].lim.concurrency = 1;
  cases[5].lim.rpm = 1;
  cases[5].tokens = 1000000;
  cases[5].cost = USD(100);        cases[5].want = TG_LIMIT_CONCURRENCY;

  for (int i = 0; i < 6; i++) {
    snap(&s, &before);
    v = admit(&s, &cases[i].lim, cases[i].tokens, cases[i].cost, t + 100);
    assert_int_equal(v.refused, cases[i].want);
    assert_unchanged(&before, &s);
  }
  /* And the same request within every limit goes through. */
  v = admit(&s, &lim, 100, USD(1), t + 100);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(s.inflight, 5);
  assert_int_equal(s.rpm.total, 6);
  assert_int_equal(s.day.reserved, USD(41));
  assert_int_equal(s.day.spent, USD(5));
  tg_tenant_state_free(&s);
}

/* A wall clock that ran hours ahead into the next day and was set right
 * reopens today with what it had spent, and the next day keeps what was
 * spent in it meanwhile: reopening today with nothing spent gave the
 * tenant a second daily budget, and the next day's spend was dropped. A
 * settlement after the roll still lands in its own day. */
static void test_clock_ahead_then_set_right_keeps_each_days_spend(void **state) {
  (void)state;
  tg_tenant_state_t s;
  tg_limits_t lim = unlimited();
  lim.day_limit = USD(10);
  int64_t d = utc(2026, 3, 10, 20, 0, 0, 0), ahead = utc(2026, 3, 11, 3, 0, 0, 0);
  tg_verdict_t v, late;

  tg_tenant_state_init(&s);
  v = admit(&s, &lim, 0, USD(9), d);
  settle(&s, &lim, 0, USD(9), &v, 0, USD(9), d, NULL, NULL);
  late = admit(&s, &lim, 0, USD(1), d + 1);       /* settled after the roll */
  v = admit(&s, &lim, 0, USD(5), ahead);          /* the clock seven hours ahead */
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.day, tg_day_of(ahead));
  settle(&s, &lim, 0, USD(5), &v, 0, USD(5), ahead, NULL, NULL);
  settle(&s, &lim, 0, USD(1), &late, 0, USD(1) / 2, ahead, NULL, NULL);

  /* set right: March 10th holds $9.50 of $10 */
  v = admit(&s, &lim, 0, USD(1), d + 300000);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_int_equal(v.day, tg_day_of(d));
  v = admit(&s, &lim, 0, USD(1) / 2, d + 300000);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  settle(&s, &lim, 0, USD(1) / 2, &v, 0, USD(1) / 2, d + 300000, NULL, NULL);
  assert_int_equal(s.day.spent, USD(10));
  assert_int_equal(s.day.reserved, 0);

  /* March 11th comes: its $5 still counts */
  int64_t next = tg_day_end_ms(tg_day_of(d));
  v = admit(&s, &lim, 0, USD(6), next);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_int_equal(admit(&s, &lim, 0, USD(5), next).refused, TG_LIMIT_NONE);
  assert_int_equal(s.day.spent, USD(5));
  assert_int_equal(s.day.reserved, USD(5));
  tg_tenant_state_free(&s);
}

/* ---- two clocks: wall for budgets, steady for the per-minute limits ----- */

static tg_verdict_t mem_admit(tg__mem_t *m, const tg_admit_req_t *r, int64_t wall,
                              int64_t steady) {
  tg_admission_t a;
  tg__mem_admit(m, r, wall, steady, &a);
  return a.v;
}

/* The memory backend times the request log, the token bucket and the
 * global limit on the steady clock: a wall clock stepped back ten minutes
 * used to freeze them for ten minutes (no entry left the log, the bucket
 * gained nothing), and one stepped a minute forward emptied the log, so
 * twice the rpm went through in one real minute. Budgets stay on the wall
 * clock: they roll at its midnight. */
static void test_memory_per_minute_limits_on_the_steady_clock(void **state) {
  (void)state;
  tg__mem_t *m = NULL;
  tg_admit_req_t r;
  tg_admission_t a;
  tg_verdict_t v;
  const int64_t W = t0(), S = 5000000, MIN = 60000;
  const int64_t late = utc(2026, 3, 10, 23, 59, 0, 0);

  assert_int_equal(tg__mem_new(NULL, &m), 0);
  memset(&r, 0, sizeof r);
  r.tenant = "acme";
  r.limits = unlimited();
  r.limits.rpm = 2;
  r.limits.tpm = 600; /* 10 tokens a second */
  r.limits.day_limit = USD(12);
  r.reserve.tokens = 300;
  r.reserve.cost = USD(4);

  assert_int_equal(mem_admit(m, &r, W, S).refused, TG_LIMIT_NONE);
  assert_int_equal(mem_admit(m, &r, W, S).refused, TG_LIMIT_NONE);
  v = mem_admit(m, &r, W, S + 1);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, MIN - 1);
  /* The wall clock a minute ahead: one real second has passed. */
  v = mem_admit(m, &r, W + MIN + 1000, S + 1000);
  assert_int_equal(v.refused, TG_LIMIT_REQUESTS);
  assert_int_equal(v.retry_after_ms, MIN - 1000);
  /* Set ten minutes back: a real minute on, the log has room and the
   * bucket has refilled (600 tokens, 300 of them wanted). */
  v = mem_admit(m, &r, W - 10 * MIN, S + MIN);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.remaining_tokens, 300);
  /* 30 more tokens three real seconds later, whatever the wall clock says. */
  r.reserve.tokens = 330;
  r.reserve.cost = 0;
  v = mem_admit(m, &r, W - 20 * MIN, S + MIN + 3000);
  assert_int_equal(v.refused, TG_LIMIT_NONE);
  assert_int_equal(v.remaining_tokens, 0);

  /* The daily budget ($12 reserved of $12) follows the wall clock: refused
   * until its midnight, a fresh day after it. */
  r.limits.rpm = r.limits.tpm = 0;
  r.reserve.cost = USD(3);
  v = mem_admit(m, &r, late, S + 3 * MIN);
  assert_int_equal(v.refused, TG_LIMIT_DAILY_BUDGET);
  assert_int_equal(v.retry_after_ms, MIN);
  assert_int_equal(mem_admit(m, &r, late + MIN, S + 3 * MIN).refused, TG_LIMIT_NONE);

  /* The global per-second limit: a second of steady time, not of wall. */
  r.global_rps = 1;
  tg__mem_admit(m, &r, late + 2 * MIN, S + 4 * MIN, &a);
  assert_int_equal(a.v.refused, TG_LIMIT_NONE);
  tg__mem_admit(m, &r, late + 3 * MIN, S + 4 * MIN + 10, &a);
  assert_int_equal(a.v.refused, TG_LIMIT_GLOBAL);
  assert_int_equal(a.v.retry_after_ms, 990);
  tg__mem_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_names),
      cmocka_unit_test(test_calendar_fixed_points),
      cmocka_unit_test(test_calendar_matches_gmtime),
      cmocka_unit_test(test_rpm_limit_and_retry),
      cmocka_unit_test(test_rpm_same_millisecond),
      cmocka_unit_test(test_rpm_greedy_three_minutes),
      cmocka_unit_test(test_rpm_spread_never_exceeds),
      cmocka_unit_test(test_rpm_reload_shrink_grow),
      cmocka_unit_test(test_slog_reserve_trims),
      cmocka_unit_test(test_rpm_memory_bounded),
      cmocka_unit_test(test_headers_unlimited_and_refused),
      cmocka_unit_test(test_global_greedy),
      cmocka_unit_test(test_global_burst_and_unlimited),
      cmocka_unit_test(test_global_unadmit),
      cmocka_unit_test(test_global_unadmit_keeps_later_admissions),
      cmocka_unit_test(test_tpm_boundaries),
      cmocka_unit_test(test_tpm_refill_exact),
      cmocka_unit_test(test_tpm_settle_up_and_down),
      cmocka_unit_test(test_tpm_oversized_and_negative),
      cmocka_unit_test(test_concurrency),
      cmocka_unit_test(test_budget_exact_boundary),
      cmocka_unit_test(test_budget_monthly),
      cmocka_unit_test(test_check_order),
      cmocka_unit_test(test_budget_settle_replaces_reservation),
      cmocka_unit_test(test_budget_rollover),
      cmocka_unit_test(test_budget_settle_after_rollover),
      cmocka_unit_test(test_budget_clock_stepped_back),
      cmocka_unit_test(test_budget_alerts),
      cmocka_unit_test(test_budget_alert_threshold_exact),
      cmocka_unit_test(test_refusal_changes_nothing),
      cmocka_unit_test(test_memory_per_minute_limits_on_the_steady_clock),
      cmocka_unit_test(test_clock_ahead_then_set_right_keeps_each_days_spend),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
