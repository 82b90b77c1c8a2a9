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
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "api/sse.h"
#include "core/err.h"
#include "core/json.h"

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

/* Lone CR line ends (the SSE format allows them): whole events however the
 * bytes are cut, and each passed on as soon as its blank line's CR is in,
 * not held for the next event. */
static void test_split_lone_cr(void **state) {
  const char *s = "data: {\"a\":1}\r\rdata: {\"b\":2}\r\r: ping\r\rdata: [DONE]\r\r";
  const size_t first = strlen("data: {\"a\":1}\r\r");
  size_t i, n = strlen(s), cut;
  tg_sse_t p;
  collect_t c;
  (void)state;

  memset(&c, 0, sizeof(c));
  tg_sse_init(&p, 1024);
  for (i = 0; i < n; i++) {
    assert_int_equal(tg_sse_feed(&p, s + i, 1, collect, &c), 0);
    if (i + 1 == first)
      assert_int_equal(c.n, 1); /* out at its last CR */
  }
  assert_int_equal(c.n, 4);
  assert_int_equal(c.lens[0], first);
  assert_memory_equal(c.joined, s, n);
  assert_int_equal(tg_sse_pending(&p), 0);
  tg_sse_free(&p);

  for (cut = 0; cut <= n; cut++) {
    memset(&c, 0, sizeof(c));
    tg_sse_init(&p, 1024);
    assert_int_equal(tg_sse_feed(&p, s, cut, collect, &c), 0);
    assert_int_equal(tg_sse_feed(&p, s + cut, n - cut, collect, &c), 0);
    assert_int_equal(c.n, 4);
    assert_int_equal(c.lens[0], first);
    assert_memory_equal(c.joined, s, n);
    tg_sse_free(&p);
  }
}

/* With CRLF line ends, a blank line's CR that arrives alone waits for its LF:
 * the event goes out whole, not with its last byte split off. */
static void test_split_crlf_waits_for_lf(void **state) {
  tg_sse_t p;
  collect_t c;
  (void)state;
  memset(&c, 0, sizeof(c));
  tg_sse_init(&p, 1024);
  assert_int_equal(tg_sse_feed(&p, "data: {}\r\n\r", 11, collect, &c), 0);
  assert_int_equal(c.n, 0);
  assert_int_equal(tg_sse_feed(&p, "\n", 1, collect, &c), 0);
  assert_int_equal(c.n, 1);
  assert_int_equal(c.lens[0], 12);
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

/* The bound is each event's, wherever reads cut: an event of exactly the
 * bound passes even when the read that ends it carries the next event too,
 * and one byte more is refused even within a single read. */
static void test_event_bound_is_per_event(void **state) {
  char ev[256 + 100 + 257];
  tg_sse_t p;
  collect_t c;
  (void)state;
  memset(ev, 'a', sizeof(ev));
  memcpy(ev, "data: ", 6);
  memcpy(ev + 254, "\n\n", 2);            /* event 1: 256 bytes */
  memcpy(ev + 256, "data: ", 6);
  memcpy(ev + 354, "\n\n", 2);            /* event 2: 100 bytes */
  memcpy(ev + 356, "data: ", 6);
  memcpy(ev + 611, "\n\n", 2);            /* event 3: 257 bytes */
  memset(&c, 0, sizeof(c));
  tg_sse_init(&p, 256);
  assert_int_equal(tg_sse_feed(&p, ev, 200, collect, &c), 0);
  assert_int_equal(tg_sse_feed(&p, ev + 200, 156, collect, &c), 0);
  assert_int_equal(c.n, 2);
  assert_int_equal(tg_sse_pending(&p), 0);
  assert_int_equal(tg_sse_feed(&p, ev + 356, 257, collect, &c), TG_ETOOBIG);
  assert_int_equal(c.n, 2);
  assert_int_equal(tg_sse_pending(&p), 0);
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

/* ev is an include_usage chunk (no choices) whose usage reads as
 * (prompt, completion), or as none when has_usage is 0. */
static void check_usage_chunk(const char *ev, int has_usage, int64_t prompt, int64_t completion) {
  tg_sse_info_t i;
  assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), 0);
  assert_int_equal(i.has_usage, has_usage);
  assert_true(i.usage_only);
  assert_int_equal(i.prompt_tokens, prompt);
  assert_int_equal(i.completion_tokens, completion);
}

