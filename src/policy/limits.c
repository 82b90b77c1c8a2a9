/* Tenant limits as pure functions of (state, limits, now, cost). Nothing here
 * reads a clock, locks, allocates beyond the sliding logs, or keeps global
 * state: the memory backend calls these under its stripe lock, the Redis
 * backend mirrors them in Lua, and the unit tests drive them with an
 * injected clock. docs/limits.md is the precise description both follow.
 *
 * Arithmetic is integer only. Products that can exceed int64 (milli-token
 * rates times milliseconds, money times percentages) are taken in __int128
 * and saturated back, so no input from a config or an upstream's usage can
 * make a limit wrap around. */
#include "policy/limits.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

#define MS_PER_DAY INT64_C(86400000)
#define MT_PER_TOKEN 1000

/* A request's tokens (reserved or actual) and a tokens-per-minute limit are
 * clamped to this, the largest rate the config accepts, so milli-tokens stay
 * below 10^15 and differences of them cannot overflow. */
#define TOKENS_MAX INT64_C(1000000000000)

/* Debt floor of a token bucket: an upstream reporting absurd usage saturates
 * here instead of wrapping the level around to "full". */
#define LEVEL_MIN (-(INT64_C(1) << 62))

/* First allocation of a log; it then doubles up to its bound. */
#define SLOG_MIN_CAP 8u

/* ---- names ------------------------------------------------------------- */

const char *tg_limit_name(tg_limit_kind_t k) {
  switch (k) {
  case TG_LIMIT_NONE: return "none";
  case TG_LIMIT_GLOBAL: return "global";
  case TG_LIMIT_CONCURRENCY: return "concurrency";
  case TG_LIMIT_REQUESTS: return "requests";
  case TG_LIMIT_TOKENS: return "tokens";
  case TG_LIMIT_DAILY_BUDGET:
  case TG_LIMIT_MONTHLY_BUDGET: return "budget";
  case TG_LIMIT_UNAVAILABLE: return "unavailable";
  }
  return "none";
}

const char *tg_limit_detail(tg_limit_kind_t k) {
  switch (k) {
  case TG_LIMIT_DAILY_BUDGET: return "daily_budget";
  case TG_LIMIT_MONTHLY_BUDGET: return "monthly_budget";
  default: return tg_limit_name(k);
  }
}

/* ---- integer helpers --------------------------------------------------- */

static int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static int64_t sat64(__int128 v) {
  if (v > INT64_MAX)
    return INT64_MAX;
  if (v < INT64_MIN)
    return INT64_MIN;
  return (int64_t)v;
}

static int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : v > hi ? hi : v;
}

/* ceil(a / b) for a >= 0, b > 0. */
static __int128 ceil_div128(__int128 a, __int128 b) {
  return (a + b - 1) / b;
}

/* ---- calendar ---------------------------------------------------------- */

/* Proleptic Gregorian calendar by integer arithmetic, valid for any int64
 * day within range. Years are counted from March so that the leap day is
 * the last day of a year; 400 years are exactly 146097 days. */
static int64_t days_from_civil(int64_t y, int m, int d) {
  y -= m <= 2;
  int64_t era = floor_div(y, 400);
  int64_t yoe = y - era * 400;                    /* [0, 399] */
  int64_t mp = (m + 9) % 12;                      /* March = 0 */
  int64_t doy = (153 * mp + 2) / 5 + d - 1;       /* [0, 365] */
  int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;             /* 719468: 0000-03-01 .. 1970-01-01 */
}

static void civil_from_days(int64_t z, int64_t *y, int *m, int *d) {
  z += 719468;
  int64_t era = floor_div(z, 146097);
  int64_t doe = z - era * 146097;                 /* [0, 146096] */
  int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  int64_t mp = (5 * doy + 2) / 153;
  *d = (int)(doy - (153 * mp + 2) / 5 + 1);
  *m = (int)(mp < 10 ? mp + 3 : mp - 9);
  *y = yoe + era * 400 + (*m <= 2);
}

int64_t tg_day_of(int64_t now_ms) {
  return floor_div(now_ms, MS_PER_DAY);
}

