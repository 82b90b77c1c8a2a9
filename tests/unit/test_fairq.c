/* The fair queue decides which tenant's waiting request reaches a saturated
 * pool next. These tests check the exact order requests leave in: FIFO within
 * a tenant, alternation across tenants of equal weight, shares by priority
 * class weight at any scale, no credit for idling, turns unchanged when
 * virtual time wraps, that cancelling a waiter keeps every other order
 * intact, and that waiters that cannot leave now are passed over. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "sched/fairq.h"

typedef struct {
  tg_fq_waiter_t w;            /* first: a waiter pointer is the item */
  char label[8];
} item_t;

/* Pops every waiter and writes their labels, space separated, into out. */
static void drain(tg_fairq_t *q, char *out, size_t size) {
  size_t n = 0;
  tg_fq_waiter_t *w;
  out[0] = '\0';
  while ((w = tg_fairq_peek(q)) != NULL) {
    item_t *it = (item_t *)w;
    n += (size_t)snprintf(out + n, size - n, "%s%s", n ? " " : "", it->label);
    assert_true(n < size);
    tg_fairq_pop(q);
  }
  assert_int_equal(q->len, 0);
}

static void push(tg_fairq_t *q, item_t *it, const char *tenant, unsigned quantum,
                 const char *label) {
  snprintf(it->label, sizeof(it->label), "%s", label);
  assert_int_equal(tg_fairq_push(q, tenant, quantum, &it->w), 0);
}

/* Pushes n waiters of tenant, labelled with the tenant's first letter and
 * first, first + 1, ... ("h1 h2 ..."), into it[0..n). */
static void push_run(tg_fairq_t *q, item_t *it, const char *tenant, unsigned quantum,
                     int first, int n) {
  for (int i = 0; i < n; i++) {
    char label[8];
    snprintf(label, sizeof(label), "%c%d", tenant[0], first + i);
    push(q, &it[i], tenant, quantum, label);
  }
}

static void test_fifo_within_a_tenant(void **state) {
  tg_fairq_t q;
  item_t it[3];
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  assert_null(tg_fairq_peek(&q));
  push(&q, &it[0], "a", 1, "a1");
  push(&q, &it[1], "a", 1, "a2");
  push(&q, &it[2], "a", 1, "a3");
  assert_int_equal(tg_fairq_tenant_len(&q, "a"), 3);
  assert_int_equal(tg_fairq_tenant_len(&q, "b"), 0);
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "a1 a2 a3");
  tg_fairq_fini(&q);
}

/* A tenant that queued five requests first does not make a second tenant's
 * two wait behind all five. */
static void test_round_robin_across_tenants(void **state) {
  tg_fairq_t q;
  item_t it[7];
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  push(&q, &it[0], "noisy", 1, "n1");
  push(&q, &it[1], "noisy", 1, "n2");
  push(&q, &it[2], "noisy", 1, "n3");
  push(&q, &it[3], "noisy", 1, "n4");
  push(&q, &it[4], "noisy", 1, "n5");
  push(&q, &it[5], "quiet", 1, "q1");
  push(&q, &it[6], "quiet", 1, "q2");
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "n1 q1 n2 q2 n3 n4 n5");
  tg_fairq_fini(&q);
}

/* Weights 2:1 (say high = 1000, medium = 500): two of the heavier tenant's
 * requests leave for each one of the other's. */
static void test_weighted_turns(void **state) {
  tg_fairq_t q;
  item_t it[8];
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  push(&q, &it[0], "hi", 2, "h1");
  push(&q, &it[1], "hi", 2, "h2");
  push(&q, &it[2], "hi", 2, "h3");
  push(&q, &it[3], "hi", 2, "h4");
  push(&q, &it[4], "lo", 1, "l1");
  push(&q, &it[5], "lo", 1, "l2");
  push(&q, &it[6], "lo", 1, "l3");
  push(&q, &it[7], "lo", 1, "l4");
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "h1 l1 h2 h3 l2 h4 l3 l4");
  tg_fairq_fini(&q);
}

