/* A growable text buffer with a hard maximum and a sticky error, used for
 * every body and SSE event the simulator writes. The sticky error lets a
 * builder chain appends and check once at the end; the maximum keeps a
 * request asking for a huge answer from eating the process's memory. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "sim.h"

void tg__sim_buf_init(tg__sim_buf_t *b, size_t max) {
  b->p = NULL;
  b->len = 0;
  b->cap = 0;
  b->max = max;
  b->err = 0;
}

void tg__sim_buf_reset(tg__sim_buf_t *b) {
  b->len = 0;
  b->err = 0;
  if (b->p != NULL)
    b->p[0] = '\0';
}

void tg__sim_buf_free(tg__sim_buf_t *b) {
  free(b->p);
  tg__sim_buf_init(b, b->max);
}

/* Makes room for need more bytes plus the NUL. */
static int buf_reserve(tg__sim_buf_t *b, size_t need) {
  size_t want, cap;
  char *p;

  if (b->err != 0)
    return b->err;
  if (need > b->max - b->len) {
    b->err = TG_ETOOBIG;
    return b->err;
  }
  want = b->len + need + 1;
  if (want <= b->cap)
    return 0;
  cap = b->cap != 0 ? b->cap : 256;
  while (cap < want)
    cap *= 2;
  /* never past max + 1 (want is at most that): addf writes into the
   * allocation without growing it, so its size is the bound there */
  if (cap > b->max + 1)
    cap = b->max + 1;
  p = realloc(b->p, cap);
  if (p == NULL) {
    b->err = TG_ENOMEM;
    return b->err;
  }
  b->p = p;
  b->cap = cap;
  return 0;
}

int tg__sim_buf_add(tg__sim_buf_t *b, const char *s, size_t n) {
  if (buf_reserve(b, n) != 0)
    return b->err;
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 0;
}

int tg__sim_buf_adds(tg__sim_buf_t *b, const char *s) {
  return tg__sim_buf_add(b, s, strlen(s));
}

int tg__sim_buf_addf(tg__sim_buf_t *b, const char *fmt, ...) {
  va_list ap;
  int n;

  if (buf_reserve(b, 0) != 0)
    return b->err;
  va_start(ap, fmt);
  n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
  va_end(ap);
  if (n < 0) {
    b->err = TG_EINVAL;
    return b->err;
  }
  if ((size_t)n >= b->cap - b->len) {
    if (buf_reserve(b, (size_t)n) != 0)
      return b->err;
    va_start(ap, fmt);
    n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0) {
      b->err = TG_EINVAL;
      return b->err;
    }
  }
  b->len += (size_t)n;
  return 0;
}

int tg__sim_buf_add_jstr(tg__sim_buf_t *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  size_t i, run = 0;

  tg__sim_buf_add(b, "\"", 1);
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[6];
    size_t elen = 2;

    if (c >= 0x20 && c != '"' && c != '\\')
      continue;
    tg__sim_buf_add(b, s + run, i - run);
    run = i + 1;
    esc[0] = '\\';
    switch (c) {
    case '"': esc[1] = '"'; break;
    case '\\': esc[1] = '\\'; break;
    case '\n': esc[1] = 'n'; break;
    case '\r': esc[1] = 'r'; break;
    case '\t': esc[1] = 't'; break;
    default:
      esc[1] = 'u';
      esc[2] = '0';
      esc[3] = '0';
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 15];
      elen = 6;
      break;
    }
    tg__sim_buf_add(b, esc, elen);
  }
  tg__sim_buf_add(b, s + run, n - run);
  return tg__sim_buf_add(b, "\"", 1);
}
