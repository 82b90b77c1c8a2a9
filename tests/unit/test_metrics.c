/* The metric tables and their Prometheus text: what a scrape shows after a
 * known set of observations, read back line by line. */
#include <ctype.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <pthread.h>
#include <stdatomic.h>

#include "obs/metrics.h"

#define TABLE_KEYS 8191 /* (tenant, model) pairs a worker's table holds besides "_other" */

static char *render(tg_metrics_t *m) {
  tg_mbuf_t b = {NULL, 0, 0, 256u * 1024 * 1024, 0, 0};
  tg_metrics_render(m, &b);
  assert_int_equal(b.err, 0);
  assert_non_null(b.s);
  return b.s;
}

/* The value of the sample whose line starts with `series ` (name and
 * labels exactly as rendered); -1 when absent; fails when it is there twice. */
static long long sample(const char *text, const char *series) {
  size_t n = strlen(series);
  long long v = -1;
  const char *p;
  for (p = text; p != NULL && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
    if (strncmp(p, series, n) == 0 && p[n] == ' ') {
      if (v != -1)
        fail_msg("%s is there twice", series);
      v = strtoll(p + n + 1, NULL, 10);
    }
  }
  return v;
}

static void observe(tg_metrics_t *m, size_t w, const char *tenant, const char *model,
                    int64_t prompt, int64_t completion) {
  tg_metrics_obs_t o;
  memset(&o, 0, sizeof(o));
  o.tenant = tenant;
  o.model = model;
  o.status = 200;
  o.refused = TG_LIMIT_NONE;
  o.prompt_tokens = prompt;
  o.completion_tokens = completion;
  o.duration_s = 0.2;
  o.ttft_s = 0.05;
  o.overhead_s = 0.0003;
  tg_metrics_observe(m, w, &o);
}

/* Counts a request of tenants prefix<first> .. prefix<first + n - 1>, model
 * "m", on worker w. */
static void fill(tg_metrics_t *m, size_t w, const char *prefix, int first, int n) {
  char tenant[32];
  int i;
  for (i = first; i < first + n; i++) {
    snprintf(tenant, sizeof(tenant), "%s%d", prefix, i);
    observe(m, w, tenant, "m", 1, 1);
  }
}

/* A table of `workers` workers whose worker 0 is full of tenants prefix<i>. */
static tg_metrics_t *full_table(size_t workers, const char *prefix) {
  tg_metrics_t *m = NULL;
  assert_int_equal(tg_metrics_new(workers, &m), 0);
  fill(m, 0, prefix, 0, TABLE_KEYS);
  return m;
}

/* Past the table's bound, requests count under tenant "_other" (requests,
 * tokens and latency alike): a full table loses none of them. */
static void test_full_table_counts_under_other(void **state) {
  tg_metrics_t *m = full_table(1, "t");
  char *text;

  (void)state;
  observe(m, 0, "late-1", "m", 10, 20);
  observe(m, 0, "late-2", "m2", 100, 200);
  text = render(m);
  assert_int_equal(sample(text, "llm_tenant_requests_total{tenant=\"late-1\"}"), -1);
  assert_int_equal(sample(text, "llm_tenant_requests_total{tenant=\"_other\"}"), 2);
  assert_int_equal(sample(text, "llm_tenant_prompt_tokens_total{tenant=\"_other\",model=\"_other\"}"),
                   110);
  assert_int_equal(
      sample(text, "llm_tenant_completion_tokens_total{tenant=\"_other\",model=\"_other\"}"), 220);
  assert_int_equal(sample(text, "llm_request_duration_seconds_count{tenant=\"_other\"}"), 2);
  assert_int_equal(sample(text, "llm_tenant_requests_total{tenant=\"t0\"}"), 1);
  assert_int_equal(sample(text, "llm_tenant_requests_total{tenant=\"t8190\"}"), 1);
  free(text);
  tg_metrics_free(m);
}

#define MANY_WORKERS 8
#define OVERFLOW 3 /* requests per worker past its full table */

