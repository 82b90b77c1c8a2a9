/* The Redis policy backend against a real redis-server, started here on a
 * free loopback port in a temporary directory (no persistence) and stopped
 * at the end. Every test states the gateway's clock (injected, as the
 * backend never reads Redis' clock) and asserts what a tenant sees:
 * admitted or refused, which limit, Retry-After, x-ratelimit-* figures,
 * and the exact money in Redis. A differential test runs random traffic
 * through both the Lua scripts and src/policy/limits.c and wants the same
 * verdict, field for field, every time. Failures: Redis frozen, killed and
 * restarted, with every admission answered exactly once. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>
#include <uv.h>

#include "core/err.h"
#include "policy/limits.h"
#include "policy/state.h"

#define USD(x) ((tg_nano_t)(x) * TG_NANO_PER_USD)
/* 2026-11-28 12:00:00 UTC; the day ends at 2026-11-29 00:00, the month at
 * 2026-12-01 00:00. */
#define T0 INT64_C(1795867200000)
#define DAY_END INT64_C(1795910400000)
#define MONTH_END INT64_C(1796083200000)

/* ---- what the backend reports through state.c's hooks --------------------
 * Weak, so that a build linking state.c's versions keeps those. */

typedef struct {
  char tenant[64];
  char window[16];
  int64_t period;
  tg_nano_t spent, limit;
  int pct;
} alert_t;

static pthread_mutex_t hook_lock = PTHREAD_MUTEX_INITIALIZER;
static alert_t alerts[16];
static int n_alerts;
static int n_down_logs, n_up_logs;

__attribute__((weak)) void tg_policy_alert(const char *tenant, const char *window,
                                           int64_t period, tg_nano_t spent, tg_nano_t limit,
                                           int pct) {
  pthread_mutex_lock(&hook_lock);
  if (n_alerts < 16) {
    alert_t *a = &alerts[n_alerts];
    snprintf(a->tenant, sizeof a->tenant, "%s", tenant);
    snprintf(a->window, sizeof a->window, "%s", window);
    a->period = period;
    a->spent = spent;
    a->limit = limit;
    a->pct = pct;
  }
  n_alerts++;
  pthread_mutex_unlock(&hook_lock);
}

__attribute__((weak)) void tg_policy_log(const char *event, const char *detail) {
  pthread_mutex_lock(&hook_lock);
  if (strcmp(event, "state_redis_down") == 0)
    n_down_logs++;
  if (strcmp(event, "state_redis_up") == 0)
    n_up_logs++;
  pthread_mutex_unlock(&hook_lock);
  fprintf(stderr, "[policy] %s: %s\n", event, detail);
}

/* ---- redis-server ---------------------------------------------------------- */

typedef struct {
  pid_t pid;
  int port;
  char dir[64];
} server_t;

static int free_port(void) {
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(fd >= 0);
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
  close(fd);
  return ntohs(sa.sin_port);
}

static redisContext *sync_connect(int port) {
  struct timeval tv = {1, 0};
  redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
  if (c != NULL && c->err) {
    redisFree(c);
    return NULL;
  }
  return c;
}

/* Starts redis-server on s->port (picked when 0) and waits for PING. */
static int server_start(server_t *s) {
  char port[16], log[128];
  if (s->dir[0] == '\0') {
    snprintf(s->dir, sizeof s->dir, "/tmp/tg-redis-XXXXXX");
    if (mkdtemp(s->dir) == NULL)
      return -1;
  }
  if (s->port == 0)
    s->port = free_port();
  snprintf(port, sizeof port, "%d", s->port);
  snprintf(log, sizeof log, "%s/redis.log", s->dir);
  s->pid = fork();
  if (s->pid < 0)
    return -1;
  if (s->pid == 0) {
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    execl("/usr/bin/redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1",
          "--save", "", "--appendonly", "no", "--dir", s->dir, "--daemonize", "no",
          "--loglevel", "warning", (char *)NULL);
    _exit(127);
  }
  for (int i = 0; i < 100; i++) {
    redisContext *c = sync_connect(s->port);
    if (c != NULL) {
      redisReply *r = redisCommand(c, "PING");
      int ok = r != NULL && r->type == REDIS_REPLY_STATUS;
      if (r)
        freeReplyObject(r);
      redisFree(c);
      if (ok)
        return 0;
    }
    usleep(50000);
  }
  return -1;
}

static void server_signal(server_t *s, int sig) {
  if (s->pid > 0)
    kill(s->pid, sig);
}

static void server_stop(server_t *s, int sig) {
  if (s->pid <= 0)
    return;
  kill(s->pid, sig);
  if (sig == SIGKILL)
    kill(s->pid, SIGCONT);
  waitpid(s->pid, NULL, 0);
  s->pid = 0;
}

static void server_cleanup(server_t *s) {
  DIR *d = opendir(s->dir);
  struct dirent *e;
  char path[512];
  if (d != NULL) {
    while ((e = readdir(d)) != NULL) {
      if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
        continue;
      snprintf(path, sizeof path, "%s/%s", s->dir, e->d_name);
      unlink(path);
    }
    closedir(d);
  }
  rmdir(s->dir);
}

/* ---- fixture ---------------------------------------------------------------- */

typedef struct {
  server_t srv;
  uv_loop_t loop;
  uv_timer_t pump;          /* keeps UV_RUN_ONCE from sleeping for long */
  tg__redis_t *r;
  tg__redis_loop_t *rl;
  redisContext *sync;
} fx_t;

static fx_t fx;

static void on_pump(uv_timer_t *t) {
  (void)t;
}

/* Runs the loop until *counter reaches want or timeout_ms passes. */
static void spin(uv_loop_t *loop, const int *counter, int want, int timeout_ms) {
  uint64_t end = uv_hrtime() + (uint64_t)timeout_ms * 1000000;
  while (*(volatile const int *)counter < want && uv_hrtime() < end)
    uv_run(loop, UV_RUN_ONCE);
}

static int connected_flag(tg__redis_loop_t *rl) {
  return tg__redis_connected(rl);
}

static int wait_connected(uv_loop_t *loop, tg__redis_loop_t *rl, int want, int timeout_ms) {
  uint64_t end = uv_hrtime() + (uint64_t)timeout_ms * 1000000;
  while (connected_flag(rl) != want && uv_hrtime() < end)
    uv_run(loop, UV_RUN_ONCE);
  return connected_flag(rl) == want;
}

static void spin_ms(uv_loop_t *loop, int ms) {
  int never = 0;
  spin(loop, &never, 1, ms);
}

/* Sync queries on the side. */
static char *sget(const char *fmt, ...) {
  static char out[128];
  va_list ap;
  va_start(ap, fmt);
  redisReply *r = redisvCommand(fx.sync, fmt, ap);
  va_end(ap);
  assert_non_null(r);
  if (r->type == REDIS_REPLY_STRING)
    snprintf(out, sizeof out, "%s", r->str);
  else if (r->type == REDIS_REPLY_INTEGER)
    snprintf(out, sizeof out, "%lld", r->integer);
  else if (r->type == REDIS_REPLY_NIL)
    snprintf(out, sizeof out, "(nil)");
  else if (r->type == REDIS_REPLY_STATUS)
    snprintf(out, sizeof out, "%s", r->str);
  else
    snprintf(out, sizeof out, "(type %d)", r->type);
  freeReplyObject(r);
  return out;
}

static int group_setup(void **state) {
  (void)state;
  memset(&fx, 0, sizeof fx);
  signal(SIGPIPE, SIG_IGN);
  if (server_start(&fx.srv) < 0)
    return -1;
  fx.sync = sync_connect(fx.srv.port);
  if (fx.sync == NULL)
    return -1;
  char url[64];
  snprintf(url, sizeof url, "redis://127.0.0.1:%d", fx.srv.port);
  if (tg__redis_new(url, &fx.r) < 0)
    return -1;
  uv_loop_init(&fx.loop);
  uv_timer_init(&fx.loop, &fx.pump);
  uv_timer_start(&fx.pump, on_pump, 5, 5);
  if (tg__redis_loop_new(fx.r, &fx.loop, &fx.rl) < 0)
    return -1;
  if (!wait_connected(&fx.loop, fx.rl, 1, 5000))
    return -1;
  return 0;
}

static int group_teardown(void **state) {
  (void)state;
  if (fx.rl)
    tg__redis_loop_close(fx.rl);
  uv_close((uv_handle_t *)&fx.pump, NULL);
  uv_run(&fx.loop, UV_RUN_DEFAULT);
  int rc = uv_loop_close(&fx.loop);
  tg__redis_free(fx.r);
  if (fx.sync)
    redisFree(fx.sync);
  server_stop(&fx.srv, SIGTERM);
  server_cleanup(&fx.srv);
  return rc == 0 ? 0 : -1;
}

static int test_setup(void **state) {
  (void)state;
  if (fx.sync == NULL)
    fx.sync = sync_connect(fx.srv.port);
  if (fx.sync == NULL)
    return -1;
  sget("FLUSHALL");
  tg__redis_holding(fx.r, 1);
  pthread_mutex_lock(&hook_lock);
  n_alerts = 0;
  n_down_logs = n_up_logs = 0;
  pthread_mutex_unlock(&hook_lock);
  return 0;
}