int64_t tg_month_of(int64_t now_ms) {
  int64_t y;
  int m, d;
  civil_from_days(tg_day_of(now_ms), &y, &m, &d);
  return (y - 1970) * 12 + (m - 1);
}

int64_t tg_day_end_ms(int64_t day) {
  return (day + 1) * MS_PER_DAY;
}

int64_t tg_month_end_ms(int64_t month) {
  int64_t next = month + 1;
  int64_t y = 1970 + floor_div(next, 12);
  int m = (int)(next - floor_div(next, 12) * 12) + 1;
  return days_from_civil(y, m, 1) * MS_PER_DAY;
}

char *tg_day_str(int64_t day, char *buf, size_t size) {
  int64_t y;
  int m, d;
  if (buf == NULL || size == 0)
    return buf;
  civil_from_days(day, &y, &m, &d);
  snprintf(buf, size, "%04lld-%02d-%02d", (long long)y, m, d);
  return buf;
}

char *tg_month_str(int64_t month, char *buf, size_t size) {
  if (buf == NULL || size == 0)
    return buf;
  int64_t y = 1970 + floor_div(month, 12);
  int m = (int)(month - floor_div(month, 12) * 12) + 1;
  snprintf(buf, size, "%04lld-%02d", (long long)y, m);
  return buf;
}

/* ---- sliding log ------------------------------------------------------- */

static uint32_t slog_at(const tg_slog_t *l, uint32_t i) {
  return (l->head + i) % l->cap;
}

static void slog_pop(tg_slog_t *l) {
  l->total -= l->n[l->head];
  l->head = (l->head + 1) % l->cap;
  l->count--;
}

void tg_slog_free(tg_slog_t *l) {
  free(l->ts);
  memset(l, 0, sizeof *l);
}

/* Moves the entries into a new block of newcap entries (newcap >= count),
 * oldest first. Returns 0 or TG_ENOMEM with the log untouched. */
static int slog_resize(tg_slog_t *l, uint32_t newcap) {
  int64_t *block = malloc((size_t)newcap * 2 * sizeof *block);
  if (block == NULL)
    return TG_ENOMEM;
  for (uint32_t i = 0; i < l->count; i++) {
    uint32_t j = slog_at(l, i);
    block[i] = l->ts[j];
    block[newcap + i] = l->n[j];
  }
  free(l->ts);
  l->ts = block;
  l->n = block + newcap;
  l->cap = newcap;
  l->head = 0;
  return 0;
}

/* Makes room for the next admission's entry under a limit of `limit`
 * admissions, without dropping any: the allocation grows by doubling up to
 * min(limit, TG_SLOG_MAX_ENTRIES) and shrinks to that bound after the limit
 * was lowered once the entries fit. A log already holding `limit`
 * admissions needs no room: the next request is refused. */
static int slog_room(tg_slog_t *l, int64_t limit) {
  uint32_t bound = limit < TG_SLOG_MAX_ENTRIES ? (uint32_t)limit : TG_SLOG_MAX_ENTRIES;
  if (l->cap > bound && l->count < bound)
    (void)slog_resize(l, bound); /* on failure the bigger block still works */
  if (l->count < l->cap || l->cap >= bound)
    return 0;
  uint32_t newcap = l->cap < SLOG_MIN_CAP ? SLOG_MIN_CAP : l->cap * 2;
  if (newcap > bound)
    newcap = bound;
  return slog_resize(l, newcap);
}

int tg_slog_reserve(tg_slog_t *l, int64_t limit) {
  if (limit <= 0) {
    tg_slog_free(l);
    return 0;
  }
  /* A lowered limit keeps the newest admissions: the oldest are the ones
   * about to leave the window anyway. */
  while (l->total > limit) {
    int64_t excess = l->total - limit;
    if (l->n[l->head] <= excess) {
      slog_pop(l);
    } else {
      l->n[l->head] -= excess;
      l->total -= excess;
    }
  }
  /* Only reachable with a window longer than the bound: keep the newest. */
  while (l->count > TG_SLOG_MAX_ENTRIES)
    slog_pop(l);
  return slog_room(l, limit);
}