/* Every worker's table full of its own tenants (the scrape merges
 * MANY_WORKERS x 8,192 keys, none held by two workers but "shared" and
 * "_other"): every series is there once, with the exact sums. */
static void test_many_full_disjoint_tables_sum_exactly(void **state) {
  tg_metrics_t *m = NULL;
  static unsigned char seen[MANY_WORKERS][TABLE_KEYS];
  const char *p;
  char tenant[32], *text;
  unsigned w, i, lines = 0;
  unsigned long long total = 0;

  (void)state;
  memset(seen, 0, sizeof(seen));
  assert_int_equal(tg_metrics_new(MANY_WORKERS, &m), 0);
  for (w = 0; w < MANY_WORKERS; w++) {
    observe(m, w, "shared", "m", 1 + w, 2);
    tg_metrics_inflight(tg_metrics_slot(m, w, "shared", "m"), 1);
    for (i = 1; i < TABLE_KEYS; i++) {
      snprintf(tenant, sizeof(tenant), "w%u-t%u", w, i);
      observe(m, w, tenant, "", 0, 0); /* no model: one series per family at most */
    }
    for (i = 0; i < OVERFLOW; i++) {
      snprintf(tenant, sizeof(tenant), "late-%u-%u", w, i);
      observe(m, w, tenant, "m", 10, 20);
    }
  }
  text = render(m);
  for (p = text; p != NULL && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
    static const char name[] = "llm_tenant_requests_total{tenant=\"";
    unsigned long long v;
    const char *q;
    if (strncmp(p, name, sizeof(name) - 1) != 0)
      continue;
    p += sizeof(name) - 1;
    q = strchr(p, '"'); /* no strstr or sscanf: both read to the text's end */
    assert_non_null(q);
    v = strtoull(q + 3, NULL, 10);
    lines++;
    total += v;
    if (p[0] == 'w' && isdigit((unsigned char)p[1])) {
      char *end;
      w = (unsigned)strtoul(p + 1, &end, 10);
      assert_true(end[0] == '-' && end[1] == 't');
      i = (unsigned)strtoul(end + 2, &end, 10);
      assert_true(end == q && w < MANY_WORKERS && i >= 1 && i < TABLE_KEYS);
      assert_int_equal(seen[w][i]++, 0);
      assert_int_equal(v, 1);
    } else if (strncmp(p, "shared\"", 7) == 0) {
      assert_int_equal(v, MANY_WORKERS);
    } else {
      assert_int_equal(strncmp(p, "_other\"", 7), 0);
      assert_int_equal(v, MANY_WORKERS * OVERFLOW);
    }
  }
  assert_int_equal(lines, MANY_WORKERS * (TABLE_KEYS - 1) + 2);
  assert_int_equal(total, MANY_WORKERS * (TABLE_KEYS + OVERFLOW));
  assert_int_equal(sample(text, "llm_tenant_prompt_tokens_total{tenant=\"shared\",model=\"m\"}"),
                   MANY_WORKERS * (MANY_WORKERS + 1) / 2);
  assert_int_equal(
      sample(text, "llm_tenant_completion_tokens_total{tenant=\"shared\",model=\"m\"}"),
      2 * MANY_WORKERS);
  assert_int_equal(sample(text, "llm_inflight_requests{pool=\"m\",tenant=\"shared\"}"),
                   MANY_WORKERS);
  assert_int_equal(sample(text, "llm_tenant_prompt_tokens_total{tenant=\"_other\",model=\"_other\"}"),
                   10 * MANY_WORKERS * OVERFLOW);
  assert_int_equal(sample(text, "llm_request_duration_seconds_count{tenant=\"_other\"}"),
                   MANY_WORKERS * OVERFLOW);
  assert_int_equal(sample(text, "llm_request_duration_seconds_count{tenant=\"w0-t1\"}"), -1);
  assert_int_equal(
      sample(text, "llm_rate_limit_rejections_total{tenant=\"w7-t8190\",limit=\"requests\"}"), 0);
  assert_int_equal(sample(text, "llm_gateway_overhead_seconds_count"),
                   MANY_WORKERS * (TABLE_KEYS + OVERFLOW));
  free(text);
  tg_metrics_free(m);
}

