/* The configuration loader, checked the way an operator meets it: the demo
 * config must load with exactly the seed's values (ports, prices in nano-USD,
 * budgets, priority weights, durations), the seed's quotas.yaml must load
 * unchanged both inline and through tenants_file, and a file with many
 * mistakes must report every one of them with its file and line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config/config.h"
#include "core/err.h"

/* ---- helpers -------------------------------------------------------------- */

/* The source tree, found from this file's own path (tests run with the
 * build directory as their working directory). */
static const char *src_dir(void) {
  static char dir[4096];
  const char *suffix = "tests/unit/test_config.c", *file = __FILE__;
  size_t n = strlen(file), sl = strlen(suffix);
  assert_true(n > sl);
  assert_string_equal(file + n - sl, suffix);
  size_t keep = n - sl;
  if (keep > 1)
    keep--; /* drop the trailing '/' */
  assert_true(keep < sizeof dir);
  memcpy(dir, file, keep);
  dir[keep] = '\0';
  return dir;
}

static char *read_all(const char *path) {
  FILE *f = fopen(path, "rb");
  assert_non_null(f);
  assert_int_equal(fseek(f, 0, SEEK_END), 0);
  long len = ftell(f);
  assert_true(len >= 0 && len < (1 << 20));
  rewind(f);
  char *buf = malloc((size_t)len + 1);
  assert_non_null(buf);
  assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
  buf[len] = '\0';
  fclose(f);
  return buf;
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
  assert_int_equal(fclose(f), 0);
}

/* A fresh directory under /tmp for one test's files. */
typedef struct {
  char dir[64];
  char files[8][128];
  size_t n;
} tmpdir_t;

static void tmp_open(tmpdir_t *t) {
  memset(t, 0, sizeof *t);
  snprintf(t->dir, sizeof t->dir, "/tmp/tg_cfg_XXXXXX");
  assert_non_null(mkdtemp(t->dir));
}

static const char *tmp_file(tmpdir_t *t, const char *name, const char *text) {
  assert_true(t->n < 8);
  char dir[sizeof t->dir];
  memcpy(dir, t->dir, sizeof dir);
  char *p = t->files[t->n++];
  snprintf(p, sizeof t->files[0], "%s/%s", dir, name);
  write_file(p, text);
  return p;
}

static void tmp_close(tmpdir_t *t) {
  for (size_t i = 0; i < t->n; i++)
    unlink(t->files[i]);
  rmdir(t->dir);
}

/* A temp file made with mkstemp, for single-file configs. */
static char *tmp_config(const char *text) {
  char *path = strdup("/tmp/tg_cfg_XXXXXX");
  assert_non_null(path);
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  size_t len = strlen(text);
  assert_int_equal(write(fd, text, len), (ssize_t)len);
  close(fd);
  return path;
}

static void dump_errors(const tg_config_errors_t *e) {
  for (size_t i = 0; i < e->n; i++)
    print_message("  %s\n", e->msgs[i]);
}

/* Asserts that one message starts with "file:line: " and contains each of
 * the given fragments (NULL-terminated). */
static void expect_err(const tg_config_errors_t *e, const char *file,
                       unsigned line, ...) {
  char prefix[512];
  snprintf(prefix, sizeof prefix, "%s:%u: ", file, line);
  for (size_t i = 0; i < e->n; i++) {
    if (strncmp(e->msgs[i], prefix, strlen(prefix)) != 0)
      continue;
    va_list ap;
    int all = 1;
    va_start(ap, line);
    for (const char *frag = va_arg(ap, const char *); frag != NULL;
         frag = va_arg(ap, const char *))
      if (strstr(e->msgs[i], frag) == NULL)
        all = 0;
    va_end(ap);
    if (all)
      return;
  }
  dump_errors(e);
  fail_msg("no error '%s...' with the expected text", prefix);
}

static tg_config_t *load_ok(const char *path) {
  tg_config_t *cfg = NULL;
  tg_config_errors_t errs;
  int rc = tg_config_load(path, &cfg, &errs);
  if (rc != 0) {
    dump_errors(&errs);
    tg_config_errors_free(&errs);
    fail_msg("%s did not load: %d", path, rc);
  }
  assert_int_equal(errs.n, 0);
  assert_non_null(cfg);
  tg_config_errors_free(&errs);
  return cfg;
}

static void load_bad(const char *path, tg_config_errors_t *errs) {
  tg_config_t *cfg = (tg_config_t *)1;
  assert_int_equal(tg_config_load(path, &cfg, errs), TG_ECONFIG);
  assert_null(cfg);
  assert_true(errs->n > 0);
}

static const char *const models_yaml =
    "models:\n"
    "  llama-3.1-70b:\n"
    "    endpoints: [{url: \"http://127.0.0.1:8000\"}]\n"
    "    pricing: {prompt_per_1k_usd: \"0.004\", completion_per_1k_usd: "
    "\"0.012\"}\n"
    "  llama-3.1-8b:\n"
    "    endpoints: [{url: \"http://127.0.0.1:8000\"}]\n"
    "    pricing: {prompt_per_1k_usd: 0.0005, completion_per_1k_usd: "
    "0.0015}\n"
    "  nomic-embed-text:\n"
    "    kind: embedding\n"
    "    endpoints: [{url: \"http://127.0.0.1:8000\"}]\n"
    "    pricing: {prompt_per_1k_usd: 0.0001, completion_per_1k_usd: 0.0}\n";

/* The seed's three tenants, exactly as quotas.yaml gives them. */
static void check_seed_tenants(const tg_config_t *cfg) {
  assert_int_equal(cfg->n_tenants, 3);

  const tg_tenant_cfg_t *a = tg_config_tenant(cfg, "acme-corp");
  assert_non_null(a);
  assert_string_equal(a->tier, "enterprise");
  assert_int_equal(a->n_models_allowed, 3);
  assert_true(tg_tenant_allows(a, "llama-3.1-70b"));
  assert_true(tg_tenant_allows(a, "llama-3.1-8b"));
  assert_true(tg_tenant_allows(a, "nomic-embed-text"));
  assert_int_equal(a->requests_per_minute, 300);
  assert_int_equal(a->tokens_per_minute, 500000);
  assert_int_equal(a->concurrent_requests, 50);
  assert_int_equal(a->daily_limit_nano, INT64_C(500000000000));
  assert_int_equal(a->monthly_limit_nano, INT64_C(10000000000000));
  assert_int_equal(a->alert_threshold_percent, 80);
  assert_string_equal(a->priority, "high");
  assert_int_equal(a->priority_weight, 1000);

  const tg_tenant_cfg_t *s = tg_config_tenant(cfg, "startup-xyz");
  assert_non_null(s);
  assert_string_equal(s->tier, "standard");
  assert_int_equal(s->n_models_allowed, 2);
  assert_false(tg_tenant_allows(s, "llama-3.1-70b"));
  assert_true(tg_tenant_allows(s, "llama-3.1-8b"));
  assert_true(tg_tenant_allows(s, "nomic-embed-text"));
  assert_int_equal(s->requests_per_minute, 60);
  assert_int_equal(s->tokens_per_minute, 100000);
  assert_int_equal(s->concurrent_requests, 10);
  assert_int_equal(s->daily_limit_nano, INT64_C(50000000000));
  assert_int_equal(s->monthly_limit_nano, INT64_C(1000000000000));
  assert_int_equal(s->alert_threshold_percent, 80);
  assert_string_equal(s->priority, "medium");
  assert_int_equal(s->priority_weight, 500);

  const tg_tenant_cfg_t *d = tg_config_tenant(cfg, "internal-dev");
  assert_non_null(d);
  assert_string_equal(d->tier, "free");
  assert_int_equal(d->n_models_allowed, 1);
  assert_true(tg_tenant_allows(d, "llama-3.1-8b"));
  assert_false(tg_tenant_allows(d, "nomic-embed-text"));
  assert_int_equal(d->requests_per_minute, 20);
  assert_int_equal(d->tokens_per_minute, 50000);
  assert_int_equal(d->concurrent_requests, 5);
  assert_int_equal(d->daily_limit_nano, INT64_C(10000000000));
  assert_int_equal(d->monthly_limit_nano, INT64_C(200000000000));
  assert_int_equal(d->alert_threshold_percent, 90);
  assert_string_equal(d->priority, "low");
  assert_int_equal(d->priority_weight, 100);

  assert_null(tg_config_tenant(cfg, "nobody"));
  assert_null(tg_config_tenant(cfg, "ACME-CORP"));
}