/* An event of several data lines is read as the SSE format joins them
 * (with LF): an upstream that pretty-prints its usage chunk is billed its
 * usage, and the chunk is still the include_usage one the client may not
 * get. Read from its first line alone, it was no usage at all. */
static void test_inspect_joins_data_lines(void **state) {
  static const char *const evs[] = {
      "data: {\"choices\": [],\ndata:   \"usage\": {\"prompt_tokens\": 7,\ndata: "
      "\"completion_tokens\": 40}}\n\n",
      "data:{\"choices\":[],\r\ndata:\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":40}}\r\n\r\n",
      "id: 3\ndata: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":7,\"completion_tokens\":40}}\n\n",
  };
  tg_sse_info_t i;
  (void)state;
  for (size_t k = 0; k < sizeof evs / sizeof evs[0]; k++)
    check_usage_chunk(evs[k], 1, 7, 40);
  /* content over two lines is content; two empty data lines are no JSON */
  {
    const char *ev = "data: {\"choices\":\ndata: [{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
    assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), 0);
    assert_true(i.has_choices);
    assert_false(i.has_usage);
    ev = "data:\ndata:\n\n";
    assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), TG_EPARSE);
  }
}

/* vLLM opens each choice of a chat stream with a chunk that announces the
 * role and carries no content: a stream cut without usage is counted a
 * token an event, and that event is none, with the empty members its
 * peers write beside the role as null, "", [] or {} too (OpenAI's
 * "refusal", SGLang's every field, an empty "tool_calls" list). One that
 * carries text, a tool call or anything else besides its role is content,
 * and so is one whose role is null. */
static void test_inspect_tells_the_role_chunk(void **state) {
  static const char *const role_only[] = {
      "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
      "\"logprobs\":null,\"finish_reason\":null}]}\n\n",
      "data: {\"choices\":[{\"index\":1,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
      "data: {\"choices\":[{\"delta\":{\"content\":null,\"role\":\"assistant\"}}]}\n\n",
      /* OpenAI's, and SGLang's (every field of its delta, unset ones null) */
      "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
      "\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
      "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
      "\"reasoning_content\":null,\"tool_calls\":null},\"logprobs\":null,\"finish_reason\":null,"
      "\"matched_stop\":null}],\"usage\":null}\n\n",
      /* every empty form beside the role: "", [], {} as null */
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"tool_calls\":[]}}]}\n\n",
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[ ],"
      "\"reasoning_content\":null,\"reasoning\":\"\",\"function_call\":{}}}]}\n\n",
  };
  static const char *const content[] = {
      "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n",
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\" \"}}]}\n\n",
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"content\":\"x\"}}]}\n\n",
      /* a tool call beside the role, its arguments a string or an object */
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,"
      "\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,"
      "\"function\":{\"arguments\":{\"a\":1}}}]}}]}\n\n",
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}},{\"delta\":{\"content\":\"a\"}}]}\n\n",
      "data: {\"choices\":[{\"delta\":{\"content\":\"the role\"}}]}\n\n",
      "data: {\"choices\":[{\"text\":\"\\\"role\\\"\"}]}\n\n",
      "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\" oops\n\n",
      /* SGLang's tokens and its closing event: a null role announces nothing */
      "data: {\"choices\":[{\"delta\":{\"role\":null,\"content\":null,\"reasoning_content\":\"2\","
      "\"tool_calls\":null}}],\"usage\":null}\n\n",
      "data: {\"choices\":[{\"delta\":{\"role\":null,\"content\":null,\"reasoning_content\":null,"
      "\"tool_calls\":null},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"refusal\":\"No.\"}}]}\n\n",
  };
  tg_sse_info_t i;
  (void)state;
  for (size_t k = 0; k < sizeof role_only / sizeof role_only[0]; k++) {
    assert_int_equal(tg_sse_inspect(role_only[k], strlen(role_only[k]), &i), 0);
    assert_true(i.has_choices);
    assert_true(i.role_only);
  }
  for (size_t k = 0; k < sizeof content / sizeof content[0]; k++) {
    (void)tg_sse_inspect(content[k], strlen(content[k]), &i);
    assert_true(i.has_choices);
    assert_false(i.role_only);
  }
  /* the role chunk with a usage riding on it (continuous usage) is both */
  {
    const char *ev = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],"
                     "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":0}}\n\n";
    assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), 0);
    assert_true(i.role_only && i.has_usage);
  }
}

