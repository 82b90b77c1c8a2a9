/* Fuzz target: API keys as clients present them (src/auth/key.c). A key
 * that parses is exactly TG_KEY_LEN bytes of the strict form, and its parts
 * point into the text; a bare id parses only as lowercase hex. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "auth/key.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int lower_hex(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
      return 0;
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *text = (const char *)data;
  tg_key_parts_t parts;
  uint64_t id;

  if (tg_key_parse(text, size, &parts) == 0) {
    if (size < TG_KEY_LEN || memcmp(text, "tg-", 3) != 0 ||
        parts.id < text || parts.id + TG_KEY_ID_LEN > text + TG_KEY_LEN ||
        parts.secret < text || parts.secret + TG_KEY_SECRET_LEN > text + TG_KEY_LEN ||
        !lower_hex(parts.id, TG_KEY_ID_LEN) || !lower_hex(parts.secret, TG_KEY_SECRET_LEN))
      abort();
    if (tg_key_id_parse(parts.id, TG_KEY_ID_LEN, &id) != 0 || id != parts.id_num)
      abort();
  }
  if (tg_key_id_parse(text, size, &id) == 0 &&
      (size != TG_KEY_ID_LEN || !lower_hex(text, size)))
    abort();
  return 0;
}