/* ---- the demo config ------------------------------------------------------ */

static void test_example_config(void **state) {
  (void)state;
  char path[4200], data_dir[4200];
  snprintf(path, sizeof path, "%s/examples/tollgate.yaml", src_dir());
  snprintf(data_dir, sizeof data_dir, "%s/examples/data", src_dir());
  tg_config_t *cfg = load_ok(path);

  assert_string_equal(cfg->path, path);
  assert_string_equal(cfg->listen_host, "127.0.0.1");
  assert_int_equal(cfg->listen_port, 8080);
  assert_string_equal(cfg->admin_host, "127.0.0.1");
  assert_int_equal(cfg->admin_port, 8081);
  assert_int_equal(cfg->workers, 2);
  assert_string_equal(cfg->data_dir, data_dir);
  assert_string_equal(cfg->state, "memory");
  assert_string_equal(cfg->state_failure, "closed");
  assert_string_equal(cfg->database, "sqlite");
  assert_int_equal(cfg->max_body_bytes, 1048576);
  assert_int_equal(cfg->max_header_bytes, 16384);
  assert_string_equal(cfg->access_log, "stdout");

  assert_int_equal(cfg->n_forward_headers, 3);
  assert_string_equal(cfg->forward_headers[0], "x-sim-fault");
  assert_string_equal(cfg->forward_headers[1], "x-sim-ttft-ms");
  assert_string_equal(cfg->forward_headers[2], "x-sim-token-ms");

  assert_int_equal(cfg->health_check_interval_ms, 2000);
  assert_int_equal(cfg->client_request_timeout_ms, 30000);
  assert_int_equal(cfg->client_keepalive_timeout_ms, 60000);
  assert_int_equal(cfg->client_send_timeout_ms, 60000);
  assert_int_equal(cfg->upstream_connect_timeout_ms, 2000);
  assert_int_equal(cfg->upstream_first_byte_timeout_ms, 60000);
  assert_int_equal(cfg->upstream_idle_timeout_ms, 30000);
  assert_int_equal(cfg->drain_timeout_ms, 30000);
  assert_int_equal(cfg->global_requests_per_second, 100);

  assert_int_equal(cfg->n_priority_classes, 3);
  assert_string_equal(cfg->priority_classes[0].name, "high");
  assert_int_equal(cfg->priority_classes[0].value, 1000);
  assert_string_equal(cfg->priority_classes[1].name, "medium");
  assert_int_equal(cfg->priority_classes[1].value, 500);
  assert_string_equal(cfg->priority_classes[2].name, "low");
  assert_int_equal(cfg->priority_classes[2].value, 100);

  assert_int_equal(cfg->n_models, 3);
  const tg_model_cfg_t *m70 = tg_config_model(cfg, "llama-3.1-70b");
  const tg_model_cfg_t *m8 = tg_config_model(cfg, "llama-3.1-8b");
  const tg_model_cfg_t *emb = tg_config_model(cfg, "nomic-embed-text");
  assert_non_null(m70);
  assert_non_null(m8);
  assert_non_null(emb);
  assert_null(tg_config_model(cfg, "gpt-4"));
  assert_null(tg_config_model(cfg, ""));

  assert_int_equal(m70->prompt_nano_per_token, 4000);
  assert_int_equal(m70->completion_nano_per_token, 12000);
  assert_int_equal(m8->prompt_nano_per_token, 500);
  assert_int_equal(m8->completion_nano_per_token, 1500);
  assert_int_equal(emb->prompt_nano_per_token, 100);
  assert_int_equal(emb->completion_nano_per_token, 0);
  assert_int_equal(m70->kind, TG_MODEL_CHAT);
  assert_int_equal(m8->kind, TG_MODEL_CHAT);
  assert_int_equal(emb->kind, TG_MODEL_EMBEDDING);
  assert_int_equal(m70->max_tokens, 4096);
  assert_int_equal(emb->max_tokens, 4096);
  const tg_model_cfg_t *all[] = {m70, m8, emb};
  for (size_t i = 0; i < 3; i++) {
    assert_int_equal(all[i]->n_endpoints, 1);
    assert_string_equal(all[i]->endpoints[0].url, "http://127.0.0.1:8000");
    assert_int_equal(all[i]->endpoints[0].max_inflight, 256);
  }

  check_seed_tenants(cfg);
  tg_config_unref(cfg);
}

/* ---- the seed's quotas.yaml, unchanged ------------------------------------ */

static void test_seed_quotas_via_tenants_file(void **state) {
  (void)state;
  tmpdir_t t;
  char quotas[4200], text[8192];
  tmp_open(&t);
  snprintf(quotas, sizeof quotas, "%s/examples/quotas.yaml", src_dir());

  /* Absolute tenants_file. */
  snprintf(text, sizeof text, "tenants_file: %s\n%s", quotas, models_yaml);
  tg_config_t *cfg = load_ok(tmp_file(&t, "abs.yaml", text));
  check_seed_tenants(cfg);
  tg_config_unref(cfg);

  /* Relative tenants_file resolves against the config file's directory,
   * not the working directory. */
  char *seed = read_all(quotas);
  tmp_file(&t, "quotas.yaml", seed);
  snprintf(text, sizeof text, "%stenants_file: ./quotas.yaml\n", models_yaml);
  cfg = load_ok(tmp_file(&t, "rel.yaml", text));
  check_seed_tenants(cfg);
  tg_config_unref(cfg);
  free(seed);
  tmp_close(&t);
}

static void test_seed_quotas_inline(void **state) {
  (void)state;
  char quotas[4200], text[8192];
  snprintf(quotas, sizeof quotas, "%s/examples/quotas.yaml", src_dir());
  char *seed = read_all(quotas);
  /* The seed's file pasted verbatim below the models. */
  snprintf(text, sizeof text, "%s%s", models_yaml, seed);
  char *path = tmp_config(text);
  tg_config_t *cfg = load_ok(path);
  check_seed_tenants(cfg);
  tg_config_unref(cfg);
  unlink(path);
  free(path);
  free(seed);
}

/* ---- defaults and value forms --------------------------------------------- */