#define EVENT_TENANTS 2000
#define EVENT_THREADS 4

static pthread_barrier_t event_start;

static void *raise_events(void *arg) {
  tg_metrics_t *m = arg;
  char tenant[32];
  int i;
  pthread_barrier_wait(&event_start);
  for (i = 0; i < EVENT_TENANTS; i++) {
    snprintf(tenant, sizeof(tenant), "t%d", i);
    tg_metrics_budget_event(m, tenant, 0);
  }
  return NULL;
}

/* Threads that raise the first event of the same tenants at the same time
 * leave one series per tenant holding every event: a tenant listed twice
 * would be a duplicate series, which Prometheus refuses. */
static void test_budget_events_from_threads_one_series_per_tenant(void **state) {
  tg_metrics_t *m = NULL;
  pthread_t th[EVENT_THREADS];
  char series[96], *text;
  int i;

  (void)state;
  assert_int_equal(tg_metrics_new(1, &m), 0);
  pthread_barrier_init(&event_start, NULL, EVENT_THREADS);
  for (i = 0; i < EVENT_THREADS; i++)
    assert_int_equal(pthread_create(&th[i], NULL, raise_events, m), 0);
  for (i = 0; i < EVENT_THREADS; i++)
    pthread_join(th[i], NULL);
  pthread_barrier_destroy(&event_start);
  text = render(m);
  for (i = 0; i < EVENT_TENANTS; i++) {
    snprintf(series, sizeof(series),
             "llm_budget_threshold_events_total{tenant=\"t%d\",window=\"day\"}", i);
    assert_int_equal(sample(text, series), EVENT_THREADS);
  }
  free(text);
  tg_metrics_free(m);
}

/* A scrape while requests end: each histogram's _count is its +Inf
 * bucket (they were read apart, and requests that ended in between made
 * them disagree, which Prometheus's rate of buckets against counts shows). */
static atomic_int observing;

static void *observe_until_told(void *arg) {
  tg_metrics_t *m = arg;
  while (atomic_load(&observing))
    observe(m, 0, "busy", "m", 1, 1);
  return NULL;
}

static void expect_inf_is_count(const char *text, const char *name, const char *labels) {
  char inf[160], count[160];
  snprintf(inf, sizeof(inf), "%s_bucket{%s%sle=\"+Inf\"}", name, labels, labels[0] ? "," : "");
  snprintf(count, sizeof(count), "%s_count%s%s%s", name, labels[0] ? "{" : "", labels,
           labels[0] ? "}" : "");
  assert_true(sample(text, inf) > 0);
  assert_int_equal(sample(text, inf), sample(text, count));
}

static void test_histogram_counts_are_their_buckets_during_load(void **state) {
  tg_metrics_t *m = NULL;
  pthread_t th;
  int i;

  (void)state;
  assert_int_equal(tg_metrics_new(1, &m), 0);
  observe(m, 0, "busy", "m", 1, 1);
  atomic_store(&observing, 1);
  assert_int_equal(pthread_create(&th, NULL, observe_until_told, m), 0);
  for (i = 0; i < 300; i++) {
    char *text = render(m);
    expect_inf_is_count(text, "llm_gateway_overhead_seconds", "");
    expect_inf_is_count(text, "llm_request_duration_seconds", "tenant=\"busy\"");
    expect_inf_is_count(text, "llm_time_to_first_token_seconds", "tenant=\"busy\"");
    free(text);
  }
  atomic_store(&observing, 0);
  pthread_join(th, NULL);
  tg_metrics_free(m);
}

/* A scrape past its bound keeps whole families and leaves out the groups
 * that do not fit, counting them; none is cut in the middle. */
