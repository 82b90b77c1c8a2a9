/* Tenant limits as pure functions of (state, limits, now, cost): the same
 * rules the memory backend applies under a lock and the Redis backend's Lua
 * scripts apply atomically, written once here so unit tests can drive them
 * with an injected clock.
 *
 *   requests per minute  sliding log of admission times: no 60 s span ever
 *                        admits more than the limit
 *   global per second    the same over 1 s, across all tenants
 *   tokens per minute    token bucket (capacity = limit, refilled at limit
 *                        per 60 s) charged with the reservation at admission,
 *                        corrected to the actual usage at settlement
 *   concurrency          a count of leases
 *   daily / monthly USD  spent + reserved per UTC day / UTC month; the
 *                        reservation is replaced by the actual cost at
 *                        settlement; crossing alert_threshold_percent of a
 *                        window raises one event for that window
 *
 * Admission is all-or-nothing: a refused request changes no state.
 * Time is unix milliseconds (UTC). Limits of 0 mean unlimited. */
#ifndef TG_POLICY_LIMITS_H
#define TG_POLICY_LIMITS_H

#include <stddef.h>
#include <stdint.h>

#include "core/money.h"

#define TG_RPM_WINDOW_MS 60000
#define TG_RPS_WINDOW_MS 1000

/* A wall clock that stepped back by at most this across the start of the
 * open budget window (an NTP correction just after midnight) keeps charging
 * that window rather than reopen the period it closed (docs/limits.md). */
#define TG_CLOCK_STEP_BACK_MAX_MS INT64_C(3600000)

typedef enum {
  TG_LIMIT_NONE = 0,
  TG_LIMIT_GLOBAL,        /* global_rate_limit: 429 */
  TG_LIMIT_CONCURRENCY,   /* concurrent_requests: 429 */
  TG_LIMIT_REQUESTS,      /* requests_per_minute: 429 */
  TG_LIMIT_TOKENS,        /* tokens_per_minute: 429 */
  TG_LIMIT_DAILY_BUDGET,  /* daily_limit_usd: 402 */
  TG_LIMIT_MONTHLY_BUDGET,/* monthly_limit_usd: 402 */
  TG_LIMIT_UNAVAILABLE    /* the state backend failed and state_failure is closed: 503 */
} tg_limit_kind_t;

/* "requests", "tokens", "concurrency", "budget", "global", ... as used in
 * error bodies, logs and metric labels. daily and monthly are both "budget"
 * for metrics; tg_limit_detail() tells them apart ("daily_budget"). */
const char *tg_limit_name(tg_limit_kind_t k);
const char *tg_limit_detail(tg_limit_kind_t k);

/* A tenant's limits, copied from its config entry at each admission (so a
 * reload applies to the next request). */
typedef struct {
  int64_t rpm;              /* requests per minute */
  int64_t tpm;              /* tokens per minute */
  int64_t concurrency;
  tg_nano_t day_limit;
  tg_nano_t month_limit;
  int alert_pct;            /* 1..100 */
} tg_limits_t;

/* Sliding log of admission times, run-length encoded: entry i says that
 * n[i] admissions happened at millisecond ts[i]. Times are distinct and
 * increasing from head, so a window of W ms never holds more than W entries
 * whatever the limit: memory is at most 16 * min(limit, TG_SLOG_MAX_ENTRIES)
 * bytes, while a plain log of one entry per admission would need 8 bytes
 * per admission the limit allows (the config accepts limits up to 10^12).
 * Zero-initialised is an empty log. */
#define TG_SLOG_MAX_ENTRIES 60000 /* = the longest window in ms */
typedef struct {
  int64_t *ts;              /* ring buffer, oldest at head; owns the block */
  int64_t *n;               /* admissions at ts[i]; points into ts' block */
  uint32_t cap;             /* allocated entries */
  uint32_t head;
  uint32_t count;           /* entries (distinct milliseconds) */
  int64_t total;            /* admissions in the log: the sum of n */
} tg_slog_t;