static void test_defaults_and_forms(void **state) {
  (void)state;
  tmpdir_t t;
  char want[256];
  tmp_open(&t);
  const char *path = tmp_file(
      &t, "min.yaml",
      "listen: \"[::1]:9000\"\n"
      "admin_listen: 0.0.0.0:9001\n"
      "workers: 0\n"
      "forward_headers: [X-Trace-Id]\n"
      "health_check_interval: 0\n"
      "access_log: logs/access.log\n"
      "state: redis://127.0.0.1:6379/0\n"
      "database: postgres://tg@db/tollgate\n"
      "timeouts:\n"
      "  client_request: 250ms\n"
      "  client_keepalive: 2m\n"
      "  upstream_first_byte: 1h\n"
      "  upstream_connect: 45\n"
      "  drain: 0s\n"
      "models:\n"
      "  m:\n"
      "    max_tokens: 512\n"
      "    media_tokens: 576\n"
      "    endpoints:\n"
      "      - url: https://gpu-1.internal:8443/\n"
      "      - {url: \"http://10.0.0.2:8000\", max_inflight: 8}\n"
      "    pricing: {prompt_per_1k_usd: \"1\", completion_per_1k_usd: "
      "\"2.5\"}\n"
      "  free-model:\n"
      "    endpoints: [{url: \"http://[::1]:8000\"}]\n"
      "tenants:\n"
      "  bare:\n"
      "    models_allowed: [m]\n");
  tg_config_t *cfg = load_ok(path);

  assert_string_equal(cfg->listen_host, "::1");
  assert_int_equal(cfg->listen_port, 9000);
  assert_string_equal(cfg->admin_host, "0.0.0.0");
  assert_int_equal(cfg->admin_port, 9001);
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  assert_int_equal(cfg->workers, cpus < 1 ? 1 : cpus);
  snprintf(want, sizeof want, "%s/data", t.dir);
  assert_string_equal(cfg->data_dir, want);
  snprintf(want, sizeof want, "%s/logs/access.log", t.dir);
  assert_string_equal(cfg->access_log, want);
  assert_string_equal(cfg->state, "redis://127.0.0.1:6379/0");
  assert_string_equal(cfg->state_failure, "closed");
  assert_string_equal(cfg->database, "postgres://tg@db/tollgate");
  assert_int_equal(cfg->n_forward_headers, 1);
  assert_string_equal(cfg->forward_headers[0], "x-trace-id");
  assert_int_equal(cfg->health_check_interval_ms, 0);
  assert_int_equal(cfg->client_request_timeout_ms, 250);
  assert_int_equal(cfg->client_keepalive_timeout_ms, 120000);
  assert_int_equal(cfg->upstream_first_byte_timeout_ms, 3600000);
  assert_int_equal(cfg->upstream_connect_timeout_ms, 45000);
  assert_int_equal(cfg->drain_timeout_ms, 0);
  assert_int_equal(cfg->client_send_timeout_ms, 60000);  /* default */
  assert_int_equal(cfg->upstream_idle_timeout_ms, 30000); /* default */
  assert_int_equal(cfg->max_body_bytes, 1048576);
  assert_int_equal(cfg->max_header_bytes, 16384);
  assert_int_equal(cfg->global_requests_per_second, 0);

  /* priority_classes absent: exactly high/medium/low. */
  assert_int_equal(cfg->n_priority_classes, 3);
  assert_string_equal(cfg->priority_classes[1].name, "medium");
  assert_int_equal(cfg->priority_classes[1].value, 500);

  const tg_model_cfg_t *m = tg_config_model(cfg, "m");
  assert_non_null(m);
  assert_int_equal(m->kind, TG_MODEL_CHAT);
  assert_int_equal(m->max_tokens, 512);
  assert_int_equal(m->media_tokens, 576);
  assert_int_equal(m->n_endpoints, 2);
  assert_string_equal(m->endpoints[0].url, "https://gpu-1.internal:8443");
  assert_int_equal(m->endpoints[0].max_inflight, 256);
  assert_string_equal(m->endpoints[1].url, "http://10.0.0.2:8000");
  assert_int_equal(m->endpoints[1].max_inflight, 8);
  assert_int_equal(m->prompt_nano_per_token, 1000000);
  assert_int_equal(m->completion_nano_per_token, 2500000);
  const tg_model_cfg_t *f = tg_config_model(cfg, "free-model");
  assert_non_null(f);
  assert_int_equal(f->max_tokens, 4096);
  assert_int_equal(f->media_tokens, 2048);
  assert_int_equal(f->prompt_nano_per_token, 0);
  assert_string_equal(f->endpoints[0].url, "http://[::1]:8000");

  /* A tenant that states no limits: unlimited, alert at 80%, medium. */
  const tg_tenant_cfg_t *b = tg_config_tenant(cfg, "bare");
  assert_non_null(b);
  assert_null(b->tier);
  assert_int_equal(b->requests_per_minute, 0);
  assert_int_equal(b->tokens_per_minute, 0);
  assert_int_equal(b->concurrent_requests, 0);
  assert_int_equal(b->daily_limit_nano, 0);
  assert_int_equal(b->monthly_limit_nano, 0);
  assert_int_equal(b->alert_threshold_percent, 80);
  assert_string_equal(b->priority, "medium");
  assert_int_equal(b->priority_weight, 500);
  assert_true(tg_tenant_allows(b, "m"));
  assert_false(tg_tenant_allows(b, "free-model"));

  tg_config_unref(cfg);
  tmp_close(&t);
}

/* ---- every mistake, with its line ----------------------------------------- */

static void test_many_mistakes(void **state) {
  (void)state;
  char *path = tmp_config(
      /*  1 */ "listen: 127.0.0.1:99999\n"
      /*  2 */ "admin_listen: localhost\n"
      /*  3 */ "workers: -3\n"
      /*  4 */ "bogus_key: 1\n"
      /*  5 */ "state: redis:/oops\n"
      /*  6 */ "timeouts:\n"
      /*  7 */ "  client_request: 30x\n"
      /*  8 */ "  upstream_idle: 10s\n"
      /*  9 */ "  upstream_idle: 20s\n"
      /* 10 */ "  client_sned: 5s\n"
      /* 11 */ "forward_headers: x-ok\n"
      /* 12 */ "priority_classes: {high: 1000, medium: 0}\n"
      /* 13 */ "max_body_bytes: lots\n"
      /* 14 */ "models:\n"
      /* 15 */ "  m1:\n"
      /* 16 */ "    endpoints: []\n"
      /* 17 */ "    pricing: {prompt_per_1k_usd: \"0.0000001\", "
               "completion_per_1k_usd: \"1e3\"}\n"
      /* 18 */ "  m2:\n"
      /* 19 */ "    kindx: chat\n"
      /* 20 */ "    endpoints:\n"
      /* 21 */ "      - url: ftp://x\n"
      /* 22 */ "        max_inflight: 0\n"
      /* 23 */ "  m1:\n"
      /* 24 */ "    endpoints: [{url: \"http://a:1\"}]\n"
      /* 25 */ "tenants:\n"
      /* 26 */ "  t1:\n"
      /* 27 */ "    models_allowed: [m1, nope]\n"
      /* 28 */ "    priority: urgent\n"
      /* 29 */ "    budget: {daily_limit_usd: \"-5\", "
               "alert_threshold_percent: 150}\n"
      /* 30 */ "    rate_limits: {requests_per_minute: 0}\n"
      /* 31 */ "tenants_file: other.yaml\n");
  tg_config_errors_t e;
  load_bad(path, &e);

  expect_err(&e, path, 1, "listen: expected host:port", "127.0.0.1:99999",
             NULL);
  expect_err(&e, path, 2, "admin_listen: expected host:port", "'localhost'",
             NULL);
  expect_err(&e, path, 3, "workers: -3 is out of range", NULL);
  expect_err(&e, path, 4, "unknown key 'bogus_key'", NULL);
  expect_err(&e, path, 5, "state: expected 'memory' or a redis://", NULL);
  expect_err(&e, path, 7, "timeouts.client_request: expected a duration",
             "'30x'", NULL);
  expect_err(&e, path, 9, "timeouts: duplicate key 'upstream_idle'",
             "first at line 8", NULL);
  expect_err(&e, path, 10, "timeouts: unknown key 'client_sned'", NULL);
  expect_err(&e, path, 11, "forward_headers: expected a list", NULL);
  expect_err(&e, path, 12, "priority_classes.medium: must be a positive",
             NULL);
  expect_err(&e, path, 13, "max_body_bytes: expected an integer", "'lots'",
             NULL);
  expect_err(&e, path, 16, "models.m1.endpoints: no endpoints", NULL);
  expect_err(&e, path, 17, "models.m1.pricing.prompt_per_1k_usd",
             "'0.0000001' is not a whole number of nano-USD per token", NULL);
  expect_err(&e, path, 17, "models.m1.pricing.completion_per_1k_usd",
             "expected an exact decimal", "'1e3'", NULL);
  expect_err(&e, path, 19, "models.m2: unknown key 'kindx'", NULL);
  expect_err(&e, path, 21, "models.m2.endpoints[0].url",
             "http:// or https://", "'ftp://x'", NULL);
  expect_err(&e, path, 22, "models.m2.endpoints[0].max_inflight",
             "must be a positive integer, got 0", NULL);
  expect_err(&e, path, 23, "models: duplicate key 'm1' (first at line 15)",
             NULL);
  expect_err(&e, path, 27, "tenants.t1.models_allowed: unknown model 'nope'",
             NULL);
  expect_err(&e, path, 28, "tenants.t1.priority: unknown priority class "
             "'urgent'", "high, medium", NULL);
  expect_err(&e, path, 29, "tenants.t1.budget.daily_limit_usd",
             "expected an exact decimal USD amount", "'-5'", NULL);
  expect_err(&e, path, 29, "tenants.t1.budget.alert_threshold_percent",
             "150 is out of range (1..100)", NULL);
  expect_err(&e, path, 30,
             "tenants.t1.rate_limits.requests_per_minute: must be a positive",
             NULL);
  expect_err(&e, path, 31, "both 'tenants' and 'tenants_file'", NULL);
  expect_err(&e, path, 31, "tenants_file: cannot read", "other.yaml'", NULL);
  assert_int_equal(e.n, 25);

  /* Sorted by line, so the operator reads the file top to bottom. */
  for (size_t i = 1; i < e.n; i++) {
    size_t pl = strlen(path) + 1;
    assert_true(strtoul(e.msgs[i - 1] + pl, NULL, 10) <=
                strtoul(e.msgs[i] + pl, NULL, 10));
  }
  tg_config_errors_free(&e);
  assert_null(e.msgs);
  assert_int_equal(e.n, 0);
  unlink(path);
  free(path);
}

