/* Strict JSON reading on cJSON: see json.h for what is added and why. */
#include "core/json.h"

#include <math.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- the per-thread arena (json.h, "Memory") ----
 *
 * cJSON allocates nodes and strings through the hooks. While this thread's
 * arena is filling (a tg_json_parse() on it), the hooks hand out its
 * bytes in order; once it is full, or when it is not filling, they call
 * malloc(). free() of a pointer inside the arena does nothing: the whole
 * arena is reused when its tree is freed (tg_json_free) or when the parse
 * failed. */

static _Thread_local struct {
  alignas(max_align_t) char mem[TG_JSON_ARENA];
  size_t used;
  int filling;   /* a parse on this thread is allocating from mem */
  int live;      /* a tree in mem has not been freed yet */
} arena;

static int in_arena(const void *p) {
  const char *c = p;
  return c >= arena.mem && c < arena.mem + sizeof(arena.mem);
}

int tg__json_in_arena(const void *p) {
  return in_arena(p);
}

static void *hook_malloc(size_t n) {
  if (arena.filling) {
    size_t a = (n + alignof(max_align_t) - 1) & ~(alignof(max_align_t) - 1);
    if (a >= n && a <= sizeof(arena.mem) - arena.used) {
      void *p = arena.mem + arena.used;
      arena.used += a;
      return p;
    }
  }
  return malloc(n);
}

static void hook_free(void *p) {
  if (!in_arena(p))
    free(p);
}

static void init_hooks(void) {
  cJSON_Hooks h = {hook_malloc, hook_free};
  cJSON_InitHooks(&h);
}

void tg_json_init(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, init_hooks);
}

void tg_json_free(cJSON *root) {
  if (root == NULL)
    return;
  cJSON_Delete(root);
  if (in_arena(root)) {
    arena.live = 0;
    arena.used = 0;
  }
}

static int fail(tg_json_err_t *err, const char *why, size_t at) {
  if (err != NULL) {
    err->why = why;
    err->at = at;
  }
  return -1;
}

int tg_json_check_text(const char *buf, size_t len, tg_json_err_t *err) {
  const unsigned char *s = (const unsigned char *)buf;
  size_t i = 0;

  while (i < len) {
    unsigned char c;
    /* Eight bytes at a time while they are all printable ASCII other than
     * a backslash: the bulk of any body. A word with anything else is
     * checked a byte at a time below. */
    while (len - i >= 8) {
      const uint64_t ones = UINT64_C(0x0101010101010101), highs = ones * 0x80;
      uint64_t w, bs;
      memcpy(&w, s + i, 8);
      bs = w ^ (ones * '\\');
      if (((w | ((w - ones * 0x20) & ~w) | ((bs - ones) & ~bs)) & highs) != 0)
        break;
      i += 8;
    }
    if (i >= len)
      break;
    c = s[i];
    if (c >= 0x20 && c < 0x80) {
      if (c == '\\' && i + 1 < len) {
        if (s[i + 1] == 'u' && i + 5 < len && memcmp(s + i + 2, "0000", 4) == 0)
          return fail(err, "a string holds \\u0000", i);
        if (s[i + 1] == '\\') /* an escaped backslash escapes nothing after it */
          i++;
      }
      i++;
      continue;
    }
    if (c < 0x80) {
      if (c == '\t' || c == '\n' || c == '\r') {
        i++;
        continue;
      }
      return fail(err, "a control character outside an escape", i);
    }
    {
      size_t n = tg_utf8_len(s + i, len - i);
      if (n == 0)
        return fail(err, "invalid UTF-8", i);
      i += n;
    }
  }
  return 0;
}

size_t tg_utf8_len(const unsigned char *s, size_t len) {
  /* a lead byte, then 1-3 continuation bytes, with the second byte's range
   * narrowed where the lead allows overlong forms, surrogates or code
   * points past U+10FFFF */
  unsigned char c = s[0], lo = 0x80, hi = 0xBF;
  size_t n;

  if (c < 0x80)
    return 1;
  if (c >= 0xC2 && c <= 0xDF)
    n = 1;
  else if (c >= 0xE0 && c <= 0xEF) {
    n = 2;
    if (c == 0xE0)
      lo = 0xA0;
    else if (c == 0xED)
      hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 3;
    if (c == 0xF0)
      lo = 0x90;
    else if (c == 0xF4)
      hi = 0x8F;
  } else
    return 0;
  if (len <= n || s[1] < lo || s[1] > hi)
    return 0;
  for (size_t k = 2; k <= n; k++)
    if ((s[k] & 0xC0) != 0x80)
      return 0;
  return n + 1;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* 0 when no object under v (v included) has a key twice; -1 otherwise, or
 * on a failed allocation. Depth is bounded by cJSON's nesting limit. */
static int check_keys(const cJSON *v, tg_json_err_t *err) {
  const cJSON *e;
  size_t n = 0;

  if (!cJSON_IsObject(v) && !cJSON_IsArray(v))
    return 0;
  for (e = v->child; e != NULL; e = e->next) {
    if (check_keys(e, err) < 0)
      return -1;
    n++;
  }
  if (!cJSON_IsObject(v) || n < 2)
    return 0;
  if (n <= 16) {
    for (e = v->child; e != NULL; e = e->next)
      for (const cJSON *f = e->next; f != NULL; f = f->next)
        if (strcmp(e->string, f->string) == 0)
          return fail(err, "an object has a key twice", 0);
    return 0;
  }
  {
    const char **keys = malloc(n * sizeof(*keys));
    size_t i = 0;
    int rc = 0;
    if (keys == NULL)
      return fail(err, "out of memory", 0);
    for (e = v->child; e != NULL; e = e->next)
      keys[i++] = e->string;
    qsort(keys, n, sizeof(*keys), cmp_str);
    for (i = 1; i < n && rc == 0; i++)
      if (strcmp(keys[i - 1], keys[i]) == 0)
        rc = fail(err, "an object has a key twice", 0);
    free(keys);
    return rc;
  }
}

cJSON *tg_json_parse(const char *buf, size_t len, int whole, tg_json_err_t *err) {
  const char *end = NULL;
  cJSON *root;

  if (tg_json_check_text(buf, len, err) < 0)
    return NULL;
  tg_json_init();
  if (!arena.live) {
    arena.used = 0;
    arena.filling = 1;
  }
  root = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
  if (arena.filling) {
    arena.filling = 0;
    arena.live = root != NULL && in_arena(root);
  }
  if (root == NULL) {
    size_t at = end != NULL && end >= buf && end <= buf + len ? (size_t)(end - buf) : 0;
    fail(err, len == 0 ? "empty text" : "invalid JSON syntax", at);
    return NULL;
  }
  if (whole && end != NULL) {
    while (end < buf + len && tg_json_ws(*end))
      end++;
    if (end < buf + len) {
      fail(err, "text after the JSON value", (size_t)(end - buf));
      tg_json_free(root);
      return NULL;
    }
  }
  if (check_keys(root, err) < 0) {
    tg_json_free(root);
    return NULL;
  }
  return root;
}

int tg_json_int(const cJSON *v, int64_t *out) {
  double d;
  if (!cJSON_IsNumber(v))
    return 0;
  d = v->valuedouble;
  if (!(fabs(d) <= 9007199254740992.0) || d != floor(d))
    return 0;
  *out = (int64_t)d;
  return 1;
}