/* Token bucket in milli-tokens (level may go below 0 after settlement). */
typedef struct {
  int64_t level_mt;
  int64_t updated_ms;
  int init;                 /* 0 until first use: starts full */
} tg_tbucket_t;

/* Money of one window (a UTC day or month). */
typedef struct {
  int64_t period;           /* tg_day_of(now) or tg_month_of(now) */
  tg_nano_t spent;          /* settled */
  tg_nano_t reserved;       /* admitted, not yet settled */
  int alerted;              /* threshold event raised in this period */
} tg_budget_t;

typedef struct {
  tg_slog_t rpm;
  tg_tbucket_t tpm;
  int64_t inflight;         /* concurrency leases held */
  tg_budget_t day, month;   /* the open windows */
  /* the windows the last roll closed: a clock that ran ahead into the next
   * period and was set right reopens its period with what it held, and a
   * late settlement of a request admitted there still lands in it */
  tg_budget_t day_prev, month_prev;
} tg_tenant_state_t;

/* What one request reserves. */
typedef struct {
  int64_t tokens;           /* prompt estimate + max_tokens (or the model's cap) for each
                             * completion asked for (n, and prompts of a list) */
  tg_nano_t cost;           /* that at the model's prices */
} tg_reserve_t;

typedef struct {
  tg_limit_kind_t refused;  /* TG_LIMIT_NONE when admitted */
  int64_t retry_after_ms;   /* when refused: when trying again can succeed */
  /* for the x-ratelimit-* headers: the state after this admission, or as it
   * stands when refused; -1 = unlimited. limit_tokens > 0 also tells the
   * settlement that this admission charged the token bucket. */
  int64_t limit_requests, remaining_requests, reset_requests_ms;
  int64_t limit_tokens, remaining_tokens, reset_tokens_ms;
  int64_t day, month;       /* periods charged, for the settlement */
} tg_verdict_t;

/* Periods: days since 1970-01-01 UTC, months since 1970-01 (year*12+month-1
 * from 1970). tg_period_end_ms gives the first millisecond of the next one. */
int64_t tg_day_of(int64_t now_ms);
int64_t tg_month_of(int64_t now_ms);
int64_t tg_day_end_ms(int64_t day);
int64_t tg_month_end_ms(int64_t month);
/* "2026-11-28" / "2026-11" into buf; returns buf. */
char *tg_day_str(int64_t day, char *buf, size_t size);
char *tg_month_str(int64_t month, char *buf, size_t size);

void tg_tenant_state_init(tg_tenant_state_t *s);
void tg_tenant_state_free(tg_tenant_state_t *s);

/* Decides one admission and, when admitted, charges it: one rpm entry, the
 * reservation's tokens, one lease, the reservation's cost in both windows.
 * Rolls the budget windows over first when now is in a later period
 * (tg_limits_periods()). Checks in
 * this order and reports the first refusal: concurrency, requests, tokens,
 * daily budget, monthly budget (the global limit is the caller's, before).
 * Leases and money are counted even for limits that are unlimited, so a
 * reload that sets a limit finds them. Returns 0 with *v filled, or
 * TG_ENOMEM (the log could not grow; nothing changed, v->refused is
 * TG_LIMIT_UNAVAILABLE). */
int tg_limits_admit(tg_tenant_state_t *s, const tg_limits_t *lim, const tg_reserve_t *r,
                    int64_t now_ms, tg_verdict_t *v);
/* The same decision on two clocks: wall_ms (unix ms) dates the budget
 * windows and their waits; steady_ms times the request log and the token
 * bucket, and must never step (CLOCK_MONOTONIC, tg_steady_ms()): a wall
 * clock set back froze both for as long as the step, and one set forward a
 * minute emptied the log, letting twice the rpm through. tg_limits_admit()
 * is this with one clock for both, as a state shared by several processes
 * (Redis) needs. The state's log and bucket must always be given the same
 * one of the two, and so must tg_limits_settle() (its now_ms is only the
 * bucket's). */
