/* HTTP/1.1 server on one libuv loop, parsing with llhttp.
 *
 * One tg_http_server_t per loop thread; several may share a port through
 * SO_REUSEPORT. The server owns connections and their requests. Every request
 * handed to the handler must be completed exactly once, by tg_http_respond(),
 * tg_http_end() or tg_http_abort(), even after the client went away (then the
 * call only releases the request). Until then the connection stays alive.
 *
 * Bounds: the header block (431), the body (413), the time a request may take
 * to arrive (408), the idle time of a keep-alive connection, and the output a
 * slow reader may leave pending (the handler sees it through tg_http_pending()
 * and is told by on_drain when it falls back under the low-water mark).
 * Pipelined requests are answered in order, one at a time, and parsed only
 * while the answers waiting for the client are under the high-water mark.
 * Upgrade offers are ignored (the connection stays HTTP/1.1); CONNECT is
 * refused with 405. A refused connection (400, 405, 408, 413, 431) gets its
 * answer, then input is read and dropped for a bounded time before it
 * closes, so the client is not reset before it reads the answer. */
#ifndef TG_HTTP_SERVER_H
#define TG_HTTP_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct tg_http_server_s tg_http_server_t;
typedef struct tg_http_conn_s tg_http_conn_t;
typedef struct tg_http_req_s tg_http_req_t;

typedef struct {
  size_t max_header_bytes;       /* request line + headers; over -> 431 */
  size_t max_body_bytes;         /* over -> 413 */
  uint64_t request_timeout_ms;   /* whole request must arrive within; -> 408 */
  uint64_t keepalive_timeout_ms; /* idle connection between requests closes */
  uint64_t send_timeout_ms;      /* pending output that does not move -> close */
  size_t write_high_water;       /* handlers stop producing, pipelined parsing stops */
  size_t write_low_water;        /* on_drain fires, parsing resumes, under this */
} tg_http_limits_t;

/* Fills *lim with the defaults: 16 KiB headers, 1 MiB body, 30 s request,
 * 60 s keep-alive, 60 s send, 256 KiB / 64 KiB water marks. */
void tg_http_limits_default(tg_http_limits_t *lim);

typedef struct {
  const char *name;  /* lower-cased, NUL-terminated */
  const char *value; /* NUL-terminated, surrounding blanks trimmed */
} tg_http_header_t;

typedef void (*tg_http_handler_cb)(tg_http_req_t *req);
typedef void (*tg_http_req_cb)(tg_http_req_t *req);

struct tg_http_req_s {
  void *data;                 /* free for the handler */
  tg_http_server_t *server;
  int method;                 /* llhttp_method_t: HTTP_GET, HTTP_POST, ... */
  const char *path;           /* what the request is routed on, NUL-terminated: the
                               * target without the query; of an absolute-form
                               * target ("http://h/p"), its path ("/" for none) */
  const char *query;          /* after '?', or "" */
  const tg_http_header_t *headers;
  size_t n_headers;
  const char *body;           /* NUL-terminated (the NUL is not counted) */
  size_t body_len;
  int keep_alive;             /* client allows reuse and server is not draining */
  uint64_t start_ns;          /* uv_hrtime() when its first byte arrived */
  tg_http_req_cb on_drain;    /* set by the handler, may stay NULL */
  tg_http_req_cb on_abort;    /* client gone while the request is active */
  tg_http_conn_t *conn;       /* internal */
};

/* Whether host:port is free for a new listener group: binds a socket without
 * SO_REUSEPORT there and closes it. Servers created with reuseport share a
 * port with any other process's reuseport listeners (same user), so a
 * process checks first that nothing listens there yet. Returns 0 or a
 * negative errno (UV_EADDRINUSE when a listener, of any process, holds it). */
int tg_http_listen_probe(const char *host, int port);

/* Creates a server listening on host:port on loop. reuseport != 0 sets
 * SO_REUSEPORT so other loops may bind the same port. port 0 binds a free
 * port (see tg_http_server_port). handler and data are kept; data is readable
 * as tg_http_server_data(). On success *out is owned by the caller and freed by
 * tg_http_server_close(). Returns 0 or a negative error. */
int tg_http_server_init(tg_http_server_t **out, uv_loop_t *loop,
                        const char *host, int port, int reuseport,
                        const tg_http_limits_t *lim,
                        tg_http_handler_cb handler, void *data);

/* Called when the server itself refuses a request (400, 405, 408, 413, 431)
 * before any handler saw it: may write extra header lines ("Name: value\r\n")
 * into hdrs (size bytes, NUL-terminated) and log the refusal. start_ns is
 * uv_hrtime() when the refused request's first byte arrived, 0 when none
 * had begun. */
typedef void (*tg_http_reject_cb)(tg_http_server_t *srv, int status, const char *code,
                                  uint64_t start_ns, char *hdrs, size_t size);
void tg_http_server_on_reject(tg_http_server_t *srv, tg_http_reject_cb cb);

void *tg_http_server_data(const tg_http_server_t *srv);
int tg_http_server_port(const tg_http_server_t *srv);
uv_loop_t *tg_http_server_loop(const tg_http_server_t *srv);

/* Stops accepting, closes idle connections, and answers the requests still
 * running with "Connection: close". */
void tg_http_server_drain(tg_http_server_t *srv);

/* Requests handed to the handler and not yet completed. */
size_t tg_http_server_active(const tg_http_server_t *srv);

/* Connections open, idle, answered and still flushing, or closing
 * included: a drain is over when none is left. */
size_t tg_http_server_conns(const tg_http_server_t *srv);

/* Closes the listener and every connection (requests in progress get their
 * on_abort first, while their connection may still carry an answer that has
 * not begun; tg_http_req_gone() is 1 from the call on), then frees the
 * server from a close callback. done may be NULL. */
void tg_http_server_close(tg_http_server_t *srv, void (*done)(void *arg), void *arg);

/* Value of a request header by lower-case name, or NULL. */
const char *tg_http_req_header(const tg_http_req_t *req, const char *lname);

/* The handler is done with the request's URL and headers: their memory (a
 * head buffer of max_header_bytes) goes back to the server now instead of
 * when the request completes, which for a stream may be minutes later.
 * path and query become "", headers none; the body stays. */
void tg_http_req_drop_head(tg_http_req_t *req);

/* Sends a whole response with Content-Length and completes the request.
 * extra_headers is NULL or a block of "Name: value\r\n" lines. */
int tg_http_respond(tg_http_req_t *req, int status, const char *content_type,
                    const char *extra_headers, const char *body, size_t len);

/* Starts a chunked response; then tg_http_write() any number of times and
 * tg_http_end() to complete the request. */
int tg_http_begin(tg_http_req_t *req, int status, const char *content_type,
                  const char *extra_headers);
int tg_http_write(tg_http_req_t *req, const char *data, size_t len);
int tg_http_end(tg_http_req_t *req);

/* Completes the request and closes the connection without finishing the
 * response, so the client sees a truncated message. */
void tg_http_abort(tg_http_req_t *req);

/* Bytes accepted for the client and not yet written to the socket. */
size_t tg_http_pending(const tg_http_req_t *req);

/* Non-zero when pending output is at or over the high-water mark: a
 * producer should wait for on_drain. */
int tg_http_congested(const tg_http_req_t *req);

/* Non-zero once the client is gone (writes are then dropped) or the server
 * is closing (tg_http_server_close). */
int tg_http_req_gone(const tg_http_req_t *req);

/* Reason phrase for a status code ("OK", "Too Many Requests", ...). */
const char *tg_http_reason(int status);

#endif