static void test_groups_past_the_bound_are_left_out_whole(void **state) {
  tg_metrics_t *m = NULL;
  tg_mbuf_t b = {NULL, 0, 0, 0, 0, 0};
  char *full;
  size_t full_len;
  char tenant[32];
  int i;

  (void)state;
  assert_int_equal(tg_metrics_new(1, &m), 0);
  for (i = 0; i < 2000; i++) {
    snprintf(tenant, sizeof(tenant), "tenant-%d", i);
    observe(m, 0, tenant, "m", 3, 4);
  }
  full = render(m);
  full_len = strlen(full);
  /* room for the requests family and little else */
  b.max = full_len / 8;
  tg_metrics_render(m, &b);
  assert_int_equal(b.err, 0);
  assert_true(b.omitted > 0);
  assert_true(b.len <= b.max);
  b.s[b.len] = '\0';
  assert_int_equal(sample(b.s, "llm_tenant_requests_total{tenant=\"tenant-1999\"}"), 1);
  /* what is there is whole: every line ends, each family's samples are all
   * there or none is */
  assert_true(b.len == 0 || b.s[b.len - 1] == '\n');
  if (strstr(b.s, "llm_tenant_prompt_tokens_total{") != NULL)
    assert_int_equal(sample(b.s, "llm_tenant_prompt_tokens_total{tenant=\"tenant-1999\",model=\"m\"}"), 3);
  assert_null(strstr(b.s, "llm_request_duration_seconds_bucket"));
  free(b.s);
  free(full);
  tg_metrics_free(m);
}

/* The family a line of the text belongs to: a comment's name, or a
 * sample's name without a histogram's suffix; written into out. */
static void family_of(const char *line, size_t len, char *out, size_t size) {
  static const char *const sfx[] = {"_bucket", "_sum", "_count"};
  size_t n, k, i;
  if (len > 7 && line[0] == '#') {
    line += 7;
    len -= 7;
  }
  for (n = 0; n < len && line[n] != '{' && line[n] != ' ' && n + 1 < size; n++)
    out[n] = line[n];
  out[n] = '\0';
  for (i = 0; i < 3; i++) {
    k = strlen(sfx[i]);
    if (n > k && strcmp(out + n - k, sfx[i]) == 0 &&
        strncmp(out, "llm_tenant_", 11) != 0 && strncmp(out, "llm_config_", 11) != 0 &&
        strncmp(out, "llm_ledger_", 11) != 0)
      out[n - k] = '\0';
  }
}

/* Lines of family f in text (up to len bytes). */
static size_t family_lines(const char *text, size_t len, const char *f) {
  const char *p = text, *end = text + len, *nl;
  char fam[160];
  size_t n = 0;
  for (; p < end; p = nl + 1) {
    nl = memchr(p, '\n', (size_t)(end - p));
    if (nl == NULL)
      nl = end;
    family_of(p, (size_t)(nl - p), fam, sizeof(fam));
    if (strcmp(fam, f) == 0)
      n++;
  }
  return n;
}

/* Whatever the bound falls on, every family of the scrape is whole or
 * absent, and a scrape that lacks one says it left something out: none is
 * cut in the middle (a histogram without its +Inf bucket or its count). */
static void test_every_family_is_whole_wherever_the_bound_falls(void **state) {
  static const char *const families[] = {
      "llm_tenant_requests_total", "llm_tenant_errors_total",
      "llm_rate_limit_rejections_total", "llm_request_duration_seconds",
      "llm_time_to_first_token_seconds", "llm_tenant_prompt_tokens_total",
      "llm_inflight_requests", "llm_queue_length", "llm_gateway_overhead_seconds",
      "llm_config_reloads_total", "llm_config_reload_failures_total",
      "llm_ledger_purges_total", "llm_ledger_purge_failures_total",
      "llm_ledger_purged_records_total", "llm_budget_threshold_events_total"};
  tg_metrics_t *m = NULL;
  char *full;
  size_t full_len, max, i;

  (void)state;
  assert_int_equal(tg_metrics_new(1, &m), 0);
  observe(m, 0, "t", "m", 3, 4);
  tg_metrics_budget_event(m, "t", 0);
  full = render(m);
  full_len = strlen(full);
  for (max = 0; max < full_len; max++) {
    tg_mbuf_t b = {NULL, 0, 0, max, 0, 0};
    int missing = 0;
    tg_metrics_render(m, &b);
    assert_int_equal(b.err, 0);
    assert_true(b.len <= max);
    for (i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
      size_t want = family_lines(full, full_len, families[i]);
      size_t got = family_lines(b.s ? b.s : "", b.len, families[i]);
      assert_true(want > 0);
      if (got != 0 && got != want)
        fail_msg("bound %zu: %s has %zu of its %zu lines", max, families[i], got, want);
      missing |= got == 0;
    }
    if (missing && b.omitted == 0)
      fail_msg("bound %zu: a family is missing and none is said to be", max);
    free(b.s);
  }
  free(full);
  tg_metrics_free(m);
}

