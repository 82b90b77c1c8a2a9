/* Fuzz target: the strict JSON reading of request bodies, answers and
 * streamed events (src/core/json.c), and the one-pass usage reading
 * (src/api/sse.c), which must give exactly what the strict parser gives on
 * any text: a difference aborts. The generated text counted in a whole
 * answer never exceeds the answer (unescaped text is never longer). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

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
