/* The OpenAI-compatible API (the `listen` port) and the admin API (the
 * `admin_listen` port). Both are handlers of the HTTP server; the server's
 * data pointer is the tg_worker_t of the loop they run on. */
#ifndef TG_API_API_H
#define TG_API_API_H

#include <stddef.h>

#include "core/app.h"
#include "http/server.h"

/* Writes a new request id, unique across the process' threads and its
 * restarts, into buf (at least 32 bytes). */
void tg_api_request_id(tg_worker_t *w, char *buf, size_t size);

/* Handler of the API listener. */
void tg_api_handle(tg_http_req_t *req);

/* The server refused a request on its own (bad HTTP, bounds, timeout):
 * names it with a request id and logs it like any other request, with the
 * time from its first byte (start_ns; 0: none) to the refusal. */
void tg_api_reject(tg_http_server_t *srv, int status, const char *code, uint64_t start_ns,
                   char *hdrs, size_t size);

/* The API key req presents in *key (NULL when none): Authorization's
 * Bearer token (SP or HTAB after the scheme), else X-Api-Key, else the
 * Authorization value itself. Returns NULL, or why the request's
 * credentials are ambiguous (Authorization, X-Api-Key or X-Tenant-Id more
 * than once, or a Bearer token and an X-Api-Key that differ): such a
 * request is refused, whichever key it would have been served with. */
const char *tg_api_credentials(const tg_http_req_t *req, const char **key);

/* Handler of the admin listener. */
void tg_admin_handle(tg_http_req_t *req);

/* Enforces upstream first-byte and idle deadlines; run by each worker's
 * periodic tick. */
void tg_api_tick(tg_worker_t *w);

/* Dispatches calls waiting for a saturated pool on w's loop while slots
 * are free; run when another loop (or this one) gave a slot back. */
void tg_api_serve_queues(tg_worker_t *w);

/* Before w's async handle closes: other loops stop waking it. */
void tg_api_worker_closing(tg_worker_t *w);

/* Frees w's queue structures once its loop has stopped. */
void tg_api_worker_fini(tg_worker_t *w);

/* Sends an OpenAI-style error {"error":{"message","type","code"}} and
 * completes req. request_id may be NULL; extra is NULL or header lines. */
void tg_api_error(tg_http_req_t *req, int status, const char *type, const char *code,
                  const char *request_id, const char *extra, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

/* The header lines of a refusal to retry in one second: Retry-After for
 * every client, and retry-after-ms, which the official OpenAI clients
 * read first (docs/gateway.md, "Errors"). */
#define TG_RETRY_AFTER_1S "Retry-After: 1\r\nretry-after-ms: 1000\r\n"

/* Writes a JSON string literal (quotes included) for s into buf; returns the
 * length, or a negative error if it does not fit. */
int tg_json_quote(char *buf, size_t size, const char *s);

/* The same, cut to what fits (between characters, never inside an
 * escape) when s does not: for a log's field, which keeps the beginning of
 * a long value rather than none of it. Negative only when size < 3. */
int tg_json_quote_cut(char *buf, size_t size, const char *s);

#endif