/* Tenant mistakes are reported against the tenants file and its lines. */
static void test_tenants_file_errors(void **state) {
  (void)state;
  tmpdir_t t;
  char text[4096], tpath[256];
  tmp_open(&t);
  tmp_file(&t, "tenants.yaml",
           /* 1 */ "tenants:\n"
           /* 2 */ "  a:\n"
           /* 3 */ "    models_allowed: [m, gpt-9]\n"
           /* 4 */ "    priority: urgent\n"
           /* 5 */ "    budget: {daily_limit_usd: 1.0000000001}\n"
           /* 6 */ "    rate_limit: {requests_per_minute: 5}\n"
           /* 7 */ "  b:\n"
           /* 8 */ "    tier: free\n"
           /* 9 */ "  a:\n"
           /*10 */ "    models_allowed: []\n"
           /*11 */ "extra: 1\n");
  snprintf(tpath, sizeof tpath, "%s/tenants.yaml", t.dir);
  snprintf(text, sizeof text,
           "models:\n"
           "  m: {endpoints: [{url: \"http://127.0.0.1:8000\"}]}\n"
           "tenants_file: tenants.yaml\n");
  const char *path = tmp_file(&t, "cfg.yaml", text);
  tg_config_errors_t e;
  load_bad(path, &e);
  expect_err(&e, tpath, 3, "tenants.a.models_allowed: unknown model 'gpt-9'",
             NULL);
  expect_err(&e, tpath, 4, "tenants.a.priority: unknown priority class",
             NULL);
  expect_err(&e, tpath, 5, "tenants.a.budget.daily_limit_usd",
             "'1.0000000001'", NULL);
  expect_err(&e, tpath, 6, "tenants.a: unknown key 'rate_limit'", NULL);
  expect_err(&e, tpath, 7, "tenants.b: missing required key 'models_allowed'",
             NULL);
  expect_err(&e, tpath, 9, "tenants: duplicate key 'a' (first at line 2)",
             NULL);
  expect_err(&e, tpath, 11, "unknown key 'extra'", NULL);
  assert_int_equal(e.n, 7);
  /* the refused config still says which file it names (serve watches it) */
  assert_non_null(e.tenants_file);
  assert_string_equal(e.tenants_file, tpath);
  tg_config_errors_free(&e);
  assert_null(e.tenants_file);
  tmp_close(&t);
}

/* A config that sets both tenants and tenants_file is refused, and the
 * tenants_file is read and checked all the same: its mistakes are shown in
 * the same run, so removing either key leaves no error unseen. */
static void test_both_tenants_keys_check_both(void **state) {
  (void)state;
  tmpdir_t t;
  char tpath[256];
  tmp_open(&t);
  tmp_file(&t, "quotas.yaml",
           "tenants:\n"
           "  a:\n"
           "    models_allowed: [m, gpt-9]\n");
  snprintf(tpath, sizeof tpath, "%s/quotas.yaml", t.dir);
  const char *path = tmp_file(&t, "cfg.yaml",
                              "models:\n"
                              "  m: {endpoints: [{url: \"http://127.0.0.1:8000\"}]}\n"
                              "tenants:\n"
                              "  b: {models_allowed: [m], priority: urgent}\n"
                              "tenants_file: quotas.yaml\n");
  tg_config_errors_t e;
  load_bad(path, &e);
  expect_err(&e, path, 4, "tenants.b.priority: unknown priority class 'urgent'", NULL);
  expect_err(&e, path, 5, "both 'tenants' and 'tenants_file' are set", NULL);
  expect_err(&e, tpath, 3, "tenants.a.models_allowed: unknown model 'gpt-9'", NULL);
  assert_int_equal(e.n, 3);
  tg_config_errors_free(&e);
  tmp_close(&t);
}

static void test_unreadable_tenants_file(void **state) {
  (void)state;
  char *path = tmp_config("models:\n"
                          "  m: {endpoints: [{url: \"http://h:1\"}]}\n"
                          "tenants_file: /nonexistent/tg/quotas.yaml\n");
  tg_config_errors_t e;
  load_bad(path, &e);
  expect_err(&e, path, 3, "tenants_file: cannot read",
             "'/nonexistent/tg/quotas.yaml'", "No such file", NULL);
  assert_int_equal(e.n, 1);
  assert_string_equal(e.tenants_file, "/nonexistent/tg/quotas.yaml");
  tg_config_errors_free(&e);
  unlink(path);
  free(path);
}

static void test_syntax_error(void **state) {
  (void)state;
  char *path = tmp_config("listen: 127.0.0.1:8080\n"
                          "models:\n"
                          "  m:\n"
                          "    endpoints: [{url: \"http://h:1\"}\n"
                          "    pricing: {}\n");
  tg_config_errors_t e;
  load_bad(path, &e);
  assert_int_equal(e.n, 1);
  /* libyaml notices the unclosed flow sequence where the next key starts. */
  expect_err(&e, path, 5, "YAML syntax error", NULL);
  tg_config_errors_free(&e);
  unlink(path);
  free(path);

  path = tmp_config("models:\n  m:\n\tendpoints: []\n");
  load_bad(path, &e);
  expect_err(&e, path, 3, "YAML syntax error", NULL);
  tg_config_errors_free(&e);
  unlink(path);
  free(path);
}

