/* SSE handling: splitting an upstream's bytes into whole events however the
 * bytes are cut, the bound on one event, and telling [DONE], usage-only
 * chunks and content chunks apart. These decide what a streaming client
 * receives and what usage is billed, so every assertion is on exact bytes
 * or exact token counts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "api/sse.h"
#include "core/err.h"

#define CHUNK1 "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok0\"}}]}\n\n"
#define CHUNK2 "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tok1\"}}]}\n\n"
#define USAGE "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n"
#define DONE "data: [DONE]\n\n"
#define STREAM CHUNK1 CHUNK2 USAGE DONE

typedef struct {
  char joined[4096];
  size_t len;
  int n;
  size_t lens[16];
} collect_t;

static int collect(void *arg, const char *ev, size_t len) {
  collect_t *c = arg;
  assert_true(c->len + len < sizeof(c->joined));
  memcpy(c->joined + c->len, ev, len);
  c->len += len;
  if (c->n < 16)
    c->lens[c->n] = len;
  c->n++;
  return 0;
}

/* Every way of cutting the stream in two yields the same four events. */
static void test_split_every_cut(void **state) {
  const char *s = STREAM;
  size_t n = strlen(s), cut;
  (void)state;
  for (cut = 0; cut <= n; cut++) {
    tg_sse_t p;
    collect_t c;
    memset(&c, 0, sizeof(c));
    tg_sse_init(&p, 4096);
    assert_int_equal(tg_sse_feed(&p, s, cut, collect, &c), 0);
    assert_int_equal(tg_sse_feed(&p, s + cut, n - cut, collect, &c), 0);
    assert_int_equal(c.n, 4);
    assert_int_equal(c.lens[0], strlen(CHUNK1));
    assert_int_equal(c.lens[3], strlen(DONE));
    assert_int_equal(c.len, n);
    assert_memory_equal(c.joined, s, n);
    assert_int_equal(tg_sse_pending(&p), 0);
    tg_sse_free(&p);
  }
}

/* Byte by byte, with CRLF line ends. */
static void test_split_bytewise_crlf(void **state) {
  const char *s = "data: {\"a\":1}\r\n\r\ndata: [DONE]\r\n\r\n";
  size_t i, n = strlen(s);
  tg_sse_t p;
  collect_t c;
  (void)state;
  memset(&c, 0, sizeof(c));
  tg_sse_init(&p, 1024);
  for (i = 0; i < n; i++)
    assert_int_equal(tg_sse_feed(&p, s + i, 1, collect, &c), 0);
  assert_int_equal(c.n, 2);
  assert_int_equal(c.lens[0], strlen("data: {\"a\":1}\r\n\r\n"));
  assert_memory_equal(c.joined, s, n);
  tg_sse_free(&p);
}

/* An incomplete event is held, not passed on. */
static void test_partial_held(void **state) {
  tg_sse_t p;
  collect_t c;
  (void)state;
  memset(&c, 0, sizeof(c));
  tg_sse_init(&p, 1024);
  assert_int_equal(tg_sse_feed(&p, CHUNK1 "data: {\"x\"", strlen(CHUNK1) + 11, collect, &c), 0);
  assert_int_equal(c.n, 1);
  assert_int_equal(tg_sse_pending(&p), 11);
  tg_sse_free(&p);
}

static void test_event_bound(void **state) {
  char big[300];
  tg_sse_t p;
  collect_t c;
  (void)state;
  memset(&c, 0, sizeof(c));
  memset(big, 'x', sizeof(big));
  tg_sse_init(&p, 256);
  assert_int_equal(tg_sse_feed(&p, big, 200, collect, &c), 0);
  assert_int_equal(tg_sse_feed(&p, big, 100, collect, &c), TG_ETOOBIG);
  assert_int_equal(c.n, 0);
  tg_sse_free(&p);
}

static int refuse_second(void *arg, const char *ev, size_t len) {
  int *n = arg;
  (void)ev;
  (void)len;
  return ++*n == 2 ? TG_ECANCELED : 0;
}

/* A callback's error stops the split and comes back to the caller. */
static void test_callback_error_stops(void **state) {
  tg_sse_t p;
  int n = 0;
  (void)state;
  tg_sse_init(&p, 1024);
  assert_int_equal(tg_sse_feed(&p, STREAM, strlen(STREAM), refuse_second, &n), TG_ECANCELED);
  assert_int_equal(n, 2);
  tg_sse_free(&p);
}

static void test_inspect(void **state) {
  tg_sse_info_t i;
  (void)state;
  assert_int_equal(tg_sse_inspect(CHUNK1, strlen(CHUNK1), &i), 0);
  assert_true(i.has_choices);
  assert_false(i.has_usage);
  assert_false(i.done);

  assert_int_equal(tg_sse_inspect(USAGE, strlen(USAGE), &i), 0);
  assert_true(i.has_usage);
  assert_true(i.usage_only);
  assert_false(i.has_choices);
  assert_int_equal(i.prompt_tokens, 9);
  assert_int_equal(i.completion_tokens, 2);

  assert_int_equal(tg_sse_inspect(DONE, strlen(DONE), &i), 0);
  assert_true(i.done);

  /* usage riding on a content chunk is usage, but not a usage-only chunk */
  {
    const char *ev = "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
    assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), 0);
    assert_true(i.has_usage);
    assert_false(i.usage_only);
    assert_true(i.has_choices);
    assert_int_equal(i.completion_tokens, 4);
  }
  /* "usage": null (OpenAI sends it on chunks when include_usage is set) */
  {
    const char *ev = "data: {\"choices\":[{\"index\":0}],\"usage\":null}\n\n";
    assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), 0);
    assert_false(i.has_usage);
  }
  /* garbage data is reported, comments are not */
  assert_int_equal(tg_sse_inspect("data: not json\n\n", 16, &i), TG_EPARSE);
  assert_int_equal(tg_sse_inspect("data: \"usage\" oops\n\n", 20, &i), TG_EPARSE);
  assert_int_equal(tg_sse_inspect(": keep-alive\n\n", 14, &i), 0);
  assert_false(i.done || i.has_usage || i.has_choices);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_split_every_cut),
    cmocka_unit_test(test_split_bytewise_crlf),
    cmocka_unit_test(test_partial_held),
    cmocka_unit_test(test_event_bound),
    cmocka_unit_test(test_callback_error_stops),
    cmocka_unit_test(test_inspect),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