/* ---- admissions -------------------------------------------------------------- */

typedef struct {
  int done;
  tg_admission_t a;
} res_t;

static void on_admit(void *arg, const tg_admission_t *a) {
  res_t *r = arg;
  r->done++;
  r->a = *a;
}

static tg_admit_req_t req(const char *tenant) {
  tg_admit_req_t r;
  memset(&r, 0, sizeof r);
  r.tenant = tenant;
  r.limits.alert_pct = 80;
  return r;
}

static tg_admission_t admit_on(tg__redis_loop_t *rl, uv_loop_t *loop, const tg_admit_req_t *r,
                               int64_t now) {
  res_t res;
  memset(&res, 0, sizeof res);
  assert_int_equal(tg__redis_admit(rl, r, now, on_admit, &res), 0);
  spin(loop, &res.done, 1, 3000);
  assert_int_equal(res.done, 1);
  return res.a;
}

static tg_admission_t admit(const tg_admit_req_t *r, int64_t now) {
  return admit_on(fx.rl, &fx.loop, r, now);
}

/* Settles and waits until Redis has run it (a PING behind it answers). */
static void settle(const tg_admit_req_t *r, const tg_admission_t *a, int64_t tokens,
                   tg_nano_t cost, int64_t now) {
  tg__redis_settle(fx.rl, r, a, tokens, cost, now);
  /* Replies come in order: an admission sent after it is answered after. */
  tg_admit_req_t probe = req("settle-probe");
  (void)admit(&probe, now);
}

#define assert_admitted(a) assert_int_equal((a).v.refused, TG_LIMIT_NONE)
#define assert_refused(a, kind, retry)                                          \
  do {                                                                          \
    tg_admission_t ar_ = (a); /* once: an admission is not idempotent */        \
    assert_int_equal(ar_.v.refused, (kind));                                    \
    assert_int_equal(ar_.v.retry_after_ms, (retry));                            \
  } while (0)

/* ---- tests ------------------------------------------------------------------- */

static void test_url(void **state) {
  (void)state;
  tg__redis_t *r = NULL;
  assert_int_equal(tg__redis_new("http://127.0.0.1:6379", &r), TG_EINVAL);
  assert_int_equal(tg__redis_new("redis://127.0.0.1:99999", &r), TG_EINVAL);
  assert_int_equal(tg__redis_new("redis://127.0.0.1:6379/x", &r), TG_EINVAL);
  assert_int_equal(tg__redis_new("redis://", &r), TG_EINVAL);
  assert_int_equal(tg__redis_new("redis://user@host", &r), TG_EINVAL);
  assert_int_equal(tg__redis_new("redis://localhost", &r), 0);
  tg__redis_free(r);
  assert_int_equal(tg__redis_new("redis://:secret@[::1]:6380/3", &r), 0);
  tg__redis_free(r);
}

/* The longest tenant name the backend takes fits its keys; longer ones
 * are refused without a callback. */
static void test_tenant_names(void **state) {
  (void)state;
  char name[130];
  res_t res;
  memset(name, 'x', sizeof name);
  name[128] = '\0';
  tg_admit_req_t r = req(name);
  r.limits.rpm = 1;
  r.limits.tpm = 1000000;
  r.limits.day_limit = USD(1000);
  r.global_rps = 1000;
  assert_admitted(admit(&r, T0));
  assert_refused(admit(&r, T0 + 1), TG_LIMIT_REQUESTS, 59999);
  name[128] = 'x';
  name[129] = '\0';
  memset(&res, 0, sizeof res);
  assert_int_equal(tg__redis_admit(fx.rl, &r, T0, on_admit, &res), TG_ETOOBIG);
  r.tenant = "";
  assert_int_equal(tg__redis_admit(fx.rl, &r, T0, on_admit, &res), TG_EINVAL);
  spin_ms(&fx.loop, 20);
  assert_int_equal(res.done, 0);
}

static void test_requests_per_minute(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  tg_admission_t a;
  r.limits.rpm = 60;

  for (int i = 0; i < 60; i++) {
    a = admit(&r, T0 + i * 100);
    assert_admitted(a);
    assert_int_equal(a.backend, TG_BACKEND_REDIS);
    assert_true(a.lease[0] != '\0');
    assert_int_equal(a.v.limit_requests, 60);
    assert_int_equal(a.v.remaining_requests, 59 - i);
    assert_int_equal(a.v.reset_requests_ms, 60000 - i * 100);
    assert_int_equal(a.v.limit_tokens, -1);
    assert_int_equal(a.v.day, tg_day_of(T0));
    assert_int_equal(a.v.month, tg_month_of(T0));
  }
  /* The 61st within the minute: refused until the first one leaves. */
  a = admit(&r, T0 + 10000);
  assert_refused(a, TG_LIMIT_REQUESTS, 50000);
  assert_int_equal(a.v.remaining_requests, 0);
  assert_string_equal(a.lease, "");
  a = admit(&r, T0 + 59999);
  assert_refused(a, TG_LIMIT_REQUESTS, 1);
  /* A refusal recorded nothing. */
  assert_string_equal(sget("GET tg:{acme}:rpm:n"), "60");
  a = admit(&r, T0 + 60000);
  assert_admitted(a);
  assert_int_equal(a.v.remaining_requests, 0);
  a = admit(&r, T0 + 60050);
  assert_refused(a, TG_LIMIT_REQUESTS, 50);
  /* No 60 s span ever admitted more than 60: the log holds exactly 60. */
  assert_string_equal(sget("GET tg:{acme}:rpm:n"), "60");
  /* A lowered limit (a reload) counts everything in the window: with 10,
   * the 51st oldest admission (at T0 + 5100) must leave first. The log is
   * not trimmed by the refusal, so raising the limit again finds it whole. */
  r.limits.rpm = 10;
  a = admit(&r, T0 + 60100);
  assert_refused(a, TG_LIMIT_REQUESTS, T0 + 5100 + 60000 - (T0 + 60100));
  assert_int_equal(a.v.remaining_requests, 0);
  assert_int_equal(a.v.reset_requests_ms, 5000);
  assert_string_equal(sget("GET tg:{acme}:rpm:n"), "59");
  r.limits.rpm = 60;
  a = admit(&r, T0 + 60100);
  assert_admitted(a);
  assert_int_equal(a.v.remaining_requests, 0);
  /* Another tenant is not affected. */
  tg_admit_req_t o = req("other");
  o.limits.rpm = 1;
  assert_admitted(admit(&o, T0 + 60050));
}

static void test_tokens_bucket_and_settle(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  tg_admission_t a1, a;
  r.limits.tpm = 1000;
  r.reserve.tokens = 600;

  a1 = admit(&r, T0);
  assert_admitted(a1);
  assert_int_equal(a1.v.limit_tokens, 1000);
  assert_int_equal(a1.v.remaining_tokens, 400);
  assert_int_equal(a1.v.reset_tokens_ms, 36000); /* 600 tokens at 1000/min */
  a = admit(&r, T0);
  assert_refused(a, TG_LIMIT_TOKENS, 12000);     /* 200 short */
  a = admit(&r, T0 + 6000);                      /* +100 refilled */
  assert_refused(a, TG_LIMIT_TOKENS, 6000);
  assert_int_equal(a.v.remaining_tokens, 500);
  /* The first used 100 of its 600: 500 come back, the bucket is full. */
  settle(&r, &a1, 100, 0, T0 + 6000);
  assert_string_equal(sget("HGET tg:{acme}:tpm level_mt"), "1000000");
  a = admit(&r, T0 + 6000);
  assert_admitted(a);
  assert_int_equal(a.v.remaining_tokens, 400);
  /* Using more than reserved takes the bucket below zero. */
  settle(&r, &a, 1500, 0, T0 + 6000);
  assert_string_equal(sget("HGET tg:{acme}:tpm level_mt"), "-500000");
  r.reserve.tokens = 100;
  a = admit(&r, T0 + 6000);
  assert_refused(a, TG_LIMIT_TOKENS, 36000);     /* 600 tokens short */
  assert_int_equal(a.v.remaining_tokens, 0);
  /* A request bigger than a minute needs a full bucket. */
  r.reserve.tokens = 5000;
  a = admit(&r, T0 + 6000 + 90000);
  assert_admitted(a);
  assert_int_equal(a.v.remaining_tokens, 0);
  assert_string_equal(sget("HGET tg:{acme}:tpm level_mt"), "-4000000");
}