/* A cancelled waiter leaves; the rest keep their order, and a tenant whose
 * last waiter is cancelled gives up its turn. */
static void test_remove_keeps_order(void **state) {
  tg_fairq_t q;
  item_t it[5];
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  push(&q, &it[0], "a", 1, "a1");
  push(&q, &it[1], "a", 1, "a2");
  push(&q, &it[2], "b", 1, "b1");
  push(&q, &it[3], "a", 1, "a3");
  push(&q, &it[4], "c", 1, "c1");
  tg_fairq_remove(&q, &it[1].w);   /* a2, in the middle of a's FIFO */
  assert_null(it[1].w.t);
  tg_fairq_remove(&q, &it[2].w);   /* b's only waiter: b leaves the ring */
  tg_fairq_remove(&q, &it[2].w);   /* removing twice is harmless */
  assert_int_equal(q.len, 3);
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "a1 c1 a3");
  /* cancelling the head of the tenant whose turn it is moves the turn on */
  push(&q, &it[0], "a", 1, "a1");
  push(&q, &it[2], "b", 1, "b1");
  tg_fairq_remove(&q, &it[0].w);
  assert_ptr_equal(tg_fairq_peek(&q), &it[2].w);
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "b1");
  tg_fairq_fini(&q);
}

static int skip_labelled_x(tg_fq_waiter_t *w, void *arg) {
  (void)arg;
  return ((item_t *)w)->label[0] == 'x';
}

/* Waiters that cannot leave now (a request back after a failed attempt
 * whose only free endpoint is one it tried) are passed over, not waited
 * behind: the next waiter of their tenant, or the next tenant, leaves in
 * fair order, and those passed over keep their place. */
static void test_skipped_waiters_keep_their_place(void **state) {
  tg_fairq_t q;
  item_t it[5];
  tg_fq_waiter_t *w;
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  push(&q, &it[0], "a", 1, "xa");   /* a's head cannot leave now */
  push(&q, &it[1], "a", 1, "a2");
  push(&q, &it[2], "b", 1, "xb");   /* nor can b's only waiter */
  push(&q, &it[3], "c", 1, "c1");
  push(&q, &it[4], "c", 1, "c2");
  /* a's turn: its second waiter goes instead of its head */
  w = tg_fairq_peek_skip(&q, skip_labelled_x, NULL);
  assert_ptr_equal(w, &it[1].w);
  tg_fairq_serve(&q, w);
  /* a used its turn: c's (b has nothing that can leave) */
  w = tg_fairq_peek_skip(&q, skip_labelled_x, NULL);
  assert_ptr_equal(w, &it[3].w);
  tg_fairq_serve(&q, w);
  w = tg_fairq_peek_skip(&q, skip_labelled_x, NULL);
  assert_ptr_equal(w, &it[4].w);
  tg_fairq_serve(&q, w);
  assert_null(tg_fairq_peek_skip(&q, skip_labelled_x, NULL));
  assert_int_equal(q.len, 2);
  /* once they can leave, the passed-over waiters go in their order */
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "xb xa");
  tg_fairq_fini(&q);
}

/* A tenant that starts waiting mid-way takes the current virtual time: it
 * is served within a turn, not after everyone's backlog. */
static void test_newcomer_joins_the_round(void **state) {
  tg_fairq_t q;
  item_t it[6];
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  push(&q, &it[0], "a", 1, "a1");
  push(&q, &it[1], "a", 1, "a2");
  push(&q, &it[2], "b", 1, "b1");
  push(&q, &it[3], "b", 1, "b2");
  tg_fairq_pop(&q);                 /* a1 served: b's turn */
  push(&q, &it[4], "c", 1, "c1");
  push(&q, &it[5], "c", 1, "c2");
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "b1 c1 a2 b2 c2");
  tg_fairq_fini(&q);
}