void tg_slog_expire(tg_slog_t *l, int64_t now_ms, int64_t window_ms) {
  while (l->count > 0 && now_ms - l->ts[l->head] >= window_ms)
    slog_pop(l);
  if (l->count == 0 && l->cap > 0)
    tg_slog_free(l);
}

/* Records one admission at now. A clock that went back records it at the
 * newest time instead, keeping the log ordered; that entry leaves the window
 * later than the admission happened, which errs toward refusing. Needs the
 * room tg_slog_reserve() made. */
static void slog_append(tg_slog_t *l, int64_t now_ms) {
  if (l->count > 0) {
    uint32_t last = slog_at(l, l->count - 1);
    if (l->ts[last] >= now_ms || l->count == l->cap) {
      /* count == cap cannot happen after tg_slog_reserve() with a window of
       * at most TG_SLOG_MAX_ENTRIES ms; merging keeps the count exact. */
      l->n[last]++;
      l->total++;
      return;
    }
  }
  if (l->cap == 0)
    return; /* no room was made: the caller ignored tg_slog_reserve()'s error */
  uint32_t i = (l->head + l->count) % l->cap;
  l->ts[i] = now_ms;
  l->n[i] = 1;
  l->count++;
  l->total++;
}

/* Milliseconds until the log's count under `limit` next goes down: until
 * the oldest entry leaves the window, or, when it holds more admissions than
 * a lowered limit allows, until the admission that brings it back under the
 * limit leaves (the (total - limit + 1)-th oldest; exactly what trimming the
 * log to its newest `limit` admissions would give). 0 when empty. */
static int64_t slog_wait(const tg_slog_t *l, int64_t limit, int64_t now_ms, int64_t window_ms) {
  if (l->count == 0)
    return 0;
  int64_t k = l->total - limit + 1; /* admissions that must leave */
  uint32_t i = 0;
  for (int64_t seen = l->n[l->head]; seen < k && i + 1 < l->count;)
    seen += l->n[slog_at(l, ++i)];
  return l->ts[slog_at(l, i)] + window_ms - now_ms;
}

void tg_global_unadmit(tg_slog_t *log, int64_t at_ms) {
  uint32_t i, j;
  /* The admission made at at_ms is in the entry stamped at_ms. None: it
   * left the window, or the limit was turned off, or it was stamped later
   * because the clock went back (it then stays counted: toward refusing). */
  for (i = log->count; i > 0 && log->ts[slog_at(log, i - 1)] > at_ms; i--)
    ;
  if (i == 0 || log->ts[j = slog_at(log, i - 1)] != at_ms || log->n[j] == 0)
    return;
  log->n[j]--;
  log->total--;
  if (log->n[j] > 0)
    return;
  /* An emptied entry goes: the later ones (admitted since, a few at most)
   * move down one. Entries all count, so `limit` of them always fit. */
  for (; i < log->count; i++) {
    uint32_t to = slog_at(log, i - 1), from = slog_at(log, i);
    log->ts[to] = log->ts[from];
    log->n[to] = log->n[from];
  }
  log->count--;
}

int tg_global_admit(tg_slog_t *log, int64_t rps, int64_t now_ms, int64_t *retry_after_ms) {
  int64_t dummy;
  if (retry_after_ms == NULL)
    retry_after_ms = &dummy;
  *retry_after_ms = 0;
  if (rps <= 0) {
    tg_slog_free(log);
    return 1;
  }
  tg_slog_expire(log, now_ms, TG_RPS_WINDOW_MS);
  if (slog_room(log, rps) != 0) {
    /* No memory to record it: refusing keeps the limit true. */
    *retry_after_ms = TG_RPS_WINDOW_MS;
    return 0;
  }
  if (log->total >= rps) {
    *retry_after_ms = slog_wait(log, rps, now_ms, TG_RPS_WINDOW_MS);
    return 0;
  }
  slog_append(log, now_ms);
  return 1;
}

/* ---- token bucket ------------------------------------------------------ */

