/* Endpoint picking (src/upstream/pool.c): an endpoint backing off after it
 * said it is overloaded is passed over while another candidate is not, even
 * a full one, and picked again when every candidate is backing off. The
 * back-offs here are long (seconds), so the test never races their end. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "upstream/pool.h"

typedef struct {
  tg_endpoint_t *eps[2];
  tg_pool_t pool;
} two_t;

static void two_open(two_t *t, int max_inflight) {
  t->eps[0] = tg_endpoint_get("http://127.0.0.1:1/a", max_inflight);
  t->eps[1] = tg_endpoint_get("http://127.0.0.1:1/b", max_inflight);
  assert_non_null(t->eps[0]);
  assert_non_null(t->eps[1]);
  t->pool.eps = t->eps;
  t->pool.n = 2;
}

static void two_close(two_t *t) {
  tg_endpoint_put(t->eps[0]);
  tg_endpoint_put(t->eps[1]);
}

/* Picks with tried (may be NULL), gives the slot back, returns the index
 * picked or -1 with *why. */
static int pick_once(const two_t *t, const tg_tried_t *tried, int *why) {
  size_t idx = 99;
  tg_endpoint_t *ep = tg_pool_pick(&t->pool, tried, &idx, why);
  if (ep == NULL)
    return -1;
  tg_endpoint_release(ep);
  return (int)idx;
}

static void test_backing_off_is_passed_over(void **state) {
  two_t t;
  int why = -1, i, seen[2] = {0, 0};
  (void)state;

  two_open(&t, 4);
  tg_endpoint_back_off(t.eps[0], 10000);
  assert_true(tg_endpoint_backing_off(t.eps[0]));
  assert_false(tg_endpoint_backing_off(t.eps[1]));
  for (i = 0; i < 8; i++)
    assert_int_equal(pick_once(&t, NULL, &why), 1);
  /* still healthy: only the picks pass it over */
  assert_true(tg_endpoint_healthy(t.eps[0]));
  /* its own word ends it */
  tg_endpoint_back_off(t.eps[0], 0);
  assert_false(tg_endpoint_backing_off(t.eps[0]));
  for (i = 0; i < 8; i++)
    seen[pick_once(&t, NULL, &why)]++;
  assert_true(seen[0] > 0 && seen[1] > 0);
  two_close(&t);
}

static void test_a_full_one_is_waited_for(void **state) {
  two_t t;
  size_t idx = 99;
  int why = -1;
  tg_endpoint_t *held;
  (void)state;

  two_open(&t, 1);
  tg_endpoint_back_off(t.eps[0], 10000);
  held = tg_pool_pick(&t.pool, NULL, &idx, &why);
  assert_ptr_equal(held, t.eps[1]);
  /* the other is full: the request waits for it, not for the one that
   * said it is overloaded */
  assert_int_equal(pick_once(&t, NULL, &why), -1);
  assert_int_equal(why, TG_PICK_SATURATED);
  tg_endpoint_release(held);
  two_close(&t);
}

static void test_every_candidate_backing_off(void **state) {
  two_t t;
  tg_tried_t tried;
  int why = -1, i, seen[2] = {0, 0};
  (void)state;

  two_open(&t, 4);
  tg_endpoint_back_off(t.eps[0], 10000);
  /* a retry that has tried the other: the one backing off is all there is */
  memset(&tried, 0, sizeof(tried));
  tg_tried_add(&tried, 1);
  assert_int_equal(pick_once(&t, &tried, &why), 0);
  /* both backing off: both are picked as before */
  tg_endpoint_back_off(t.eps[1], 10000);
  for (i = 0; i < 8; i++)
    seen[pick_once(&t, NULL, &why)]++;
  assert_true(seen[0] > 0 && seen[1] > 0);
  two_close(&t);
}

/* Error counts of a URL a reload drops come back with it, for the 4,096
 * most recently dropped: a rollout that moves every endpoint each time
 * keeps at most that many, however many URLs went by. */
static void test_saved_error_counts_are_bounded(void **state) {
  char url[64];
  tg_endpoint_t *ep;
  int i;
  (void)state;
  for (i = 0; i < 5000; i++) {
    snprintf(url, sizeof(url), "http://10.0.%d.%d:8000", i / 256, i % 256);
    ep = tg_endpoint_get(url, 1);
    assert_non_null(ep);
    tg_endpoint_error(ep, TG_UPERR_CONNECT);
    if (i % 2)
      tg_endpoint_error(ep, TG_UPERR_STATUS);
    tg_endpoint_put(ep);
    assert_true(tg__endpoint_retired() <= 4096);
  }
  assert_int_equal(tg__endpoint_retired(), 4096);
  /* 1,000th of 5,000 dropped: within the bound, its counts come back */
  ep = tg_endpoint_get("http://10.0.3.233:8000", 1);
  assert_int_equal(tg_endpoint_errors(ep, TG_UPERR_CONNECT), 1);
  assert_int_equal(tg_endpoint_errors(ep, TG_UPERR_STATUS), 1);
  assert_int_equal(tg__endpoint_retired(), 4095);
  tg_endpoint_put(ep);
  /* the first, past the bound: a new series */
  ep = tg_endpoint_get("http://10.0.0.0:8000", 1);
  assert_int_equal(tg_endpoint_errors(ep, TG_UPERR_CONNECT), 0);
  tg_endpoint_put(ep);
  assert_int_equal(tg__endpoint_retired(), 4096);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_backing_off_is_passed_over),
    cmocka_unit_test(test_a_full_one_is_waited_for),
    cmocka_unit_test(test_every_candidate_backing_off),
    cmocka_unit_test(test_saved_error_counts_are_bounded),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
