/* OpenAI-style error bodies. The official clients read error.message,
 * error.type and error.code from them, so every refusal uses this shape. */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "api/api.h"
#include "core/err.h"
#include "core/json.h"

int tg_json_quote(char *buf, size_t size, const char *s) {
  static const char hex[] = "0123456789abcdef";
  size_t n = 0, left = strlen(s), k;
  const unsigned char *p = (const unsigned char *)s;

#define PUT(ch) do { if (n + 1 >= size) return TG_ETOOBIG; buf[n++] = (char)(ch); } while (0)
  PUT('"');
  for (; *p; p++, left--) {
    if (*p == '"' || *p == '\\') {
      PUT('\\');
      PUT(*p);
    } else if (*p < 0x20) {
      PUT('\\'); PUT('u'); PUT('0'); PUT('0');
      PUT(hex[*p >> 4]);
      PUT(hex[*p & 15]);
    } else if (*p < 0x80) {
      PUT(*p);
    } else if ((k = tg_utf8_len(p, left)) == 0) {
      /* not UTF-8 (a client's bytes, a message cut inside a character):
       * U+FFFD, so the text stays JSON */
      PUT('\\'); PUT('u'); PUT('f'); PUT('f'); PUT('f'); PUT('d');
    } else {
      for (; k > 1; k--, p++, left--)
        PUT(*p);
      PUT(*p);
    }
  }
  PUT('"');
#undef PUT
  buf[n] = '\0';
  return (int)n;
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