void tg_tbucket_refill(tg_tbucket_t *b, int64_t capacity, int64_t now_ms) {
  if (capacity < 0)
    capacity = 0;
  if (!b->init) {
    b->level_mt = capacity;
    b->updated_ms = now_ms;
    b->init = 1;
    return;
  }
  if (now_ms > b->updated_ms) {
    __int128 add = ((__int128)now_ms - b->updated_ms) * capacity / TG_RPM_WINDOW_MS;
    __int128 level = (__int128)b->level_mt + add;
    b->level_mt = level > capacity ? capacity : (int64_t)level;
    b->updated_ms = now_ms;
  } else if (b->level_mt > capacity) {
    b->level_mt = capacity; /* the limit was lowered */
  }
}

/* Milliseconds from now until bucket b (as stored, before any refill to now)
 * holds at least target milli-tokens; target <= capacity. Exact for the
 * refill rule above: the first t with
 * level + floor((now + t - updated) * capacity / 60000) >= target. */
static int64_t tbucket_wait(const tg_tbucket_t *b, int64_t capacity, int64_t target,
                            int64_t now_ms) {
  if (!b->init || capacity <= 0)
    return 0;
  int64_t level = b->level_mt > capacity ? capacity : b->level_mt;
  if (level >= target)
    return 0;
  __int128 since = ceil_div128(((__int128)target - level) * TG_RPM_WINDOW_MS, capacity);
  __int128 wait = since - ((__int128)now_ms - b->updated_ms);
  return wait > 0 ? sat64(wait) : 0;
}

static int64_t tbucket_cap(int64_t tpm) {
  return clamp64(tpm, 0, TOKENS_MAX) * MT_PER_TOKEN;
}

static int64_t tokens_mt(int64_t tokens) {
  return clamp64(tokens, 0, TOKENS_MAX) * MT_PER_TOKEN;
}

/* ---- budgets ----------------------------------------------------------- */

/* The period an admission at now_ms charges in a window open for period
 * open, which began at open_start_ms: now's period, unless the wall clock
 * stepped back across the window's start by at most
 * TG_CLOCK_STEP_BACK_MAX_MS. Reopening the period the window closed would
 * start it again from nothing (its spend was dropped at the roll), handing
 * the tenant a second budget for it, and the clock coming forward again
 * would then drop what the open window held. A window further ahead is a
 * clock that ran ahead and was set right: now's period starts afresh rather
 * than hold that window until the clock catches up with it. */
static int64_t charged_period(int64_t open, int64_t open_start_ms, int64_t now_period,
                              int64_t now_ms) {
  if (open > now_period && open_start_ms - now_ms <= TG_CLOCK_STEP_BACK_MAX_MS)
    return open;
  return now_period;
}

void tg_limits_periods(const tg_tenant_state_t *s, int64_t now_ms, int64_t *day,
                       int64_t *month) {
  *day = charged_period(s->day.period, tg_day_end_ms(s->day.period - 1), tg_day_of(now_ms),
                        now_ms);
  *month = charged_period(s->month.period, tg_month_end_ms(s->month.period - 1),
                          tg_month_of(now_ms), now_ms);
}

/* Opens period in b. The window it closes is kept in prev, and when period
 * is the one prev holds (a wall clock that ran ahead into the next period
 * and was set right) the two change places: a period reopened with nothing
 * spent would give the tenant its budget a second time. */
static void budget_roll(tg_budget_t *b, tg_budget_t *prev, int64_t period) {
  tg_budget_t closed = *b;
  if (b->period == period)
    return;
  if (prev->period == period && period != 0) {
    *b = *prev;
  } else {
    b->period = period;
    b->spent = 0;
    b->reserved = 0;
    b->alerted = 0;
  }
  *prev = closed;
}

static int budget_fits(const tg_budget_t *b, tg_nano_t limit, tg_nano_t cost) {
  if (limit <= 0)
    return 1;
  return (__int128)b->spent + b->reserved + cost <= limit;
}

int tg_budget_alert_due(tg_nano_t spent, tg_nano_t limit, int pct) {
  if (limit <= 0)
    return 0;
  pct = pct < 1 ? 1 : pct > 100 ? 100 : pct;
  return (__int128)spent * 100 >= (__int128)limit * pct;
}

/* Applies a settlement to one window; returns 1 when it crossed the alert
 * threshold for the first time in this window. */