/* Being served alone costs nothing later: a, served four times while no one
 * else waited, is charged only for its last request when b arrives (b
 * starts at the current virtual time, not at 0 where it would take four
 * turns before a got one). */
static void test_idling_earns_nothing(void **state) {
  tg_fairq_t q;
  item_t it[8];
  char out[64];
  int i;
  (void)state;
  tg_fairq_init(&q);
  /* a alone for a while: its virtual time runs ahead */
  for (i = 0; i < 4; i++) {
    push(&q, &it[0], "a", 1, "a");
    tg_fairq_pop(&q);
  }
  push(&q, &it[1], "b", 1, "b1");   /* b starts now, not at 0 */
  push(&q, &it[2], "b", 1, "b2");
  push(&q, &it[3], "b", 1, "b3");
  push(&q, &it[4], "a", 1, "a1");
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "b1 b2 a1 b3");
  tg_fairq_fini(&q);
}

/* Only the ratio of weights counts, at any scale up to the largest class
 * value the config takes (10^9, as Kubernetes priority classes): 3:1 gives
 * the same turns as 300,000,000:100,000,000; a heavier weight counts as the
 * largest. */
static void test_shares_keep_their_ratio_at_any_scale(void **state) {
  static const unsigned w[][2] = {{3, 1}, {300000000u, 100000000u},
                                  {TG_FQ_WEIGHT_MAX, TG_FQ_WEIGHT_MAX / 3},
                                  {4000000000u, TG_FQ_WEIGHT_MAX / 3}};
  size_t k;
  (void)state;
  for (k = 0; k < sizeof(w) / sizeof(w[0]); k++) {
    tg_fairq_t q;
    item_t it[8];
    char out[64];
    tg_fairq_init(&q);
    push_run(&q, &it[0], "hi", w[k][0], 1, 4);
    push_run(&q, &it[4], "lo", w[k][1], 1, 4);
    drain(&q, out, sizeof(out));
    assert_string_equal(out, "h1 l1 h2 h3 h4 l2 l3 l4");
    tg_fairq_fini(&q);
  }
}

/* Virtual time wraps around (a weight-1 tenant after 2^14 requests served):
 * turns go on as before. Here the queue has served until its virtual time
 * is about to wrap; a is served once across the wrap, then a and b alternate
 * from b's turn, as they would anywhere else. */
static void test_virtual_time_wraps(void **state) {
  tg_fairq_t q;
  item_t it[7];
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  q.vnow = UINT64_MAX - 1000;
  push(&q, &it[0], "a", 1, "a1");
  tg_fairq_pop(&q);                  /* a's virtual time wraps past 0 */
  push_run(&q, &it[1], "a", 1, 2, 3);
  push_run(&q, &it[4], "b", 1, 1, 3);
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "b1 a2 b2 a3 b3 a4");
  tg_fairq_fini(&q);
}

/* a and b take turns; x, served once, then idles until a and b's turns
 * have passed its virtual time. Pruned or not, the queue gives the same
 * turns after, with x back. prune: whether to prune before x returns. */
static void rounds_with_x(tg_fairq_t *q, int prune, char *out, size_t size) {
  item_t it[16];
  tg_fairq_init(q);
  push(q, &it[0], "x", 1, "x0");
  tg_fairq_pop(q);
  push_run(q, &it[1], "a", 1, 1, 3);
  push_run(q, &it[4], "b", 1, 1, 3);
  drain(q, out, size);
  assert_int_equal(q->n_tenants, 3);
  if (prune) {
    /* x's time is behind the queue's: it goes; a and b are one turn ahead
     * (back now, they would wait that turn): they stay */
    assert_int_equal(tg_fairq_prune(q, NULL, NULL), 1);
    assert_int_equal(q->n_tenants, 2);
    assert_int_equal(tg_fairq_tenant_len(q, "x"), 0);
  }
  push_run(q, &it[7], "a", 1, 4, 2);
  push_run(q, &it[9], "x", 1, 1, 2);
  push_run(q, &it[11], "b", 1, 4, 2);
  drain(q, out, size);
  tg_fairq_fini(q);
}