static void test_concurrency_lease_released_by_settle(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  r.limits.concurrency = 2;
  tg_admission_t a1 = admit(&r, T0), a2 = admit(&r, T0 + 1), a;
  assert_admitted(a1);
  assert_admitted(a2);
  assert_string_not_equal(a1.lease, a2.lease);
  a = admit(&r, T0 + 2);
  assert_refused(a, TG_LIMIT_CONCURRENCY, 1000);
  assert_string_equal(sget("ZCARD tg:{acme}:leases"), "2");
  settle(&r, &a1, 0, 0, T0 + 3);
  assert_string_equal(sget("ZCARD tg:{acme}:leases"), "1");
  a = admit(&r, T0 + 4);
  assert_admitted(a);
  a = admit(&r, T0 + 5);
  assert_refused(a, TG_LIMIT_CONCURRENCY, 1000);
  /* A settlement of a refused admission gives nothing back. */
  settle(&r, &a, 0, 0, T0 + 6);
  assert_string_equal(sget("ZCARD tg:{acme}:leases"), "2");
}

/* A gateway that dies stops renewing: its slot and its reserved money come
 * back when the lease expires, TTL after the last renewal. */
static void test_lease_expiry(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  tg__redis_loop_t *dead = NULL;
  r.limits.concurrency = 1;
  r.limits.day_limit = USD(10);
  r.reserve.cost = USD(6);

  assert_int_equal(tg__redis_loop_new(fx.r, &fx.loop, &dead), 0);
  assert_true(wait_connected(&fx.loop, dead, 1, 3000));
  tg_admission_t old = admit_on(dead, &fx.loop, &r, T0);
  assert_admitted(old);
  tg__redis_loop_close(dead); /* killed: never settles, never renews */
  assert_string_equal(sget("HGET tg:{acme}:day:%lld reserved", (long long)tg_day_of(T0)),
                      "6000000000");

  r.reserve.cost = USD(1);
  assert_refused(admit(&r, T0 + 29999), TG_LIMIT_CONCURRENCY, 1000);
  r.reserve.cost = USD(6);
  tg_admission_t a = admit(&r, T0 + 30000);
  assert_admitted(a); /* the slot came back, and so did the 6 USD */
  assert_string_equal(sget("HGET tg:{acme}:day:%lld reserved", (long long)tg_day_of(T0)),
                      "6000000000");
  /* The dead gateway's settlement, if it ever comes, counts the money spent
   * but no longer takes back a reservation already given back. */
  tg__redis_settle(fx.rl, &r, &old, 10, USD(2), T0 + 30001);
  settle(&r, &a, 10, USD(3), T0 + 30002);
  assert_string_equal(sget("HGET tg:{acme}:day:%lld reserved", (long long)tg_day_of(T0)), "0");
  assert_string_equal(sget("HGET tg:{acme}:day:%lld spent", (long long)tg_day_of(T0)),
                      "5000000000");
  assert_string_equal(sget("ZCARD tg:{acme}:leases"), "0");
}

static void test_budgets(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  const long long day = (long long)tg_day_of(T0), month = (long long)tg_month_of(T0);
  r.limits.day_limit = USD(1);
  r.limits.month_limit = USD(100);

  r.reserve.cost = 400000000;
  const tg_admit_req_t r1 = r; /* a settlement gets the request as admitted */
  tg_admission_t a1 = admit(&r1, T0);
  assert_admitted(a1);
  r.reserve.cost = 600000000;
  assert_admitted(admit(&r, T0 + 1)); /* exactly the limit */
  r.reserve.cost = 1;
  assert_refused(admit(&r, T0 + 2), TG_LIMIT_DAILY_BUDGET, DAY_END - (T0 + 2));
  assert_string_equal(sget("HGET tg:{acme}:day:%lld reserved", day), "1000000000");
  assert_string_equal(sget("HGET tg:{acme}:month:%lld reserved", month), "1000000000");
  /* The 0.40 reservation settles at 0.10 actual. */
  settle(&r1, &a1, 0, 100000000, T0 + 3);
  assert_string_equal(sget("HGET tg:{acme}:day:%lld spent", day), "100000000");
  assert_string_equal(sget("HGET tg:{acme}:day:%lld reserved", day), "600000000");
  r.reserve.cost = 300000000;
  assert_admitted(admit(&r, T0 + 4)); /* 0.1 + 0.6 + 0.3 = 1.0 */
  r.reserve.cost = 1;
  assert_refused(admit(&r, T0 + 5), TG_LIMIT_DAILY_BUDGET, DAY_END - (T0 + 5));
  assert_string_equal(sget("HGET tg:{acme}:month:%lld reserved", month), "900000000");
  /* A new day: a new window. Twelve hours on, the unsettled admissions'
   * leases have long expired unrenewed, so the month's reservations came
   * back too; the month keeps what was spent. */
  assert_admitted(admit(&r, DAY_END));
  assert_string_equal(sget("HGET tg:{acme}:day:%lld reserved", day + 1), "1");
  assert_string_equal(sget("HGET tg:{acme}:month:%lld reserved", month), "1");
  assert_string_equal(sget("HGET tg:{acme}:month:%lld spent", month), "100000000");

  /* Monthly, and large amounts stay exact. */
  tg_admit_req_t m = req("big");
  m.limits.month_limit = USD(5000000);
  m.reserve.cost = USD(5000000) - 1;
  assert_admitted(admit(&m, T0));
  m.reserve.cost = 1;
  assert_admitted(admit(&m, T0 + 1));
  assert_refused(admit(&m, T0 + 2), TG_LIMIT_MONTHLY_BUDGET, MONTH_END - (T0 + 2));
  assert_string_equal(sget("HGET tg:{big}:month:%lld reserved", month), "5000000000000000");
  /* Both exceeded: the daily one is named (check order), and the wait is
   * the month's: the request passes only once both budgets do. */
  m.limits.day_limit = 1;
  assert_refused(admit(&m, T0 + 3), TG_LIMIT_DAILY_BUDGET, MONTH_END - (T0 + 3));
  /* Keys expire a few periods after theirs ends. */
  long long ttl = strtoll(sget("PTTL tg:{acme}:day:%lld", day), NULL, 10);
  assert_true(ttl > 3LL * 86400000 && ttl <= (DAY_END - T0) + 3LL * 86400000);
}

static void test_alert_once(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  r.limits.day_limit = USD(10);
  r.limits.month_limit = USD(10);
  r.limits.alert_pct = 80;
  r.reserve.cost = USD(1);
  tg_admission_t a;

  a = admit(&r, T0);
  settle(&r, &a, 0, USD(7) + 999999999, T0 + 1); /* 79.99...% */
  assert_int_equal(n_alerts, 0);
  a = admit(&r, T0 + 2);
  settle(&r, &a, 0, 1, T0 + 3);                  /* exactly 80% */
  assert_int_equal(n_alerts, 2);
  assert_string_equal(alerts[0].tenant, "acme");
  assert_string_equal(alerts[0].window, "day");
  assert_int_equal(alerts[0].period, tg_day_of(T0));
  assert_int_equal(alerts[0].spent, USD(8));
  assert_int_equal(alerts[0].limit, USD(10));
  assert_int_equal(alerts[0].pct, 80);
  assert_string_equal(alerts[1].window, "month");
  assert_int_equal(alerts[1].period, tg_month_of(T0));
  a = admit(&r, T0 + 4);
  settle(&r, &a, 0, USD(1), T0 + 5);
  assert_int_equal(n_alerts, 2);                 /* once per window */
  /* The next day's window alerts again, the month's does not. */
  a = admit(&r, DAY_END);
  settle(&r, &a, 0, USD(9), DAY_END + 1);
  assert_int_equal(n_alerts, 3);
  assert_string_equal(alerts[2].window, "day");
  assert_int_equal(alerts[2].period, tg_day_of(DAY_END));
}

static void test_global_limit(void **state) {
  (void)state;
  tg_admit_req_t a = req("a"), b = req("b"), c = req("c");
  a.global_rps = b.global_rps = c.global_rps = 3;
  c.limits.rpm = 1;

  assert_admitted(admit(&a, T0));
  assert_admitted(admit(&b, T0 + 100));
  assert_admitted(admit(&a, T0 + 200));
  tg_admission_t x = admit(&b, T0 + 300);
  assert_refused(x, TG_LIMIT_GLOBAL, 700);
  assert_string_equal(x.lease, "");
  assert_refused(admit(&a, T0 + 999), TG_LIMIT_GLOBAL, 1);
  assert_admitted(admit(&b, T0 + 1000));
  /* A request its tenant refuses gives its global slot back ... */
  assert_admitted(admit(&c, T0 + 1100));
  assert_refused(admit(&c, T0 + 1200), TG_LIMIT_REQUESTS, 60000 - 100);
  /* ... which a takes */
  assert_admitted(admit(&a, T0 + 1300));
  assert_string_equal(sget("GET tg:{global}:rps:n"), "3"); /* b@1000, c@1100, a@1300 */
  assert_refused(admit(&a, T0 + 1400), TG_LIMIT_GLOBAL, 600);
}

static void test_noscript_falls_back(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  r.limits.rpm = 2;
  assert_admitted(admit(&r, T0));
  assert_string_equal(sget("SCRIPT FLUSH"), "OK");
  assert_admitted(admit(&r, T0 + 1));
  assert_refused(admit(&r, T0 + 2), TG_LIMIT_REQUESTS, 59998);
}