static int budget_settle(tg_budget_t *b, tg_budget_t *prev, int64_t period, tg_nano_t limit,
                         int pct, tg_nano_t reserved, tg_nano_t actual) {
  if (b->period != period) {
    /* rolled over since: the money belongs to the closed window, which is
     * kept in case its period comes back; its alert was its own to raise */
    if (prev->period == period && period != 0) {
      prev->reserved = prev->reserved > reserved ? prev->reserved - reserved : 0;
      prev->spent = sat64((__int128)prev->spent + actual);
    }
    return 0;
  }
  b->reserved = b->reserved > reserved ? b->reserved - reserved : 0;
  b->spent = sat64((__int128)b->spent + actual);
  if (b->alerted || !tg_budget_alert_due(b->spent, limit, pct))
    return 0;
  b->alerted = 1;
  return 1;
}

/* ---- tenant ------------------------------------------------------------ */

void tg_tenant_state_init(tg_tenant_state_t *s) {
  memset(s, 0, sizeof *s);
}

void tg_tenant_state_free(tg_tenant_state_t *s) {
  tg_slog_free(&s->rpm);
}

/* The first refusal in check order names the limit; the wait is the
 * longest of all the refusals': the request passes only once every limit
 * that refused it does (a tenant over both budgets waits for the month's
 * end, not for midnight). */
static void refuse(tg_verdict_t *v, tg_limit_kind_t kind, int64_t retry_after_ms) {
  if (v->refused == TG_LIMIT_NONE)
    v->refused = kind;
  if (retry_after_ms > v->retry_after_ms)
    v->retry_after_ms = retry_after_ms;
}

/* Fills the x-ratelimit-* fields from the state as it stands. */
static void fill_headers(const tg_tenant_state_t *s, const tg_limits_t *lim,
                         const tg_tbucket_t *bucket_now, int64_t now_ms, tg_verdict_t *v) {
  if (lim->rpm > 0) {
    v->limit_requests = lim->rpm;
    v->remaining_requests = lim->rpm > s->rpm.total ? lim->rpm - s->rpm.total : 0;
    v->reset_requests_ms = slog_wait(&s->rpm, lim->rpm, now_ms, TG_RPM_WINDOW_MS);
  } else {
    v->limit_requests = v->remaining_requests = v->reset_requests_ms = -1;
  }
  if (lim->tpm > 0) {
    int64_t cap = tbucket_cap(lim->tpm);
    v->limit_tokens = lim->tpm;
    v->remaining_tokens = bucket_now->level_mt > 0 ? bucket_now->level_mt / MT_PER_TOKEN : 0;
    v->reset_tokens_ms = tbucket_wait(&s->tpm, cap, cap, now_ms);
  } else {
    v->limit_tokens = v->remaining_tokens = v->reset_tokens_ms = -1;
  }
}

int tg_limits_admit(tg_tenant_state_t *s, const tg_limits_t *lim, const tg_reserve_t *r,
                    int64_t now_ms, tg_verdict_t *v) {
  return tg_limits_admit_at(s, lim, r, now_ms, now_ms, v);
}

