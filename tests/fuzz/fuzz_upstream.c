/* Fuzz target: the native upstream client's reading of what a backend
 * answers (src/upstream/h1client.c on llhttp: status line, headers,
 * Content-Length and chunked bodies, an answer cut short). A small server
 * in this process reads the client's request and answers with the input's
 * bytes, then closes; a fresh client per input, so no connection is reused
 * across inputs. The first byte of the input picks whether the client
 * pauses on the first body bytes (resumed from the loop), as a slow
 * client's stream does. Aborts when on_done does not come exactly once, with
 * a known result, when body bytes arrive before a status or more body
 * arrives than was sent, or when the answer's Retry-After to relay is not
 * a bounded number or date. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "core/err.h"
#include "upstream/h1client.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uv_loop_t loop;
static uv_tcp_t listener;
static int port;
static int peers;   /* server-side connections not yet closed */

/* what the server answers, for the connection being served */
static const char *answer;
static size_t answer_len;

typedef struct {
  uv_tcp_t tcp;
  uv_write_t wreq;
  char head[4096];
  size_t head_len;
  int answered;
} peer_t;

static void peer_closed(uv_handle_t *h) {
  free(h->data);
  peers--;
}

static void peer_close(peer_t *p) {
  if (!uv_is_closing((uv_handle_t *)&p->tcp))
    uv_close((uv_handle_t *)&p->tcp, peer_closed);
}

static void peer_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  peer_t *p = h->data;
  (void)hint;
  *buf = uv_buf_init(p->head + p->head_len, (unsigned)(sizeof(p->head) - p->head_len));
}

static void peer_written(uv_write_t *w, int status) {
  (void)status;
  peer_close(w->data);
}

static void peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  peer_t *p = s->data;
  (void)buf;
  if (n < 0 || (size_t)n >= sizeof(p->head) - p->head_len) {
    if (!p->answered)
      peer_close(p);
    return;
  }
  p->head_len += (size_t)n;
  /* a GET: the request ends with its head */
  if (!p->answered && p->head_len >= 4 &&
      memcmp(p->head + p->head_len - 4, "\r\n\r\n", 4) == 0) {
    uv_buf_t out = uv_buf_init((char *)answer, (unsigned)answer_len);
    p->answered = 1;
    uv_read_stop(s);
    p->wreq.data = p;
    if (answer_len == 0 || uv_write(&p->wreq, s, &out, 1, peer_written) != 0)
      peer_close(p);
  }
}

static void on_peer(uv_stream_t *l, int status) {
  peer_t *p;
  if (status != 0 || (p = calloc(1, sizeof(*p))) == NULL)
    return;
  peers++;
  uv_tcp_init(&loop, &p->tcp);
  p->tcp.data = p;
  if (uv_accept(l, (uv_stream_t *)&p->tcp) != 0) {
    peer_close(p);
    return;
  }
  uv_read_start((uv_stream_t *)&p->tcp, peer_alloc, peer_read);
}

static void start(void) {
  struct sockaddr_in addr;
  struct sockaddr_storage bound;
  int len = sizeof(bound);

  if (uv_loop_init(&loop) != 0 || uv_tcp_init(&loop, &listener) != 0 ||
      uv_ip4_addr("127.0.0.1", 0, &addr) != 0 ||
      uv_tcp_bind(&listener, (const struct sockaddr *)&addr, 0) != 0 ||
      uv_listen((uv_stream_t *)&listener, 64, on_peer) != 0 ||
      uv_tcp_getsockname(&listener, (struct sockaddr *)&bound, &len) != 0)
    abort();
  port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
}

typedef struct {
  tg_xfer_t *x;
  int status, done, result, pause, paused;
  size_t body;
  uv_idle_t resume;
} run_t;

static int on_status(tg_xfer_t *x, int status, void *arg) {
  run_t *r = arg;
  const char *ra = tg_xfer_retry_after(x);
  if (r->status != 0 || r->done)
    abort();   /* one status, before the end */
  if (ra != NULL && (ra[0] == '\0' || strlen(ra) > TG_RETRY_AFTER_MAX ||
                     (strspn(ra, "0123456789") != strlen(ra) && strlen(ra) != TG_RETRY_AFTER_MAX)))
    abort();   /* a Retry-After to relay is a number or a date, bounded */
  r->status = status;
  return 0;
}

static void on_resume(uv_idle_t *i) {
  run_t *r = i->data;
  uv_idle_stop(i);
  if (!r->done && tg__h1_paused(r->x))
    tg__h1_resume(r->x);
}

static int on_data(tg_xfer_t *x, const char *d, size_t len, void *arg) {
  run_t *r = arg;
  (void)x;
  (void)d;
  if (r->status == 0 || r->done)
    abort();   /* body before the status, or after the end */
  if (r->pause && !r->paused) {
    r->paused = 1;
    uv_idle_start(&r->resume, on_resume);
    return TG_XFER_PAUSE;
  }
  r->body += len;
  return 0;
}

static void on_done(int result, const char *detail, void *arg) {
  run_t *r = arg;
  (void)detail;
  if (r->done++)
    abort();   /* twice */
  if (result < TG_XFER_OK || result > TG_XFER_ABORTED)
    abort();
  r->result = result;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const tg_xfer_cbs_t cbs = {on_status, on_data, on_done};
  char url[64];
  tg__h1_t *h;
  tg_xfer_opts_t o;
  run_t r;

  if (port == 0)
    start();
  memset(&r, 0, sizeof(r));
  r.pause = size > 0 && (data[0] & 1);
  answer = (const char *)data;
  answer_len = size;
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/v1/x", port);
  memset(&o, 0, sizeof(o));
  o.url = url;
  o.connect_timeout_ms = 2000;
  if (tg__h1_init(&h, &loop) != 0)
    abort();
  uv_idle_init(&loop, &r.resume);
  r.resume.data = &r;
  if (tg__h1_start(h, &o, &cbs, &r, &r.x) != 0)
    abort();
  while (!r.done)
    uv_run(&loop, UV_RUN_ONCE);
  if (r.body > size || (r.result == TG_XFER_OK && r.status == 0))
    abort();
  uv_close((uv_handle_t *)&r.resume, NULL);
  tg__h1_close(h);
  /* the client's handles close (and free it) and the server's side sees
   * the connection go, within a few turns of the loop on loopback */
  for (int i = 0; i < 1000 && (i < 4 || peers > 0); i++)
    uv_run(&loop, UV_RUN_NOWAIT);
  if (peers > 0)
    abort();
  return 0;
}
