/* OpenAI-style error bodies. The official clients read error.message,
 * error.type and error.code from them, so every refusal uses this shape. */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "api/api.h"
#include "core/err.h"
#include "core/json.h"

/* s as a JSON string literal in buf. A character that does not fit (with
 * the closing quote) ends it: TG_ETOOBIG, or with cut the literal of what
 * came before it, so a cut never splits a character or an escape. */
static int quote(char *buf, size_t size, const char *s, int cut) {
  static const char hex[] = "0123456789abcdef";
  size_t n = 1, left = strlen(s), k;
  const unsigned char *p = (const unsigned char *)s;
  char e[8];

  if (size < 3)
    return TG_ETOOBIG;
  buf[0] = '"';
  for (; *p; p += k, left -= k) {
    const char *add = e;
    size_t len;
    k = 1;
    if (*p == '"' || *p == '\\') {
      e[0] = '\\';
      e[1] = (char)*p;
      len = 2;
    } else if (*p < 0x20) {
      memcpy(e, "\\u00", 4);
      e[4] = hex[*p >> 4];
      e[5] = hex[*p & 15];
      len = 6;
    } else if (*p < 0x80) {
      if (n + 3 > size) /* it, the closing quote and the NUL */
        break;
      buf[n++] = (char)*p; /* the common byte, stored at once */
      continue;
    } else if ((k = tg_utf8_len(p, left)) == 0) {
      /* not UTF-8 (a client's bytes, a message cut inside a character):
       * U+FFFD, so the text stays JSON */
      add = "\\ufffd";
      len = 6;
      k = 1;
    } else {
      add = (const char *)p;
      len = k;
    }
    if (n + len + 2 > size) /* the closing quote and the NUL */
      break;
    memcpy(buf + n, add, len);
    n += len;
  }
  if (*p != '\0' && !cut)
    return TG_ETOOBIG;
  buf[n++] = '"';
  buf[n] = '\0';
  return (int)n;
}

int tg_json_quote(char *buf, size_t size, const char *s) {
  return quote(buf, size, s, 0);
}

int tg_json_quote_cut(char *buf, size_t size, const char *s) {
  return quote(buf, size, s, 1);
}

void tg_api_error(tg_http_req_t *req, int status, const char *type, const char *code,
                  const char *request_id, const char *extra, const char *fmt, ...) {
  char msg[512], qmsg[1100], body[1400], hdrs[512];
  va_list ap;
  int n, hl = 0;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (tg_json_quote(qmsg, sizeof(qmsg), msg) < 0)
    memcpy(qmsg, "\"error\"", 8);
  n = snprintf(body, sizeof(body),
               "{\"error\":{\"message\":%s,\"type\":\"%s\",\"param\":null,\"code\":\"%s\"}}",
               qmsg, type, code);
  if (n < 0 || (size_t)n >= sizeof(body))
    n = 0;
  hdrs[0] = '\0';
  if (request_id)
    hl = snprintf(hdrs, sizeof(hdrs), "x-request-id: %s\r\n", request_id);
  if (extra && hl >= 0 && (size_t)hl < sizeof(hdrs))
    snprintf(hdrs + hl, sizeof(hdrs) - (size_t)hl, "%s", extra);
  tg_http_respond(req, status, "application/json", hdrs, body, (size_t)n);
}