/* ---- two gateways ------------------------------------------------------------- */

#define PER_THREAD 150
#define SHARED_RPM 200

typedef struct {
  int admitted, refused, other, done, ready;
  int waves;                  /* 2: a second burst after the grants are back */
} worker_t;

static void on_worker_admit(void *arg, const tg_admission_t *a) {
  worker_t *w = arg;
  if (a->v.refused == TG_LIMIT_NONE)
    w->admitted++;
  else if (a->v.refused == TG_LIMIT_REQUESTS)
    w->refused++;
  else
    w->other++;
  w->done++;
}

static void *worker_main(void *arg) {
  worker_t *w = arg;
  uv_loop_t loop;
  uv_timer_t pump;
  tg__redis_loop_t *rl = NULL;
  tg_admit_req_t r = req("shared");
  r.limits.rpm = SHARED_RPM;

  uv_loop_init(&loop);
  uv_timer_init(&loop, &pump);
  uv_timer_start(&pump, on_pump, 5, 5);
  if (tg__redis_loop_new(fx.r, &loop, &rl) == 0 && wait_connected(&loop, rl, 1, 5000)) {
    w->ready = 1;
    for (int i = 0; i < PER_THREAD; i++)
      if (tg__redis_admit(rl, &r, T0 + i, on_worker_admit, w) < 0)
        w->other++, w->done++;
    spin(&loop, &w->done, PER_THREAD, 10000);
    if (w->waves == 2) {
      /* A grant left unused goes back when its period is over (a tick
       * after 200 ms): then the other gateway may have it. */
      spin_ms(&loop, 900);
      for (int i = 0; i < PER_THREAD; i++)
        if (tg__redis_admit(rl, &r, T0 + 1000 + i, on_worker_admit, w) < 0)
          w->other++, w->done++;
      spin(&loop, &w->done, 2 * PER_THREAD, 10000);
    }
  }
  if (rl)
    tg__redis_loop_close(rl);
  uv_close((uv_handle_t *)&pump, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return NULL;
}

static void run_two_gateways(worker_t w[2], int waves) {
  pthread_t th[2];
  memset(w, 0, 2 * sizeof *w);
  for (int i = 0; i < 2; i++) {
    w[i].waves = waves;
    assert_int_equal(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
  }
  for (int i = 0; i < 2; i++)
    pthread_join(th[i], NULL);
  for (int i = 0; i < 2; i++) {
    assert_int_equal(w[i].ready, 1);
    assert_int_equal(w[i].done, waves * PER_THREAD);
    assert_int_equal(w[i].other, 0);
  }
  /* Both really took part. */
  assert_true(w[0].admitted > 0 && w[1].admitted > 0);
}

/* One by one (holdings off), a burst from both sides gets exactly the limit. */
static void test_two_gateways_share_the_limit(void **state) {
  (void)state;
  worker_t w[2];
  tg__redis_holding(fx.r, 0);
  run_two_gateways(w, 1);
  assert_int_equal(w[0].admitted + w[1].admitted, SHARED_RPM);
  assert_int_equal(w[0].refused + w[1].refused, 2 * PER_THREAD - SHARED_RPM);
}

/* With holdings, a burst may leave part of a grant unused on one side for
 * a period; once it is back, the two together have had exactly the limit,
 * never more. */
static void test_two_gateways_holdings_exact(void **state) {
  (void)state;
  worker_t w[2];
  run_two_gateways(w, 2);
  assert_int_equal(w[0].admitted + w[1].admitted, SHARED_RPM);
  assert_int_equal(w[0].refused + w[1].refused, 4 * PER_THREAD - SHARED_RPM);
  assert_string_equal(sget("GET tg:{shared}:rpm:n"), "200");
}

/* ---- holdings ------------------------------------------------------------------ */

static long long evalsha_calls(void) {
  redisReply *r = redisCommand(fx.sync, "INFO commandstats");
  long long n = 0;
  assert_non_null(r);
  if (r->type == REDIS_REPLY_STRING) {
    const char *p = strstr(r->str, "cmdstat_evalsha:calls=");
    if (p != NULL)
      n = strtoll(p + strlen("cmdstat_evalsha:calls="), NULL, 10);
  }
  freeReplyObject(r);
  return n;
}

/* Holdings sync on the loop's 250 ms tick once their 200 ms period is over. */
static void wait_holdings(void) {
  spin_ms(&fx.loop, 900);
}

/* A busy tenant far from its limits is admitted from its holding, without a
 * script call per request, and what its requests spent reaches Redis to the
 * nano-USD, with nothing left reserved or held. */
static void test_holding_admits_locally_and_reports_exactly(void **state) {
  (void)state;
  tg_admit_req_t r = req("busy");
  const long long day = (long long)tg_day_of(T0), month = (long long)tg_month_of(T0);
  r.limits.rpm = 1000000;
  r.limits.concurrency = 1000;
  r.limits.day_limit = USD(1000);
  r.limits.month_limit = USD(10000);
  r.reserve.tokens = 100;
  r.reserve.cost = 1000000;
  long long calls0 = evalsha_calls();
  tg_nano_t spent = 0;
  int local = 0;
  for (int i = 0; i < 2000; i++) {
    int64_t now = T0 + i / 10;
    tg_admission_t a = admit(&r, now);
    assert_admitted(a);
    assert_int_equal(a.v.limit_requests, 1000000);
    assert_int_equal(a.v.remaining_requests, 1000000 - 1 - i);
    local += strstr(a.lease, "-h") != NULL;
    tg__redis_settle(fx.rl, &r, &a, 40 + i % 7, 300000 + i, now);
    spent += 300000 + i;
  }
  long long calls = evalsha_calls() - calls0;
  assert_true(local > 1800);
  assert_true(calls < 200);
  wait_holdings();
  char want[32];
  snprintf(want, sizeof want, "%lld", (long long)spent);
  assert_string_equal(sget("HGET tg:{busy}:day:%lld spent", day), want);
  assert_string_equal(sget("HGET tg:{busy}:month:%lld spent", month), want);
  assert_string_equal(sget("HGET tg:{busy}:day:%lld reserved", day), "0");
  assert_string_equal(sget("HGET tg:{busy}:month:%lld reserved", month), "0");
  assert_string_equal(sget("GET tg:{busy}:rpm:n"), "2000"); /* unused grants came back */
  assert_string_equal(sget("ZCARD tg:{busy}:holds"), "0");
  assert_string_equal(sget("ZCARD tg:{busy}:leases"), "0");
}

/* Grants never take a budget past its limit, and what they leave unused
 * comes back: two bursts get exactly what the budget allows. */
static void test_holding_never_passes_budget(void **state) {
  (void)state;
  tg_admit_req_t r = req("thrifty");
  const long long day = (long long)tg_day_of(T0);
  r.limits.day_limit = USD(1);
  r.limits.alert_pct = 80;
  r.reserve.cost = 1000000; /* 1000 requests fit */
  int admitted = 0;
  for (int wave = 0; wave < 2; wave++) {
    for (int i = 0; i < 1500; i++) {
      int64_t now = T0 + wave * 2000 + i / 10;
      tg_admission_t a = admit(&r, now);
      if (a.v.refused == TG_LIMIT_NONE) {
        admitted++;
        tg__redis_settle(fx.rl, &r, &a, 0, 1000000, now);
      } else {
        assert_int_equal(a.v.refused, TG_LIMIT_DAILY_BUDGET);
      }
    }
    wait_holdings();
  }
  assert_int_equal(admitted, 1000);
  assert_string_equal(sget("HGET tg:{thrifty}:day:%lld spent", day), "1000000000");
  assert_string_equal(sget("HGET tg:{thrifty}:day:%lld reserved", day), "0");
  /* The spend the syncs reported crossed 80% once: one event. */
  pthread_mutex_lock(&hook_lock);
  assert_int_equal(n_alerts, 1);
  assert_string_equal(alerts[0].tenant, "thrifty");
  assert_string_equal(alerts[0].window, "day");
  assert_int_equal(alerts[0].period, tg_day_of(T0));
  assert_true(alerts[0].spent >= USD(1) * 8 / 10 && alerts[0].spent <= USD(1));
  assert_int_equal(alerts[0].limit, USD(1));
  pthread_mutex_unlock(&hook_lock);
}

/* A gateway that dies holding a grant and running requests gives its slots
 * and reserved money back when the holding expires, like a lease. */
static void test_holding_of_a_dead_gateway_expires(void **state) {
  (void)state;
  tg_admit_req_t r = req("crash");
  tg__redis_loop_t *dead = NULL;
  const long long day = (long long)tg_day_of(T0);
  r.limits.concurrency = 1000;
  r.limits.day_limit = USD(1000);
  r.reserve.cost = USD(1);
  assert_int_equal(tg__redis_loop_new(fx.r, &fx.loop, &dead), 0);
  assert_true(wait_connected(&fx.loop, dead, 1, 3000));
  int local = 0;
  for (int i = 0; i < 50; i++) {
    tg_admission_t a = admit_on(dead, &fx.loop, &r, T0 + i / 10);
    assert_admitted(a);
    local += strstr(a.lease, "-h") != NULL;
  }
  assert_true(local > 0);
  tg__redis_loop_close(dead); /* killed: never settles, never syncs */
  assert_string_equal(sget("ZCARD tg:{crash}:holds"), "1");
  assert_true(strtoll(sget("HGET tg:{crash}:day:%lld reserved", day), NULL, 10) >= USD(50));
  r.limits.concurrency = 1;
  assert_refused(admit(&r, T0 + 1000), TG_LIMIT_CONCURRENCY, 1000);
  assert_admitted(admit(&r, T0 + 31000));
  assert_string_equal(sget("HGET tg:{crash}:day:%lld reserved", day), "1000000000");
  assert_string_equal(sget("ZCARD tg:{crash}:holds"), "0");
}

/* A reload that lowers a limit applies to the next request: the grant made
 * under the old limit goes back ahead of it. */
static void test_holding_follows_a_lowered_limit(void **state) {
  (void)state;
  tg_admit_req_t r = req("reload");
  r.limits.rpm = 100000;
  int local = 0;
  for (int i = 0; i < 100; i++) {
    tg_admission_t a = admit(&r, T0 + i / 10);
    assert_admitted(a);
    local += strstr(a.lease, "-h") != NULL;
    tg__redis_settle(fx.rl, &r, &a, 0, 0, T0 + i / 10);
  }
  assert_true(local > 0);
  r.limits.rpm = 110;
  int n = 0;
  for (int i = 0; i < 30; i++) {
    tg_admission_t a = admit(&r, T0 + 100 + i);
    if (a.v.refused == TG_LIMIT_NONE)
      n++;
    else
      assert_int_equal(a.v.refused, TG_LIMIT_REQUESTS);
  }
  assert_int_equal(n, 10);
}

/* Requests admitted from a holding before midnight and settled after it
 * spend in the day they were admitted in, as requests admitted one by one
 * do: the new day's budget is not charged for them. */
static void test_holding_spend_stays_in_the_admitted_day(void **state) {
  (void)state;
  tg_admit_req_t r = req("midnight");
  const long long day = (long long)tg_day_of(DAY_END - 1);
  const long long next = (long long)tg_day_of(DAY_END);
  r.limits.concurrency = 1000;
  r.limits.day_limit = USD(1000);
  r.reserve.cost = 1000000;
  tg_admission_t old[60];
  int local = 0;
  for (int i = 0; i < 60; i++) {
    old[i] = admit(&r, DAY_END - 100 + i);
    assert_admitted(old[i]);
    assert_int_equal(old[i].v.day, day);
    local += strstr(old[i].lease, "-h") != NULL;
  }
  assert_true(local > 0);
  /* After midnight: the tenant is still busy (its holding moves to the new
   * day), then yesterday's requests finish. */
  for (int i = 0; i < 20; i++) {
    tg_admission_t a = admit(&r, DAY_END + i);
    assert_admitted(a);
    tg__redis_settle(fx.rl, &r, &a, 0, 0, DAY_END + i);
  }
  for (int i = 0; i < 60; i++)
    tg__redis_settle(fx.rl, &r, &old[i], 0, 700000, DAY_END + 50);
  wait_holdings();
  wait_holdings();
  assert_string_equal(sget("HGET tg:{midnight}:day:%lld spent", day), "42000000");
  assert_string_equal(sget("HGET tg:{midnight}:day:%lld spent", next), "0");
  assert_string_equal(sget("HGET tg:{midnight}:day:%lld reserved", next), "0");
  assert_string_equal(sget("ZCARD tg:{midnight}:holds"), "0");
}

/* ---- same meaning as limits.c -------------------------------------------------- */

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint32_t rnd(uint32_t n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng % n);
}

typedef struct {
  tg_admission_t a;
  tg_verdict_t v;
  tg_admit_req_t r;
  int64_t at;
} held_t;

static void check_same(const tg_verdict_t *m, const tg_verdict_t *v, int step) {
  if (m->refused != v->refused || m->retry_after_ms != v->retry_after_ms ||
      m->limit_requests != v->limit_requests ||
      m->remaining_requests != v->remaining_requests ||
      m->reset_requests_ms != v->reset_requests_ms || m->limit_tokens != v->limit_tokens ||
      m->remaining_tokens != v->remaining_tokens ||
      m->reset_tokens_ms != v->reset_tokens_ms || m->day != v->day || m->month != v->month)
    fail_msg("step %d: limits.c says refused=%d retry=%lld req=%lld/%lld/%lld tok=%lld/%lld/%lld; "
             "redis says refused=%d retry=%lld req=%lld/%lld/%lld tok=%lld/%lld/%lld",
             step, m->refused, (long long)m->retry_after_ms, (long long)m->limit_requests,
             (long long)m->remaining_requests, (long long)m->reset_requests_ms,
             (long long)m->limit_tokens, (long long)m->remaining_tokens,
             (long long)m->reset_tokens_ms, v->refused, (long long)v->retry_after_ms,
             (long long)v->limit_requests, (long long)v->remaining_requests,
             (long long)v->reset_requests_ms, (long long)v->limit_tokens,
             (long long)v->remaining_tokens, (long long)v->reset_tokens_ms);
}

static void test_same_verdicts_as_limits_c(void **state) {
  (void)state;
  tg__redis_holding(fx.r, 0); /* one by one, as limits.c decides */
  static const int64_t rpms[] = {0, 4, 12};
  static const int64_t tpms[] = {0, 900, 50000, 2000000000}; /* the last: big figures */
  static const int64_t concs[] = {0, 2, 5};
  static const tg_nano_t days[] = {0, USD(2), USD(50)};
  int step = 0;
  int seen[TG_LIMIT_UNAVAILABLE + 1] = {0};
  /* TG_DIFF_SCENARIOS=n runs more of them (and TG_DIFF_SEED another seed). */
  const char *env = getenv("TG_DIFF_SCENARIOS");
  int scenarios = env ? (int)strtol(env, NULL, 10) : 12;
  if (getenv("TG_DIFF_SEED"))
    rng ^= strtoull(getenv("TG_DIFF_SEED"), NULL, 10) * 0x2545f4914f6cdd1dULL;

  for (int scenario = 0; scenario < scenarios; scenario++) {
    char tenant[32];
    tg_tenant_state_t s;
    tg_slog_t glog;
    held_t held[64];
    int n_held = 0;
    int64_t now = T0 + scenario * 1000;
    tg_limits_t lim;

    snprintf(tenant, sizeof tenant, "diff%d", scenario);
    tg_tenant_state_init(&s);
    memset(&glog, 0, sizeof glog);
    memset(&lim, 0, sizeof lim);
    lim.rpm = rpms[rnd(3)];
    lim.tpm = tpms[rnd(4)];
    lim.concurrency = concs[rnd(3)];
    lim.day_limit = days[rnd(3)];
    lim.month_limit = days[rnd(3)];
    lim.alert_pct = 50 + (int)rnd(51);
    int64_t grps = rnd(3) == 0 ? 4 : 0;
    sget("DEL tg:{global}:rps tg:{global}:rps:n");
    pthread_mutex_lock(&hook_lock);
    n_alerts = 0;
    pthread_mutex_unlock(&hook_lock);
    int mem_alerts = 0;

    for (int i = 0; i < 120; i++, step++) {
      now += rnd(8) == 0 ? rnd(40000) : rnd(700);
      /* Settle what is older than 20 s: leases never expire here, as
       * limits.c has none. */
      while (n_held > 0 && (now - held[0].at > 20000 || n_held == 64 || rnd(3) == 0)) {
        held_t *h = &held[0];
        int64_t tok = rnd(2500);
        tg_nano_t cost = (tg_nano_t)rnd(900) * 1000000;
        int ad = 0, am = 0;
        tg_limits_settle(&s, &h->r.limits, &h->r.reserve, &h->v, tok, cost, now, &ad, &am);
        mem_alerts += ad + am;
        settle(&h->r, &h->a, tok, cost, now);
        memmove(&held[0], &held[1], (size_t)(n_held - 1) * sizeof held[0]);
        n_held--;
      }
      if (rnd(40) == 0) { /* a reload: limits change under traffic */
        lim.rpm = rpms[rnd(3)];
        lim.tpm = tpms[rnd(4)];
        lim.concurrency = concs[rnd(3)];
      }
      tg_admit_req_t r = req(tenant);
      r.limits = lim;
      r.global_rps = grps;
      r.reserve.tokens = rnd(3000);
      r.reserve.cost = (tg_nano_t)rnd(1000) * 1000000;
      tg_verdict_t mv;
      int64_t gretry = 0;
      if (grps > 0 && !tg_global_admit(&glog, grps, now, &gretry)) {
        memset(&mv, 0, sizeof mv);
        mv.refused = TG_LIMIT_GLOBAL;
        mv.retry_after_ms = gretry;
        mv.limit_requests = mv.remaining_requests = mv.reset_requests_ms = -1;
        mv.limit_tokens = mv.remaining_tokens = mv.reset_tokens_ms = -1;
      } else {
        assert_int_equal(tg_limits_admit(&s, &lim, &r.reserve, now, &mv), 0);
        if (grps > 0 && mv.refused != TG_LIMIT_NONE)
          tg_global_unadmit(&glog, now); /* the tenant refused it: its slot back */
      }
      tg_admission_t ra = admit(&r, now);
      if (mv.refused == TG_LIMIT_GLOBAL) {
        /* The global refusal carries no tenant figures in either backend. */
        assert_int_equal(ra.v.refused, TG_LIMIT_GLOBAL);
        assert_int_equal(ra.v.retry_after_ms, mv.retry_after_ms);
        seen[TG_LIMIT_GLOBAL]++;
        continue;
      }
      check_same(&mv, &ra.v, step);
      seen[mv.refused]++;
      if (mv.refused == TG_LIMIT_NONE) {
        held[n_held].a = ra;
        held[n_held].v = mv;
        held[n_held].r = r;
        held[n_held].at = now;
        n_held++;
      }
    }
    for (int k = 0; k < n_held; k++) {
      int ad = 0, am = 0;
      tg_limits_settle(&s, &held[k].r.limits, &held[k].r.reserve, &held[k].v, 100, 0, now,
                       &ad, &am);
      mem_alerts += ad + am;
      settle(&held[k].r, &held[k].a, 100, 0, now);
    }
    assert_int_equal(n_alerts, mem_alerts);
    /* Money in Redis is what limits.c counted. */
    if (s.day.period == tg_day_of(T0)) {
      long long spent = strtoll(
          sget("HGET tg:{%s}:day:%lld spent", tenant, (long long)s.day.period), NULL, 10);
      assert_int_equal(spent, s.day.spent);
    }
    tg_tenant_state_free(&s);
    tg_slog_free(&glog);
  }
  /* The traffic reached every outcome. */
  for (int k = TG_LIMIT_NONE; k < TG_LIMIT_UNAVAILABLE; k++)
    if (seen[k] == 0)
      fail_msg("no verdict of kind %s in %d steps", tg_limit_detail((tg_limit_kind_t)k), step);
}

/* The backend sends the operations of one loop iteration as one script
 * call per tenant. Bursts of admissions (each with its own clock) and
 * settlements made without running the loop in between must get exactly
 * the verdicts limits.c gives the same operations one at a time. */
typedef struct {
  res_t res;
  tg_verdict_t mv;
  tg_admit_req_t r;
  int64_t at;
} burst_t;

static void test_batches_same_as_one_at_a_time(void **state) {
  (void)state;
  tg__redis_holding(fx.r, 0); /* one by one, as limits.c decides */
  static const int64_t rpms[] = {0, 5, 30};
  static const int64_t tpms[] = {0, 2000, 60000};
  static const int64_t concs[] = {0, 3, 12};
  static const tg_nano_t days[] = {0, USD(3), USD(40)};
  const char *env = getenv("TG_DIFF_SCENARIOS");
  int scenarios = env ? (int)strtol(env, NULL, 10) : 12;
  int seen[TG_LIMIT_UNAVAILABLE + 1] = {0};
  int step = 0, biggest = 0;

  for (int scenario = 0; scenario < scenarios; scenario++) {
    char tenant[32];
    tg_tenant_state_t s;
    tg_slog_t glog;
    held_t held[64];
    burst_t b[24];
    int n_held = 0, mem_alerts = 0;
    int64_t now = T0 + scenario * 1000;
    tg_limits_t lim;

    snprintf(tenant, sizeof tenant, "burst%d", scenario);
    tg_tenant_state_init(&s);
    memset(&glog, 0, sizeof glog);
    memset(&lim, 0, sizeof lim);
    lim.rpm = rpms[rnd(3)];
    lim.tpm = tpms[rnd(3)];
    lim.concurrency = concs[rnd(3)];
    lim.day_limit = days[rnd(3)];
    lim.month_limit = days[rnd(3)];
    lim.alert_pct = 50 + (int)rnd(51);
    int64_t grps = rnd(3) == 0 ? 10 : 0;
    sget("DEL tg:{global}:rps tg:{global}:rps:n");
    pthread_mutex_lock(&hook_lock);
    n_alerts = 0;
    pthread_mutex_unlock(&hook_lock);

    for (int burst = 0; burst < 30; burst++) {
      now += rnd(6) == 0 ? rnd(40000) : rnd(3000);
      /* Settlements first: an admission past the global limit reaches its
       * tenant's script one round trip later, after them. */
      int n_settled = 0;
      while (n_held > 0 && (now - held[0].at > 20000 || n_held > 40 || rnd(3) == 0)) {
        held_t *h = &held[0];
        int64_t tok = rnd(2500);
        tg_nano_t cost = (tg_nano_t)rnd(900) * 1000000;
        int ad = 0, am = 0;
        tg_limits_settle(&s, &h->r.limits, &h->r.reserve, &h->v, tok, cost, now, &ad, &am);
        mem_alerts += ad + am;
        tg__redis_settle(fx.rl, &h->r, &h->a, tok, cost, now);
        memmove(&held[0], &held[1], (size_t)(n_held - 1) * sizeof held[0]);
        n_held--;
        n_settled++;
      }
      if (rnd(10) == 0) { /* a reload between bursts */
        lim.rpm = rpms[rnd(3)];
        lim.tpm = tpms[rnd(3)];
        lim.concurrency = concs[rnd(3)];
      }
      int k = 1 + (int)rnd(20);
      int passed[20];
      /* A burst's global checks go in one call, its tenant checks in the
       * next, and the slots of those the tenant refused come back after
       * both (before the next burst): the model does the same. */
      for (int j = 0; j < k; j++) {
        burst_t *x = &b[j];
        memset(x, 0, sizeof *x);
        now += rnd(3) == 0 ? 0 : rnd(40);
        x->at = now;
        x->r = req(tenant);
        x->r.limits = lim;
        x->r.global_rps = grps;
        x->r.reserve.tokens = rnd(4000);
        x->r.reserve.cost = (tg_nano_t)rnd(1500) * 1000000;
        int64_t gretry = 0;
        passed[j] = !(grps > 0 && !tg_global_admit(&glog, grps, now, &gretry));
        if (!passed[j]) {
          x->mv.refused = TG_LIMIT_GLOBAL;
          x->mv.retry_after_ms = gretry;
        }
        assert_int_equal(tg__redis_admit(fx.rl, &x->r, now, on_admit, &x->res), 0);
      }
      for (int j = 0; j < k; j++)
        if (passed[j])
          assert_int_equal(tg_limits_admit(&s, &lim, &b[j].r.reserve, b[j].at, &b[j].mv), 0);
      for (int j = 0; j < k; j++)
        if (passed[j] && grps > 0 && b[j].mv.refused != TG_LIMIT_NONE)
          tg_global_unadmit(&glog, b[j].at);
      if (n_settled + k > biggest)
        biggest = n_settled + k;
      for (int j = 0; j < k; j++) {
        spin(&fx.loop, &b[j].res.done, 1, 3000);
        assert_int_equal(b[j].res.done, 1);
      }
      for (int j = 0; j < k; j++, step++) {
        burst_t *x = &b[j];
        seen[x->mv.refused]++;
        if (x->mv.refused == TG_LIMIT_GLOBAL) {
          assert_int_equal(x->res.a.v.refused, TG_LIMIT_GLOBAL);
          assert_int_equal(x->res.a.v.retry_after_ms, x->mv.retry_after_ms);
          continue;
        }
        check_same(&x->mv, &x->res.a.v, step);
        if (x->mv.refused == TG_LIMIT_NONE) {
          assert_true(n_held < 64);
          held[n_held].a = x->res.a;
          held[n_held].v = x->mv;
          held[n_held].r = x->r;
          held[n_held].at = x->at;
          n_held++;
        }
      }
    }
    for (int j = 0; j < n_held; j++) {
      int ad = 0, am = 0;
      tg_limits_settle(&s, &held[j].r.limits, &held[j].r.reserve, &held[j].v, 100, 0, now,
                       &ad, &am);
      mem_alerts += ad + am;
      tg__redis_settle(fx.rl, &held[j].r, &held[j].a, 100, 0, now);
    }
    tg_admit_req_t probe = req("settle-probe");
    (void)admit(&probe, now);
    assert_int_equal(n_alerts, mem_alerts);
    /* Money and the leases left in Redis are what limits.c counted. */
    if (s.day.period == tg_day_of(T0)) {
      long long spent = strtoll(
          sget("HGET tg:{%s}:day:%lld spent", tenant, (long long)s.day.period), NULL, 10);
      assert_int_equal(spent, s.day.spent);
      long long reserved = strtoll(
          sget("HGET tg:{%s}:day:%lld reserved", tenant, (long long)s.day.period), NULL, 10);
      assert_int_equal(reserved, s.day.reserved);
    }
    assert_string_equal(sget("ZCARD tg:{%s}:leases", tenant), "0");
    tg_tenant_state_free(&s);
    tg_slog_free(&glog);
  }
  for (int k = TG_LIMIT_NONE; k < TG_LIMIT_UNAVAILABLE; k++)
    if (seen[k] == 0)
      fail_msg("no verdict of kind %s in %d steps", tg_limit_detail((tg_limit_kind_t)k), step);
  assert_true(biggest >= 20); /* batches of many operations were tried */
}

/* The spend figures behind the /metrics gauges: known at once from the
 * settlement's reply, read from Redis by a gateway that served nothing,
 * and 0 once the day (or month) has rolled over, traffic or not. */
static void test_spend_figures(void **state) {
  (void)state;
  tg_admit_req_t r = req("spender");
  tg__redis_t *r2 = NULL;
  tg__redis_loop_t *rl2 = NULL;
  tg_nano_t d = -1, m = -1;
  char url[64];
  int64_t day0 = tg_day_of(T0);

  static const char *const followed[] = {"spender"};
  r.limits.day_limit = USD(100);
  r.reserve.cost = USD(2);
  assert_int_equal(tg__redis_keep(fx.r, followed, 1), 0);
  tg_admission_t a = admit(&r, T0);
  assert_admitted(a);
  settle(&r, &a, 10, 1500000000, T0 + 10); /* 1.50 USD */
  assert_int_equal(tg__redis_spend(fx.r, "spender", T0 + 20, &d, &m), 0);
  assert_int_equal(d, 1500000000);
  assert_int_equal(m, 1500000000);
  assert_string_equal(sget("HGET tg:{spender}:day:%lld spent", (long long)day0), "1500000000");

  /* Another gateway on the same Redis, with no traffic of this tenant: it
   * does not know yet, and learns within a refresh (2 s). Its clock is the
   * one its own admissions use (the test's). */
  snprintf(url, sizeof url, "redis://127.0.0.1:%d", fx.srv.port);
  assert_int_equal(tg__redis_new(url, &r2), 0);
  assert_int_equal(tg__redis_keep(r2, followed, 1), 0);
  assert_int_equal(tg__redis_loop_new(r2, &fx.loop, &rl2), 0);
  assert_true(wait_connected(&fx.loop, rl2, 1, 3000));
  tg_admit_req_t other = req("someone-else");
  assert_admitted(admit_on(rl2, &fx.loop, &other, T0 + 30));
  assert_int_equal(tg__redis_spend(r2, "spender", T0 + 40, &d, &m), TG_ENOTFOUND);
  assert_int_equal(d, 0);
  assert_int_equal(m, 0);
  uint64_t start = uv_hrtime();
  while (uv_hrtime() - start < UINT64_C(4000) * 1000000) {
    spin_ms(&fx.loop, 100);
    if (tg__redis_spend(r2, "spender", T0 + 40, &d, &m) == 0 && d == 1500000000)
      break;
  }
  assert_int_equal(d, 1500000000);
  assert_int_equal(m, 1500000000);

  /* More spend through the first gateway reaches the second one too. */
  a = admit(&r, T0 + 50);
  assert_admitted(a);
  settle(&r, &a, 10, 250000000, T0 + 60);
  start = uv_hrtime();
  while (uv_hrtime() - start < UINT64_C(4000) * 1000000) {
    spin_ms(&fx.loop, 100);
    if (tg__redis_spend(r2, "spender", T0 + 70, &d, &m) == 0 && d == 1750000000)
      break;
  }
  assert_int_equal(d, 1750000000);

  /* The next UTC day starts at 0 without any request; so does the month. */
  assert_int_equal(tg__redis_spend(fx.r, "spender", tg_day_end_ms(day0), &d, &m), 0);
  assert_int_equal(d, 0);
  assert_int_equal(m, tg_month_of(tg_day_end_ms(day0)) == tg_month_of(T0) ? 1750000000 : 0);
  int64_t next_month = tg_month_end_ms(tg_month_of(T0));
  assert_int_equal(tg__redis_spend(r2, "spender", next_month, &d, &m), 0);
  assert_int_equal(d, 0);
  assert_int_equal(m, 0);
  assert_int_equal(tg__redis_spend(fx.r, "nobody", T0, &d, &m), TG_ENOTFOUND);
  assert_int_equal(d + m, 0);

  tg__redis_loop_close(rl2);
  spin_ms(&fx.loop, 20);
  tg__redis_free(r2);
}

/* The tenants whose spend is followed are the config's: a reload keeps the
 * figures of those it keeps, frees the place of those it drops (before, a
 * tenant once seen kept its place for the process's life, and a new tenant
 * past 4,096 of them read 0 for good), and says how many do not fit. */
static void test_spend_follows_the_configured_tenants(void **state) {
  (void)state;
  enum { N = 4097 };
  static char names[N][16];
  const char *list[N];
  tg_admit_req_t r = req("payer");
  tg_nano_t d = -1, m = -1;

  for (int i = 0; i < N; i++) {
    snprintf(names[i], sizeof names[i], "t%d", i);
    list[i] = names[i];
  }
  list[0] = "payer";
  assert_int_equal(tg__redis_keep(fx.r, list, N), 1);
  assert_int_equal(tg__redis_spend(fx.r, "t4096", T0, &d, &m), TG_ETOOBIG);
  r.limits.day_limit = USD(100);
  r.reserve.cost = USD(1);
  tg_admission_t a = admit(&r, T0);
  assert_admitted(a);
  settle(&r, &a, 10, 500000000, T0 + 10);
  assert_int_equal(tg__redis_spend(fx.r, "payer", T0 + 20, &d, &m), 0);
  assert_int_equal(d, 500000000);

  /* A reload drops t1..t4095 and brings new ones: all fit, payer keeps
   * its figures without waiting for a refresh. */
  for (int i = 1; i < N; i++)
    snprintf(names[i], sizeof names[i], "u%d", i);
  assert_int_equal(tg__redis_keep(fx.r, list, N - 1), 0);
  assert_int_equal(tg__redis_spend(fx.r, "payer", T0 + 30, &d, &m), 0);
  assert_int_equal(d, 500000000);
  assert_int_equal(tg__redis_spend(fx.r, "u4095", T0 + 30, &d, &m), TG_ENOTFOUND);
  assert_int_equal(tg__redis_spend(fx.r, "t5", T0 + 30, &d, &m), TG_ENOTFOUND);
  /* a tenant the config dropped: a late settlement does not bring it back */
  list[0] = "u0";
  assert_int_equal(tg__redis_keep(fx.r, list, 1), 0);
  a = admit(&r, T0 + 40);
  assert_admitted(a);
  settle(&r, &a, 10, 100000000, T0 + 50);
  assert_int_equal(tg__redis_spend(fx.r, "payer", T0 + 60, &d, &m), TG_ENOTFOUND);
}

/* ---- lease renewal (waits 10 s of real time) ------------------------------------ */

/* A lease's member in tg:{T}:leases: its id, periods and reserved cost. */
static const char *member(const tg_admission_t *a, tg_nano_t cost) {
  static char m[128];
  snprintf(m, sizeof m, "%s %lld %lld %lld", a->lease, (long long)a->v.day,
           (long long)a->v.month, (long long)cost);
  return m;
}

static void test_lease_renewal(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  r.limits.concurrency = 1;
  tg_admission_t a = admit(&r, T0);
  assert_admitted(a);
  assert_string_equal(sget("ZSCORE tg:{acme}:leases %s", member(&a, 0)), "1795867230000");
  /* Within one renewal period the expiry moves on by about the time that
   * passed (the backend's clock follows the one admissions gave it). */
  uint64_t start = uv_hrtime();
  long long score = 0;
  while (uv_hrtime() - start < UINT64_C(11500) * 1000000) {
    spin_ms(&fx.loop, 100);
    score = strtoll(sget("ZSCORE tg:{acme}:leases %s", member(&a, 0)), NULL, 10);
    if (score > T0 + 30000)
      break;
  }
  assert_true(score > T0 + 30000);
  assert_true(score <= T0 + 30000 + 11500);
  /* So a live gateway keeps its slot past the first TTL. */
  assert_refused(admit(&r, score - 1), TG_LIMIT_CONCURRENCY, 1000);
  settle(&r, &a, 0, 0, score);
  assert_string_equal(sget("ZSCORE tg:{acme}:leases %s", member(&a, 0)), "(nil)");
}

/* ---- failures ------------------------------------------------------------------- */

static void test_close_answers_pending(void **state) {
  (void)state;
  tg__redis_loop_t *rl = NULL;
  res_t res[3];
  tg_admit_req_t r = req("acme");
  memset(res, 0, sizeof res);
  assert_int_equal(tg__redis_loop_new(fx.r, &fx.loop, &rl), 0);
  assert_true(wait_connected(&fx.loop, rl, 1, 3000));
  for (int i = 0; i < 3; i++)
    assert_int_equal(tg__redis_admit(rl, &r, T0, on_admit, &res[i]), 0);
  tg__redis_loop_close(rl);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(res[i].done, 1);
    assert_int_equal(res[i].a.v.refused, TG_LIMIT_UNAVAILABLE);
  }
  spin_ms(&fx.loop, 50);
  for (int i = 0; i < 3; i++)
    assert_int_equal(res[i].done, 1);
}