/* An upstream asked for usage may write "usage": null on every chunk;
 * a client that did not ask gets the chunk without it. Only the member
 * that ends an object the strict parser took is found, and cutting it
 * out leaves that object without it. */
static void test_inspect_finds_a_trailing_null_usage(void **state) {
  static const struct {
    const char *ev, *cut; /* cut: the event without the member, or NULL */
  } cases[] = {
    {"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
     "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n"},
    /* Python's separators, CRLF lines, no space after "data:" */
    {"data:{\"choices\": [{\"delta\": {\"role\": \"assistant\"}}], \"usage\" : null }\r\n\r\n",
     "data:{\"choices\": [{\"delta\": {\"role\": \"assistant\"}}]}\r\n\r\n"},
    {"data: {\"a\":\",\",\"usage\":null}\n\n", "data: {\"a\":\",\"}\n\n"},
    /* not the object's own last member, or not null: left alone */
    {"data: {\"usage\":null,\"choices\":[{\"text\":\"a\"}]}\n\n", NULL},
    {"data: {\"choices\":[{\"delta\":{\"content\":\"a\",\"usage\":null}}]}\n\n", NULL},
    {"data: {\"choices\":[{\"text\":\"a\"}],\"x\\\"usage\":null}\n\n", NULL},
    {"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":0}}\n\n", NULL},
    {"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":nul}\n\n", NULL},
    {"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null,\"usage\":null}\n\n", NULL},
    /* an event of two data lines is relayed as it came */
    {"data: {\"choices\":[{\"text\":\"a\"}],\n" "data: \"usage\":null}\n\n", NULL},
  };
  tg_sse_info_t i;
  char out[256];
  (void)state;

  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    const char *ev = cases[k].ev;
    size_t len = strlen(ev);
    (void)tg_sse_inspect(ev, len, &i);
    if (cases[k].cut == NULL) {
      if (i.null_usage_len != 0)
        fail_msg("case %zu: a member found in %s", k, ev);
      continue;
    }
    assert_true(i.null_usage_len > 0 && i.null_usage_at + i.null_usage_len < len);
    memcpy(out, ev, i.null_usage_at);
    memcpy(out + i.null_usage_at, ev + i.null_usage_at + i.null_usage_len,
           len - i.null_usage_at - i.null_usage_len);
    out[len - i.null_usage_len] = '\0';
    assert_string_equal(out, cases[k].cut);
  }
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
  /* a stream's usage without completion_tokens is no usage (the stream is
   * counted instead), and still the include_usage chunk */
  check_usage_chunk("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n", 0, 0, 0);
  /* "usage": null (OpenAI sends it on chunks when include_usage is set) */
  {
    const char *ev = "data: {\"choices\":[{\"index\":0}],\"usage\":null}\n\n";
    assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), 0);
    assert_false(i.has_usage);
  }
  /* a content chunk the strict parser refuses (a NUL the model wrote) is
   * content, "usage": null on it or not: an upstream that puts one on
   * every chunk had such chunks uncounted */
  {
    static const char *const evs[] = {
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\u0000\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\u0000\"}}]}\n\n",
    };
    for (size_t k = 0; k < sizeof evs / sizeof evs[0]; k++) {
      (void)tg_sse_inspect(evs[k], strlen(evs[k]), &i); /* parsed or scanned */
      assert_true(i.has_choices);
      assert_false(i.has_usage || i.usage_only);
    }
  }
  /* garbage data is reported, comments are not */
  assert_int_equal(tg_sse_inspect("data: not json\n\n", 16, &i), TG_EPARSE);
  assert_int_equal(tg_sse_inspect("data: \"usage\" oops\n\n", 20, &i), TG_EPARSE);
  assert_int_equal(tg_sse_inspect(": keep-alive\n\n", 14, &i), 0);
  assert_false(i.done || i.has_usage || i.has_choices);

  /* the data field is the line that starts with "data:": a comment or
   * another field that mentions it is not */
  {
    const char *ev = ": data: proxy note\r\nid: data:7\r\ndata: {\"choices\":[],"
                     "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}\r\n\r\n";
    assert_int_equal(tg_sse_inspect(ev, strlen(ev), &i), 0);
    assert_true(i.has_usage && i.usage_only);
    assert_int_equal(i.prompt_tokens, 5);
    assert_int_equal(i.completion_tokens, 6);
    assert_int_equal(tg_sse_inspect(": data: [DONE]\n\n", 16, &i), 0);
    assert_false(i.done || i.has_usage || i.has_choices);
  }

  /* every line end the format allows ends the data line */
  {
    static const char *const ends[] = {"\n\n", "\r\n\r\n", "\r\r"};
    char ev[256];
    for (size_t k = 0; k < 3; k++) {
      int n = snprintf(ev, sizeof(ev), "data: [DONE]%s", ends[k]);
      assert_int_equal(tg_sse_inspect(ev, (size_t)n, &i), 0);
      assert_true(i.done);
      n = snprintf(ev, sizeof(ev),
                   "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,"
                   "\"completion_tokens\":6}}%s", ends[k]);
      assert_int_equal(tg_sse_inspect(ev, (size_t)n, &i), 0);
      assert_true(i.has_usage && i.usage_only);
      assert_int_equal(i.prompt_tokens, 5);
      assert_int_equal(i.completion_tokens, 6);
    }
  }
}