static void test_structure_errors(void **state) {
  (void)state;
  struct {
    const char *text;
    unsigned line;
    const char *frag;
  } cases[] = {
      {"", 1, "empty configuration"},
      {"listen: 127.0.0.1:1\n", 1, "missing required key 'models'"},
      {"models: {}\n", 1, "models: at least one model is required"},
      {"models:\n", 1, "models: at least one model is required"},
      {"models: [a, b]\n", 1, "models: expected a mapping, got a list"},
      {"- a\n- b\n", 1, "expected a mapping, got a list"},
      {"models:\n  m:\n", 2, "models.m: no endpoints"},
      {"models:\n  m: {kind: chat}\n", 2, "models.m: no endpoints"},
      {"models:\n  m: {endpoints: [{max_inflight: 3}]}\n", 2,
       "models.m.endpoints[0]: missing required key 'url'"},
      {"models:\n  m: {endpoints: [\"http://h:1\"]}\n", 2,
       "models.m.endpoints[0]: expected a mapping"},
      {"models:\n  m:\n    endpoints: [{url: \"http://:80\"}]\n", 3,
       "URL has no host"},
      {"models:\n  m:\n    endpoints: [{url: \"http://h:0\"}]\n", 3,
       "invalid port"},
      {"models:\n  m:\n    endpoints: [{url: \"http://u:p@h:1\"}]\n", 3,
       "credentials"},
      {"models:\n  m:\n    endpoints: [{url: \"http://h:1/caf\u00e9\"}]\n", 3,
       "non-ASCII"},
      {"models:\n  " "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
       "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm:\n"
       "    endpoints: [{url: \"http://h\"}]\n", 2, "at most 127"},
      {"models:\n  m:\n    kind: vision\n    endpoints: [{url: \"http://h\"}]\n",
       3, "models.m.kind: expected 'chat' or 'embedding', got 'vision'"},
      {"models:\n  m:\n    endpoints: [{url: \"http://h\"}]\n"
       "    pricing: {prompt_per_1k_usd: \"0.001\"}\n",
       4, "missing required key 'completion_per_1k_usd'"},
      {"models:\n  m:\n    endpoints: [{url: \"http://h\"}]\n"
       "    max_tokens: 99999999999\n",
       4, "models.m.max_tokens: 99999999999 is out of range"},
      {"models:\n  m:\n    endpoints: [{url: \"http://h\"}]\n"
       "    media_tokens: -1\n",
       4, "models.m.media_tokens: -1 is out of range"},
      {"models:\n  bad name:\n    endpoints: [{url: \"http://h\"}]\n", 2,
       "invalid model name 'bad name'"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "  Total: {endpoints: [{url: \"http://h\"}]}\n", 3,
       "models: model name 'Total' is reserved (the CSV invoice's total line)"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "  _other: {endpoints: [{url: \"http://h\"}]}\n", 3,
       "models: model name '_other' is reserved (the metrics' overflow series)"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "tenants:\n  _other: {models_allowed: [m]}\n", 4,
       "tenant name '_other' is reserved (the metrics' overflow series)"},
      {"models:\n  m:\n    endpoints: [{url: \"http://h\"}]\n    cache_salt: maybe\n", 4,
       "models.m.cache_salt: expected 'tenant' or 'off', got 'maybe'"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "forward_headers: [Authorization]\n",
       3, "'authorization' cannot be forwarded"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "forward_headers: [x-sim-fault, X-Request-Id]\n",
       3, "'x-request-id' cannot be forwarded"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "forward_headers: [accept-encoding]\n",
       3, "'accept-encoding' cannot be forwarded"},
      {"models:\n  m:\n    endpoints: [{url: \"http://h\"}]\n"
       "    pricing: {prompt_per_1k_usd: \"1000.000001\", completion_per_1k_usd: \"1\"}\n",
       4, "price '1000.000001' is too large (at most 1000 USD per 1K tokens)"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "health_check_interval: 1.5s\n",
       3, "health_check_interval: expected a duration"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "timeouts: {client_request: 0}\n",
       3, "timeouts.client_request: duration must be greater than zero"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "database: mysql://x\n",
       3, "database: expected 'sqlite' or a postgres:// URL"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "state_failure: maybe\n",
       3, "state_failure: expected 'closed' or 'open'"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "data_dir: [a]\n",
       3, "data_dir: expected a string, got a list"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "timeouts: 30s\n",
       3, "timeouts: expected a mapping, got a scalar"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "global_rate_limit: {requests_per_second: 1.5}\n",
       3, "global_rate_limit.requests_per_second: expected an integer"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "priority_classes: {high: 10}\n"
       "tenants:\n  t: {models_allowed: [m]}\n",
       5, "tenants.t: no priority set and there is no 'medium'"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n"
       "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n",
       4, "duplicate key 'listen' (first at line 3)"},
      {"models:\n  m: {endpoints: [{url: \"http://h\"}]}\n---\nlisten: x\n", 3,
       "only one YAML document"},
      {"models:\n  m:\n    endpoints:\n      - {url: \"http://h:1\"}\n"
       "      - {url: \"http://h:1/\"}\n",
       5, "endpoint 'http://h:1' is listed twice for this model (first at line 4)"},
      {"models:\n  a:\n    endpoints: [{url: \"http://h:1\", max_inflight: 8}]\n"
       "  b:\n    endpoints: [{url: \"http://h:2\"}, {url: \"http://h:1\"}]\n",
       5, "endpoint 'http://h:1' has max_inflight 256 here and 8 under model 'a' (line 3)"},
      /* scheme and host are case-insensitive: one server, however written */
      {"models:\n  m:\n    endpoints:\n      - {url: \"http://GPU-1:8000\"}\n"
       "      - {url: \"http://gpu-1:8000/\"}\n",
       5, "endpoint 'http://gpu-1:8000' is listed twice for this model (first at line 4)"},
      {"models:\n  a:\n    endpoints: [{url: \"HTTP://Gpu-1:8000\", max_inflight: 8}]\n"
       "  b:\n    endpoints: [{url: \"http://gpu-1:8000\"}]\n",
       5, "endpoint 'http://gpu-1:8000' has max_inflight 256 here and 8 under model 'a' (line 3)"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char *path = tmp_config(cases[i].text);
    tg_config_errors_t e;
    tg_config_t *cfg = NULL;
    int rc = tg_config_load(path, &cfg, &e);
    if (rc != TG_ECONFIG)
      fail_msg("case %zu loaded (rc %d): %s", i, rc, cases[i].text);
    assert_null(cfg);
    expect_err(&e, path, cases[i].line, cases[i].frag, NULL);
    tg_config_errors_free(&e);
    unlink(path);
    free(path);
  }
}

/* One server under two model names (a vLLM serving LoRA adapters) with
 * the same cap loads: both models list it. */
static void test_endpoint_shared_by_models(void **state) {
  (void)state;
  char *path = tmp_config("models:\n"
                          "  base: {endpoints: [{url: \"http://h:1\", max_inflight: 8}]}\n"
                          "  lora: {endpoints: [{url: \"http://h:1/\", max_inflight: 8}]}\n");
  tg_config_t *cfg = load_ok(path);
  assert_int_equal(cfg->n_models, 2);
  assert_int_equal(cfg->models[0].cache_salt, TG_CACHE_SALT_TENANT); /* the default */
  for (size_t i = 0; i < 2; i++) {
    assert_int_equal(cfg->models[i].n_endpoints, 1);
    assert_string_equal(cfg->models[i].endpoints[0].url, "http://h:1");
    assert_int_equal(cfg->models[i].endpoints[0].max_inflight, 8);
  }
  tg_config_unref(cfg);
  unlink(path);
  free(path);
}

/* A URL's scheme and host are case-insensitive (RFC 3986): the config
 * keeps them in lower case, so "http://GPU-1:8000" and "http://gpu-1:8000"
 * are one endpoint with one slot count, shared by the models that list it.
 * The path keeps its case: a server may tell /V1 from /v1. */
static void test_endpoint_host_case(void **state) {
  (void)state;
  char *path = tmp_config("models:\n"
                          "  base: {endpoints: [{url: \"HTTP://GPU-1.Internal:8000\", max_inflight: 8}]}\n"
                          "  lora: {endpoints: [{url: \"http://gpu-1.internal:8000/\", max_inflight: 8}]}\n"
                          "  v6: {endpoints: [{url: \"Http://[FE80::A]:8000/Serve/V1\"}]}\n");
  tg_config_t *cfg = load_ok(path);
  assert_int_equal(cfg->n_models, 3);
  assert_string_equal(cfg->models[0].endpoints[0].url, "http://gpu-1.internal:8000");
  assert_string_equal(cfg->models[1].endpoints[0].url, "http://gpu-1.internal:8000");
  assert_string_equal(cfg->models[2].endpoints[0].url, "http://[fe80::a]:8000/Serve/V1");
  tg_config_unref(cfg);
  unlink(path);
  free(path);
}

static void test_missing_file(void **state) {
  (void)state;
  tg_config_errors_t e;
  tg_config_t *cfg = NULL;
  assert_int_equal(tg_config_load("/nonexistent/tollgate.yaml", &cfg, &e),
                   TG_ECONFIG);
  assert_null(cfg);
  assert_int_equal(e.n, 1);
  expect_err(&e, "/nonexistent/tollgate.yaml", 1,
             "cannot read configuration", NULL);
  assert_null(e.tenants_file); /* not read that far */
  tg_config_errors_free(&e);
  /* errs is optional. */
  assert_int_equal(tg_config_load("/nonexistent/tollgate.yaml", &cfg, NULL),
                   TG_ECONFIG);
  assert_int_equal(tg_config_load(NULL, &cfg, NULL), TG_EINVAL);
}

/* ---- lookups and lifetime ------------------------------------------------- */

static void test_many_models_lookup(void **state) {
  (void)state;
  size_t cap = 64 * 1024, len = 0;
  char *text = malloc(cap);
  assert_non_null(text);
  len += (size_t)snprintf(text + len, cap - len, "models:\n");
  for (int i = 0; i < 500; i++)
    len += (size_t)snprintf(text + len, cap - len,
                            "  model-%d: {endpoints: [{url: "
                            "\"http://h:%d\"}]}\n",
                            i, 1000 + i);
  assert_true(len < cap);
  char *path = tmp_config(text);
  tg_config_t *cfg = load_ok(path);
  assert_int_equal(cfg->n_models, 500);
  for (int i = 0; i < 500; i++) {
    char name[32], url[32];
    snprintf(name, sizeof name, "model-%d", i);
    snprintf(url, sizeof url, "http://h:%d", 1000 + i);
    const tg_model_cfg_t *m = tg_config_model(cfg, name);
    assert_non_null(m);
    assert_string_equal(m->name, name);
    assert_string_equal(m->endpoints[0].url, url);
  }
  assert_null(tg_config_model(cfg, "model-500"));
  assert_null(tg_config_model(cfg, "model-"));
  assert_int_equal(cfg->n_tenants, 0);
  assert_null(tg_config_tenant(cfg, "anyone"));
  tg_config_unref(cfg);
  unlink(path);
  free(path);
  free(text);
}

static void test_refcount(void **state) {
  (void)state;
  char path[4200];
  snprintf(path, sizeof path, "%s/examples/tollgate.yaml", src_dir());
  tg_config_t *cfg = load_ok(path);
  assert_int_equal(cfg->refs, 1);
  assert_ptr_equal(tg_config_ref(cfg), cfg);
  assert_int_equal(cfg->refs, 2);
  tg_config_unref(cfg);
  /* Still alive for the other holder. */
  assert_int_equal(cfg->refs, 1);
  assert_int_equal(tg_config_model(cfg, "llama-3.1-8b")->prompt_nano_per_token,
                   500);
  tg_config_unref(cfg); /* frees; ASan reports a leak otherwise */
  tg_config_unref(NULL);
  assert_null(tg_config_ref(NULL));
}

/* ---- tollgate check-config ------------------------------------------------ */

/* Runs check-config with stdout and stderr captured into out / err. */
static int run_check(int argc, char **argv, char *out, char *err,
                     size_t size) {
  char opath[] = "/tmp/tg_cfg_out_XXXXXX", epath[] = "/tmp/tg_cfg_err_XXXXXX";
  int ofd = mkstemp(opath), efd = mkstemp(epath);
  assert_true(ofd >= 0 && efd >= 0);
  fflush(stdout);
  fflush(stderr);
  int so = dup(1), se = dup(2);
  dup2(ofd, 1);
  dup2(efd, 2);
  int rc = tg_cmd_check_config(argc, argv);
  fflush(stdout);
  fflush(stderr);
  dup2(so, 1);
  dup2(se, 2);
  close(so);
  close(se);
  char *paths[2] = {opath, epath};
  char *bufs[2] = {out, err};
  int fds[2] = {ofd, efd};
  for (int i = 0; i < 2; i++) {
    ssize_t n = pread(fds[i], bufs[i], size - 1, 0);
    assert_true(n >= 0);
    bufs[i][n] = '\0';
    close(fds[i]);
    unlink(paths[i]);
  }
  return rc;
}

static void test_check_config_command(void **state) {
  (void)state;
  char path[4200], out[4096], err[4096];
  snprintf(path, sizeof path, "%s/examples/tollgate.yaml", src_dir());

  char *ok_argv[] = {"check-config", "--config", path, NULL};
  assert_int_equal(run_check(3, ok_argv, out, err, sizeof out), 0);
  assert_string_equal(out, "config OK: 3 models, 3 tenants\n");
  assert_string_equal(err, "");

  char *bad = tmp_config("models:\n  m: {endpoints: []}\nworkers: x\n");
  char *bad_argv[] = {"check-config", "--config", bad, NULL};
  assert_int_equal(run_check(3, bad_argv, out, err, sizeof out), 1);
  assert_string_equal(out, "");
  char want[1024];
  snprintf(want, sizeof want,
           "%s:2: models.m.endpoints: no endpoints (at least one is "
           "required)\n"
           "%s:3: workers: expected an integer, got 'x'\n",
           bad, bad);
  assert_string_equal(err, want);
  unlink(bad);
  free(bad);

  char *no_argv[] = {"check-config", NULL};
  assert_int_equal(run_check(1, no_argv, out, err, sizeof out), 2);
  assert_non_null(strstr(err, "usage: tollgate check-config --config FILE"));
  char *dangling[] = {"check-config", "--config", NULL};
  assert_int_equal(run_check(2, dangling, out, err, sizeof out), 2);
  char *unknown[] = {"check-config", "--cfg", path, NULL};
  assert_int_equal(run_check(3, unknown, out, err, sizeof out), 2);
}

/* ---- upstream_client ------------------------------------------------------ */

/* A config file with `first` as its first line (may be empty) and a model
 * whose second endpoint is url (line 6 when first is one line). */
static char *client_config(const char *first, const char *url) {
  char text[1024];
  snprintf(text, sizeof text,
           "%s\n"
           "models:\n"
           "  m:\n"
           "    endpoints:\n"
           "      - url: http://10.0.0.1:8000\n"
           "      - url: %s\n"
           "    pricing: {prompt_per_1k_usd: \"1\", completion_per_1k_usd: \"1\"}\n"
           "tenants:\n"
           "  t: {models_allowed: [m]}\n",
           first, url);
  return tmp_config(text);
}

static void test_upstream_client(void **state) {
  (void)state;
  tg_config_errors_t e;
  tg_config_t *cfg;
  char *path;

  /* absent: auto (native for http://, libcurl for https://), and https
   * endpoints are fine */
  path = client_config("", "https://gpu:8443");
  cfg = load_ok(path);
  assert_int_equal(cfg->upstream_native, TG_UPSTREAM_CLIENT_AUTO);
  tg_config_unref(cfg);
  unlink(path);
  free(path);

  /* auto, said explicitly */
  path = client_config("upstream_client: auto", "https://gpu:8443");
  cfg = load_ok(path);
  assert_int_equal(cfg->upstream_native, TG_UPSTREAM_CLIENT_AUTO);
  tg_config_unref(cfg);
  unlink(path);
  free(path);

  /* native with http endpoints only */
  path = client_config("upstream_client: native", "http://localhost:8001/");
  cfg = load_ok(path);
  assert_int_equal(cfg->upstream_native, 1);
  assert_string_equal(cfg->models[0].endpoints[1].url, "http://localhost:8001");
  tg_config_unref(cfg);
  unlink(path);
  free(path);

  /* explicit curl keeps https */
  path = client_config("upstream_client: curl", "https://gpu:8443");
  cfg = load_ok(path);
  assert_int_equal(cfg->upstream_native, 0);
  tg_config_unref(cfg);
  unlink(path);
  free(path);

  /* native with an https endpoint: an error at the endpoint's line */
  path = client_config("upstream_client: native", "https://gpu:8443");
  load_bad(path, &e);
  assert_int_equal(e.n, 1);
  expect_err(&e, path, 6, "upstream_client 'native' serves only http:// endpoints",
             "https://gpu:8443", NULL);
  tg_config_errors_free(&e);
  unlink(path);
  free(path);

  /* an unknown value: an error at its line */
  path = client_config("upstream_client: libcurl", "http://gpu:8000");
  load_bad(path, &e);
  assert_int_equal(e.n, 1);
  expect_err(&e, path, 1, "upstream_client",
             "expected 'auto', 'curl' or 'native', got 'libcurl'", NULL);
  tg_config_errors_free(&e);
  unlink(path);
  free(path);
}

/* ---- bounds on the YAML itself ------------------------------------------- */

/* A growable text for generated files. */
typedef struct {
  char *p;
  size_t len, cap;
} text_t;

static void text_add(text_t *t, const char *s) {
  size_t n = strlen(s);
  if (t->len + n + 1 > t->cap) {
    t->cap = (t->len + n + 1) * 2;
    t->p = realloc(t->p, t->cap);
    assert_non_null(t->p);
  }
  memcpy(t->p + t->len, s, n + 1);
  t->len += n;
}

static void expect_only_err(const char *text, unsigned line, const char *frag) {
  char *path = tmp_config(text);
  tg_config_errors_t e;
  load_bad(path, &e);
  expect_err(&e, path, line, frag, NULL);
  if (e.n != 1)
    dump_errors(&e);
  assert_int_equal(e.n, 1);
  tg_config_errors_free(&e);
  unlink(path);
  free(path);
}

/* libyaml spends time quadratic in the nesting depth and in the number of
 * anchors, and aliases multiply what the loader walks: each is bounded and
 * reported at its line before libyaml's loader runs. */
static void test_yaml_shape_bounds(void **state) {
  (void)state;
  text_t t = {0};

  /* The 64th '[' opens the 65th level (the root mapping is the first). */
  text_add(&t, "models: ");
  for (int i = 0; i < 20000; i++)
    text_add(&t, "[\n");
  for (int i = 0; i < 20000; i++)
    text_add(&t, "]");
  text_add(&t, "\n");
  expect_only_err(t.p, 64, "YAML nesting deeper than 64 levels");

  t.len = 0;
  text_add(&t, "models:\n");
  for (int i = 0; i < 20000; i++) {
    char line[32];
    snprintf(line, sizeof line, "- &a%d x\n", i);
    text_add(&t, line);
  }
  expect_only_err(t.p, 258, "more than 256 YAML anchors");

  /* Each list is ten of the one before: the seventh stands for 11111111
   * nodes, more than a 16 MiB file holds without aliases. */
  t.len = 0;
  text_add(&t, "models:\n  m: {endpoints: [{url: \"http://h:1\"}]}\n"
               "laughs:\n  - &l0 [a, a, a, a, a, a, a, a, a, a]\n");
  for (int i = 1; i < 8; i++) {
    char line[256];
    int n = snprintf(line, sizeof line, "  - &l%d [", i);
    for (int j = 0; j < 10; j++)
      n += snprintf(line + n, sizeof line - (size_t)n, "%s*l%d", j ? ", " : "",
                    i - 1);
    snprintf(line + n, sizeof line - (size_t)n, "]\n");
    text_add(&t, line);
  }
  expect_only_err(t.p, 10, "aliases expand the file beyond 8388608 nodes");

  /* Aliases that stay small work as YAML says. */
  char *path = tmp_config("models:\n  m: {endpoints: [{url: \"http://h:1\"}]}\n"
                          "tenants:\n"
                          "  t1: {models_allowed: &all [m], rate_limits: &rl "
                          "{requests_per_minute: 7}}\n"
                          "  t2: {models_allowed: *all, rate_limits: *rl}\n");
  tg_config_t *cfg = load_ok(path);
  assert_true(tg_tenant_allows(tg_config_tenant(cfg, "t2"), "m"));
  assert_int_equal(tg_config_tenant(cfg, "t2")->requests_per_minute, 7);
  tg_config_unref(cfg);
  unlink(path);
  free(path);
  free(t.p);
}

/* Only a regular file is read. A FIFO without a writer made open() wait
 * for ever (check-config, serve, a reload on the main loop); a FIFO or a
 * device gives a reload no stable text. The alarm makes such a hang a
 * failure. */
static void test_only_regular_files(void **state) {
  (void)state;
  tmpdir_t td;
  tg_config_errors_t e;
  char fifo[128];
  tmp_open(&td);
  snprintf(fifo, sizeof fifo, "%s/tenants.pipe", td.dir);
  assert_int_equal(mkfifo(fifo, 0600), 0);
  const char *cfg = tmp_file(&td, "tollgate.yaml",
                             "models: {m: {endpoints: [{url: \"http://h:1\"}]}}\n"
                             "tenants_file: tenants.pipe\n");
  alarm(10);
  load_bad(fifo, &e);
  expect_err(&e, fifo, 1, "cannot read configuration", "not a regular file (a FIFO)", NULL);
  tg_config_errors_free(&e);
  load_bad(cfg, &e);
  expect_err(&e, cfg, 2, "tenants_file: cannot read", "not a regular file (a FIFO)", NULL);
  tg_config_errors_free(&e);
  load_bad("/dev/null", &e);
  expect_err(&e, "/dev/null", 1, "not a regular file (a device)", NULL);
  tg_config_errors_free(&e);
  alarm(0);

  /* past 16 MiB, said by its size before anything is read */
  const char *big = tmp_file(&td, "big.yaml", "models: {}\n");
  assert_int_equal(truncate(big, (off_t)17 << 20), 0);
  load_bad(big, &e);
  expect_err(&e, big, 1, "cannot read configuration", "file is larger than 16777216 bytes",
             NULL);
  tg_config_errors_free(&e);
  unlink(fifo);
  tmp_close(&td);
}

/* serve binds IP literals only, and the two listeners need different
 * sockets: check-config refuses what serve would. */
static void test_listen_addresses(void **state) {
  static const struct {
    const char *listen, *admin, *err; /* err NULL: accepted */
  } cases[] = {
      {"localhost:9000", "127.0.0.1:9001", "listen: expected an IP address, not a host name"},
      {"127.0.0.1:9000", "gw.example:9001", "admin_listen: expected an IP address"},
      {"127.0.0.1:9000", "127.0.0.1:9000", "cannot both be bound"},
      {"0.0.0.0:9000", "127.0.0.1:9000", "cannot both be bound"},
      {"\"[::]:9000\"", "127.0.0.1:9000", "cannot both be bound"},
      {"\"[::1]:9000\"", "\"[0:0::1]:9000\"", "cannot both be bound"},
      {"127.0.0.1:9000", "127.0.0.2:9000", NULL},
      {"0.0.0.0:9000", "\"[::1]:9000\"", NULL},
      {"0.0.0.0:9000", "0.0.0.0:9001", NULL},
  };
  char text[512];
  (void)state;
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    snprintf(text, sizeof text, "listen: %s\nadmin_listen: %s\n%s", cases[i].listen,
             cases[i].admin, "models: {m: {endpoints: [{url: \"http://h:1\"}]}}\n");
    if (cases[i].err == NULL) {
      char *path = tmp_config(text);
      tg_config_unref(load_ok(path));
      unlink(path);
      free(path);
    } else {
      expect_only_err(text, cases[i].err[0] == 'l' ? 1 : 2, cases[i].err);
    }
  }
  /* admin_listen alone, on the default listen's port */
  expect_only_err("admin_listen: 127.0.0.1:8080\n"
                  "models: {m: {endpoints: [{url: \"http://h:1\"}]}}\n",
                  1, "'127.0.0.1:8080' and admin_listen '127.0.0.1:8080' cannot both");
}

