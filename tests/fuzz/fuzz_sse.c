/* Fuzz target: splitting an upstream's SSE bytes into events and
 * classifying them (src/api/sse.c). The first byte chooses where the bytes
 * are cut in two and how long an event may be; whatever the input, every
 * byte ends up in exactly one event or in the held remainder, and each
 * event ends at its first empty line (LF, CRLF or lone CR line ends). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/sse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct {
  size_t bytes;
} seen_t;

/* Where the first empty line of s[0..n) ends, by the SSE format's rules
 * (lines end with CRLF, LF or a lone CR; a CR last in s ends its line), or
 * 0 when it has none. Written apart from the splitter, to check it. */
static size_t first_empty_line_end(const char *s, size_t n) {
  size_t line = 0, i = 0;
  while (i < n) {
    if (s[i] != '\r' && s[i] != '\n') {
      i++;
      continue;
    }
    size_t t = (s[i] == '\r' && i + 1 < n && s[i + 1] == '\n') ? 2 : 1;
    if (i == line)
      return i + t;
    i += t;
    line = i;
  }
  return 0;
}

/* The event without its "usage": null (what a client that did not ask
 * for usage gets) is the same chunk: one object, no usage left, the same
 * choices. */
static void check_cut(const char *ev, size_t len, const tg_sse_info_t *info) {
  tg_sse_info_t cut;
  size_t rest = info->null_usage_at + info->null_usage_len;
  char *b;

  if (info->null_usage_at == 0 || rest >= len || (b = malloc(len)) == NULL)
    abort();
  memcpy(b, ev, info->null_usage_at);
  memcpy(b + info->null_usage_at, ev + rest, len - rest);
  if (tg_sse_inspect(b, len - info->null_usage_len, &cut) != 0 || cut.null_usage_len != 0 ||
      cut.has_usage || cut.has_choices != info->has_choices || cut.role_only != info->role_only)
    abort();
  free(b);
}

static int on_event(void *arg, const char *ev, size_t len) {
  seen_t *s = arg;
  tg_sse_info_t info;

  /* an event is everything up to its first empty line, and no more */
  if (len == 0 || first_empty_line_end(ev, len) != len)
    abort();
  (void)tg_sse_inspect(ev, len, &info);
  /* a usage-only chunk has no choice; a usage is usable with both counts
   * (a usage-only chunk may carry an unusable one: it is still withheld
   * from a client that did not ask for usage, and counted as none) */
  if (info.usage_only && info.has_choices)
    abort();
  if (info.has_usage && (info.prompt_tokens < 0 || info.completion_tokens < 0))
    abort();
  if (info.null_usage_len > 0)
    check_cut(ev, len, &info);
  s->bytes += len;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  tg_sse_t p;
  seen_t s = {0};
  size_t cut, max;
  int r;

  if (size == 0)
    return 0;
  cut = size > 1 ? data[0] % size : 0;
  max = 16 + (size_t)data[0] * 8;
  data++;
  size--;
  if (cut > size)
    cut = size;
  tg_json_init();
  tg_sse_init(&p, max);
  r = tg_sse_feed(&p, (const char *)data, cut, on_event, &s);
  if (r == 0)
    r = tg_sse_feed(&p, (const char *)data + cut, size - cut, on_event, &s);
  if (r == 0 && s.bytes + tg_sse_pending(&p) != size)
    abort();   /* a byte lost or doubled */
  if (tg_sse_pending(&p) > max)
    abort();   /* the bound on one held event */
  tg_sse_free(&p);
  return 0;
}