/* The config no longer has tenants whose name starts with arg. */
static int gone_prefix(const char *tenant, void *arg) {
  return strncmp(tenant, (const char *)arg, strlen((const char *)arg)) == 0;
}

static long long requests_of(const char *text, const char *tenant) {
  char series[96];
  snprintf(series, sizeof(series), "llm_tenant_requests_total{tenant=\"%s\"}", tenant);
  return sample(text, series);
}

static void prune_all(tg_metrics_t *m, size_t n, const char *prefix, uint64_t now_ns) {
  size_t w;
  for (w = 0; w < n; w++)
    tg_metrics_prune(m, w, gone_prefix, (void *)prefix, now_ns);
}

/* A full table counts newcomers under "_other" and says how many; once the
 * tenants that filled it leave the config, a scrape shows their last
 * figures, then their entries are freed and newcomers get series of their
 * own. Before, a table once full stayed full for the process's life. */
static void test_a_departed_tenant_frees_its_slots_after_a_scrape(void **state) {
  tg_metrics_t *m = full_table(2, "old-");
  char *text;

  (void)state;
  observe(m, 1, "old-0", "m", 1, 1);
  observe(m, 0, "new-1", "m", 1, 1);
  text = render(m);
  assert_int_equal(requests_of(text, "new-1"), -1);
  assert_int_equal(requests_of(text, "_other"), 1);
  assert_int_equal(sample(text, "llm_metrics_overflow_requests_total"), 1);
  free(text);

  prune_all(m, 2, "old-", 1000); /* each worker finds them gone */
  text = render(m);              /* their last figures, shown once */
  assert_int_equal(requests_of(text, "old-0"), 2);
  assert_int_equal(requests_of(text, "old-8190"), 1);
  free(text);
  prune_all(m, 2, "old-", 2000); /* freed */
  text = render(m);
  assert_int_equal(requests_of(text, "old-0"), -1);
  assert_int_equal(requests_of(text, "old-8190"), -1);
  assert_int_equal(requests_of(text, "_other"), 1);
  free(text);

  /* room for as many pairs as before, "_other" among them now */
  fill(m, 0, "new-", 2, TABLE_KEYS - 1);
  observe(m, 0, "new-1", "m", 1, 1); /* full again: one past it */
  text = render(m);
  assert_int_equal(requests_of(text, "new-2"), 1);
  assert_int_equal(requests_of(text, "new-8191"), 1);
  assert_int_equal(requests_of(text, "new-1"), -1);
  assert_int_equal(requests_of(text, "_other"), 2);
  assert_int_equal(sample(text, "llm_metrics_overflow_requests_total"), 2);
  free(text);
  tg_metrics_free(m);
}

/* A departed tenant that a call on one worker still counts in stays on
 * every worker, its counters whole, until that call is done and a scrape
 * has shown the sum: a part of it would read as a counter reset. */
