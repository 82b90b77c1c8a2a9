/* The native upstream client's table of hosts (src/upstream/h1client.c)
 * over a long life: every distinct host:port a loop ever sent to has an
 * entry, and the table is bounded. Config reloads that move endpoints
 * (pods rescheduled on new addresses at each rollout) keep adding hosts, so
 * a full table must make room by dropping hosts nothing uses any more,
 * rather than refuse every new endpoint for the rest of the process's
 * life. Each host here is a loopback address on port 9, where nothing
 * listens: the connect is refused at once and the host is unused after.
 * The table is hashed: a lookup among thousands of hosts compares about
 * one key, and one made after evictions finds the host itself, never a
 * dropped one. */
#define _GNU_SOURCE /* memmem */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "upstream/client.h"
#include "upstream/h1client.h"

/* More than the client's bound on hosts (HOSTS_MAX, 4096). */
#define HOSTS 4200
/* Transfers in flight at once, under the usual descriptor limit. */
#define BATCH 200

typedef struct {
  int done, refused, other, ok;
} tally_t;

static int on_status(tg_xfer_t *x, int status, void *arg) {
  (void)x, (void)status, (void)arg;
  return 0;
}

static int on_data(tg_xfer_t *x, const char *data, size_t len, void *arg) {
  (void)x, (void)data, (void)len, (void)arg;
  return 0;
}

static void on_done(int result, const char *detail, void *arg) {
  tally_t *t = arg;
  (void)detail;
  t->done++;
  if (result == TG_XFER_CONNECT)
    t->refused++;
  else if (result == TG_XFER_OK)
    t->ok++;
  else
    t->other++;
}

static const tg_xfer_cbs_t cbs = {on_status, on_data, on_done};

static void post_opts(tg_xfer_opts_t *o, const char *url) {
  memset(o, 0, sizeof(*o));
  o->url = url;
  o->body = "{}";
  o->body_len = 2;
  o->connect_timeout_ms = 2000;
}

/* The i-th refused host's URL (i < 64000). */
static void host_url(char *url, size_t size, int i) {
  snprintf(url, size, "http://127.1.%d.%d:9/v1/completions", i / 250, 1 + i % 250);
}

/* Starts a POST to the i-th host; returns tg_xfer_start's result. */
static int start_one(tg_upstream_t *up, int i, tally_t *t) {
  char url[64];
  tg_xfer_opts_t o;
  tg_xfer_t *x;

  host_url(url, sizeof(url), i);
  post_opts(&o, url);
  return tg_xfer_start(up, &o, &cbs, t, &x);
}

