/* Fuzz target: the strict JSON reading of request bodies, answers and
 * streamed events (src/core/json.c), and the one-pass usage reading
 * (src/api/sse.c), which must give exactly what the strict parser gives on
 * any text: a difference aborts. The generated text counted in a whole
 * answer never exceeds the answer (unescaped text is never longer). The
 * scan of a relayed answer (tg_ascan_*) gives the same verdict and usage
 * however the text is cut, calls every object the strict parser accepts
 * whole, and any top-level usage it keeps is that member's whole value. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/sse.h"
#include "core/json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Nodes of a tree, walked whole so every part of it is read. */
static size_t walk(const cJSON *v) {
  size_t n = 1;
  for (const cJSON *c = v->child; c != NULL; c = c->next)
    n += walk(c);
  return n;
}

/* The answer scan: cut in two at `cut`, it must agree with one piece; on
 * an object the strict parser accepts it must agree with the tree. */
static void check_scan(const char *text, size_t size, size_t cut, const cJSON *whole) {
  static tg_ascan_t a, b;
  size_t na = 0, nb = 0, ca, cb;
  const char *ua, *ub;

  tg_ascan_init(&a);
  ca = tg_ascan_feed(&a, text, size);
  tg_ascan_init(&b);
  cb = tg_ascan_feed(&b, text, cut);
  if (cb == cut)
    cb = cut + tg_ascan_feed(&b, text + cut, size - cut);
  else
    (void)tg_ascan_feed(&b, text + cut, size - cut);
  ua = tg_ascan_usage(&a, &na);
  ub = tg_ascan_usage(&b, &nb);
  if (tg_ascan_whole(&a) != tg_ascan_whole(&b) || (ua == NULL) != (ub == NULL) ||
      (ua != NULL && (na != nb || memcmp(ua, ub, na) != 0)))
    abort();   /* the cut changed the verdict or the usage */
  if (tg_ascan_whole(&a) && (ca >= size || text[ca] != '}' || ca != cb))
    abort();   /* a whole object closes at a brace, the same one */
  if (cJSON_IsObject(whole)) {
    const cJSON *u = tg_json_get(whole, "usage");
    if (!tg_ascan_whole(&a))
      abort();
    if (u == NULL && ua != NULL)
      abort(); /* a usage where the object has none */
    if (u != NULL && ua != NULL) {
      cJSON *v = tg_json_parse(ua, na, 1, NULL);
      if (v == NULL || walk(v) != walk(u))
        abort(); /* not the member's whole value */
      tg_json_free(v);
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *text = (const char *)data;
  int64_t p1 = 0, c1 = 0, p2 = 0, c2 = 0;
  int r1, r2;
  cJSON *whole, *prefix;

  tg_json_init();
  (void)tg_json_check_text(text, size, NULL);
  whole = tg_json_parse(text, size, 1, NULL);
  prefix = tg_json_parse(text, size, 0, NULL);   /* a second tree: the heap */
  if (whole != NULL && (prefix == NULL || walk(whole) != walk(prefix)))
    abort();   /* a whole value is also a prefix value, the same one */
  if (whole != NULL)
    (void)walk(whole);
  check_scan(text, size, size > 0 ? data[0] % (size + 1) : 0, whole);
  tg_json_free(prefix);
  tg_json_free(whole);

  r1 = tg_usage_read_text(text, size, &p1, &c1);
  prefix = tg_json_parse(text, size, 0, NULL);
  r2 = tg_usage_read(prefix, &p2, &c2);
  tg_json_free(prefix);
  if (r1 != r2 || (r1 && (p1 != p2 || c1 != c2))) {
    fprintf(stderr, "usage: one pass %d (%lld, %lld), parser %d (%lld, %lld)\n", r1,
            (long long)p1, (long long)c1, r2, (long long)p2, (long long)c2);
    abort();
  }
  if (tg_answer_text_bytes(text, size) > (int64_t)size)
    abort();
  return 0;
}