/* What the strict parser says of a usage text: the reference that
 * tg_usage_read_text must match whatever the text. */
static int usage_ref(const char *t, size_t n, int64_t *pt, int64_t *ct) {
  cJSON *u = tg_json_parse(t, n, 0, NULL);
  int r = tg_usage_read(u, pt, ct);
  tg_json_free(u);
  return r;
}

static void same_as_parser(const char *t, size_t n) {
  int64_t p1 = -1, c1 = -1, p2 = -1, c2 = -1;
  int r1 = tg_usage_read_text(t, n, &p1, &c1), r2 = usage_ref(t, n, &p2, &c2);
  if (r1 != r2 || (r1 && (p1 != p2 || c1 != c2)))
    fail_msg("usage text [%.*s]: read %d (%lld, %lld), parser %d (%lld, %lld)",
             (int)n, t, r1, (long long)p1, (long long)c1, r2, (long long)p2,
             (long long)c2);
}

static void test_usage_text(void **state) {
  static const struct {
    const char *text;
    int r;
    int64_t pt, ct;
  } cases[] = {
    {"{\"prompt_tokens\":7,\"completion_tokens\":16,\"total_tokens\":23}}", 1, 7, 16},
    {" {\n \"completion_tokens\" : 0 ,\t\"prompt_tokens\":\r12 } ", 1, 12, 0},
    {"{\"prompt_tokens\":5,\"total_tokens\":5,\"prompt_tokens_details\":null}", 1, 5, -1},
    {"{\"prompt_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":3}}", 1, 5, -1},
    /* TG_USAGE_TOKENS_MAX: a figure past a billion tokens makes the usage none */
    {"{\"prompt_tokens\":1000000000,\"completion_tokens\":1000000000}", 1, 1000000000,
     1000000000},
    {"{\"prompt_tokens\":1000000001,\"completion_tokens\":1}", 0, 0, 0},
    {"{\"prompt_tokens\":7,\"completion_tokens\":1000000001}", 0, 0, 0},
    {"{\"prompt_tokens\":999999999999999,\"completion_tokens\":1}", 0, 0, 0},
    /* found by fuzz_json: digits past what int64 holds are never summed */
    {"{\"prompt_tokens\":177777777777777777777777777777777,\"completion_tokens\":2}", 0, 0, 0},
    {"{\"prompt_tokens\":7,\"completion_tokens\":1777777777777777777777}", 1, 7, -1},
    {"{\"prompt_tokens\":9007199254740992}", 0, 0, 0},
    {"{\"prompt_tokens\":9007199254740993}", 0, 0, 0},
    {"{\"prompt_tokens\":2.0,\"completion_tokens\":1e1}", 1, 2, 10},
    {"{\"prompt_tokens\":016}", 1, 16, -1},     /* cJSON reads it; so do we */
    {"{\"prompt\\u005ftokens\":4}", 1, 4, -1},   /* an escaped key is the key */
    {"{\"prompt_tokens\":3,\"completion_tokens\":-2}", 1, 3, -1},
    {"{\"prompt_tokens\":1,\"prompt_tokens\":2}", 0, 0, 0},   /* a key twice */
    {"{\"a\":1,\"completion_tokens\":1,\"a\":1,\"prompt_tokens\":1}", 0, 0, 0},
    {"{\"prompt_tokens\":-1}", 0, 0, 0},
    {"{\"prompt_tokens\":null,\"completion_tokens\":3}", 0, 0, 0},
    {"{\"prompt_tokens\":\"7\"}", 0, 0, 0},
    {"{\"prompt_tokens\":16.5}", 0, 0, 0},
    {"{\"prompt_tokens\":7,}", 0, 0, 0},
    {"{\"prompt_tokens\":7", 0, 0, 0},
    {"{\"prompt_tokens\":7}\xff", 0, 0, 0},       /* the rest is checked as text */
    {"{\"prompt_tokens\":7}\x01", 0, 0, 0},
    {"{\"prompt_tokens\"\x01:7}", 0, 0, 0},
    {"{}", 0, 0, 0},
    {"null", 0, 0, 0},
    {"[7]", 0, 0, 0},
    {"", 0, 0, 0},
  };
  (void)state;

  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    int64_t pt = -1, ct = -1;
    size_t n = strlen(cases[i].text);
    int r = tg_usage_read_text(cases[i].text, n, &pt, &ct);
    if (r != cases[i].r || (r && (pt != cases[i].pt || ct != cases[i].ct)))
      fail_msg("case %zu [%s]: %d (%lld, %lld)", i, cases[i].text, r,
               (long long)pt, (long long)ct);
    same_as_parser(cases[i].text, n);
    for (size_t cut = 0; cut < n; cut++)   /* every prefix, too */
      same_as_parser(cases[i].text, cut);
  }
}