static void test_frozen_redis_times_out(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  res_t res;
  memset(&res, 0, sizeof res);
  server_signal(&fx.srv, SIGSTOP);
  assert_int_equal(tg__redis_admit(fx.rl, &r, T0, on_admit, &res), 0);
  uint64_t t = uv_hrtime();
  spin(&fx.loop, &res.done, 1, 5000);
  uint64_t waited_ms = (uv_hrtime() - t) / 1000000;
  assert_int_equal(res.done, 1);
  assert_int_equal(res.a.v.refused, TG_LIMIT_UNAVAILABLE);
  assert_true(waited_ms >= 1500 && waited_ms < 3500);
  assert_int_equal(tg__redis_connected(fx.rl), 0);
  server_signal(&fx.srv, SIGCONT);
  assert_true(wait_connected(&fx.loop, fx.rl, 1, 5000));
  assert_true(n_down_logs >= 1);
  assert_true(n_up_logs >= 1);
  assert_admitted(admit(&r, T0 + 1));
}

static void test_redis_killed_and_restarted(void **state) {
  (void)state;
  tg_admit_req_t r = req("acme");
  r.limits.concurrency = 1;
  res_t res[3];
  memset(res, 0, sizeof res);
  tg_admission_t held = admit(&r, T0);
  assert_admitted(held);

  /* Frozen, so the admissions are on the wire when it dies. */
  server_signal(&fx.srv, SIGSTOP);
  for (int i = 0; i < 3; i++)
    assert_int_equal(tg__redis_admit(fx.rl, &r, T0 + 1, on_admit, &res[i]), 0);
  spin_ms(&fx.loop, 50);
  uint64_t t = uv_hrtime();
  server_stop(&fx.srv, SIGKILL);
  redisFree(fx.sync);
  fx.sync = NULL;
  spin(&fx.loop, &res[2].done, 1, 3000);
  assert_true((uv_hrtime() - t) / 1000000 < 1500); /* the drop, not the timeout */
  for (int i = 0; i < 3; i++) {
    assert_int_equal(res[i].done, 1);
    assert_int_equal(res[i].a.v.refused, TG_LIMIT_UNAVAILABLE);
    assert_int_equal(res[i].a.backend, TG_BACKEND_REDIS);
  }
  assert_int_equal(tg__redis_connected(fx.rl), 0);
  res_t none;
  memset(&none, 0, sizeof none);
  assert_int_equal(tg__redis_admit(fx.rl, &r, T0 + 2, on_admit, &none), TG_EUNAVAIL);
  tg__redis_settle(fx.rl, &r, &held, 0, 0, T0 + 2); /* lost, logged */
  spin_ms(&fx.loop, 300);                            /* a few failed reconnects */
  assert_int_equal(none.done, 0);
  assert_int_equal(tg__redis_connected(fx.rl), 0);

  /* Back on the same port: the backend reconnects by itself, loads its
   * scripts again, and the (empty) new server admits. */
  assert_int_equal(server_start(&fx.srv), 0);
  fx.sync = sync_connect(fx.srv.port);
  assert_non_null(fx.sync);
  assert_true(wait_connected(&fx.loop, fx.rl, 1, 5000));
  tg_admission_t a = admit(&r, T0 + 3);
  assert_admitted(a);
  assert_string_equal(sget("ZCARD tg:{acme}:leases"), "1");
  assert_true(n_up_logs >= 1);
  for (int i = 0; i < 3; i++)
    assert_int_equal(res[i].done, 1);
}

