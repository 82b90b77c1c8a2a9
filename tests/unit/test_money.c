/* Exact money: decimal text to nano-USD without floats, per-1K prices to
 * nano-USD per token, formatting, and saturating cost. The values here are
 * the ones an invoice shows, so every assertion is on an exact integer or
 * an exact string. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/err.h"
#include "core/money.h"

static tg_nano_t usd(const char *text) {
  tg_nano_t v = -1;
  assert_int_equal(tg_money_parse_usd(text, &v), 0);
  return v;
}

static tg_nano_t per_1k(const char *text) {
  tg_nano_t v = -1;
  assert_int_equal(tg_money_parse_per_1k(text, &v), 0);
  return v;
}

static void test_parse_usd_exact(void **state) {
  (void)state;
  assert_int_equal(usd("500.00"), INT64_C(500000000000));
  assert_int_equal(usd("10000.00"), INT64_C(10000000000000));
  assert_int_equal(usd("500"), INT64_C(500000000000));
  assert_int_equal(usd("0"), 0);
  assert_int_equal(usd("0.0"), 0);
  assert_int_equal(usd("0.000000001"), 1);
  assert_int_equal(usd("1.234500000"), INT64_C(1234500000));
  assert_int_equal(usd("0.1"), INT64_C(100000000));
  assert_int_equal(usd("007.5"), INT64_C(7500000000));
  /* Digits beyond the ninth are fine when they change nothing. */
  assert_int_equal(usd("1.5000000000000"), INT64_C(1500000000));
  /* The largest amount an int64 of nano-USD can hold. */
  assert_int_equal(usd("9223372036.854775807"), INT64_MAX);
}

static void test_parse_usd_rejects(void **state) {
  (void)state;
  tg_nano_t v = 42;
  const char *bad[] = {"",      ".",     "-1",     "+1",    "1e3",  "1E3",
                       " 1",    "1 ",    "1,000",  "$5",    ".5",   "5.",
                       "1.2.3", "0x10",  "1_000",  "nan",   "inf",  "1.0a",
                       /* ten fractional digits, the tenth not zero */
                       "0.0000000001", "1.2345678901"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    v = 42;
    int rc = tg_money_parse_usd(bad[i], &v);
    if (rc != TG_EPARSE)
      fail_msg("'%s': expected TG_EPARSE, got %d", bad[i], rc);
    assert_int_equal(v, 42); /* untouched on failure */
  }
  assert_int_equal(tg_money_parse_usd(NULL, &v), TG_EINVAL);
}

static void test_parse_usd_overflow(void **state) {
  (void)state;
  tg_nano_t v = 42;
  assert_int_equal(tg_money_parse_usd("9223372036.854775808", &v), TG_ETOOBIG);
  assert_int_equal(tg_money_parse_usd("9223372037", &v), TG_ETOOBIG);
  assert_int_equal(tg_money_parse_usd("99999999999999999999999999", &v),
                   TG_ETOOBIG);
  /* Syntax errors win over size. */
  assert_int_equal(tg_money_parse_usd("99999999999999999999999999x", &v),
                   TG_EPARSE);
  assert_int_equal(v, 42);
}

static void test_parse_per_1k_seed_rates(void **state) {
  (void)state;
  /* model-costs.yaml of the seed: every rate is whole nano-USD per token. */
  assert_int_equal(per_1k("0.004"), 4000);
  assert_int_equal(per_1k("0.012"), 12000);
  assert_int_equal(per_1k("0.0005"), 500);
  assert_int_equal(per_1k("0.0015"), 1500);
  assert_int_equal(per_1k("0.0001"), 100);
  assert_int_equal(per_1k("0.0"), 0);
  assert_int_equal(per_1k("0.001"), 1000);
  assert_int_equal(per_1k("0.003"), 3000);
  assert_int_equal(per_1k("0.000001"), 1); /* the smallest price there is */
  assert_int_equal(per_1k("15"), 15000000);
  assert_int_equal(per_1k("0.00050000"), 500);
}

