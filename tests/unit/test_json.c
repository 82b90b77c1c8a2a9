/* Strict JSON reading (src/core/json.c): what cJSON alone would let through
 * and the request path must not (a key twice, \u0000, invalid UTF-8,
 * control bytes, text after the value), and what must still pass. */
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "api/api.h"
#include "core/err.h"
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
  tg_json_free(v);
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
  tg_json_free(v);
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
  tg_json_free(v);
}

/* tg_json_quote: what it writes is JSON whatever the bytes: quotes,
 * backslashes and control bytes escaped, UTF-8 kept, any byte that is not
 * part of a UTF-8 character (a client's bytes, a message cut inside a
 * character) written as U+FFFD. */
static void test_quote_always_json(void **state) {
  static const struct {
    const char *in, *out;
  } cases[] = {
      {"plain", "\"plain\""},
      {"q\"b\\\n", "\"q\\\"b\\\\\\u000a\""},
      {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""},
      {"a\xff" "b", "\"a\\ufffdb\""},
      {"cut\xc3", "\"cut\\ufffd\""},
      {"cut\xe2\x82", "\"cut\\ufffd\\ufffd\""},
      {"\xed\xa0\x80", "\"\\ufffd\\ufffd\\ufffd\""},       /* a surrogate */
      {"\xc0\xaf", "\"\\ufffd\\ufffd\""},                     /* overlong '/' */
      {"\xf4\x90\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\""}, /* past U+10FFFF */
  };
  char buf[128];
  (void)state;

  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    int n = tg_json_quote(buf, sizeof(buf), cases[i].in);
    if (n < 0 || strcmp(buf, cases[i].out) != 0)
      fail_msg("case %zu: %d [%s]", i, n, n < 0 ? "" : buf);
    assert_int_equal(tg_json_check_text(buf, (size_t)n, NULL), 0);
  }
  assert_int_equal(tg_json_quote(buf, 4, "abcdef"), TG_ETOOBIG);
}

/* tg_json_quote_cut: a value longer than its room keeps its beginning, cut
 * between characters, never inside an escape or a UTF-8 character, and
 * the literal is still closed and JSON; one that fits is as tg_json_quote
 * writes it. */
static void test_quote_cut_keeps_the_beginning(void **state) {
  static const struct {
    const char *in;
    size_t size;
    const char *out;
  } cases[] = {
      {"abcdef", 5, "\"ab\""},
      {"abcdef", 9, "\"abcdef\""},
      {"a\\b", 5, "\"a\""},                 /* not "a\" */
      {"a\x01", 8, "\"a\""},                 /* not half of \u0001 */
      {"ab\xe2\x82\xac", 7, "\"ab\""},       /* not half of the euro sign */
      {"ab\xe2\x82\xac", 8, "\"ab\xe2\x82\xac\""},
      {"x\xff", 8, "\"x\""},                 /* not half of \ufffd */
  };
  char buf[64];
  (void)state;

  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    int n = tg_json_quote_cut(buf, cases[i].size, cases[i].in);
    if (n < 0 || strcmp(buf, cases[i].out) != 0)
      fail_msg("case %zu: %d [%s]", i, n, n < 0 ? "" : buf);
    assert_true((size_t)n < cases[i].size);
    assert_int_equal(tg_json_check_text(buf, (size_t)n, NULL), 0);
  }
  assert_int_equal(tg_json_quote_cut(buf, 2, "a"), TG_ETOOBIG);
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

/* The text check reads printable ASCII eight bytes at a time: whatever it
 * must refuse is found at every position of a long text and at every
 * alignment, and reported at its own byte. */
