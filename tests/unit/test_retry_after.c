/* The Retry-After catcher of the upstream clients (src/upstream/retry_after.c):
 * which values are relayed, whatever pieces the header comes in, and a
 * bound no value crosses. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "upstream/retry_after.h"

#define DATE "Wed, 21 Oct 2015 07:28:00 GMT"

/* What a head of the given header lines ("Name: value\r\n") relays. */
static const char *caught(tg_retry_after_t *ra, const char *const *lines) {
  tg_retry_after_reset(ra);
  for (; *lines != NULL; lines++)
    tg_retry_after_line(ra, *lines, strlen(*lines));
  return tg_retry_after_get(ra);
}

static const char *one(tg_retry_after_t *ra, const char *line) {
  const char *lines[] = {"Content-Type: application/json\r\n", line, "Content-Length: 2\r\n",
                         "\r\n", NULL};
  return caught(ra, lines);
}

static void test_values_relayed_and_dropped(void **state) {
  static const char *const good[][2] = {
    {"Retry-After: 7\r\n", "7"},
    {"retry-after:0\r\n", "0"},
    {"RETRY-AFTER: \t 2147483648 \t\r\n", "2147483648"},
    {"Retry-After: " DATE "\r\n", DATE},
    {"Retry-After: Sun, 06 Nov 1994 08:49:37 GMT         \r\n", "Sun, 06 Nov 1994 08:49:37 GMT"},
  };
  static const char *const bad[] = {
    "Retry-After: 12345678901\r\n", "Retry-After: -1\r\n", "Retry-After: +5\r\n",
    "Retry-After: 1.5\r\n", "Retry-After: soon\r\n", "Retry-After:\r\n", "Retry-After:  \r\n",
    "Retry-After: 1 2\r\n",
    "Retry-After: Wed, 21 Oct 2015 07:28:00 UTC\r\n",
    "Retry-After: wed, 21 Oct 2015 07:28:00 GMT\r\n",
    "Retry-After: Wed, 21 Okt 2015 07:28:00 GMT\r\n",
    "Retry-After: Wed, 21 Oct 2015 7:28:00 GMT\r\n",
    "Retry-After: Wednesday, 21-Oct-15 07:28:00 GMT\r\n",  /* rfc850-date */
    "Retry-After: Wed Oct 21 07:28:00 2015\r\n",            /* asctime-date */
    "Retry-After: " DATE ", soon\r\n",
    "Retry-After: " DATE "x\r\n",
    "Retry-After-Ms: 7\r\n", "X-Retry-After: 7\r\n", "Retry-Afte: 7\r\n",
    "HTTP/1.1 503 Retry-After: 7\r\n",
  };
  tg_retry_after_t ra;
  size_t i;
  (void)state;

  for (i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
    const char *v = one(&ra, good[i][0]);
    assert_non_null(v);
    assert_string_equal(v, good[i][1]);
  }
  for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    if (one(&ra, bad[i]) != NULL)
      fail_msg("relayed from %s", bad[i]);
  }
}

static void test_two_fields_and_a_new_head(void **state) {
  const char *two[] = {"Retry-After: 1\r\n", "Retry-After: 1\r\n", NULL};
  const char *spoilt_then_good[] = {"Retry-After: soon\r\n", "Retry-After: 1\r\n", NULL};
  tg_retry_after_t ra;
  (void)state;

  /* Retry-After is no list: two of them say nothing relayable */
  assert_null(caught(&ra, two));
  assert_null(caught(&ra, spoilt_then_good));
  /* a 1xx head's field is forgotten with it */
  tg_retry_after_reset(&ra);
  tg_retry_after_line(&ra, "Retry-After: 5\r\n", 16);
  tg_retry_after_reset(&ra);
  assert_null(tg_retry_after_get(&ra));
  tg_retry_after_line(&ra, "Retry-After: 6\r\n", 16);
  assert_string_equal(tg_retry_after_get(&ra), "6");
}

/* A field given in two pieces of name and two of value, cut at every
 * point, is read as the whole line is. */
