/* Fuzz target: the ledger spool's line format (src/meter/ledger.c), which a
 * replay reads back from disk after a crash, a full disk or a hand edit.
 * The input is tried as a line, and again with its CRC-32 made to match
 * (so mutated fields get past the checksum): one that decodes is a record
 * within its documented ranges, its texts NUL-terminated, and it encodes
 * again to a line that decodes to the same record. The input is also read as a record
 * (texts of any bytes, numbers in range), which must encode and decode back
 * unchanged. */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "meter/ledger.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The spool's checksum (CRC-32, as zlib's), written apart from ledger.c. */
static uint32_t crc32_of(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++)
      c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

static int text_ok(const char *s, size_t cap) {
  return memchr(s, '\0', cap) != NULL;
}

static int rec_ok(const tg_ledger_rec_t *r) {
  return text_ok(r->request_id, sizeof(r->request_id)) && r->request_id[0] != '\0' &&
         text_ok(r->tenant, sizeof(r->tenant)) && text_ok(r->key_id, sizeof(r->key_id)) &&
         text_ok(r->model, sizeof(r->model)) && text_ok(r->endpoint, sizeof(r->endpoint)) &&
         r->prompt_tokens >= 0 && r->completion_tokens >= 0 && r->cost_nano >= 0 &&
         (r->usage_counted == 0 || r->usage_counted == 1);
}

/* r encodes to a line that decodes to r again, byte for byte. */
static void round_trip(const tg_ledger_rec_t *r) {
  static char line[TG_LEDGER_LINE_MAX + 1];
  tg_ledger_rec_t back;
  int n = tg__ledger_line_encode(r, line, sizeof(line));

  if (n <= 0 || line[n - 1] != '\n' || memchr(line, '\n', (size_t)n - 1) != NULL)
    abort();
  if (tg__ledger_line_decode(line, (size_t)n - 1, &back) != 0 ||
      memcmp(&back, r, sizeof(back)) != 0)
    abort();
}

/* Takes a text field from the input: a length byte, then up to that many
 * bytes (cut at the field's size and at a NUL). */
static void take_text(const uint8_t **p, const uint8_t *end, char *dst, size_t cap) {
  size_t n;
  if (*p >= end)
    return;
  n = **p % cap;
  (*p)++;
  if (n > (size_t)(end - *p))
    n = (size_t)(end - *p);
  memcpy(dst, *p, n);
  *p += n;
  n = strnlen(dst, cap);
  memset(dst + n, 0, cap - n);
}

static int64_t take_num(const uint8_t **p, const uint8_t *end) {
  uint64_t v = 0;
  for (int i = 0; i < 8 && *p < end; i++, (*p)++)
    v = (v << 8) | **p;
  return (int64_t)v;
}

/* data as a line: it decodes to a sound record, or not at all. */
static void try_line(const char *line, size_t len) {
  tg_ledger_rec_t r;
  if (tg__ledger_line_decode(line, len, &r) == 0) {
    if (!rec_ok(&r))
      abort();
    round_trip(&r);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const char hex[] = "0123456789ABCDEF";
  static char fixed[TG_LEDGER_LINE_MAX + 1];
  const uint8_t *p = data, *end = data + size;
  tg_ledger_rec_t r;

  try_line((const char *)data, size);
  if (size > 12 && size <= sizeof(fixed)) {
    uint32_t crc = crc32_of(data + 12, size - 12);
    memcpy(fixed, data, size);
    memcpy(fixed, "L1 ", 3);
    for (int i = 0; i < 8; i++)
      fixed[3 + i] = hex[(crc >> (28 - 4 * i)) & 15];
    fixed[11] = ' ';
    try_line(fixed, size);
  }

  memset(&r, 0, sizeof(r));
  take_text(&p, end, r.request_id, sizeof(r.request_id));
  take_text(&p, end, r.tenant, sizeof(r.tenant));
  take_text(&p, end, r.key_id, sizeof(r.key_id));
  take_text(&p, end, r.model, sizeof(r.model));
  take_text(&p, end, r.endpoint, sizeof(r.endpoint));
  r.ts_ms = take_num(&p, end);
  r.prompt_tokens = take_num(&p, end) & INT64_MAX;
  r.completion_tokens = take_num(&p, end) & INT64_MAX;
  r.cost_nano = take_num(&p, end) & INT64_MAX;
  r.status = (int)(int32_t)take_num(&p, end);
  r.usage_counted = (int)(take_num(&p, end) & 1);
  r.queue_us = take_num(&p, end);
  r.ttft_us = take_num(&p, end);
  r.total_us = take_num(&p, end);
  if (r.request_id[0] != '\0')
    round_trip(&r);
  return 0;
}
