/* The native upstream client's table of hosts (src/upstream/h1client.c)
 * over a long life: every distinct host:port a loop ever sent to has an
 * entry, and the table is bounded. Config reloads that move endpoints
 * (pods rescheduled on new addresses at each rollout) keep adding hosts, so
 * a full table must make room by dropping hosts nothing uses any more,
 * rather than refuse every new endpoint for the rest of the process's
 * life. Each host here is a loopback address on port 9, where nothing
 * listens: the connect is refused at once and the host is unused after. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "upstream/client.h"

/* More than the client's bound on hosts (HOSTS_MAX, 4096). */
#define HOSTS 4200
/* Transfers in flight at once, under the usual descriptor limit. */
#define BATCH 200

typedef struct {
  int done, refused, other;
} tally_t;

static int on_status(tg_xfer_t *x, int status, void *arg) {
  (void)x, (void)status, (void)arg;
  return 0;
}

static int on_data(tg_xfer_t *x, const char *data, size_t len, void *arg) {
  (void)x, (void)data, (void)len, (void)arg;
  return 0;
}

static void on_done(int result, const char *detail, void *arg) {
  tally_t *t = arg;
  (void)detail;
  t->done++;
  if (result == TG_XFER_CONNECT)
    t->refused++;
  else
    t->other++;
}

static const tg_xfer_cbs_t cbs = {on_status, on_data, on_done};

/* Starts a POST to the i-th host (i < 64000); returns tg_xfer_start's
 * result. */
static int start_one(tg_upstream_t *up, int i, tally_t *t) {
  char url[64];
  tg_xfer_opts_t o;
  tg_xfer_t *x;

  snprintf(url, sizeof(url), "http://127.1.%d.%d:9/v1/completions", i / 250, 1 + i % 250);
  memset(&o, 0, sizeof(o));
  o.url = url;
  o.body = "{}";
  o.body_len = 2;
  o.connect_timeout_ms = 2000;
  return tg_xfer_start(up, &o, &cbs, t, &x);
}

static void test_a_full_host_table_makes_room(void **state) {
  uv_loop_t loop;
  tg_upstream_t *up;
  tally_t t = {0, 0, 0};
  int i = 0, started = 0;
  (void)state;

  assert_int_equal(uv_loop_init(&loop), 0);
  assert_int_equal(tg_upstream_init(&up, &loop), 0);
  assert_int_equal(tg_upstream_set_mode(up, TG_UPSTREAM_NATIVE), 0);
  while (i < HOSTS) {
    int n;
    for (n = 0; n < BATCH && i < HOSTS; n++, i++) {
      int r = start_one(up, i, &t);
      if (r != 0)
        fail_msg("host %d of %d: tg_xfer_start refused it (%d)", i + 1, HOSTS, r);
      started++;
    }
    while (t.done < started)
      uv_run(&loop, UV_RUN_ONCE);
  }
  assert_int_equal(t.done, HOSTS);
  assert_int_equal(t.refused, HOSTS);  /* each reached its host and was refused */
  assert_int_equal(t.other, 0);
  /* a host seen before the table filled, dropped since, comes back */
  assert_int_equal(start_one(up, 0, &t), 0);
  while (t.done < HOSTS + 1)
    uv_run(&loop, UV_RUN_ONCE);
  assert_int_equal(t.refused, HOSTS + 1);
  tg_upstream_close(up);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_a_full_host_table_makes_room),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