static void test_pieces_read_as_whole(void **state) {
  static const char *const fields[][2] = {
    {"Retry-After", " " DATE " "}, {"rEtRy-aFtEr", "120"}, {"Retry-After", "12x"},
    {"Retry-Afterx", "1"}, {"Retry", "1"}, {"Retry-After", "  1234567890123456789012345678  9"},
  };
  tg_retry_after_t whole, cut;
  char line[128];
  size_t f, i, j;
  (void)state;

  for (f = 0; f < sizeof(fields) / sizeof(fields[0]); f++) {
    const char *name = fields[f][0], *value = fields[f][1], *want;
    size_t nl = strlen(name), vl = strlen(value);
    snprintf(line, sizeof(line), "%s:%s\r\n", name, value);
    tg_retry_after_reset(&whole);
    tg_retry_after_line(&whole, line, strlen(line));
    want = tg_retry_after_get(&whole);
    for (i = 0; i <= nl; i++) {
      for (j = 0; j <= vl; j++) {
        const char *got;
        tg_retry_after_reset(&cut);
        tg_retry_after_name(&cut, name, i);
        tg_retry_after_name(&cut, name + i, nl - i);
        tg_retry_after_name_end(&cut);
        tg_retry_after_value(&cut, value, j);
        tg_retry_after_value(&cut, value + j, vl - j);
        tg_retry_after_value_end(&cut);
        got = tg_retry_after_get(&cut);
        if (want == NULL)
          assert_null(got);
        else
          assert_string_equal(got, want);
      }
    }
  }
}

/* However long the value, no more than TG_RETRY_AFTER_MAX bytes of it are
 * kept (ASan sees any write past the object), and it is dropped. */
static void test_bound_is_kept(void **state) {
  char line[600];
  tg_retry_after_t ra;
  size_t n;
  (void)state;

  for (n = 1; n < 500; n += 7) {
    memcpy(line, "Retry-After: ", 13);
    memset(line + 13, '9', n);
    memcpy(line + 13 + n, "\r\n", 2);
    tg_retry_after_reset(&ra);
    tg_retry_after_line(&ra, line, 13 + n + 2);
    if (n <= 10)
      assert_int_equal(strlen(tg_retry_after_get(&ra)), n);
    else
      assert_null(tg_retry_after_get(&ra));
    assert_true(ra.len <= TG_RETRY_AFTER_MAX);
  }
}

/* The wait a value asks for, which the gateway keeps its endpoint out of
 * picks for: seconds as they are, a date from now (none once past), and
 * nothing for text that is no value. */
static void test_wait_of_a_value(void **state) {
  /* DATE is 1445412480 s after the epoch */
  const int64_t at = INT64_C(1445412480000);
  (void)state;
  assert_int_equal(tg_retry_after_wait_ms("7", at), 7000);
  assert_int_equal(tg_retry_after_wait_ms("0", at), 0);
  assert_int_equal(tg_retry_after_wait_ms("9999999999", at), INT64_C(9999999999000));
  assert_int_equal(tg_retry_after_wait_ms(DATE, at - 2500), 2500);
  assert_int_equal(tg_retry_after_wait_ms(DATE, at), 0);
  assert_int_equal(tg_retry_after_wait_ms(DATE, at + 1), 0);
  assert_int_equal(tg_retry_after_wait_ms("Sun, 06 Nov 1994 08:49:37 GMT", 0),
                   INT64_C(784111777000));
  assert_int_equal(tg_retry_after_wait_ms("Thu, 29 Feb 2024 23:59:59 GMT", 0),
                   INT64_C(1709251199000));
  assert_int_equal(tg_retry_after_wait_ms(NULL, at), -1);
  assert_int_equal(tg_retry_after_wait_ms("", at), -1);
  assert_int_equal(tg_retry_after_wait_ms("soon", at), -1);
  assert_int_equal(tg_retry_after_wait_ms("12345678901", at), -1);
  assert_int_equal(tg_retry_after_wait_ms("Wed, 21 Oct 2015 07:28:00 UTC", at), -1);
  assert_int_equal(tg_retry_after_wait_ms("Wed, 21 Okt 2015 07:28:00 GMT", at), -1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_values_relayed_and_dropped),
    cmocka_unit_test(test_two_fields_and_a_new_head),
    cmocka_unit_test(test_pieces_read_as_whole),
    cmocka_unit_test(test_bound_is_kept),
    cmocka_unit_test(test_wait_of_a_value),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