static void test_check_text_every_position(void **state) {
  static const struct {
    const char *bad;
    size_t at;     /* offset of the reported byte within bad */
    const char *why;
  } cases[] = {
    {"\x01", 0, "control"}, {"\x1f", 0, "control"}, {"\x80", 0, "UTF-8"},
    {"\xff", 0, "UTF-8"}, {"\xc3(", 0, "UTF-8"}, {"\xed\xa0\x80", 0, "UTF-8"},
    {"\\u0000", 0, "\\u0000"}, {"\\\\\\u0000", 2, "\\u0000"},
  };
  char text[96];
  tg_json_err_t err;
  (void)state;

  for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
    size_t bl = strlen(cases[c].bad);
    for (size_t pos = 0; pos + bl <= 64; pos++) {
      memset(text, 'a', sizeof(text));
      memcpy(text + pos, cases[c].bad, bl);
      err.why = NULL;
      if (tg_json_check_text(text, 64, &err) == 0)
        fail_msg("case %zu at %zu: accepted", c, pos);
      assert_int_equal(err.at, pos + cases[c].at);
      assert_non_null(strstr(err.why, cases[c].why));
    }
  }
  /* valid text of every length and alignment: escapes, tabs, UTF-8 */
  for (size_t off = 0; off < 8; off++)
    for (size_t n = 0; n + off <= 80; n++) {
      memset(text, 'b', sizeof(text));
      memcpy(text + 10, "\\\\u0000\t\xc3\xa9\\n", 12);
      if (n + off > 22 && tg_json_check_text(text + off, n, NULL) != 0)
        fail_msg("refused a valid text of %zu bytes at offset %zu", n, off);
    }
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
  tg_json_free(v);
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
  tg_json_free(v);
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

/* {"v":N,"s":"N","a":[N,{"k":N}]}: a small body whose values tell trees
 * apart. */
static cJSON *small(int n) {
  char text[128];
  snprintf(text, sizeof(text), "{\"v\":%d,\"s\":\"%d\",\"a\":[%d,{\"k\":%d}]}",
           n, n, n, n);
  return parse(text, 1, NULL);
}

/* 1 when t is small(n), read back whole. */
static int is_small(const cJSON *t, int n) {
  char s[16];
  int64_t v, k;
  const cJSON *a = tg_json_get(t, "a");
  snprintf(s, sizeof(s), "%d", n);
  return tg_json_int(tg_json_get(t, "v"), &v) && v == n &&
         cJSON_IsString(tg_json_get(t, "s")) &&
         strcmp(tg_json_get(t, "s")->valuestring, s) == 0 &&
         cJSON_GetArraySize(a) == 2 &&
         tg_json_int(cJSON_GetArrayItem(a, 0), &v) && v == n &&
         tg_json_int(tg_json_get(cJSON_GetArrayItem(a, 1), "k"), &k) && k == n;
}

static void test_arena_reused(void **state) {
  cJSON *t;
  (void)state;

  tg_json_init();
  for (int i = 0; i < 1000; i++) {
    t = small(i);
    assert_non_null(t);
    /* the tree, its nodes and its strings come from the arena */
    assert_true(tg__json_in_arena(t));
    assert_true(tg__json_in_arena(tg_json_get(t, "a")->child->next));
    assert_true(tg__json_in_arena(tg_json_get(t, "s")->valuestring));
    assert_true(is_small(t, i));
    tg_json_free(t);
  }
  /* a refused text (syntax, a key twice) leaves the arena free for the next */
  assert_null(parse("{\"a\":[1,2,{\"b\":", 1, NULL));
  assert_null(parse("{\"a\":{\"b\":1,\"b\":2}}", 1, NULL));
  assert_null(parse("[1] x", 1, NULL));
  t = small(7);
  assert_true(tg__json_in_arena(t));
  tg_json_free(t);
}

/* A tree larger than the arena: what does not fit comes from the heap, all
 * of it reads back, and freeing it frees the heap part (the sanitizer's leak
 * check sees a miss). */