/* A value quoted from the file into a message cannot break its line: a
 * name holding a newline or an escape would forge lines ("config OK", an
 * error of another file) or drive the terminal. */
static void test_values_escaped_in_messages(void **state) {
  (void)state;
  char *path = tmp_config("models: {m: {endpoints: [{url: \"http://h:1\"}]}}\n"
                          "tenants:\n"
                          "  \"ev\\nconfig OK\\e[2K\": {models_allowed: [m]}\n"
                          "  ok: {models_allowed: [\"m\\nfake.yaml:1: x\\u0085\\u009b\"]}\n");
  tg_config_errors_t e;
  load_bad(path, &e);
  expect_err(&e, path, 3, "ev\\nconfig OK\\x1b[2K", NULL);
  expect_err(&e, path, 4, "unknown model 'm\\nfake.yaml:1: x\\u0085\\u009b'", NULL);
  for (size_t i = 0; i < e.n; i++)
    for (const unsigned char *c = (const unsigned char *)e.msgs[i]; *c; c++) {
      assert_true(*c >= 0x20 && *c != 0x7f);
      assert_false(*c == 0xc2 && c[1] >= 0x80 && c[1] <= 0x9f);
    }
  tg_config_errors_free(&e);
  unlink(path);
  free(path);
}

/* Bytes that are not UTF-8 (or are control characters) are reported at
 * the line that holds them, CR LF files included, like every other error. */
