/* Strict JSON reading (src/core/json.c): what cJSON alone would let through
 * and the request path must not (a key twice, \u0000, invalid UTF-8,
 * control bytes, text after the value), and what must still pass. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/json.h"

static cJSON *parse(const char *text, int whole, tg_json_err_t *err) {
  return tg_json_parse(text, strlen(text), whole, err);
}

static void refused(const char *text, const char *why_part) {
  tg_json_err_t err = {NULL, 0};
  cJSON *v = parse(text, 1, &err);
  if (v != NULL)
    fail_msg("accepted: %s", text);
  assert_non_null(err.why);
  if (strstr(err.why, why_part) == NULL)
    fail_msg("%s: refused for '%s', expected '%s'", text, err.why, why_part);
}

static void accepted(const char *text) {
  tg_json_err_t err = {NULL, 0};
  cJSON *v = parse(text, 1, &err);
  if (v == NULL)
    fail_msg("refused (%s at %zu): %s", err.why, err.at, text);
  cJSON_Delete(v);
}

static void test_duplicate_keys_refused_at_any_depth(void **state) {
  char big[2048];
  size_t n = 0;
  (void)state;

  refused("{\"model\":\"a\",\"model\":\"b\"}", "key twice");
  refused("{\"messages\":[{\"role\":\"user\",\"content\":\"a\",\"content\":\"b\"}]}", "key twice");
  refused("{\"a\":{\"b\":{\"c\":1,\"c\":1}}}", "key twice");
  refused("[[{\"x\":1,\"y\":2,\"x\":3}]]", "key twice");
  /* keys differing in case or by an escape are different keys */
  accepted("{\"model\":\"a\",\"Model\":\"b\"}");
  accepted("{\"a\":1,\"b\":{\"a\":2},\"c\":[{\"a\":3}]}");
  /* \u0061 is "a": the same key written another way */
  refused("{\"a\":1,\"\\u0061\":2}", "key twice");

  /* a large object goes through the sorted check */
  n += (size_t)snprintf(big + n, sizeof(big) - n, "{");
  for (int i = 0; i < 40; i++)
    n += (size_t)snprintf(big + n, sizeof(big) - n, "%s\"k%d\":%d", i ? "," : "", i, i);
  snprintf(big + n, sizeof(big) - n, "}");
  accepted(big);
  big[n] = '\0';
  snprintf(big + n, sizeof(big) - n, ",\"k17\":0}");
  refused(big, "key twice");
}

static void test_nul_escape_refused(void **state) {
  cJSON *v;
  (void)state;

  refused("{\"model\":\"llama\\u0000evil\"}", "\\u0000");
  refused("{\"mod\\u0000el\":\"x\"}", "\\u0000");
  /* an escaped backslash followed by u0000 is text, not a NUL */
  v = parse("{\"a\":\"x\\\\u0000\"}", 1, NULL);
  assert_non_null(v);
  assert_string_equal(cJSON_GetObjectItemCaseSensitive(v, "a")->valuestring, "x\\u0000");
  cJSON_Delete(v);
  refused("{\"a\":\"x\\\\\\u0000\"}", "\\u0000");
  accepted("{\"a\":\"\\u0001\\u00e9\"}");
}

static void test_utf8(void **state) {
  cJSON *v;
  (void)state;

  accepted("{\"a\":\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf\"}");
  refused("{\"a\":\"\xc0\x80\"}", "UTF-8");          /* overlong NUL */
  refused("{\"a\":\"\xc1\xbf\"}", "UTF-8");          /* overlong */
  refused("{\"a\":\"\xe0\x9f\xbf\"}", "UTF-8");      /* overlong 3-byte */
  refused("{\"a\":\"\xed\xa0\x80\"}", "UTF-8");      /* surrogate */
  refused("{\"a\":\"\xf0\x8f\xbf\xbf\"}", "UTF-8");  /* overlong 4-byte */
  refused("{\"a\":\"\xf4\x90\x80\x80\"}", "UTF-8");  /* past U+10FFFF */
  refused("{\"a\":\"\xf5\x80\x80\x80\"}", "UTF-8");
  refused("{\"a\":\"\x80\"}", "UTF-8");              /* lone continuation */
  refused("{\"a\":\"\xe2\x82\"}", "UTF-8");          /* cut short */
  refused("{\"a\":\"\xff\"}", "UTF-8");
  /* a sequence cut by the end of the text */
  assert_int_equal(tg_json_check_text("ab\xe2\x82", 4, NULL), -1);
  assert_int_equal(tg_json_check_text("ab\xe2\x82\xac", 5, NULL), 0);
  /* the reason points at the offending byte */
  {
    tg_json_err_t err;
    assert_int_equal(tg_json_check_text("abc\xff", 4, &err), -1);
    assert_int_equal(err.at, 3);
  }
  v = parse("\"\xf0\x9f\x98\x80\"", 1, NULL);
  assert_non_null(v);
  assert_int_equal(strlen(v->valuestring), 4);
  cJSON_Delete(v);
}

