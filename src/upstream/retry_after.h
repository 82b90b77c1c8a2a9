/* An upstream answer's Retry-After, caught while its head goes by.
 *
 * A replica or a hosted backend that answers 429 or 503 says in
 * Retry-After when to come back; the gateway relays it with the error
 * (docs/decisions.md). Both upstream clients feed the final answer's
 * header fields here: the native one in pieces as llhttp hands them out,
 * libcurl's as whole lines. Nothing is allocated: the value is kept only
 * while it can still be one worth relaying, and at most
 * TG_RETRY_AFTER_MAX bytes of it. */
#ifndef TG_UPSTREAM_RETRY_AFTER_H
#define TG_UPSTREAM_RETRY_AFTER_H

#include <stddef.h>
#include <stdint.h>

/* Longest value relayed: an IMF-fixdate, "Sun, 06 Nov 1994 08:49:37 GMT". */
#define TG_RETRY_AFTER_MAX 29

typedef struct {
  char v[TG_RETRY_AFTER_MAX + 1]; /* the value, NUL-terminated once whole */
  uint8_t len;                    /* bytes of v */
  uint8_t name;                   /* bytes of the field name matched; NAME_NO: not it */
  uint8_t in_value;               /* reading a Retry-After value */
  uint8_t seen;                   /* Retry-After fields, counted up to 2 */
  uint8_t ok;                     /* the one seen is worth relaying */
} tg_retry_after_t;

/* Forgets what was caught: a new answer head begins (a 1xx's fields are
 * not the answer's). A zeroed object is reset too. */
void tg_retry_after_reset(tg_retry_after_t *ra);

/* A field, in pieces: its name's bytes (any case), the end of the name,
 * its value's bytes, the end of the value. Every field goes through all
 * four steps, in order; a name or value may come in any number of
 * pieces, empty ones included. */
void tg_retry_after_name(tg_retry_after_t *ra, const char *at, size_t len);
void tg_retry_after_name_end(tg_retry_after_t *ra);
void tg_retry_after_value(tg_retry_after_t *ra, const char *at, size_t len);
void tg_retry_after_value_end(tg_retry_after_t *ra);

/* A whole header line as libcurl hands it over ("Name: value\r\n"); a line
 * without a colon (the status line, the blank line) is no field. */
void tg_retry_after_line(tg_retry_after_t *ra, const char *line, size_t len);

/* The value to relay, or NULL: there was exactly one Retry-After field and
 * its value, without surrounding whitespace, is delta-seconds of 1 to 10
 * digits or an IMF-fixdate (RFC 9110 10.2.3, 5.6.7). The obsolete date
 * forms, a longer number, anything else, and two fields (Retry-After is
 * no list) give NULL. Points into ra. */
const char *tg_retry_after_get(const tg_retry_after_t *ra);

/* How long from now_ms (Unix time in milliseconds) a value of that form
 * (delta-seconds or an IMF-fixdate, as tg_retry_after_get gives) asks to
 * wait, in milliseconds: 0 for a date already past, -1 for NULL or any
 * other text. Not bounded: the caller caps it. */
int64_t tg_retry_after_wait_ms(const char *v, int64_t now_ms);

#endif
