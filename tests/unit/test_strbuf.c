/* The request path's text builder (src/core/strbuf.h): the same text as
 * printf for every number it writes, and a bound that is never crossed. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/strbuf.h"

static const int64_t samples[] = {
  0, 1, -1, 9, 10, 99, 100, 12345, -12345, 999999999, 1000000000,
  INT64_C(4294967295), INT64_C(4294967296), INT64_C(9007199254740993),
  INT64_MAX, INT64_MIN, INT64_MIN + 1,
};

static void test_numbers_as_printf(void **state) {
  char got[64], want[64];
  tg_sb_t b;
  (void)state;

  for (size_t i = 0; i < sizeof(samples) / sizeof(samples[0]); i++) {
    int64_t v = samples[i];
    tg_sb_init(&b, got, sizeof(got));
    tg_sb_puti(&b, v);
    snprintf(want, sizeof(want), "%" PRId64, v);
    assert_string_equal(got, want);
    assert_int_equal(b.len, strlen(want));

    tg_sb_init(&b, got, sizeof(got));
    tg_sb_putu(&b, (uint64_t)v);
    snprintf(want, sizeof(want), "%" PRIu64, (uint64_t)v);
    assert_string_equal(got, want);

    for (int width = 0; width <= 16; width++) {
      tg_sb_init(&b, got, sizeof(got));
      tg_sb_puthex(&b, (uint64_t)v, width);
      snprintf(want, sizeof(want), "%0*" PRIx64, width, (uint64_t)v);
      assert_string_equal(got, want);
    }
  }
}

static void test_bound_is_kept(void **state) {
  char buf[16];
  tg_sb_t b;
  (void)state;

  memset(buf, 'x', sizeof(buf));
  tg_sb_init(&b, buf, 8);
  tg_sb_lit(&b, "abc");
  tg_sb_puti(&b, 1234);          /* 7 characters: fits with its NUL */
  assert_false(b.err);
  assert_string_equal(buf, "abc1234");
  tg_sb_lit(&b, "d");            /* one more does not */
  assert_true(b.err);
  assert_string_equal(buf, "abc1234");
  tg_sb_lit(&b, "");             /* nothing more after a failure */
  assert_true(b.err);
  assert_int_equal(buf[8], 'x'); /* never past cap */

  tg_sb_init(&b, buf, 1);
  assert_false(b.err);
  assert_string_equal(buf, "");
  tg_sb_putu(&b, 5);
  assert_true(b.err);
  assert_string_equal(buf, "");

  tg_sb_init(&b, buf, 0);        /* no room even for the NUL */
  assert_true(b.err);
}

static void test_copy_as_snprintf(void **state) {
  static const char *const texts[] = {"", "a", "abcdef", "abcdefg", "abcdefgh", "abcdefghijklmno"};
  char got[16], want[16];
  (void)state;

  for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
    for (size_t size = 1; size <= 9; size++) {
      int n;
      memset(got, 'x', sizeof(got));
      memset(want, 'x', sizeof(want));
      n = snprintf(want, size, "%s", texts[i]);
      assert_int_equal(tg_str_copy(got, size, texts[i]),
                       (size_t)n < size ? (size_t)n : size - 1);
      assert_memory_equal(got, want, sizeof(got)); /* and nothing past size */
    }
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_numbers_as_printf),
    cmocka_unit_test(test_bound_is_kept),
    cmocka_unit_test(test_copy_as_snprintf),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
