/* Exact money arithmetic. Every amount is an int64 count of nano-USD and is
 * read from decimal text digit by digit, so "0.0005" is exactly 500000 nano
 * and no value ever passes through a binary float (where 0.1 + 0.2 != 0.3
 * and a month of rounding drift becomes a billing dispute).
 *
 * Both parsers share one scaled-decimal reader: the text is an unsigned
 * decimal with an optional fraction, multiplied by 10^scale. Fractional
 * digits beyond the scale are accepted only when they are zeros, because
 * anything else would have to be rounded, and a price or a budget that the
 * gateway silently rounds is a price the operator did not write. */
#include "core/money.h"

#include <stdio.h>

#include "core/err.h"

/* Reads "DIGITS[.DIGITS]" and returns its value times 10^scale in *out.
 * At least one digit is required on each side of the dot (".5" and "5."
 * are rejected as likely typos). Returns 0, TG_EPARSE (syntax, or non-zero
 * digits beyond the scale) or TG_ETOOBIG (does not fit in int64). */
static int parse_scaled(const char *text, int scale, int64_t *out) {
  const char *p = text;
  uint64_t whole = 0, frac = 0;
  int overflow = 0, nfrac = 0;

  if (text == NULL || out == NULL)
    return TG_EINVAL;
  if (*p < '0' || *p > '9')
    return TG_EPARSE;
  for (; *p >= '0' && *p <= '9'; p++) {
    /* Keep scanning after an overflow so that syntax errors still win
     * over "too big" for inputs like "99999999999999999999x". */
    if (!overflow) {
      if (whole > (UINT64_MAX - 9) / 10)
        overflow = 1;
      else
        whole = whole * 10 + (uint64_t)(*p - '0');
    }
  }
  if (*p == '.') {
    p++;
    if (*p < '0' || *p > '9')
      return TG_EPARSE;
    for (; *p >= '0' && *p <= '9'; p++, nfrac++) {
      if (nfrac < scale)
        frac = frac * 10 + (uint64_t)(*p - '0');
      else if (*p != '0')
        return TG_EPARSE; /* would need rounding */
    }
  }
  if (*p != '\0')
    return TG_EPARSE;
  for (; nfrac < scale; nfrac++)
    frac *= 10;
  if (overflow)
    return TG_ETOOBIG;

  uint64_t unit = 1;
  for (int i = 0; i < scale; i++)
    unit *= 10;
  if (whole > (uint64_t)INT64_MAX / unit)
    return TG_ETOOBIG;
  uint64_t v = whole * unit;
  if (v > (uint64_t)INT64_MAX - frac)
    return TG_ETOOBIG;
  *out = (int64_t)(v + frac);
  return 0;
}

int tg_money_parse_usd(const char *text, tg_nano_t *out) {
  return parse_scaled(text, 9, out);
}

/* USD per 1000 tokens -> nano-USD per token: x USD / 1000 * 10^9 = x * 10^6.
 * A seventh significant fractional digit would be a fraction of a nano-USD
 * per token, which the integer ledger cannot represent. */
int tg_money_parse_per_1k(const char *text, tg_nano_t *nano_per_token) {
  return parse_scaled(text, 6, nano_per_token);
}

int tg_money_format_usd(tg_nano_t nano, char *buf, size_t size) {
  /* Negate in unsigned arithmetic so INT64_MIN prints correctly. */
  uint64_t mag = nano < 0 ? (uint64_t)0 - (uint64_t)nano : (uint64_t)nano;
  uint64_t units = (uint64_t)TG_NANO_PER_USD;
  int n;

  if (buf == NULL || size == 0)
    return TG_EINVAL;
  n = snprintf(buf, size, "%s%llu.%09llu", nano < 0 ? "-" : "",
               (unsigned long long)(mag / units),
               (unsigned long long)(mag % units));
  if (n < 0)
    return TG_EINVAL;
  if ((size_t)n >= size)
    return TG_ETOOBIG;
  return n;
}

tg_nano_t tg_money_cost(int64_t tokens, tg_nano_t nano_per_token) {
  int64_t r;
  if (__builtin_mul_overflow(tokens, nano_per_token, &r))
    return ((tokens < 0) != (nano_per_token < 0)) ? INT64_MIN : INT64_MAX;
  return r;
}