static void test_a_held_tenant_stays_whole_on_every_worker(void **state) {
  tg_metrics_t *m = NULL;
  char *text;
  void *slot;

  (void)state;
  assert_int_equal(tg_metrics_new(2, &m), 0);
  observe(m, 0, "gone", "m", 1, 1);
  slot = tg_metrics_slot(m, 1, "gone", "m");
  assert_non_null(slot);
  observe(m, 1, "gone", "m", 1, 1);
  observe(m, 0, "kept", "m", 1, 1);
  prune_all(m, 2, "gone", 1000);
  free(render(m));
  prune_all(m, 2, "gone", 2000);
  text = render(m);
  assert_int_equal(requests_of(text, "gone"), 2);
  free(text);

  tg_metrics_slot_put(slot);
  prune_all(m, 2, "gone", 3000);
  text = render(m);
  assert_int_equal(requests_of(text, "gone"), 2);
  free(text);
  prune_all(m, 2, "gone", 4000);
  text = render(m);
  assert_int_equal(requests_of(text, "gone"), -1);
  assert_int_equal(requests_of(text, "kept"), 1);
  free(text);
  tg_metrics_free(m);
}

/* Nothing scrapes: a departed tenant's entries are freed after 10 minutes
 * all the same; a tenant back in the config before is kept. */
static void test_with_no_scrape_departed_tenants_go_after_ten_minutes(void **state) {
  const uint64_t s = UINT64_C(1000000000);
  tg_metrics_t *m = full_table(1, "old-");
  char *text;

  (void)state;
  prune_all(m, 1, "old-", 1 * s);
  prune_all(m, 1, "old-", 500 * s);
  observe(m, 0, "new", "m", 1, 1);      /* still full */
  prune_all(m, 1, "old-1", 601 * s);    /* old-1*: gone for 600 s, freed */
  observe(m, 0, "new", "m", 1, 1);
  text = render(m);
  assert_int_equal(requests_of(text, "new"), 1);
  assert_int_equal(requests_of(text, "_other"), 1);
  assert_int_equal(requests_of(text, "old-1"), -1);
  assert_int_equal(requests_of(text, "old-2"), 1);
  free(text);
  tg_metrics_free(m);
}

/* A departed tenant's budget event counts are shown once more, then leave
 * /metrics; a configured tenant's stay. Before, every tenant that ever
 * crossed a threshold kept its series for the process's life. */
static void test_a_departed_tenants_budget_events_go_after_a_scrape(void **state) {
  tg_metrics_t *m = NULL;
  char *text;

  (void)state;
  assert_int_equal(tg_metrics_new(2, &m), 0);
  tg_metrics_budget_event(m, "gone-a", 0);
  tg_metrics_budget_event(m, "gone-a", 1);
  tg_metrics_budget_event(m, "kept", 1);
  prune_all(m, 2, "gone-", 1000);
  text = render(m);
  assert_int_equal(
      sample(text, "llm_budget_threshold_events_total{tenant=\"gone-a\",window=\"month\"}"), 1);
  free(text);
  prune_all(m, 2, "gone-", 2000);
  text = render(m);
  assert_int_equal(
      sample(text, "llm_budget_threshold_events_total{tenant=\"gone-a\",window=\"day\"}"), -1);
  assert_int_equal(
      sample(text, "llm_budget_threshold_events_total{tenant=\"kept\",window=\"month\"}"), 1);
  free(text);
  tg_metrics_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_full_table_counts_under_other),
      cmocka_unit_test(test_many_full_disjoint_tables_sum_exactly),
      cmocka_unit_test(test_budget_events_from_threads_one_series_per_tenant),
      cmocka_unit_test(test_histogram_counts_are_their_buckets_during_load),
      cmocka_unit_test(test_groups_past_the_bound_are_left_out_whole),
      cmocka_unit_test(test_every_family_is_whole_wherever_the_bound_falls),
      cmocka_unit_test(test_a_departed_tenant_frees_its_slots_after_a_scrape),
      cmocka_unit_test(test_a_held_tenant_stays_whole_on_every_worker),
      cmocka_unit_test(test_with_no_scrape_departed_tenants_go_after_ten_minutes),
      cmocka_unit_test(test_a_departed_tenants_budget_events_go_after_a_scrape),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