/* The generated text of a whole answer: every place a model writes text,
 * counted in bytes after JSON unescaping; an answer the strict parser
 * refuses, or one past the walk's bound, counts its own length. */
static void test_answer_text_bytes(void **state) {
  static const struct {
    const char *text;
    int64_t bytes;
  } cases[] = {
    /* completions: each choice's text */
    {"{\"choices\":[{\"text\":\"tok0 tok1\"},{\"text\":\"ab\"}],\"usage\":null}", 11},
    /* chat: content, refusal, reasoning, tool and function calls */
    {"{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":\"hi\","
     "\"refusal\":\"no\",\"reasoning_content\":\"why\",\"function_call\":"
     "{\"name\":\"f\",\"arguments\":\"{}\"},\"tool_calls\":[{\"id\":\"call_9\","
     "\"function\":{\"name\":\"get\",\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}", 20},
    /* reasoning under vLLM's name; under both names, once when the same */
    {"{\"choices\":[{\"message\":{\"content\":\"ok\",\"reasoning\":\"hmm\"}}]}", 5},
    {"{\"choices\":[{\"message\":{\"reasoning\":\"hmm\",\"reasoning_content\":\"hmm\"}}]}", 3},
    {"{\"choices\":[{\"message\":{\"reasoning\":\"hmm\",\"reasoning_content\":\"hm\"}}]}", 5},
    /* content parts, escapes and multi-byte text: bytes, not characters */
    {"{\"choices\":[{\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"\\u00e9\\n\"},"
     "\"\xe2\x9c\x93\",7]}}]}", 6},
    /* arguments written as JSON itself, not in a string (TGI): the
     * object's length as compact text, the same as the string holding it */
    {"{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"0\","
     "\"type\":\"function\",\"function\":{\"description\":null,\"name\":\"get_weather\","
     "\"arguments\":{\"location\":\"Brooklyn, NY\",\"format\":\"celsius\"}}}]}}]}", 11 + 46},
    {"{\"choices\":[{\"message\":{\"function_call\":{\"name\":\"f\","
     "\"arguments\":{\"a\":[1,2.5,-3e-07,true,false,null],\"b\":\"x\\ny\\\"\xc3\xa9""\\t\\u0001\",\"c\":{}}}}}]}", 1 + 66},
    {"{\"choices\":[{\"message\":{\"function_call\":{\"name\":\"f\","
     "\"arguments\":\"{\\\"a\\\":[1,2.5,-3e-07,true,false,null],\\\"b\\\":\\\"x\\\\ny\\\\\\\"\xc3\xa9""\\\\t\\\\u0001\\\",\\\"c\\\":{}}\"}}}]}", 1 + 66},
    {"{\"choices\":[{\"message\":{\"tool_calls\":[{\"function\":{\"name\":\"g\",\"arguments\":[7,\"a\"]}},"
     "{\"function\":{\"name\":\"h\",\"arguments\":null}},{\"function\":{\"name\":\"i\",\"arguments\":{}}}]}}]}", 1 + 7 + 1 + 1 + 2},
    /* null content and no choices count nothing */
    {"{\"choices\":[{\"message\":{\"content\":null}}]}", 0},
    {"{\"id\":\"x\"}", 0},
    /* refused by the strict parser (a key twice): the whole length */
    {"{\"choices\":[],\"choices\":[]}", 27},
    {"{\"choices\":[{\"text\":\"\xff\"}]}", 26},
  };
  char *big;
  (void)state;

  for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
    int64_t n = tg_answer_text_bytes(cases[k].text, strlen(cases[k].text));
    if (n != cases[k].bytes)
      fail_msg("case %zu [%s]: %lld bytes", k, cases[k].text, (long long)n);
  }
  /* one byte past the bound is not parsed: its length, not its text */
  big = test_malloc(TG_ANSWER_WALK_MAX + 2);
  memset(big, ' ', TG_ANSWER_WALK_MAX + 1);
  memcpy(big, "{\"choices\":[{\"text\":\"ab\"}]}", 27);
  assert_int_equal(tg_answer_text_bytes(big, TG_ANSWER_WALK_MAX), 2);
  assert_int_equal(tg_answer_text_bytes(big, TG_ANSWER_WALK_MAX + 1), TG_ANSWER_WALK_MAX + 1);
  test_free(big);
}

