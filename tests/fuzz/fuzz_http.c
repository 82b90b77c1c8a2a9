/* Fuzz target: the HTTP/1.1 server's reading of what clients send
 * (src/http/server.c on llhttp), through a real connection on loopback:
 * the input is written to the server as a client would (then the client's
 * side is shut), and whatever comes back is read to the end. Small bounds
 * (1 KiB of headers, 4 KiB of body) so the 431 and 413 paths are reached.
 * The handler answers each request with what the server made of it,
 * chunked when the path asks for it. Aborts when a request handed over
 * breaks the server's promises (a header name not lower-case, a path or
 * body not NUL-terminated) or when the answer does not start as an HTTP
 * response ("HTTP/1.1 ", or "HTTP/1.0 " to a 1.0 client). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "http/server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uv_loop_t loop;
static tg_http_server_t *srv;

static void handle(tg_http_req_t *req) {
  char out[160];
  int n;

  if (req->path == NULL || req->query == NULL || req->body == NULL ||
      req->body[req->body_len] != '\0')
    abort();
  for (size_t i = 0; i < req->n_headers; i++)
    for (const char *c = req->headers[i].name; *c; c++)
      if (*c >= 'A' && *c <= 'Z')
        abort();
  n = snprintf(out, sizeof(out), "%d %.60s %zu %zu\n", req->method, req->path,
               req->n_headers, req->body_len);
  if (strcmp(req->path, "/chunked") == 0) {
    tg_http_begin(req, 200, "text/plain", NULL);
    tg_http_write(req, out, (size_t)n);
    tg_http_end(req);
  } else {
    tg_http_respond(req, 200, "text/plain", "X-Fuzz: 1\r\n", out, (size_t)n);
  }
}

typedef struct {
  uv_tcp_t tcp;
  uv_connect_t creq;
  uv_write_t wreq;
  uv_shutdown_t sreq;
  uv_buf_t in;
  char got[16];
  size_t got_len;
  int closed;
} client_t;

static void on_closed(uv_handle_t *h) {
  ((client_t *)h->data)->closed = 1;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  static char scratch[65536];
  (void)h;
  (void)hint;
  *buf = uv_buf_init(scratch, sizeof(scratch));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  client_t *c = s->data;
  if (n > 0 && c->got_len < sizeof(c->got)) {
    size_t k = sizeof(c->got) - c->got_len < (size_t)n ? sizeof(c->got) - c->got_len : (size_t)n;
    memcpy(c->got + c->got_len, buf->base, k);
    c->got_len += k;
  }
  if (n < 0 && !uv_is_closing((uv_handle_t *)s))
    uv_close((uv_handle_t *)s, on_closed);
}

static void on_shutdown(uv_shutdown_t *r, int status) {
  (void)r;
  (void)status;
}

static void on_written(uv_write_t *w, int status) {
  client_t *c = w->data;
  if (status == 0)
    uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown);
}

static void on_connected(uv_connect_t *r, int status) {
  client_t *c = r->data;
  if (status != 0) {
    uv_close((uv_handle_t *)&c->tcp, on_closed);
    return;
  }
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  c->wreq.data = c;
  if (c->in.len == 0)
    uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown);
  else
    uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &c->in, 1, on_written);
}

static void start(void) {
  tg_http_limits_t lim;

  if (uv_loop_init(&loop) != 0)
    abort();
  tg_http_limits_default(&lim);
  lim.max_header_bytes = 1024;
  lim.max_body_bytes = 4096;
  if (tg_http_server_init(&srv, &loop, "127.0.0.1", 0, 0, &lim, handle, NULL) != 0)
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  client_t c;
  struct sockaddr_in addr;
  char *copy = malloc(size ? size : 1);

  if (srv == NULL)
    start();
  memset(&c, 0, sizeof(c));
  memcpy(copy, data, size);
  c.in = uv_buf_init(copy, (unsigned)size);
  uv_ip4_addr("127.0.0.1", tg_http_server_port(srv), &addr);
  uv_tcp_init(&loop, &c.tcp);
  c.tcp.data = c.creq.data = &c;
  if (uv_tcp_connect(&c.creq, &c.tcp, (const struct sockaddr *)&addr, on_connected) != 0)
    abort();
  while (!c.closed)
    uv_run(&loop, UV_RUN_ONCE);
  /* let the server finish with its side before the next input */
  while (tg_http_server_active(srv) > 0)
    uv_run(&loop, UV_RUN_ONCE);
  uv_run(&loop, UV_RUN_NOWAIT);
  free(copy);
  /* HTTP/1.1, or 1.0 to a 1.0 client */
  if (c.got_len > 0 && (c.got_len < 9 || memcmp(c.got, "HTTP/1.", 7) != 0 ||
                        (c.got[7] != '1' && c.got[7] != '0') || c.got[8] != ' '))
    abort();
  return 0;
}