static void test_parse_per_1k_rejects(void **state) {
  (void)state;
  tg_nano_t v = 42;
  /* 0.0000001 USD per 1K tokens is a tenth of a nano-USD per token. */
  assert_int_equal(tg_money_parse_per_1k("0.0000001", &v), TG_EPARSE);
  assert_int_equal(tg_money_parse_per_1k("0.0000015", &v), TG_EPARSE);
  assert_int_equal(tg_money_parse_per_1k("1e-3", &v), TG_EPARSE);
  assert_int_equal(tg_money_parse_per_1k("-0.001", &v), TG_EPARSE);
  assert_int_equal(tg_money_parse_per_1k("", &v), TG_EPARSE);
  assert_int_equal(tg_money_parse_per_1k(".", &v), TG_EPARSE);
  assert_int_equal(tg_money_parse_per_1k("9223372036854.775808", &v),
                   TG_ETOOBIG);
  assert_int_equal(v, 42);
  assert_int_equal(per_1k("9223372036854.775807"), INT64_MAX);
}

static void test_format_usd(void **state) {
  (void)state;
  char buf[32];
  assert_int_equal(tg_money_format_usd(INT64_C(1234500000), buf, sizeof buf),
                   11);
  assert_string_equal(buf, "1.234500000");
  tg_money_format_usd(0, buf, sizeof buf);
  assert_string_equal(buf, "0.000000000");
  tg_money_format_usd(INT64_C(12000000500), buf, sizeof buf);
  assert_string_equal(buf, "12.000000500");
  tg_money_format_usd(-1, buf, sizeof buf);
  assert_string_equal(buf, "-0.000000001");
  tg_money_format_usd(INT64_C(-500000000000), buf, sizeof buf);
  assert_string_equal(buf, "-500.000000000");
  tg_money_format_usd(INT64_MAX, buf, sizeof buf);
  assert_string_equal(buf, "9223372036.854775807");
  tg_money_format_usd(INT64_MIN, buf, sizeof buf);
  assert_string_equal(buf, "-9223372036.854775808");

  /* Round trip through the parser. */
  tg_nano_t back = 0;
  tg_money_format_usd(INT64_C(987654321012), buf, sizeof buf);
  assert_int_equal(tg_money_parse_usd(buf, &back), 0);
  assert_int_equal(back, INT64_C(987654321012));

  /* Too small a buffer: an error, never a truncated amount passed off as
   * whole. "1.234500000" needs 12 bytes with its terminator. */
  char small[11];
  assert_int_equal(tg_money_format_usd(INT64_C(1234500000), small,
                                       sizeof small),
                   TG_ETOOBIG);
  assert_int_equal(tg_money_format_usd(1, small, 0), TG_EINVAL);
}

static void test_cost(void **state) {
  (void)state;
  /* 1234 prompt tokens of llama-3.1-70b at 0.004 USD per 1K. */
  assert_int_equal(tg_money_cost(1234, 4000), INT64_C(4936000));
  assert_int_equal(tg_money_cost(0, 4000), 0);
  assert_int_equal(tg_money_cost(1000000, 0), 0);
  /* Saturates instead of wrapping to a negative bill. */
  assert_int_equal(tg_money_cost(INT64_MAX / 2, 3), INT64_MAX);
  assert_int_equal(tg_money_cost(INT64_MAX, INT64_MAX), INT64_MAX);
  assert_int_equal(tg_money_cost(-INT64_MAX, 2), INT64_MIN);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse_usd_exact),
      cmocka_unit_test(test_parse_usd_rejects),
      cmocka_unit_test(test_parse_usd_overflow),
      cmocka_unit_test(test_parse_per_1k_seed_rates),
      cmocka_unit_test(test_parse_per_1k_rejects),
      cmocka_unit_test(test_format_usd),
      cmocka_unit_test(test_cost),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