static uint32_t rnd(uint32_t *seed, size_t n) {
  *seed = *seed * 1103515245u + 12345u;
  return (*seed >> 16) % (uint32_t)n;
}

/* Many texts assembled from the pieces upstreams send and the ones they
 * should not: the one-pass reading and the strict parser always agree. */
/* Feeds text to a fresh scanner in pieces of `step` bytes (0: whole) and
 * returns the offset of the object's closing brace in the whole text, or
 * the text's length when no piece closed it. */
static size_t ascan_run(tg_ascan_t *sc, const char *text, size_t step) {
  size_t len = strlen(text), off = 0, closed = len;
  tg_ascan_init(sc);
  if (step == 0)
    step = len ? len : 1;
  while (off < len) {
    size_t n = len - off < step ? len - off : step;
    size_t r = tg_ascan_feed(sc, text + off, n);
    if (r < n)
      closed = off + r;
    off += n;
  }
  return closed;
}

static void test_answer_scan(void **state) {
  static const struct {
    const char *text;
    int whole;           /* one JSON object */
    const char *usage;   /* the usage text kept, or NULL */
  } cases[] = {
    {"{\"data\":[[1,2.5e-3,-3]],\"usage\":{\"prompt_tokens\":7,\"total_tokens\":7}}", 1,
     "{\"prompt_tokens\":7,\"total_tokens\":7}"},
    /* whitespace around; usage a scalar; the last top-level usage counts */
    {" \r\n{ \"usage\" : null , \"usage\":{\"a\":1} }\n", 1, "{\"a\":1}"},
    {"{\"usage\":{\"a\":1},\"usage\":null}", 1, "null"},
    {"{\"usage\": 12 }", 1, "12 "},
    /* a "usage" inside a value, in a string, or as a value is not the member */
    {"{\"choices\":[{\"usage\":{\"x\":1}}],\"id\":\"\\\"usage\\\":{}\"}", 1, NULL},
    {"{\"id\":\"usage\",\"x\":\"usage\"}", 1, NULL},
    {"{\"usagex\":{},\"usag\":{}}", 1, NULL},
    /* a key written with escapes is not "usage", whatever it spells */
    {"{\"usage\\\"\":{\"a\":1}}", 1, NULL},
    {"{\"u\\\\sage\":{\"a\":1},\"usage\\n\":2}", 1, NULL},
    {"{\"us\\u0061ge\":{\"a\":1}}", 1, NULL},
    /* braces and quotes inside strings do not nest */
    {"{\"t\":\"}{][\\\"\",\"usage\":{\"s\":\"}\"}}", 1, "{\"s\":\"}\"}"},
    /* not one object */
    {"[1,2]", 0, NULL},
    {"{\"a\":1} x", 0, NULL},
    {"{\"a\":1}{}", 0, NULL},
    {"{\"a\":\"open}", 0, NULL},
    {"{\"a\":{\"b\":1}", 0, NULL},
    {"{\"a\":[1]]", 0, NULL},
    {"", 0, NULL},
    {"null", 0, NULL},
  };
  static const size_t steps[] = {0, 1, 2, 3, 7};
  (void)state;

  for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++)
    for (size_t j = 0; j < sizeof(steps) / sizeof(steps[0]); j++) {
      tg_ascan_t sc;
      const char *t = cases[k].text;
      size_t closed = ascan_run(&sc, t, steps[j]), ulen = 0;
      const char *u = tg_ascan_usage(&sc, &ulen);
      if (tg_ascan_whole(&sc) != cases[k].whole)
        fail_msg("case %zu step %zu [%s]: whole %d", k, steps[j], t, tg_ascan_whole(&sc));
      if (cases[k].whole && (closed >= strlen(t) || t[closed] != '}' ||
                             strspn(t + closed + 1, " \r\n\t") != strlen(t + closed + 1)))
        fail_msg("case %zu step %zu [%s]: closed at %zu", k, steps[j], t, closed);
      if (cases[k].usage == NULL ? u != NULL
                                 : u == NULL || ulen != strlen(cases[k].usage) ||
                                       memcmp(u, cases[k].usage, ulen) != 0)
        fail_msg("case %zu step %zu [%s]: usage [%.*s]", k, steps[j], t, u ? (int)ulen : 6,
                 u ? u : "(none)");
    }
}