int tg_limits_admit_at(tg_tenant_state_t *s, const tg_limits_t *lim, const tg_reserve_t *r,
                       int64_t wall_ms, int64_t steady_ms, tg_verdict_t *v);

/* The day and month an admission at now_ms charges: now's, or the open
 * window's when the wall clock stepped back across its start by at most
 * TG_CLOCK_STEP_BACK_MAX_MS (a window is never reopened for the period it
 * closed). Changes nothing. */
void tg_limits_periods(const tg_tenant_state_t *s, int64_t now_ms, int64_t *day,
                       int64_t *month);

/* Settles an admitted request: gives back its lease, moves its reservation
 * to actual tokens and cost in the periods it was charged to (a period that
 * has since rolled over is left alone). now_ms is the token bucket's clock
 * (the steady one when admissions gave one). Sets *alert_day / *alert_month to 1
 * when this settlement crossed the alert threshold of the current window
 * for the first time, else 0 (either pointer may be NULL). r and admitted
 * are what tg_limits_admit() was given and gave; a refused verdict settles
 * nothing. Windows are not rolled here: a settlement after midnight still
 * counts for the day it was admitted in while that window is the stored one. */
void tg_limits_settle(tg_tenant_state_t *s, const tg_limits_t *lim, const tg_reserve_t *r,
                      const tg_verdict_t *admitted, int64_t actual_tokens,
                      tg_nano_t actual_cost, int64_t now_ms, int *alert_day,
                      int *alert_month);

/* 1 when spent has reached pct % of limit, the alert threshold (pct is
 * clamped into 1..100; an unlimited window, limit <= 0, never has). */
int tg_budget_alert_due(tg_nano_t spent, tg_nano_t limit, int pct);

/* The global per-second limit: a sliding log over 1 s. Returns 1 and records
 * the admission, or 0 with *retry_after_ms set. rps <= 0 admits everything
 * (and frees the log). Out of memory refuses, with a retry after 1 s. */
int tg_global_admit(tg_slog_t *log, int64_t rps, int64_t now_ms, int64_t *retry_after_ms);
/* Gives back the admission tg_global_admit() recorded at at_ms (its now_ms),
 * for a request its tenant's limits then refused: a tenant hammering its
 * own limit uses none of the others' share. Its own entry loses it, not
 * the newest: admissions another thread made since then stay in the window
 * as long as their own. */
void tg_global_unadmit(tg_slog_t *log, int64_t at_ms);

/* Sliding-log and bucket primitives, exposed for tests and the backends. */

/* Fits the log to a limit of `limit` admissions: drops the oldest admissions
 * beyond `limit`, keeping the newest, and makes room for the next
 * admission's entry. limit <= 0 empties the log and frees its memory.
 * Returns 0, or TG_ENOMEM (then only the trimming has happened).
 * tg_limits_admit() and tg_global_admit() do not trim: they count every
 * admission still in the window against the current limit, which refuses
 * exactly as a trimmed log would and leaves a refused request's state
 * untouched (see docs/limits.md). */
int tg_slog_reserve(tg_slog_t *l, int64_t limit);
/* Drops the entries that left the window: those with now - t >= window.
 * An emptied log gives its memory back. */
void tg_slog_expire(tg_slog_t *l, int64_t now_ms, int64_t window_ms);
/* Frees the log's memory; the log is then empty and may be used again. */
void tg_slog_free(tg_slog_t *l);
/* Brings the bucket to now: a bucket never used starts full; otherwise it
 * gains floor(elapsed * capacity / 60000) milli-tokens, capacity being in
 * milli-tokens (tpm * 1000), and stops at capacity. A clock that went back
 * adds nothing and does not move updated_ms back. */
void tg_tbucket_refill(tg_tbucket_t *b, int64_t capacity, int64_t now_ms);

#endif