static void test_control_bytes_and_syntax(void **state) {
  (void)state;
  refused("{\"a\":\"x\x01y\"}", "control");
  refused("{\"a\":1}\x7f", "text after");
  refused("{\"a\":1} x", "text after");
  refused("{\"a\":1,}", "syntax");
  refused("{\"a\" 1}", "syntax");
  refused("{", "syntax");
  refused("", "empty");
  refused("[1,2", "syntax");
  accepted(" \t\r\n{\"a\":[1,2.5,-3e2,true,false,null,\"s\"]} \n\t\r ");
  accepted("{\"a\":\"tab\\tnl\\n\"}");
}

static void test_prefix_mode(void **state) {
  const char *text = "{\"prompt_tokens\":7,\"completion_tokens\":9}},\"x\":1}";
  tg_json_err_t err;
  cJSON *v;
  int64_t n;
  (void)state;

  v = tg_json_parse(text, strlen(text), 0, &err);
  assert_non_null(v);
  assert_true(tg_json_int(tg_json_get(v, "prompt_tokens"), &n));
  assert_int_equal(n, 7);
  assert_true(tg_json_int(tg_json_get(v, "completion_tokens"), &n));
  assert_int_equal(n, 9);
  cJSON_Delete(v);
  assert_null(tg_json_parse(text, strlen(text), 1, &err));
  /* the rest is still checked as text */
  assert_null(tg_json_parse("{\"a\":1}\xff", 8, 0, &err));
}

static void test_integers(void **state) {
  cJSON *v = parse("{\"a\":16,\"b\":16.5,\"c\":-3,\"d\":9007199254740992,"
                   "\"e\":1e300,\"f\":\"16\",\"g\":2.0,\"h\":18446744073709551616}",
                   1, NULL);
  int64_t n = 0;
  (void)state;

  assert_non_null(v);
  assert_true(tg_json_int(tg_json_get(v, "a"), &n));
  assert_int_equal(n, 16);
  assert_false(tg_json_int(tg_json_get(v, "b"), &n));
  assert_true(tg_json_int(tg_json_get(v, "c"), &n));
  assert_int_equal(n, -3);
  assert_true(tg_json_int(tg_json_get(v, "d"), &n));
  assert_int_equal(n, INT64_C(9007199254740992));
  assert_false(tg_json_int(tg_json_get(v, "e"), &n));
  assert_false(tg_json_int(tg_json_get(v, "f"), &n));
  assert_true(tg_json_int(tg_json_get(v, "g"), &n));
  assert_int_equal(n, 2);
  assert_false(tg_json_int(tg_json_get(v, "h"), &n));
  assert_false(tg_json_int(tg_json_get(v, "missing"), &n));
  /* tg_json_get on a non-object is NULL, not a crash */
  assert_null(tg_json_get(tg_json_get(v, "a"), "x"));
  assert_null(tg_json_get(NULL, "x"));
  cJSON_Delete(v);
}

static void test_deep_nesting_bounded(void **state) {
  static char deep[40001];
  (void)state;
  /* far past cJSON's nesting limit: refused, without exhausting the stack */
  memset(deep, '[', 20000);
  memset(deep + 20000, ']', 20000);
  deep[40000] = '\0';
  refused(deep, "syntax");
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_duplicate_keys_refused_at_any_depth),
    cmocka_unit_test(test_nul_escape_refused),
    cmocka_unit_test(test_utf8),
    cmocka_unit_test(test_control_bytes_and_syntax),
    cmocka_unit_test(test_prefix_mode),
    cmocka_unit_test(test_integers),
    cmocka_unit_test(test_deep_nesting_bounded),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