/* A usage value past the bound is none; a big answer of floats and long
 * strings is read through, and its usage still found. */
static void test_answer_scan_bounds(void **state) {
  size_t n = 3u << 20, len = 0, ulen = 0;
  char *big = malloc(n + 4096);
  tg_ascan_t sc;
  const char *u;
  (void)state;

  assert_non_null(big);
  len += (size_t)sprintf(big, "{\"usage\":{\"pad\":\"");
  memset(big + len, 'x', TG_ASCAN_USAGE_MAX);
  len += TG_ASCAN_USAGE_MAX;
  len += (size_t)sprintf(big + len, "\"}}");
  ascan_run(&sc, big, 0);
  assert_true(tg_ascan_whole(&sc));
  assert_null(tg_ascan_usage(&sc, &ulen));

  len = (size_t)sprintf(big, "{\"data\":[{\"embedding\":[");
  while (len < n / 2)
    len += (size_t)sprintf(big + len, "-0.01234567,");
  len += (size_t)sprintf(big + len, "1]},{\"embedding\":\"");
  memset(big + len, 'A', n / 2);
  len += n / 2;
  len += (size_t)sprintf(big + len, "\"}],\"usage\":{\"prompt_tokens\":3}}");
  big[len] = '\0';
  ascan_run(&sc, big, 65536);
  assert_true(tg_ascan_whole(&sc));
  u = tg_ascan_usage(&sc, &ulen);
  assert_non_null(u);
  assert_int_equal(ulen, strlen("{\"prompt_tokens\":3}"));
  free(big);
}