static void test_undecodable_bytes_line(void **state) {
  (void)state;
  expect_only_err("models:\n  m:\n    endpoints: [{url: \"http://h\xff:1\"}]\n",
                  3, "YAML error: invalid leading UTF-8 octet");
  expect_only_err("models:\r\n  m:\r\n\r\n    endpoints: []\r\n  \x01\r\n", 5,
                  "YAML error: control characters are not allowed");
}

#define MODEL_TEXT "models:\n  m:\n    endpoints: [{url: \"http://h:1\"}]\n"
/* A YAML 1.1 reader (PyYAML, the libyaml-based tools, go-yaml v2) takes a
 * plain integer with a leading zero as octal: 010 is 8 to it, and "0100"
 * requests a minute 64. Read as decimal, the same file would mean another
 * limit to the gateway than to the tooling that writes or checks it, so
 * leading zeros are refused in integers and bare-second durations, like
 * 0x10 and 1_000; a lone 0, 0s and 010s (no YAML integer) stay. */
static void test_leading_zeros_refused(void **state) {
  (void)state;
  expect_only_err(MODEL_TEXT "tenants:\n  a:\n    models_allowed: [m]\n"
                  "    rate_limits: {requests_per_minute: 0100}\n",
                  7, "tenants.a.rate_limits.requests_per_minute: expected a decimal integer "
                     "without leading zeros, got '0100'");
  expect_only_err(MODEL_TEXT "workers: \"07\"\n", 4, "workers: expected a decimal integer");
  expect_only_err(MODEL_TEXT "queue_max: -010\n", 4, "queue_max: expected a decimal integer");
  expect_only_err(MODEL_TEXT "timeouts: {queue: 010}\n", 4,
                  "timeouts.queue: expected a duration like 250ms, 30s, 2m or 1h "
                  "(without leading zeros), got '010'");

  char *path = tmp_config(MODEL_TEXT "workers: 0\nqueue_max: 0\n"
                          "health_check_interval: 0\ntimeouts: {drain: 0s, queue: 010s}\n");
  tg_config_t *cfg = load_ok(path);
  assert_int_equal(cfg->queue_max, 0);
  assert_int_equal(cfg->queue_timeout_ms, 10000);
  assert_int_equal(cfg->drain_timeout_ms, 0);
  tg_config_unref(cfg);
  unlink(path);
  free(path);
}

