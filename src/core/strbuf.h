/* Bounded text building without printf, for what every request formats
 * (response heads, rate-limit headers, request ids). snprintf parses its
 * format string on every call; these only copy.
 *
 * A tg_sb_t writes into the caller's buffer and keeps it NUL-terminated.
 * Once a piece does not fit, nothing more is written and err is set, so a
 * caller checks once at the end; what was written before stays whole. */
#ifndef TG_CORE_STRBUF_H
#define TG_CORE_STRBUF_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
  char *p;
  size_t len, cap;   /* cap >= 1: room for the NUL */
  int err;           /* 1 once something did not fit */
} tg_sb_t;

static inline void tg_sb_init(tg_sb_t *b, char *p, size_t cap) {
  b->p = p;
  b->len = 0;
  b->cap = cap;
  b->err = cap == 0;
  if (cap > 0)
    p[0] = '\0';
}

static inline void tg_sb_put(tg_sb_t *b, const char *s, size_t n) {
  if (b->err || n >= b->cap - b->len) {
    b->err = 1;
    return;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

/* A string literal, its length counted by the compiler. */
#define tg_sb_lit(b, lit) tg_sb_put((b), "" lit, sizeof(lit) - 1)

static inline void tg_sb_puts(tg_sb_t *b, const char *s) {
  tg_sb_put(b, s, strlen(s));
}

/* Copies src into dst[0..size) as snprintf(dst, size, "%s", src) would:
 * cut to size - 1 bytes and NUL-terminated (size >= 1). Returns the bytes
 * written, without the NUL. */
static inline size_t tg_str_copy(char *dst, size_t size, const char *src) {
  size_t n = strlen(src);
  if (n >= size)
    n = size - 1;
  memcpy(dst, src, n);
  dst[n] = '\0';
  return n;
}

/* FNV-1a of n bytes: the hash of the name tables. */
static inline uint64_t tg_hash_mem(const void *p, size_t n) {
  const unsigned char *s = p;
  uint64_t h = UINT64_C(14695981039346656037);
  for (; n > 0; n--, s++)
    h = (h ^ *s) * UINT64_C(1099511628211);
  return h;
}

/* FNV-1a of a NUL-terminated string. */
static inline uint64_t tg_hash_str(const char *s) {
  return tg_hash_mem(s, strlen(s));
}

/* v in decimal. */
static inline void tg_sb_putu(tg_sb_t *b, uint64_t v) {
  char t[20];
  size_t i = sizeof(t);
  do {
    t[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v != 0);
  tg_sb_put(b, t + i, sizeof(t) - i);
}

static inline void tg_sb_puti(tg_sb_t *b, int64_t v) {
  if (v < 0) {
    tg_sb_put(b, "-", 1);
    tg_sb_putu(b, (uint64_t)0 - (uint64_t)v);
  } else {
    tg_sb_putu(b, (uint64_t)v);
  }
}

/* in[0..n) as 2n lowercase hex characters at out (no NUL written). */
static inline void tg_hex_encode(const uint8_t *in, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[in[i] >> 4];
    out[2 * i + 1] = digits[in[i] & 0xf];
  }
}

/* The value of hex digit c (either case), or -1. */
static inline int tg_hex_val(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* The len bytes at s with their percent-encoded octets decoded (RFC 3986
 * 2.1) into dst (size bytes, NUL-terminated). A '%' not followed by two
 * hex digits stays as it is, or with strict makes the text refused.
 * Returns the decoded length, or -1 for an encoded NUL (it would cut the
 * text short), a refused '%', or a dst too small. */
static inline int tg_pct_decode(char *dst, size_t size, const char *s, size_t len, int strict) {
  size_t i, n = 0;
  for (i = 0; i < len; i++) {
    int ch = (unsigned char)s[i], hi, lo;
    if (ch == '%' && i + 2 < len && (hi = tg_hex_val(s[i + 1])) >= 0 &&
        (lo = tg_hex_val(s[i + 2])) >= 0) {
      if ((ch = hi * 16 + lo) == 0)
        return -1;
      i += 2;
    } else if (ch == '%' && strict) {
      return -1;
    }
    if (n + 1 >= size)
      return -1;
    dst[n++] = (char)ch;
  }
  dst[n] = '\0';
  return (int)n;
}

/* v in lowercase hex, zero-padded to at least width digits (<= 16), as
 * printf's "%0*llx". */
static inline void tg_sb_puthex(tg_sb_t *b, uint64_t v, int width) {
  static const char digits[] = "0123456789abcdef";
  char t[16];
  size_t i = sizeof(t);
  do {
    t[--i] = digits[v & 0xf];
    v >>= 4;
  } while (v != 0);
  while (i > 0 && (int)(sizeof(t) - i) < width)
    t[--i] = '0';
  tg_sb_put(b, t + i, sizeof(t) - i);
}

#endif