static void test_usage_text_agrees_with_parser(void **state) {
  static const char *keys[] = {"prompt_tokens", "completion_tokens", "total_tokens",
                               "prompt_tokens_details", "Prompt_tokens", "",
                               "prompt_tokens ", "completion\\u005ftokens", "x"};
  static const char *vals[] = {"0", "7", "16", "016", "-3", "16.5", "1e2", "2.0",
                               "null", "true", "\"7\"", "{}", "{\"cached_tokens\":0}",
                               "[1]", "999999999999999", "9999999999999999",
                               "90071992547409921", "00", "1 2", "nul", "7x"};
  static const char *ws[] = {"", " ", "\n", "\t ", "\r\n", "\x0b"};
  static const char *after[] = {"", "}", "}}\n", "\xff", " ,\"x\":1}", "\x01", "\xc3\xa9"};
  uint32_t seed = 12345;
  char t[512];
  (void)state;

#define PICK(a) a[rnd(&seed, sizeof(a) / sizeof(a[0]))]
  for (int iter = 0; iter < 200000; iter++) {
    size_t n = 0;
    int members = (int)rnd(&seed, 6);
    n += (size_t)snprintf(t + n, sizeof(t) - n, "%s{", PICK(ws));
    for (int m = 0; m < members; m++) {
      const char *w1 = PICK(ws), *k = PICK(keys), *w2 = PICK(ws), *w3 = PICK(ws);
      const char *v = PICK(vals), *w4 = PICK(ws);
      n += (size_t)snprintf(t + n, sizeof(t) - n, "%s%s\"%s\"%s:%s%s%s",
                            m ? "," : "", w1, k, w2, w3, v, w4);
    }
    {
      const char *comma = rnd(&seed, 20) ? "" : ",", *rest = PICK(after);
      n += (size_t)snprintf(t + n, sizeof(t) - n, "%s}%s", comma, rest);
    }
    assert_true(n < sizeof(t));
    same_as_parser(t, n);
  }
#undef PICK
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_split_every_cut),
    cmocka_unit_test(test_split_bytewise_crlf),
    cmocka_unit_test(test_split_lone_cr),
    cmocka_unit_test(test_split_crlf_waits_for_lf),
    cmocka_unit_test(test_partial_held),
    cmocka_unit_test(test_event_bound),
    cmocka_unit_test(test_event_bound_is_per_event),
    cmocka_unit_test(test_callback_error_stops),
    cmocka_unit_test(test_inspect),
    cmocka_unit_test(test_inspect_joins_data_lines),
    cmocka_unit_test(test_inspect_tells_the_role_chunk),
    cmocka_unit_test(test_inspect_finds_a_trailing_null_usage),
    cmocka_unit_test(test_usage_text),
    cmocka_unit_test(test_usage_text_agrees_with_parser),
    cmocka_unit_test(test_answer_text_bytes),
    cmocka_unit_test(test_answer_scan),
    cmocka_unit_test(test_answer_scan_bounds),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