static void test_host_name_and_db_from_url(void **state) {
  (void)state;
  tg__redis_t *r = NULL;
  tg__redis_loop_t *rl = NULL;
  char url[64];
  /* A name: resolved off the loop. */
  snprintf(url, sizeof url, "redis://localhost:%d/3", fx.srv.port);
  assert_int_equal(tg__redis_new(url, &r), 0);
  assert_int_equal(tg__redis_loop_new(r, &fx.loop, &rl), 0);
  assert_true(wait_connected(&fx.loop, rl, 1, 3000));
  tg_admit_req_t q = req("dbtest");
  q.limits.rpm = 5;
  assert_admitted(admit_on(rl, &fx.loop, &q, T0));
  assert_string_equal(sget("EXISTS tg:{dbtest}:rpm"), "0");
  sget("SELECT 3");
  assert_string_equal(sget("EXISTS tg:{dbtest}:rpm"), "1");
  sget("SELECT 0");
  tg__redis_loop_close(rl);
  spin_ms(&fx.loop, 20);
  tg__redis_free(r);
}

/* A password in the URL is sent first on every connection; a wrong one
 * leaves the backend unusable (and saying so), never admitting. */
static void test_password(void **state) {
  (void)state;
  tg__redis_t *good = NULL, *bad = NULL;
  tg__redis_loop_t *rg = NULL, *rb = NULL;
  char url[96];
  tg_admit_req_t q = req("authtest");
  q.limits.rpm = 5;

  assert_string_equal(sget("CONFIG SET requirepass s3cret"), "OK");
  assert_string_equal(sget("AUTH s3cret"), "OK");
  snprintf(url, sizeof url, "redis://:s3cret@127.0.0.1:%d", fx.srv.port);
  assert_int_equal(tg__redis_new(url, &good), 0);
  snprintf(url, sizeof url, "redis://default:wrong@127.0.0.1:%d", fx.srv.port);
  assert_int_equal(tg__redis_new(url, &bad), 0);
  assert_int_equal(tg__redis_loop_new(good, &fx.loop, &rg), 0);
  assert_int_equal(tg__redis_loop_new(bad, &fx.loop, &rb), 0);
  assert_true(wait_connected(&fx.loop, rg, 1, 3000));
  assert_admitted(admit_on(rg, &fx.loop, &q, T0));

  for (int i = 0; i < 5; i++) {
    res_t res;
    memset(&res, 0, sizeof res);
    if (tg__redis_admit(rb, &q, T0 + 1, on_admit, &res) == 0) {
      spin(&fx.loop, &res.done, 1, 3000);
      assert_int_equal(res.done, 1);
      assert_int_equal(res.a.v.refused, TG_LIMIT_UNAVAILABLE);
    }
    spin_ms(&fx.loop, 100);
  }
  /* Said once, not at every attempt; never claimed to be up. */
  assert_int_equal(n_down_logs, 1);
  assert_int_equal(n_up_logs, 1); /* the good one */
  assert_int_equal(tg__redis_connected(rb), 0);
  assert_string_equal(sget("GET tg:{authtest}:rpm:n"), "1");

  assert_string_equal(sget("CONFIG SET requirepass %s", ""), "OK");
  tg__redis_loop_close(rg);
  tg__redis_loop_close(rb);
  spin_ms(&fx.loop, 20);
  tg__redis_free(good);
  tg__redis_free(bad);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_url),
      cmocka_unit_test_setup(test_tenant_names, test_setup),
      cmocka_unit_test_setup(test_requests_per_minute, test_setup),
      cmocka_unit_test_setup(test_tokens_bucket_and_settle, test_setup),
      cmocka_unit_test_setup(test_concurrency_lease_released_by_settle, test_setup),
      cmocka_unit_test_setup(test_lease_expiry, test_setup),
      cmocka_unit_test_setup(test_budgets, test_setup),
      cmocka_unit_test_setup(test_alert_once, test_setup),
      cmocka_unit_test_setup(test_global_limit, test_setup),
      cmocka_unit_test_setup(test_noscript_falls_back, test_setup),
      cmocka_unit_test_setup(test_host_name_and_db_from_url, test_setup),
      cmocka_unit_test_setup(test_password, test_setup),
      cmocka_unit_test_setup(test_two_gateways_share_the_limit, test_setup),
      cmocka_unit_test_setup(test_two_gateways_holdings_exact, test_setup),
      cmocka_unit_test_setup(test_holding_admits_locally_and_reports_exactly, test_setup),
      cmocka_unit_test_setup(test_holding_never_passes_budget, test_setup),
      cmocka_unit_test_setup(test_holding_of_a_dead_gateway_expires, test_setup),
      cmocka_unit_test_setup(test_holding_follows_a_lowered_limit, test_setup),
      cmocka_unit_test_setup(test_holding_spend_stays_in_the_admitted_day, test_setup),
      cmocka_unit_test_setup(test_same_verdicts_as_limits_c, test_setup),
      cmocka_unit_test_setup(test_batches_same_as_one_at_a_time, test_setup),
      cmocka_unit_test_setup(test_spend_figures, test_setup),
      cmocka_unit_test_setup(test_spend_follows_the_configured_tenants, test_setup),
      cmocka_unit_test_setup(test_lease_renewal, test_setup),
      cmocka_unit_test_setup(test_close_answers_pending, test_setup),
      cmocka_unit_test_setup(test_frozen_redis_times_out, test_setup),
      cmocka_unit_test_setup(test_redis_killed_and_restarted, test_setup),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
