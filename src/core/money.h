/* Money is an int64 count of nano-USD (1 USD = 10^9) everywhere. Prices and
 * limits are read from decimal text, never through a float. */
#ifndef TG_CORE_MONEY_H
#define TG_CORE_MONEY_H

#include <stddef.h>
#include <stdint.h>

typedef int64_t tg_nano_t;

#define TG_NANO_PER_USD INT64_C(1000000000)

/* Parses non-negative decimal USD text ("500", "500.00", "0.0005") into
 * nano-USD. Rejects signs, exponents, more than 9 fractional digits that are
 * not zero, and overflow. Returns 0 or TG_EPARSE / TG_ETOOBIG. */
int tg_money_parse_usd(const char *text, tg_nano_t *out);

/* Parses a price in USD per 1K tokens into nano-USD per token. The text must
 * be a whole number of nano-USD per token (at most 6 significant fractional
 * digits: "0.0005" -> 500). Returns 0, TG_EPARSE or TG_ETOOBIG. */
int tg_money_parse_per_1k(const char *text, tg_nano_t *nano_per_token);

/* Writes nano as decimal USD with 9 fractional digits ("12.000000500") into
 * buf; returns the length, or a negative error when buf is too small. */
int tg_money_format_usd(tg_nano_t nano, char *buf, size_t size);

/* cost = tokens * price, saturating at INT64_MAX. */
tg_nano_t tg_money_cost(int64_t tokens, tg_nano_t nano_per_token);

#endif