/* A tenant node whose virtual time the queue has passed is freed, and that
 * changes no turn: the tenant, back, starts at the current time either
 * way. */
static void test_prune_frees_what_no_turn_needs(void **state) {
  tg_fairq_t q;
  char kept[64], pruned[64];
  (void)state;
  rounds_with_x(&q, 0, kept, sizeof(kept));
  rounds_with_x(&q, 1, pruned, sizeof(pruned));
  assert_string_equal(pruned, kept);
  assert_string_equal(pruned, "x1 a4 x2 b4 a5 b5");
}

static int gone_if_listed(const char *tenant, void *arg) {
  return strstr(arg, tenant) != NULL;
}

/* A tenant the config no longer has goes even while its time is ahead,
 * but never while one of its requests waits: that one is still served. */
static void test_prune_frees_gone_tenants_once_they_stop_waiting(void **state) {
  tg_fairq_t q;
  item_t it[8];
  char out[64];
  (void)state;
  tg_fairq_init(&q);
  push(&q, &it[0], "a", 1, "a1");
  push(&q, &it[1], "b", 1, "b1");
  push(&q, &it[2], "b", 1, "b2");
  tg_fairq_pop(&q);                          /* a1: a is now ahead */
  assert_int_equal(tg_fairq_prune(&q, NULL, NULL), 0);
  assert_int_equal(tg_fairq_prune(&q, gone_if_listed, "a b"), 1);  /* a, not b */
  assert_int_equal(q.n_tenants, 1);
  assert_int_equal(tg_fairq_tenant_len(&q, "b"), 2);
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "b1 b2");
  assert_int_equal(tg_fairq_prune(&q, gone_if_listed, "a b"), 1);
  assert_int_equal(q.n_tenants, 0);
  /* a tenant back after being pruned waits and leaves like a new one */
  push(&q, &it[3], "a", 1, "a2");
  push(&q, &it[4], "c", 1, "c1");
  drain(&q, out, sizeof(out));
  assert_string_equal(out, "a2 c1");
  tg_fairq_fini(&q);
}

/* Tenants that come and go (a reload at a time): pruning keeps the nodes to
 * the few the turns still need, not one per tenant ever seen. */
static void test_prune_bounds_the_tenants_kept(void **state) {
  tg_fairq_t q;
  item_t it[2];
  char name[16];
  int i;
  (void)state;
  tg_fairq_init(&q);
  for (i = 0; i < 10000; i++) {
    snprintf(name, sizeof(name), "t%d", i);
    push(&q, &it[0], name, 1, "t");
    push(&q, &it[1], "steady", 1, "s");
    tg_fairq_pop(&q);
    tg_fairq_pop(&q);
    tg_fairq_prune(&q, NULL, NULL);
    assert_true(q.n_tenants <= 3);
  }
  tg_fairq_fini(&q);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fifo_within_a_tenant),
      cmocka_unit_test(test_round_robin_across_tenants),
      cmocka_unit_test(test_weighted_turns),
      cmocka_unit_test(test_remove_keeps_order),
      cmocka_unit_test(test_skipped_waiters_keep_their_place),
      cmocka_unit_test(test_newcomer_joins_the_round),
      cmocka_unit_test(test_idling_earns_nothing),
      cmocka_unit_test(test_shares_keep_their_ratio_at_any_scale),
      cmocka_unit_test(test_virtual_time_wraps),
      cmocka_unit_test(test_prune_frees_what_no_turn_needs),
      cmocka_unit_test(test_prune_frees_gone_tenants_once_they_stop_waiting),
      cmocka_unit_test(test_prune_bounds_the_tenants_kept),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
