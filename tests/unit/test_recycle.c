/* The per-loop recycle of same-size blocks (src/core/recycle.c): blocks
 * come back in last-freed-first order, at most the recycle's max are kept,
 * clearing frees them all (the sanitizer's leak check would see a miss),
 * and under AddressSanitizer a kept block is poisoned, so a use after free
 * of a recycled call is still caught. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/recycle.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

static void test_reuse_lifo(void **state) {
  tg_recycle_t r;
  void *a, *b, *c;
  (void)state;

  tg_recycle_init(&r, 3000, 4);
  a = tg_recycle_alloc(&r);
  b = tg_recycle_alloc(&r);
  assert_non_null(a);
  assert_non_null(b);
  assert_ptr_not_equal(a, b);
  memset(a, 0xAB, 3000);       /* the whole size is usable */
  memset(b, 0xCD, 3000);
  tg_recycle_free(&r, a);
  tg_recycle_free(&r, b);
  tg_recycle_free(&r, NULL);   /* ignored */
  assert_int_equal(r.n, 2);
  c = tg_recycle_alloc(&r);
  assert_ptr_equal(c, b);
  assert_ptr_equal(tg_recycle_alloc(&r), a);
  assert_int_equal(r.n, 0);
  tg_recycle_free(&r, a);
  tg_recycle_free(&r, c);
  tg_recycle_clear(&r);
  assert_int_equal(r.n, 0);
}

#define MAX 100

static void test_bounded(void **state) {
  void *blocks[MAX + 10];
  tg_recycle_t r;
  (void)state;

  tg_recycle_init(&r, 64, MAX);
  for (int i = 0; i < MAX + 10; i++)
    assert_non_null(blocks[i] = tg_recycle_alloc(&r));
  for (int i = 0; i < MAX + 10; i++)
    tg_recycle_free(&r, blocks[i]);
  /* the ten past the bound went back to the C library */
  assert_int_equal(r.n, MAX);
  /* and the kept ones come back, last freed first */
  for (int i = MAX - 1; i >= 0; i--)
    assert_ptr_equal(tg_recycle_alloc(&r), blocks[i]);
  assert_int_equal(r.n, 0);
  for (int i = 0; i < MAX; i++)
    tg_recycle_free(&r, blocks[i]);
  tg_recycle_clear(&r);
  assert_int_equal(r.n, 0);
  /* still usable after a clear */
  blocks[0] = tg_recycle_alloc(&r);
  assert_non_null(blocks[0]);
  tg_recycle_free(&r, blocks[0]);
  tg_recycle_clear(&r);
}

static void test_kept_blocks_poisoned(void **state) {
#if defined(__SANITIZE_ADDRESS__)
  tg_recycle_t r;
  char *p;
  (void)state;

  tg_recycle_init(&r, 256, 4);
  p = tg_recycle_alloc(&r);
  assert_int_equal(__asan_address_is_poisoned(p), 0);
  assert_int_equal(__asan_address_is_poisoned(p + 255), 0);
  tg_recycle_free(&r, p);
  /* the whole block, the bytes that link the kept ones included */
  assert_int_equal(__asan_address_is_poisoned(p), 1);
  assert_int_equal(__asan_address_is_poisoned(p + 255), 1);
  assert_ptr_equal(tg_recycle_alloc(&r), p);
  assert_int_equal(__asan_address_is_poisoned(p + 128), 0);
  p[255] = 1;
  tg_recycle_free(&r, p);
  tg_recycle_clear(&r);
#else
  (void)state;
  skip();
#endif
}

static void test_tiny_blocks(void **state) {
  tg_recycle_t r;
  void *a, *b;
  (void)state;

  tg_recycle_init(&r, 1, 4);   /* room for the link anyway */
  assert_true(r.size >= sizeof(void *));
  a = tg_recycle_alloc(&r);
  b = tg_recycle_alloc(&r);
  tg_recycle_free(&r, a);
  tg_recycle_free(&r, b);
  assert_ptr_equal(tg_recycle_alloc(&r), b);
  assert_ptr_equal(tg_recycle_alloc(&r), a);
  free(a);
  free(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_reuse_lifo),
    cmocka_unit_test(test_bounded),
    cmocka_unit_test(test_kept_blocks_poisoned),
    cmocka_unit_test(test_tiny_blocks),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