static void test_arena_spills_to_heap(void **state) {
  size_t cap = 64 * 1024, n = 0;
  char *text = malloc(cap);
  int count = 2000, in = 0, out = 0;
  cJSON *t, *e;
  (void)state;

  assert_non_null(text);
  n += (size_t)snprintf(text + n, cap - n, "[");
  for (int i = 0; i < count; i++)
    n += (size_t)snprintf(text + n, cap - n, "%s{\"key%d\":\"value %d\"}",
                          i ? "," : "", i, i);
  n += (size_t)snprintf(text + n, cap - n, "]");
  assert_true(n < cap - 1);
  t = tg_json_parse(text, n, 1, NULL);
  assert_non_null(t);
  assert_int_equal(cJSON_GetArraySize(t), count);
  int i = 0;
  cJSON_ArrayForEach(e, t) {
    char k[16], v[24];
    snprintf(k, sizeof(k), "key%d", i);
    snprintf(v, sizeof(v), "value %d", i);
    assert_string_equal(e->child->string, k);
    assert_string_equal(e->child->valuestring, v);
    if (tg__json_in_arena(e->child->valuestring))
      in++;
    else
      out++;
    i++;
  }
  assert_true(in > 0);
  assert_true(out > 0);
  tg_json_free(t);
  free(text);
  t = small(3);
  assert_true(tg__json_in_arena(t));
  tg_json_free(t);
}

/* While one arena tree lives, a second parse takes the heap, and freeing the
 * second does not free the arena under the first. */
static void test_arena_one_tree_at_a_time(void **state) {
  cJSON *x, *y, *z;
  (void)state;

  x = small(1);
  assert_true(tg__json_in_arena(x));
  y = small(2);
  assert_false(tg__json_in_arena(y));
  assert_false(tg__json_in_arena(tg_json_get(y, "a")->child));
  tg_json_free(y);
  z = small(3);                 /* would overwrite x if y had reset the arena */
  assert_false(tg__json_in_arena(z));
  assert_true(is_small(x, 1));
  assert_true(is_small(z, 3));
  tg_json_free(z);
  tg_json_free(x);
  x = small(4);
  assert_true(tg__json_in_arena(x));
  tg_json_free(x);
}

static void *parse_many(void *arg) {
  int base = *(int *)arg;
  for (int i = 0; i < 20000; i++) {
    cJSON *t = small(base + i);
    if (t == NULL || !tg__json_in_arena(t) || !is_small(t, base + i))
      return "a tree read back wrong";
    tg_json_free(t);
  }
  return NULL;
}

/* Each thread has its own arena: trees parsed at once on several threads,
 * and one kept on this thread meanwhile, all read back as parsed. */
static void test_arena_per_thread(void **state) {
  pthread_t th[3];
  int base[3] = {100000, 200000, 300000};
  cJSON *mine = small(42);
  void *res;
  (void)state;

  assert_true(tg__json_in_arena(mine));
  for (int i = 0; i < 3; i++)
    assert_int_equal(pthread_create(&th[i], NULL, parse_many, &base[i]), 0);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(pthread_join(th[i], &res), 0);
    if (res != NULL)
      fail_msg("%s", (const char *)res);
  }
  assert_true(is_small(mine, 42));
  tg_json_free(mine);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_duplicate_keys_refused_at_any_depth),
    cmocka_unit_test(test_nul_escape_refused),
    cmocka_unit_test(test_utf8),
    cmocka_unit_test(test_quote_always_json),
    cmocka_unit_test(test_quote_cut_keeps_the_beginning),
    cmocka_unit_test(test_control_bytes_and_syntax),
    cmocka_unit_test(test_check_text_every_position),
    cmocka_unit_test(test_prefix_mode),
    cmocka_unit_test(test_integers),
    cmocka_unit_test(test_deep_nesting_bounded),
    cmocka_unit_test(test_arena_reused),
    cmocka_unit_test(test_arena_spills_to_heap),
    cmocka_unit_test(test_arena_one_tree_at_a_time),
    cmocka_unit_test(test_arena_per_thread),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