/* A state URL serve could not use is check-config's error, at its line,
 * and the password in it is not shown. */
#define MODEL "models:\n  m:\n    endpoints: [{url: \"http://h:1\"}]\n"
static void test_state_urls(void **state) {
  static const char *const bad[] = {
      "redis://127.0.0.1:99999/0", "redis://127.0.0.1:6379/abc", "redis://h:x/0",
      "redis://h/-1", "redis://[::1", "redis://u@h/0", "redis://:6379/0"};
  char text[512];
  tg_redis_url_t u;
  (void)state;
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    snprintf(text, sizeof text, "state: %s\n%s", bad[i], MODEL);
    expect_only_err(text, 1, "state: expected 'memory' or a redis://");
  }
  expect_only_err("state: redis://:hunter2@h:x/0\n" MODEL, 1, "got 'redis://:***@h:x/0'");
  expect_only_err("state: \"redis://:Ab3/xYz+Q==@127.0.0.1:6379/x\"\n" MODEL, 1,
                  "got 'redis://:***@127.0.0.1:6379/x'");
  expect_only_err("state: \"redis://s3cretpw@127.0.0.1:6379/0\"\n" MODEL, 1,
                  "got 'redis://***@127.0.0.1:6379/0'");
  {
    char *path = tmp_config("state: redis://:hunter2@h:x/0\n" MODEL);
    tg_config_errors_t e;
    load_bad(path, &e);
    for (size_t i = 0; i < e.n; i++)
      assert_null(strstr(e.msgs[i], "hunter2"));
    tg_config_errors_free(&e);
    unlink(path);
    free(path);
  }
  assert_int_equal(tg_config_redis_url("redis://u:p@[::1]:6380/2", &u), 0);
  assert_string_equal(u.host, "::1");
  assert_string_equal(u.user, "u");
  assert_string_equal(u.pass, "p");
  assert_int_equal(u.port, 6380);
  assert_int_equal(u.db, 2);
  assert_int_equal(u.has_pass, 1);
  assert_int_equal(tg_config_redis_url("redis://h", &u), 0);
  assert_int_equal(u.port, 6379);
  assert_int_equal(u.db, 0);
  assert_int_equal(u.has_pass, 0);
}

/* database: url is refused at line 1 with frag in the error, and the
 * password hunter2 in url is not shown. */
static void expect_database_err(const char *url, const char *frag) {
  char text[512], *path;
  tg_config_errors_t e;

  snprintf(text, sizeof text, "database: \"%s\"\n%s", url, MODEL);
  expect_only_err(text, 1, frag);
  path = tmp_config(text);
  load_bad(path, &e);
  assert_int_equal(e.n, 1);
  assert_null(strstr(e.msgs[0], "hunter2"));
  tg_config_errors_free(&e);
  unlink(path);
  free(path);
}

/* A database URL serve cannot use is check-config's error, at its line,
 * and the password in it is not shown: a mistyped scheme used to print the
 * URL whole, password and all. What libpq cannot read, or an sslmode it
 * refuses, serve refuses at its first connection: check-config says so
 * too (it used to answer "config OK"). */
static void test_database_urls(void **state) {
  static const char *const scheme = "database: expected 'sqlite' or a postgres:// URL";
  static const struct {
    const char *url, *frag;
  } bad[] = {
      {"postgresq://tg:hunter2@db/tollgate", scheme},
      {"pgsql://tg:hunter2@db/tollgate", scheme},
      {"mysql://tg:hunter2@db/tollgate", scheme},
      {"postgres://", scheme},
      {"postgre://tg:Ab3/x@Yz+Q==@db:5432/tollgate", "got 'postgre://tg:***@db:5432/tollgate'"},
      {"postgres://tg:hunter2@db/t?nosuch=1", "invalid URI query parameter: \"nosuch\""},
      {"postgres://tg:hunter2@db/t?nosuch=1", "in 'postgres://tg:***@db/t?nosuch=1'"},
      {"postgres://tg:hunter2@db/t?sslmode=requir", "invalid sslmode value \"requir\""},
      {"postgresql://tg:hunter2%zz@db/t", "invalid percent-encoded token: \"***\""},
  };
  static const char good[] =
      "postgresql://tg:p%40ss@db/t?sslmode=verify-full&sslrootcert=/etc/ca.pem";
  char text[512], *path;
  tg_config_t *cfg;

  (void)state;
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    expect_database_err(bad[i].url, bad[i].frag);
  snprintf(text, sizeof text, "database: \"%s\"\n%s", good, MODEL);
  path = tmp_config(text);
  cfg = load_ok(path);
  assert_string_equal(cfg->database, good);
  tg_config_unref(cfg);
  unlink(path);
  free(path);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_example_config),
      cmocka_unit_test(test_seed_quotas_via_tenants_file),
      cmocka_unit_test(test_seed_quotas_inline),
      cmocka_unit_test(test_defaults_and_forms),
      cmocka_unit_test(test_many_mistakes),
      cmocka_unit_test(test_tenants_file_errors),
      cmocka_unit_test(test_both_tenants_keys_check_both),
      cmocka_unit_test(test_unreadable_tenants_file),
      cmocka_unit_test(test_syntax_error),
      cmocka_unit_test(test_structure_errors),
      cmocka_unit_test(test_endpoint_shared_by_models),
      cmocka_unit_test(test_endpoint_host_case),
      cmocka_unit_test(test_missing_file),
      cmocka_unit_test(test_many_models_lookup),
      cmocka_unit_test(test_refcount),
      cmocka_unit_test(test_check_config_command),
      cmocka_unit_test(test_upstream_client),
      cmocka_unit_test(test_yaml_shape_bounds),
      cmocka_unit_test(test_only_regular_files),
      cmocka_unit_test(test_listen_addresses),
      cmocka_unit_test(test_values_escaped_in_messages),
      cmocka_unit_test(test_undecodable_bytes_line),
      cmocka_unit_test(test_state_urls),
      cmocka_unit_test(test_database_urls),
      cmocka_unit_test(test_leading_zeros_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