int tg_limits_admit_at(tg_tenant_state_t *s, const tg_limits_t *lim, const tg_reserve_t *r,
                       int64_t wall_ms, int64_t steady_ms, tg_verdict_t *v) {
  int64_t now_ms = steady_ms; /* the per-minute limits' clock */
  int64_t tpm = clamp64(lim->tpm, 0, TOKENS_MAX);
  int64_t cap = tbucket_cap(tpm);
  int64_t res_mt = tokens_mt(r->tokens);
  tg_nano_t cost = r->cost > 0 ? r->cost : 0;
  tg_tbucket_t bucket = s->tpm;

  memset(v, 0, sizeof *v);
  tg_limits_periods(s, wall_ms, &v->day, &v->month);

  /* Changes nobody can observe: closed windows and expired log entries go,
   * and the log's block is fitted to the limit. A log holding more than a
   * lowered limit is not trimmed here: counting all its admissions refuses
   * exactly as a trimmed log would, and a refusal must change nothing. */
  budget_roll(&s->day, &s->day_prev, v->day);
  budget_roll(&s->month, &s->month_prev, v->month);
  if (lim->rpm > 0) {
    tg_slog_expire(&s->rpm, now_ms, TG_RPM_WINDOW_MS);
    if (slog_room(&s->rpm, lim->rpm) != 0) {
      v->refused = TG_LIMIT_UNAVAILABLE;
      v->retry_after_ms = 1000;
      return TG_ENOMEM;
    }
  }
  if (tpm > 0)
    tg_tbucket_refill(&bucket, cap, now_ms); /* a copy: kept only if admitted */

  /* Decide, in the order the first refusal is reported. */
  if (lim->concurrency > 0 && s->inflight >= lim->concurrency)
    refuse(v, TG_LIMIT_CONCURRENCY, 1000);
  if (lim->rpm > 0 && s->rpm.total >= lim->rpm)
    refuse(v, TG_LIMIT_REQUESTS, slog_wait(&s->rpm, lim->rpm, now_ms, TG_RPM_WINDOW_MS));
  if (tpm > 0) {
    /* A request bigger than a whole minute needs a full bucket. */
    int64_t need = res_mt < cap ? res_mt : cap;
    if (bucket.level_mt < need)
      refuse(v, TG_LIMIT_TOKENS, tbucket_wait(&s->tpm, cap, need, now_ms));
  }
  if (!budget_fits(&s->day, lim->day_limit, cost))
    refuse(v, TG_LIMIT_DAILY_BUDGET, tg_day_end_ms(v->day) - wall_ms);
  if (!budget_fits(&s->month, lim->month_limit, cost))
    refuse(v, TG_LIMIT_MONTHLY_BUDGET, tg_month_end_ms(v->month) - wall_ms);

  if (v->refused != TG_LIMIT_NONE) {
    fill_headers(s, lim, &bucket, now_ms, v);
    return 0;
  }

  /* Admitted: charge everything at once. */
  s->inflight++;
  if (lim->rpm > 0)
    slog_append(&s->rpm, now_ms);
  else
    tg_slog_free(&s->rpm); /* unlimited records nothing: the log goes */
  if (tpm > 0) {
    bucket.level_mt = sat64((__int128)bucket.level_mt - res_mt);
    if (bucket.level_mt < LEVEL_MIN)
      bucket.level_mt = LEVEL_MIN;
    s->tpm = bucket;
  }
  s->day.reserved = sat64((__int128)s->day.reserved + cost);
  s->month.reserved = sat64((__int128)s->month.reserved + cost);
  fill_headers(s, lim, &s->tpm, now_ms, v);
  return 0;
}

void tg_limits_settle(tg_tenant_state_t *s, const tg_limits_t *lim, const tg_reserve_t *r,
                      const tg_verdict_t *admitted, int64_t actual_tokens,
                      tg_nano_t actual_cost, int64_t now_ms, int *alert_day,
                      int *alert_month) {
  int ad = 0, am = 0;
  tg_nano_t rcost = r->cost > 0 ? r->cost : 0;
  tg_nano_t acost = actual_cost > 0 ? actual_cost : 0;

  if (admitted->refused != TG_LIMIT_NONE)
    goto out; /* nothing was charged */

  if (s->inflight > 0)
    s->inflight--;

  /* limit_tokens > 0 says the admission charged the bucket; a bucket that
   * was unlimited then, or is now, has nothing to give back. */
  if (admitted->limit_tokens > 0 && lim->tpm > 0) {
    int64_t cap = tbucket_cap(lim->tpm);
    tg_tbucket_refill(&s->tpm, cap, now_ms);
    __int128 level = (__int128)s->tpm.level_mt + tokens_mt(r->tokens) - tokens_mt(actual_tokens);
    s->tpm.level_mt = level > cap ? cap : level < LEVEL_MIN ? LEVEL_MIN : (int64_t)level;
  }

  ad = budget_settle(&s->day, &s->day_prev, admitted->day, lim->day_limit, lim->alert_pct, rcost,
                     acost);
  am = budget_settle(&s->month, &s->month_prev, admitted->month, lim->month_limit,
                     lim->alert_pct, rcost, acost);
out:
  if (alert_day != NULL)
    *alert_day = ad;
  if (alert_month != NULL)
    *alert_month = am;
}
