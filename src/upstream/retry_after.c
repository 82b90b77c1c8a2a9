/* An upstream answer's Retry-After, caught while its head goes by: see
 * retry_after.h. The checks are on the form alone: a date in the past or
 * a number of seconds larger than a client would wait is the upstream's
 * to say, and the client's to judge. */
#include "upstream/retry_after.h"

#include <string.h>
#include <time.h>

#define NAME "retry-after"
#define NAME_LEN (sizeof(NAME) - 1)
#define NAME_NO 0xff
#define DELTA_DIGITS_MAX 10

static int is_ows(char ch) {
  return ch == ' ' || ch == '\t';
}

static int is_digit(char ch) {
  return ch >= '0' && ch <= '9';
}

void tg_retry_after_reset(tg_retry_after_t *ra) {
  memset(ra, 0, sizeof(*ra));
}

void tg_retry_after_name(tg_retry_after_t *ra, const char *at, size_t len) {
  size_t i;

  for (i = 0; i < len && ra->name != NAME_NO; i++) {
    char ch = at[i];
    if (ch >= 'A' && ch <= 'Z')
      ch = (char)(ch + 32);
    ra->name = ra->name < NAME_LEN && ch == NAME[ra->name] ? (uint8_t)(ra->name + 1) : NAME_NO;
  }
}

void tg_retry_after_name_end(tg_retry_after_t *ra) {
  ra->in_value = ra->name == NAME_LEN;
  ra->name = 0; /* the next field's name starts */
  if (!ra->in_value)
    return;
  if (ra->seen < 2)
    ra->seen++;
  ra->len = 0;
  ra->ok = 1; /* until its value says otherwise */
}

/* Leading whitespace is skipped, trailing whitespace past the bound
 * ignored (it is trimmed at the end); any other byte past it spoils the
 * value. */
void tg_retry_after_value(tg_retry_after_t *ra, const char *at, size_t len) {
  size_t i;

  if (!ra->in_value || !ra->ok)
    return;
  for (i = 0; i < len; i++) {
    if (ra->len == 0 && is_ows(at[i]))
      continue;
    if (ra->len == TG_RETRY_AFTER_MAX) {
      if (!is_ows(at[i])) {
        ra->ok = 0;
        return;
      }
      continue;
    }
    ra->v[ra->len++] = at[i];
  }
}

/* The month of its three-letter name (0 for Jan), or -1. */
static int month_of(const char *v) {
  static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
  size_t i;
  for (i = 0; i < sizeof(months) - 1; i += 3)
    if (memcmp(months + i, v, 3) == 0)
      return (int)(i / 3);
  return -1;
}

/* Whether v[0..n) is an IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT". */
static int imf_fixdate(const char *v, size_t n) {
  static const char shape[] = "aaa, 00 aaa 0000 00:00:00 GMT";
  static const char days[] = "MonTueWedThuFriSatSun";
  size_t i;

  if (n != sizeof(shape) - 1)
    return 0;
  for (i = 0; i < n; i++)
    if (shape[i] == '0' ? !is_digit(v[i]) : shape[i] != 'a' && v[i] != shape[i])
      return 0;
  for (i = 0; i < sizeof(days) - 1 && memcmp(days + i, v, 3) != 0; i += 3)
    ;
  return i < sizeof(days) - 1 && month_of(v + 8) >= 0;
}

static int delta_seconds(const char *v, size_t n) {
  size_t i;

  if (n == 0 || n > DELTA_DIGITS_MAX)
    return 0;
  for (i = 0; i < n; i++)
    if (!is_digit(v[i]))
      return 0;
  return 1;
}

void tg_retry_after_value_end(tg_retry_after_t *ra) {
  if (!ra->in_value)
    return;
  ra->in_value = 0;
  while (ra->len > 0 && is_ows(ra->v[ra->len - 1]))
    ra->len--;
  ra->v[ra->len] = '\0';
  if (ra->ok)
    ra->ok = delta_seconds(ra->v, ra->len) || imf_fixdate(ra->v, ra->len);
}

void tg_retry_after_line(tg_retry_after_t *ra, const char *line, size_t len) {
  const char *colon = memchr(line, ':', len), *end = line + len;

  if (colon == NULL)
    return;
  while (end > colon + 1 && (end[-1] == '\r' || end[-1] == '\n'))
    end--;
  tg_retry_after_name(ra, line, (size_t)(colon - line));
  tg_retry_after_name_end(ra);
  tg_retry_after_value(ra, colon + 1, (size_t)(end - colon - 1));
  tg_retry_after_value_end(ra);
}

const char *tg_retry_after_get(const tg_retry_after_t *ra) {
  return ra->seen == 1 && ra->ok && !ra->in_value ? ra->v : NULL;
}

/* The number the n digits at v spell. */
static int64_t num(const char *v, size_t n) {
  int64_t x = 0;
  while (n-- > 0)
    x = x * 10 + (*v++ - '0');
  return x;
}

int64_t tg_retry_after_wait_ms(const char *v, int64_t now_ms) {
  size_t n = v != NULL ? strlen(v) : 0;
  int64_t at_ms;
  struct tm tm;

  if (delta_seconds(v, n))
    return num(v, n) * 1000;
  if (!imf_fixdate(v, n))
    return -1;
  memset(&tm, 0, sizeof(tm));
  tm.tm_mday = (int)num(v + 5, 2);
  tm.tm_mon = month_of(v + 8);
  tm.tm_year = (int)num(v + 12, 4) - 1900;
  tm.tm_hour = (int)num(v + 17, 2);
  tm.tm_min = (int)num(v + 20, 2);
  tm.tm_sec = (int)num(v + 23, 2);
  at_ms = (int64_t)timegm(&tm) * 1000;
  return at_ms > now_ms ? at_ms - now_ms : 0;
}