static void test_a_full_host_table_makes_room(void **state) {
  uv_loop_t loop;
  tg_upstream_t *up;
  tally_t t = {0, 0, 0, 0};
  int i = 0, started = 0;
  (void)state;

  assert_int_equal(uv_loop_init(&loop), 0);
  assert_int_equal(tg_upstream_init(&up, &loop), 0);
  assert_int_equal(tg_upstream_set_mode(up, TG_UPSTREAM_NATIVE), 0);
  while (i < HOSTS) {
    int n;
    for (n = 0; n < BATCH && i < HOSTS; n++, i++) {
      int r = start_one(up, i, &t);
      if (r != 0)
        fail_msg("host %d of %d: tg_xfer_start refused it (%d)", i + 1, HOSTS, r);
      started++;
    }
    while (t.done < started)
      uv_run(&loop, UV_RUN_ONCE);
  }
  assert_int_equal(t.done, HOSTS);
  assert_int_equal(t.refused, HOSTS);  /* each reached its host and was refused */
  assert_int_equal(t.other, 0);
  /* a host seen before the table filled, dropped since, comes back */
  assert_int_equal(start_one(up, 0, &t), 0);
  while (t.done < HOSTS + 1)
    uv_run(&loop, UV_RUN_ONCE);
  assert_int_equal(t.refused, HOSTS + 1);
  tg_upstream_close(up);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- a one-answer server on loopback ---------------------------------- */

typedef struct {
  uv_tcp_t tcp;
  char buf[1024];
  size_t len;
  int answered;
  int *served;
} peer_t;

static const char answer[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";

static void peer_closed(uv_handle_t *hd) {
  free(hd->data);
}

static void peer_written(uv_write_t *wr, int status) {
  (void)status;
  uv_close((uv_handle_t *)wr->handle, peer_closed);
  free(wr);
}

static void peer_alloc(uv_handle_t *hd, size_t size, uv_buf_t *b) {
  peer_t *p = hd->data;
  (void)size;
  *b = uv_buf_init(p->buf + p->len, (unsigned)(sizeof(p->buf) - p->len));
}

/* Answers once the request's head and its 2-byte body are in. */
static void peer_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  peer_t *p = st->data;
  const char *end;
  uv_write_t *wr;
  uv_buf_t out;
  (void)b;
  if (n < 0) {
    if (!p->answered)
      uv_close((uv_handle_t *)st, peer_closed);
    return;
  }
  p->len += (size_t)n;
  end = memmem(p->buf, p->len, "\r\n\r\n", 4);
  if (p->answered || end == NULL || (size_t)(end + 4 - p->buf) + 2 > p->len)
    return;
  p->answered = 1;
  (*p->served)++;
  uv_read_stop(st);
  wr = malloc(sizeof(*wr));
  assert_non_null(wr);
  out = uv_buf_init((char *)answer, sizeof(answer) - 1);
  assert_int_equal(uv_write(wr, st, &out, 1, peer_written), 0);
}

static void on_peer(uv_stream_t *server, int status) {
  peer_t *p = calloc(1, sizeof(*p));
  assert_int_equal(status, 0);
  assert_non_null(p);
  p->served = server->data;
  uv_tcp_init(server->loop, &p->tcp);
  p->tcp.data = p;
  assert_int_equal(uv_accept(server, (uv_stream_t *)&p->tcp), 0);
  uv_read_start((uv_stream_t *)&p->tcp, peer_alloc, peer_read);
}

static void h1_post(tg__h1_t *h, const char *url, tally_t *t) {
  tg_xfer_opts_t o;
  tg_xfer_t *x;
  post_opts(&o, url);
  assert_int_equal(tg__h1_start(h, &o, &cbs, t, &x), 0);
}

/* Runs the loop until t has seen want completions and no connection is
 * left open (so every host is unused again). */
static void run_until(uv_loop_t *loop, tg__h1_t *h, tally_t *t, int want) {
  size_t open = 1, idle;
  while (t->done < want || open > 0) {
    uv_run(loop, UV_RUN_ONCE);
    tg__h1_counts(h, &open, &idle);
  }
}

/* Fills the table past its bound with refused hosts first .. first+n-1. */
static void fill(uv_loop_t *loop, tg__h1_t *h, tally_t *t, int first, int n) {
  char url[64];
  int i = 0;
  while (i < n) {
    int k, want = t->done;
    for (k = 0; k < BATCH && i < n; k++, i++, want++) {
      host_url(url, sizeof(url), first + i);
      h1_post(h, url, t);
    }
    run_until(loop, h, t, want);
  }
}

static void test_lookup_after_evictions_finds_the_host(void **state) {
  uv_loop_t loop;
  uv_tcp_t server;
  struct sockaddr_in a;
  struct sockaddr_storage bound;
  int blen = sizeof(bound), served = 0, before;
  char url[64], real[64];
  tg__h1_t *h;
  tally_t t = {0, 0, 0, 0};
  size_t hosts;
  uint64_t c0, c1;
  (void)state;

  assert_int_equal(uv_loop_init(&loop), 0);
  assert_int_equal(uv_tcp_init(&loop, &server), 0);
  server.data = &served;
  assert_int_equal(uv_ip4_addr("127.0.0.1", 0, &a), 0);
  assert_int_equal(uv_tcp_bind(&server, (const struct sockaddr *)&a, 0), 0);
  assert_int_equal(uv_listen((uv_stream_t *)&server, 64, on_peer), 0);
  assert_int_equal(uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &blen), 0);
  snprintf(real, sizeof(real), "http://127.0.0.1:%d/v1/completions",
           ntohs(((struct sockaddr_in *)&bound)->sin_port));
  assert_int_equal(tg__h1_init(&h, &loop), 0);

  /* the server is answered, then pushed out of the table by HOSTS others */
  h1_post(h, real, &t);
  run_until(&loop, h, &t, 1);
  assert_int_equal(t.ok, 1);
  assert_int_equal(served, 1);
  fill(&loop, h, &t, 0, HOSTS);
  assert_int_equal(t.refused, HOSTS);
  tg__h1_host_stats(h, &hosts, &c0);
  assert_int_equal(hosts, 4096);

  /* back in the table (a dropped host of the same hash chain would be
   * a freed one: ASan says so), it is the server that answers */
  h1_post(h, real, &t);
  run_until(&loop, h, &t, HOSTS + 2);
  assert_int_equal(t.ok, 2);
  assert_int_equal(served, 2);

  /* an old host still in the table is found with a key compared or two,
   * not after a walk past the thousands added since; and it is refused,
   * as its own address is */
  host_url(url, sizeof(url), HOSTS - 4000);
  tg__h1_host_stats(h, &hosts, &c0);
  before = t.refused;
  h1_post(h, url, &t);
  tg__h1_host_stats(h, &hosts, &c1);
  if (c1 - c0 > 8)
    fail_msg("one lookup among %zu hosts compared %llu keys", hosts,
             (unsigned long long)(c1 - c0));
  assert_int_equal(hosts, 4096);
  run_until(&loop, h, &t, HOSTS + 3);
  assert_int_equal(t.refused, before + 1);
  /* so is the first one, dropped long ago and added again */
  host_url(url, sizeof(url), 0);
  h1_post(h, url, &t);
  run_until(&loop, h, &t, HOSTS + 4);
  assert_int_equal(t.refused, before + 2);
  assert_int_equal(t.other, 0);

  tg__h1_close(h);
  uv_close((uv_handle_t *)&server, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_a_full_host_table_makes_room),
    cmocka_unit_test(test_lookup_after_evictions_finds_the_host),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
