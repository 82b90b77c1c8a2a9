/* The Redis backend of the policy state (state.h): every admission and every
 * settlement is one Lua script (redis_scripts.h), so any number of gateways
 * share exact limits. docs/state-redis.md describes the keys, the scripts
 * and what happens when Redis fails.
 *
 * Each loop thread owns one tg__redis_loop_t: one hiredis async connection
 * driven by that loop, a reconnect timer (100 ms doubling to 2 s), and a
 * tick timer that renews the loop's concurrency leases every 10 s and gives
 * up on replies that do not come. Every request sent is a call_t kept in a
 * list in send order until hiredis hands back its reply; hiredis answers
 * every pending command exactly once, with NULL when the connection goes,
 * so each admission callback runs exactly once.
 *
 * hiredis 0.14's own libuv adapter ignores poll errors: a refused connect
 * (POLLERR) then never reaches hiredis and the connection hangs forever. The
 * small adapter below hands errors to hiredis, which meets the socket error
 * itself and reports it. Host names are resolved on libuv's thread pool,
 * since hiredis would resolve them with a blocking call on the loop. */
#include "policy/state.h"

#include <arpa/inet.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <netdb.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/err.h"
#include "policy/redis_scripts.h"

/* A lease lives this long unless renewed: a gateway that dies gives its
 * concurrency slots (and reserved money) back within this time. */
#define TG_REDIS_LEASE_TTL_MS 30000
/* How often a live gateway renews its leases (a third of the TTL, so two
 * renewals may fail before a lease expires). */
#define TG_REDIS_LEASE_RENEW_MS 10000
/* A reply later than this counts as a failed connection: every pending
 * call is answered UNAVAILABLE and the connection is made again. */
#define TG_REDIS_REPLY_TIMEOUT_MS 2000
#define TG_REDIS_CONNECT_TIMEOUT_MS 2000
#define TG_REDIS_BACKOFF_MIN_MS 100
#define TG_REDIS_BACKOFF_MAX_MS 2000
#define TG_REDIS_TICK_MS 250
/* Bounds: calls waiting for a reply and leases held per loop thread. */
#define TG_REDIS_MAX_PENDING 20000
#define TG_REDIS_MAX_LEASES 65536
#define TG_REDIS_MAX_TENANT 128
/* Window keys outlive their period by this much (late settlements,
 * inspection by an operator). */
#define TG_REDIS_DAY_KEEP_MS (INT64_C(3) * 86400000)
#define TG_REDIS_MONTH_KEEP_MS (INT64_C(62) * 86400000)
/* Same clamp as limits.c: tokens and token rates above this are taken as it. */
#define TG_REDIS_TOKENS_MAX INT64_C(1000000000000)

enum { SCRIPT_GLOBAL, SCRIPT_ADMIT, SCRIPT_SETTLE, N_SCRIPTS };

static const char *const script_text[N_SCRIPTS] = {
    TG_REDIS_LUA_GLOBAL,
    TG_REDIS_LUA_ADMIT,
    TG_REDIS_LUA_SETTLE,
};

struct tg__redis_s {
  char host[256];
  int port;
  int db;
  char user[128];
  char pass[256];
  int has_pass;
  char sha[N_SCRIPTS][41];
};

/* ---- calls --------------------------------------------------------------- */

enum { CALL_SETUP, CALL_ADMIT, CALL_SETTLE, CALL_RENEW };
enum { STAGE_GLOBAL, STAGE_TENANT };

#define CALL_MAX_ARGS 32
#define CALL_BUF 2048

typedef struct call_s call_t;
struct call_s {
  call_t *prev, *next;        /* pending list, in send order */
  tg__redis_loop_t *rl;
  int kind;
  int stage;                  /* CALL_ADMIT: global script first, or tenant;
                               * CALL_SETUP: 1 on the handshake's last call */
  int script;                 /* index for EVALSHA, or -1 for a plain command */
  int eval_retry;             /* already sent again with EVAL after NOSCRIPT */
  uint64_t sent_ms;           /* uv_now() when sent */
  int argc;
  const char *argv[CALL_MAX_ARGS];
  size_t argvlen[CALL_MAX_ARGS];
  size_t used;
  char buf[CALL_BUF];

  /* admission and settlement */
  char tenant[TG_REDIS_MAX_TENANT + 1];
  tg_admit_req_t req;         /* req.tenant points at tenant above */
  int64_t now_ms;
  tg_admit_cb cb;
  void *arg;
  uint32_t slot;              /* lease table slot of an admission */
  tg_admission_t a;
  int64_t day, month;         /* settlement: periods admitted in */
};

/* ---- per loop ------------------------------------------------------------ */

/* IDLE (waiting to reconnect) -> RESOLVING (a host name) -> CONNECTING ->
 * HANDSHAKE (AUTH, SELECT, SCRIPT LOAD under way) -> UP: usable. */
enum { RL_IDLE, RL_RESOLVING, RL_CONNECTING, RL_HANDSHAKE, RL_UP, RL_CLOSED };
enum { LEASE_FREE, LEASE_PENDING, LEASE_ACTIVE };

typedef struct {
  char id[40];
  char tenant[TG_REDIS_MAX_TENANT + 1];
  uint32_t next_free;
  uint8_t state;
} lease_t;

struct tg__redis_loop_s {
  tg__redis_t *r;
  uv_loop_t *loop;
  redisAsyncContext *ac;
  int state;
  int closing;
  int open;                   /* handles and requests still to come back */
  int down;                   /* the failure was logged; log the recovery */
  int ever_up;
  uint64_t backoff_ms;
  uv_timer_t conn_timer;      /* RL_IDLE: reconnect; else connect timeout */
  uv_timer_t tick;
  uv_getaddrinfo_t gai;
  int gai_busy;
  call_t *head, *tail;
  size_t n_pending;
  uint64_t last_renew_ms;     /* start of the last renewal round */
  int renewing;               /* a round is under way */
  uint32_t renew_cursor;      /* next lease slot of the round */
  int64_t renew_expiry;       /* the round's new expiry */
  uint64_t last_err_log_ms;
  /* The gateway's clock minus uv_now(), learnt from the now_ms of each call,
   * so renewals use the same clock as admissions (injected in tests). */
  int64_t clock_offset_ms;
  lease_t *leases;
  uint32_t lease_cap;
  uint32_t lease_free;        /* head of the free list; lease_cap = none */
  uint32_t lease_gen;
  char lease_prefix[17];
};

static void start_connect(tg__redis_loop_t *rl);
static void schedule_reconnect(tg__redis_loop_t *rl);
static void become_up(tg__redis_loop_t *rl);
static void on_conn_timer(uv_timer_t *t);
static void on_reply(redisAsyncContext *ac, void *reply, void *priv);

/* ---- small helpers ------------------------------------------------------- */

static int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : v > hi ? hi : v;
}

static void log_event(const char *event, const tg__redis_t *r, const char *why) {
  char detail[1024];
  snprintf(detail, sizeof detail, "redis %.255s:%d: %.600s", r->host, r->port, why);
  tg_policy_log(event, detail);
}

/* Errors in replies can come once per request: at most one line a second. */
static void log_reply_error(tg__redis_loop_t *rl, const char *what, const char *err) {
  uint64_t now = uv_now(rl->loop);
  if (rl->last_err_log_ms != 0 && now - rl->last_err_log_ms < 1000)
    return;
  rl->last_err_log_ms = now;
  char why[512];
  snprintf(why, sizeof why, "%s: %.400s", what, err);
  log_event("state_redis_error", rl->r, why);
}

static int64_t loop_clock(const tg__redis_loop_t *rl) {
  return (int64_t)uv_now(rl->loop) + rl->clock_offset_ms;
}

static void note_clock(tg__redis_loop_t *rl, int64_t now_ms) {
  rl->clock_offset_ms = now_ms - (int64_t)uv_now(rl->loop);
}

/* ---- URL ----------------------------------------------------------------- */

static int parse_int(const char *s, size_t n, long lo, long hi, int *out) {
  char tmp[16];
  char *end;
  if (n == 0 || n >= sizeof tmp)
    return TG_EINVAL;
  memcpy(tmp, s, n);
  tmp[n] = '\0';
  for (size_t i = 0; i < n; i++)
    if (tmp[i] < '0' || tmp[i] > '9')
      return TG_EINVAL;
  long v = strtol(tmp, &end, 10);
  if (*end != '\0' || v < lo || v > hi)
    return TG_EINVAL;
  *out = (int)v;
  return 0;
}

static int copy_part(char *dst, size_t size, const char *s, size_t n) {
  if (n >= size)
    return TG_ETOOBIG;
  memcpy(dst, s, n);
  dst[n] = '\0';
  return 0;
}

/* redis://[[user]:password@]host[:port][/db]; host may be [v6]. */
static int parse_url(tg__redis_t *r, const char *url) {
  static const char scheme[] = "redis://";
  const char *p, *end, *at, *hs, *he, *slash;
  int rc;

  if (strncmp(url, scheme, sizeof scheme - 1) != 0)
    return TG_EINVAL;
  p = url + sizeof scheme - 1;
  end = p + strlen(p);
  slash = memchr(p, '/', (size_t)(end - p));
  if (slash == NULL)
    slash = end;
  r->port = 6379;
  r->db = 0;
  at = NULL;
  for (const char *q = p; q < slash; q++)
    if (*q == '@')
      at = q;
  if (at != NULL) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (colon == NULL)
      return TG_EINVAL; /* a password is required with a user */
    if ((rc = copy_part(r->user, sizeof r->user, p, (size_t)(colon - p))) < 0 ||
        (rc = copy_part(r->pass, sizeof r->pass, colon + 1, (size_t)(at - colon - 1))) < 0)
      return rc;
    r->has_pass = 1;
    p = at + 1;
  }
  if (*p == '[') {
    hs = p + 1;
    he = memchr(hs, ']', (size_t)(slash - hs));
    if (he == NULL)
      return TG_EINVAL;
    p = he + 1;
  } else {
    hs = p;
    he = memchr(p, ':', (size_t)(slash - p));
    if (he == NULL)
      he = slash;
    p = he;
  }
  if (he == hs)
    return TG_EINVAL;
  if ((rc = copy_part(r->host, sizeof r->host, hs, (size_t)(he - hs))) < 0)
    return rc;
  if (p < slash) {
    if (*p != ':' || parse_int(p + 1, (size_t)(slash - p - 1), 1, 65535, &r->port) < 0)
      return TG_EINVAL;
  }
  if (slash < end && slash + 1 < end) {
    if (parse_int(slash + 1, (size_t)(end - slash - 1), 0, 1000000, &r->db) < 0)
      return TG_EINVAL;
  }
  return 0;
}

static int sha1_hex(const char *text, char out[41]) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_Digest(text, strlen(text), md, &n, EVP_sha1(), NULL) != 1 || n != 20)
    return TG_EIO;
  for (unsigned i = 0; i < n; i++)
    snprintf(out + 2 * i, 3, "%02x", md[i]);
  return 0;
}

int tg__redis_new(const char *url, tg__redis_t **out) {
  tg__redis_t *r;
  int rc;

  if (url == NULL || out == NULL)
    return TG_EINVAL;
  *out = NULL;
  r = calloc(1, sizeof *r);
  if (r == NULL)
    return TG_ENOMEM;
  if ((rc = parse_url(r, url)) < 0)
    goto fail;
  for (int i = 0; i < N_SCRIPTS; i++)
    if ((rc = sha1_hex(script_text[i], r->sha[i])) < 0)
      goto fail;
  *out = r;
  return 0;
fail:
  free(r);
  return rc;
}

void tg__redis_free(tg__redis_t *r) {
  if (r == NULL)
    return;
  OPENSSL_cleanse(r->pass, sizeof r->pass);
  free(r);
}

/* ---- libuv adapter ------------------------------------------------------- */

typedef struct {
  redisAsyncContext *ac;      /* NULL once hiredis let go of the context */
  uv_poll_t poll;
  int events;
} uvev_t;

static void uvev_poll_cb(uv_poll_t *h, int status, int events) {
  uvev_t *e = h->data;
  /* libuv reports POLLERR as a status (and stops watching): let hiredis try
   * what it waited for, so it meets the socket error and reports it. */
  if (status < 0)
    events = e->events;
  if (e->ac != NULL && (events & UV_READABLE))
    redisAsyncHandleRead(e->ac);
  if (e->ac != NULL && (events & UV_WRITABLE))
    redisAsyncHandleWrite(e->ac);
}

static void uvev_update(uvev_t *e) {
  if (e->events)
    uv_poll_start(&e->poll, e->events, uvev_poll_cb);
  else
    uv_poll_stop(&e->poll);
}

static void uvev_add_read(void *d) {
  uvev_t *e = d;
  e->events |= UV_READABLE;
  uvev_update(e);
}

static void uvev_del_read(void *d) {
  uvev_t *e = d;
  e->events &= ~UV_READABLE;
  uvev_update(e);
}

static void uvev_add_write(void *d) {
  uvev_t *e = d;
  e->events |= UV_WRITABLE;
  uvev_update(e);
}

static void uvev_del_write(void *d) {
  uvev_t *e = d;
  e->events &= ~UV_WRITABLE;
  uvev_update(e);
}

static void uvev_closed(uv_handle_t *h) {
  free(h->data);
}

static void uvev_cleanup(void *d) {
  uvev_t *e = d;
  e->ac = NULL;
  uv_close((uv_handle_t *)&e->poll, uvev_closed);
}

static int uvev_attach(redisAsyncContext *ac, uv_loop_t *loop) {
  uvev_t *e = calloc(1, sizeof *e);
  if (e == NULL)
    return TG_ENOMEM;
  int rc = uv_poll_init_socket(loop, &e->poll, ac->c.fd);
  if (rc < 0) {
    free(e);
    return rc;
  }
  e->ac = ac;
  e->poll.data = e;
  ac->ev.data = e;
  ac->ev.addRead = uvev_add_read;
  ac->ev.delRead = uvev_del_read;
  ac->ev.addWrite = uvev_add_write;
  ac->ev.delWrite = uvev_del_write;
  ac->ev.cleanup = uvev_cleanup;
  return 0;
}

/* ---- leases held by this loop -------------------------------------------- */

static int lease_alloc(tg__redis_loop_t *rl, const char *tenant, uint32_t *slot) {
  if (rl->lease_free >= rl->lease_cap) {
    uint32_t cap = rl->lease_cap ? rl->lease_cap * 2 : 64;
    if (rl->lease_cap >= TG_REDIS_MAX_LEASES)
      return TG_ETOOBIG;
    if (cap > TG_REDIS_MAX_LEASES)
      cap = TG_REDIS_MAX_LEASES;
    lease_t *n = realloc(rl->leases, (size_t)cap * sizeof *n);
    if (n == NULL)
      return TG_ENOMEM;
    for (uint32_t i = rl->lease_cap; i < cap; i++) {
      memset(&n[i], 0, sizeof n[i]);
      n[i].next_free = i + 1 < cap ? i + 1 : UINT32_MAX;
    }
    rl->lease_free = rl->lease_cap;
    rl->leases = n;
    rl->lease_cap = cap;
  }
  uint32_t i = rl->lease_free;
  lease_t *l = &rl->leases[i];
  rl->lease_free = l->next_free == UINT32_MAX ? rl->lease_cap : l->next_free;
  l->state = LEASE_PENDING;
  snprintf(l->tenant, sizeof l->tenant, "%s", tenant);
  snprintf(l->id, sizeof l->id, "%s-%" PRIx32 "-%" PRIx32, rl->lease_prefix, i, ++rl->lease_gen);
  *slot = i;
  return 0;
}

static void lease_put(tg__redis_loop_t *rl, uint32_t i) {
  lease_t *l = &rl->leases[i];
  l->state = LEASE_FREE;
  l->id[0] = '\0';
  l->next_free = rl->lease_free < rl->lease_cap ? rl->lease_free : UINT32_MAX;
  rl->lease_free = i;
}

/* The slot of lease id, when this loop holds it. */
static int lease_find(const tg__redis_loop_t *rl, const char *id, uint32_t *slot) {
  size_t n = strlen(rl->lease_prefix);
  char *end;
  if (strncmp(id, rl->lease_prefix, n) != 0 || id[n] != '-')
    return TG_ENOTFOUND;
  unsigned long v = strtoul(id + n + 1, &end, 16);
  if (end == id + n + 1 || *end != '-' || v >= rl->lease_cap)
    return TG_ENOTFOUND;
  if (rl->leases[v].state == LEASE_FREE || strcmp(rl->leases[v].id, id) != 0)
    return TG_ENOTFOUND;
  *slot = (uint32_t)v;
  return 0;
}

/* ---- building commands --------------------------------------------------- */

static void call_reset(call_t *c) {
  c->argc = 0;
  c->used = 0;
}

/* Appends one argument, formatted, into the call's own buffer. */
static int arg(call_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int arg(call_t *c, const char *fmt, ...) {
  va_list ap;
  if (c->argc >= CALL_MAX_ARGS)
    return TG_ETOOBIG;
  size_t room = sizeof c->buf - c->used;
  va_start(ap, fmt);
  int n = vsnprintf(c->buf + c->used, room, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= room)
    return TG_ETOOBIG;
  c->argv[c->argc] = c->buf + c->used;
  c->argvlen[c->argc] = (size_t)n;
  c->argc++;
  c->used += (size_t)n + 1;
  return 0;
}

/* Appends a long constant (a script's text) without copying it. */
static int arg_static(call_t *c, const char *s) {
  if (c->argc >= CALL_MAX_ARGS)
    return TG_ETOOBIG;
  c->argv[c->argc] = s;
  c->argvlen[c->argc] = strlen(s);
  c->argc++;
  return 0;
}

static int arg_i64(call_t *c, int64_t v) {
  return arg(c, "%" PRId64, v);
}

static int arg_key(call_t *c, const char *suffix) {
  return arg(c, "tg:{%s}:%s", c->tenant, suffix);
}

/* EVALSHA <sha> <numkeys>; EVAL replaces the first two after NOSCRIPT. */
static int script_head(call_t *c, int script, int numkeys) {
  call_reset(c);
  c->script = script;
  c->eval_retry = 0;
  int rc = arg(c, "EVALSHA");
  if (rc == 0)
    rc = arg(c, "%s", c->rl->r->sha[script]);
  if (rc == 0)
    rc = arg(c, "%d", numkeys);
  return rc;
}

static int build_global(call_t *c) {
  int rc = script_head(c, SCRIPT_GLOBAL, 2);
  if (rc == 0) rc = arg(c, "tg:{global}:rps");
  if (rc == 0) rc = arg(c, "tg:{global}:rps:n");
  if (rc == 0) rc = arg_i64(c, c->now_ms);
  if (rc == 0) rc = arg_i64(c, c->req.global_rps);
  return rc;
}

static int build_admit(call_t *c) {
  const tg_limits_t *lim = &c->req.limits;
  int64_t now = c->now_ms;
  int64_t day = tg_day_of(now), month = tg_month_of(now);
  int64_t day_end = tg_day_end_ms(day), month_end = tg_month_end_ms(month);
  int64_t res_mt = clamp64(c->req.reserve.tokens, 0, TG_REDIS_TOKENS_MAX) * 1000;
  tg_nano_t cost = c->req.reserve.cost > 0 ? c->req.reserve.cost : 0;
  char daykey[40], monthkey[40];
  int rc;

  c->a.v.day = day;
  c->a.v.month = month;
  snprintf(daykey, sizeof daykey, "day:%" PRId64, day);
  snprintf(monthkey, sizeof monthkey, "month:%" PRId64, month);
  rc = script_head(c, SCRIPT_ADMIT, 7);
  if (rc == 0) rc = arg_key(c, "rpm");
  if (rc == 0) rc = arg_key(c, "rpm:n");
  if (rc == 0) rc = arg_key(c, "tpm");
  if (rc == 0) rc = arg_key(c, "leases");
  if (rc == 0) rc = arg_key(c, "resv");
  if (rc == 0) rc = arg_key(c, daykey);
  if (rc == 0) rc = arg_key(c, monthkey);
  if (rc == 0) rc = arg_i64(c, now);
  if (rc == 0) rc = arg_i64(c, lim->rpm > 0 ? lim->rpm : 0);
  if (rc == 0) rc = arg_i64(c, clamp64(lim->tpm, 0, TG_REDIS_TOKENS_MAX));
  if (rc == 0) rc = arg_i64(c, lim->concurrency > 0 ? lim->concurrency : 0);
  if (rc == 0) rc = arg_i64(c, lim->day_limit > 0 ? lim->day_limit : 0);
  if (rc == 0) rc = arg_i64(c, lim->month_limit > 0 ? lim->month_limit : 0);
  if (rc == 0) rc = arg_i64(c, res_mt);
  if (rc == 0) rc = arg_i64(c, cost);
  if (rc == 0) rc = arg(c, "%s", c->a.lease);
  if (rc == 0) rc = arg_i64(c, now + TG_REDIS_LEASE_TTL_MS);
  if (rc == 0) rc = arg_i64(c, day);
  if (rc == 0) rc = arg_i64(c, month);
  if (rc == 0) rc = arg_i64(c, day_end + TG_REDIS_DAY_KEEP_MS - now);
  if (rc == 0) rc = arg_i64(c, month_end + TG_REDIS_MONTH_KEEP_MS - now);
  if (rc == 0) rc = arg_i64(c, day_end - now);
  if (rc == 0) rc = arg_i64(c, month_end - now);
  return rc;
}

/* ceil(limit * pct / 100) without overflow: spent >= it exactly when
 * spent * 100 >= limit * pct, the rule of limits.c. 0 = no alert. */
static tg_nano_t alert_threshold(tg_nano_t limit, int pct) {
  if (limit <= 0)
    return 0;
  pct = pct < 1 ? 1 : pct > 100 ? 100 : pct;
  return (limit / 100) * pct + ((limit % 100) * pct + 99) / 100;
}

static int build_settle(call_t *c, int64_t actual_tokens, tg_nano_t actual_cost) {
  const tg_limits_t *lim = &c->req.limits;
  int charged = c->a.v.limit_tokens > 0 && lim->tpm > 0;
  tg_nano_t rcost = c->req.reserve.cost > 0 ? c->req.reserve.cost : 0;
  tg_nano_t acost = actual_cost > 0 ? actual_cost : 0;
  char daykey[40], monthkey[40];
  int rc;

  snprintf(daykey, sizeof daykey, "day:%" PRId64, c->day);
  snprintf(monthkey, sizeof monthkey, "month:%" PRId64, c->month);
  rc = script_head(c, SCRIPT_SETTLE, 5);
  if (rc == 0) rc = arg_key(c, "tpm");
  if (rc == 0) rc = arg_key(c, "leases");
  if (rc == 0) rc = arg_key(c, "resv");
  if (rc == 0) rc = arg_key(c, daykey);
  if (rc == 0) rc = arg_key(c, monthkey);
  if (rc == 0) rc = arg_i64(c, c->now_ms);
  if (rc == 0) rc = arg_i64(c, clamp64(lim->tpm, 0, TG_REDIS_TOKENS_MAX));
  if (rc == 0) rc = arg(c, "%d", charged);
  if (rc == 0) rc = arg(c, "%s", c->a.lease);
  if (rc == 0) rc = arg_i64(c, clamp64(c->req.reserve.tokens, 0, TG_REDIS_TOKENS_MAX) * 1000);
  if (rc == 0) rc = arg_i64(c, clamp64(actual_tokens, 0, TG_REDIS_TOKENS_MAX) * 1000);
  if (rc == 0) rc = arg_i64(c, rcost);
  if (rc == 0) rc = arg_i64(c, acost);
  if (rc == 0) rc = arg_i64(c, alert_threshold(lim->day_limit, lim->alert_pct));
  if (rc == 0) rc = arg_i64(c, alert_threshold(lim->month_limit, lim->alert_pct));
  return rc;
}

/* ---- sending ------------------------------------------------------------- */

static void pending_add(tg__redis_loop_t *rl, call_t *c) {
  c->prev = rl->tail;
  c->next = NULL;
  if (rl->tail)
    rl->tail->next = c;
  else
    rl->head = c;
  rl->tail = c;
  rl->n_pending++;
}

static void pending_del(tg__redis_loop_t *rl, call_t *c) {
  if (c->prev)
    c->prev->next = c->next;
  else
    rl->head = c->next;
  if (c->next)
    c->next->prev = c->prev;
  else
    rl->tail = c->prev;
  c->prev = c->next = NULL;
  rl->n_pending--;
}

/* Queues c on the connection. Returns 0 (on_reply follows, exactly once) or
 * TG_EUNAVAIL (c untouched, no reply). */
static int send_call(tg__redis_loop_t *rl, call_t *c) {
  if (rl->ac == NULL || rl->n_pending >= TG_REDIS_MAX_PENDING)
    return TG_EUNAVAIL;
  if (rl->state != RL_UP && !(rl->state == RL_HANDSHAKE && c->kind == CALL_SETUP))
    return TG_EUNAVAIL;
  if (redisAsyncCommandArgv(rl->ac, on_reply, c, c->argc, c->argv, c->argvlen) != REDIS_OK)
    return TG_EUNAVAIL;
  c->sent_ms = uv_now(rl->loop);
  pending_add(rl, c);
  return 0;
}

/* The connection is going (or has gone): new calls are refused from now on.
 * hiredis answers what is pending with NULL and then calls on_disconnect. */
static void mark_down(tg__redis_loop_t *rl, const char *why) {
  if (rl->state == RL_UP || rl->state == RL_HANDSHAKE) {
    rl->state = RL_IDLE;
    if (!rl->down && !rl->closing) {
      rl->down = 1;
      log_event("state_redis_down", rl->r, why);
    }
  }
}

/* Drops the connection from outside any hiredis callback or from within
 * one (hiredis then frees it when the callback returns). */
static void drop(tg__redis_loop_t *rl, const char *why) {
  redisAsyncContext *ac = rl->ac;
  if (ac == NULL)
    return;
  if (rl->state == RL_CONNECTING) {
    /* Never connected: hiredis will not call on_disconnect. */
    rl->ac = NULL;
    rl->state = RL_IDLE;
    ac->data = NULL;
    redisAsyncFree(ac);
    if (!rl->down && !rl->closing) {
      rl->down = 1;
      log_event("state_redis_down", rl->r, why);
    }
    schedule_reconnect(rl);
    return;
  }
  mark_down(rl, why);
  redisAsyncFree(ac); /* on_disconnect clears rl->ac and reconnects */
}

/* ---- replies ------------------------------------------------------------- */

static int64_t reply_int(const redisReply *e) {
  if (e->type == REDIS_REPLY_INTEGER)
    return (int64_t)e->integer;
  if (e->type == REDIS_REPLY_STRING) {
    char *end;
    long long v = strtoll(e->str, &end, 10);
    return end != e->str && *end == '\0' ? (int64_t)v : 0;
  }
  return 0;
}

static void unavailable(tg_admission_t *a) {
  memset(&a->v, 0, sizeof a->v);
  a->v.refused = TG_LIMIT_UNAVAILABLE;
  a->v.retry_after_ms = 1000;
  a->v.limit_requests = a->v.remaining_requests = a->v.reset_requests_ms = -1;
  a->v.limit_tokens = a->v.remaining_tokens = a->v.reset_tokens_ms = -1;
}

/* Finishes an admission: the lease is live or given back, then the caller
 * hears once. c is freed. */
static void admit_done(call_t *c, int admitted) {
  tg__redis_loop_t *rl = c->rl;
  if (admitted) {
    rl->leases[c->slot].state = LEASE_ACTIVE;
  } else {
    lease_put(rl, c->slot);
    c->a.lease[0] = '\0';
  }
  tg_admit_cb cb = c->cb;
  void *arg = c->arg;
  tg_admission_t a = c->a;
  free(c);
  cb(arg, &a);
}

static void admit_reply(call_t *c, const redisReply *rep) {
  tg_verdict_t *v = &c->a.v;
  static const tg_limit_kind_t kinds[] = {
      [TG_REDIS_OK] = TG_LIMIT_NONE,
      [TG_REDIS_CONCURRENCY] = TG_LIMIT_CONCURRENCY,
      [TG_REDIS_REQUESTS] = TG_LIMIT_REQUESTS,
      [TG_REDIS_TOKENS] = TG_LIMIT_TOKENS,
      [TG_REDIS_DAILY] = TG_LIMIT_DAILY_BUDGET,
      [TG_REDIS_MONTHLY] = TG_LIMIT_MONTHLY_BUDGET,
  };

  if (c->stage == STAGE_GLOBAL) {
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2)
      goto bad;
    if (reply_int(rep->element[0]) != 1) {
      memset(v, 0, sizeof *v);
      v->refused = TG_LIMIT_GLOBAL;
      v->retry_after_ms = reply_int(rep->element[1]);
      v->limit_requests = v->remaining_requests = v->reset_requests_ms = -1;
      v->limit_tokens = v->remaining_tokens = v->reset_tokens_ms = -1;
      admit_done(c, 0);
      return;
    }
    c->stage = STAGE_TENANT;
    if (build_admit(c) < 0 || send_call(c->rl, c) < 0) {
      unavailable(&c->a);
      admit_done(c, 0);
    }
    return;
  }
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 8)
    goto bad;
  int64_t code = reply_int(rep->element[0]);
  if (code < 0 || code > TG_REDIS_MONTHLY)
    goto bad;
  int64_t day = v->day, month = v->month;
  memset(v, 0, sizeof *v);
  v->refused = kinds[code];
  v->retry_after_ms = reply_int(rep->element[1]);
  v->limit_requests = reply_int(rep->element[2]);
  v->remaining_requests = reply_int(rep->element[3]);
  v->reset_requests_ms = reply_int(rep->element[4]);
  v->limit_tokens = reply_int(rep->element[5]);
  v->remaining_tokens = reply_int(rep->element[6]);
  v->reset_tokens_ms = reply_int(rep->element[7]);
  v->day = day;
  v->month = month;
  admit_done(c, v->refused == TG_LIMIT_NONE);
  return;
bad:
  log_reply_error(c->rl, "admission", "unexpected reply shape");
  unavailable(&c->a);
  admit_done(c, 0);
}

static void settle_reply(call_t *c, const redisReply *rep) {
  static const char *const window[2] = {"day", "month"};
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 5) {
    log_reply_error(c->rl, "settlement", "unexpected reply shape");
    return;
  }
  for (int w = 0; w < 2; w++) {
    if (reply_int(rep->element[1 + 2 * w]) != 1)
      continue;
    tg_nano_t spent = reply_int(rep->element[2 + 2 * w]);
    tg_nano_t limit = w == 0 ? c->req.limits.day_limit : c->req.limits.month_limit;
    tg_policy_alert(c->tenant, window[w], w == 0 ? c->day : c->month, spent, limit,
                    c->req.limits.alert_pct);
  }
}

/* The one place replies arrive. reply is NULL when the connection went
 * (or is being closed) before the answer. */
static void on_reply(redisAsyncContext *ac, void *reply, void *priv) {
  call_t *c = priv;
  tg__redis_loop_t *rl = c->rl;
  redisReply *rep = reply;

  pending_del(rl, c);
  if (rep == NULL) {
    mark_down(rl, ac->errstr[0] ? ac->errstr : "connection lost");
  } else if (rep->type == REDIS_REPLY_ERROR && c->script >= 0 && !c->eval_retry &&
             strncmp(rep->str, "NOSCRIPT", 8) == 0) {
    /* The server forgot the script (restart, SCRIPT FLUSH, failover):
     * send the text itself once. */
    c->eval_retry = 1;
    c->argv[0] = "EVAL";
    c->argvlen[0] = 4;
    c->argv[1] = script_text[c->script];
    c->argvlen[1] = strlen(script_text[c->script]);
    if (send_call(rl, c) == 0)
      return;
  }
  if (rep != NULL && rep->type == REDIS_REPLY_ERROR) {
    switch (c->kind) {
    case CALL_ADMIT: log_reply_error(rl, "admission", rep->str); break;
    case CALL_SETTLE: log_reply_error(rl, "settlement", rep->str); break;
    case CALL_RENEW: log_reply_error(rl, "lease renewal", rep->str); break;
    default: break;
    }
  }
  switch (c->kind) {
  case CALL_ADMIT:
    if (rep == NULL || rep->type == REDIS_REPLY_ERROR) {
      unavailable(&c->a);
      admit_done(c, 0);
    } else {
      admit_reply(c, rep);
    }
    return; /* c is freed */
  case CALL_SETTLE:
    if (rep == NULL)
      log_event("state_redis_settle_lost", rl->r, "connection lost before the reply");
    else if (rep->type != REDIS_REPLY_ERROR)
      settle_reply(c, rep);
    break;
  case CALL_SETUP:
    /* A connection that cannot authenticate, select its database or load
     * the scripts is no use: drop it and try again later. */
    if (rep != NULL && rep->type == REDIS_REPLY_ERROR) {
      char why[300];
      snprintf(why, sizeof why, "%s refused: %.200s", c->argv[0], rep->str);
      drop(rl, why);
    } else if (rep != NULL && c->stage == 1 && rl->state == RL_HANDSHAKE) {
      become_up(rl);
    }
    break;
  default:
    break;
  }
  free(c);
}

/* ---- connection ---------------------------------------------------------- */

static call_t *call_new(tg__redis_loop_t *rl, int kind) {
  call_t *c = calloc(1, sizeof *c);
  if (c != NULL) {
    c->rl = rl;
    c->kind = kind;
    c->script = -1;
  }
  return c;
}

/* The handshake's last reply came: the connection is usable. */
static void become_up(tg__redis_loop_t *rl) {
  uv_timer_stop(&rl->conn_timer); /* the connect and handshake timeout */
  rl->state = RL_UP;
  rl->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
  if (rl->down) {
    rl->down = 0;
    log_event("state_redis_up", rl->r, "connected again");
  } else if (!rl->ever_up) {
    log_event("state_redis_up", rl->r, "connected");
  }
  rl->ever_up = 1;
}

/* Builds one handshake command; NULL when out of memory or room. */
static call_t *setup_call(tg__redis_loop_t *rl, const char *a0, const char *a1, const char *a2,
                          const char *a3) {
  call_t *c = call_new(rl, CALL_SETUP);
  if (c == NULL)
    return NULL;
  const char *v[4] = {a0, a1, a2, a3};
  for (int i = 0; i < 4 && v[i] != NULL; i++) {
    /* Script texts are long constants: referenced, not copied. */
    int rc = strlen(v[i]) > 256 ? arg_static(c, v[i]) : arg(c, "%s", v[i]);
    if (rc < 0) {
      free(c);
      return NULL;
    }
  }
  return c;
}

static void on_connect(const redisAsyncContext *cac, int status) {
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  tg__redis_loop_t *rl = ac->data;
  call_t *c[2 + N_SCRIPTS];
  int n = 0;
  char db[16];

  if (rl == NULL)
    return;
  if (status != REDIS_OK) {
    /* hiredis frees the context after this returns. */
    uv_timer_stop(&rl->conn_timer);
    rl->ac = NULL;
    rl->state = RL_IDLE;
    ac->data = NULL;
    if (!rl->down && !rl->closing) {
      rl->down = 1;
      log_event("state_redis_down", rl->r, ac->errstr[0] ? ac->errstr : "connect failed");
    }
    schedule_reconnect(rl);
    return;
  }
  /* Pipelined ahead of anything else: by the time a script runs, the
   * connection is authenticated, on its database, and the scripts loaded.
   * Admissions wait (are refused) until the last of these answers. */
  rl->state = RL_HANDSHAKE;
  const tg__redis_t *r = rl->r;
  if (r->has_pass)
    c[n++] = r->user[0] ? setup_call(rl, "AUTH", r->user, r->pass, NULL)
                        : setup_call(rl, "AUTH", r->pass, NULL, NULL);
  if (r->db != 0) {
    snprintf(db, sizeof db, "%d", r->db);
    c[n++] = setup_call(rl, "SELECT", db, NULL, NULL);
  }
  for (int i = 0; i < N_SCRIPTS; i++)
    c[n++] = setup_call(rl, "SCRIPT", "LOAD", script_text[i], NULL);
  if (c[n - 1] != NULL)
    c[n - 1]->stage = 1;
  for (int i = 0; i < n; i++) {
    if (c[i] != NULL && send_call(rl, c[i]) == 0)
      continue;
    for (int j = i; j < n; j++)
      free(c[j]);
    /* Not from here: hiredis still uses the context after this callback.
     * The connect timer drops it at once instead. */
    uv_timer_start(&rl->conn_timer, on_conn_timer, 0, 0);
    return;
  }
}

static void on_disconnect(const redisAsyncContext *cac, int status) {
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  tg__redis_loop_t *rl = ac->data;

  if (rl == NULL || rl->ac != ac)
    return;
  rl->ac = NULL;
  ac->data = NULL;
  if (rl->closing) {
    rl->state = RL_CLOSED;
    return;
  }
  mark_down(rl, status == REDIS_OK   ? "disconnected"
                : ac->errstr[0] ? ac->errstr
                                : "connection lost");
  rl->state = RL_IDLE;
  schedule_reconnect(rl);
}

static void connect_to(tg__redis_loop_t *rl, const char *ip) {
  redisAsyncContext *ac = redisAsyncConnect(ip, rl->r->port);
  if (ac == NULL || ac->err) {
    if (!rl->down) {
      rl->down = 1;
      log_event("state_redis_down", rl->r, ac ? ac->errstr : "out of memory");
    }
    if (ac)
      redisAsyncFree(ac);
    schedule_reconnect(rl);
    return;
  }
  if (uvev_attach(ac, rl->loop) < 0) {
    redisAsyncFree(ac);
    schedule_reconnect(rl);
    return;
  }
  ac->data = rl;
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  rl->ac = ac;
  rl->state = RL_CONNECTING;
}

static void arm_connect_timeout(tg__redis_loop_t *rl) {
  uv_timer_start(&rl->conn_timer, on_conn_timer, TG_REDIS_CONNECT_TIMEOUT_MS, 0);
}

static void maybe_free(tg__redis_loop_t *rl) {
  if (--rl->open > 0)
    return;
  free(rl->leases);
  free(rl);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  tg__redis_loop_t *rl = req->data;
  char ip[64];

  rl->gai_busy = 0;
  if (rl->closing) {
    if (res)
      uv_freeaddrinfo(res);
    maybe_free(rl);
    return;
  }
  rl->open--; /* the request's own count */
  if (status < 0 || res == NULL) {
    if (!rl->down) {
      rl->down = 1;
      log_event("state_redis_down", rl->r, status < 0 ? uv_strerror(status) : "no address");
    }
    rl->state = RL_IDLE;
    if (res)
      uv_freeaddrinfo(res);
    schedule_reconnect(rl);
    return;
  }
  /* IPv4 first, as hiredis itself resolves: "localhost" then reaches a
   * server bound to 127.0.0.1 even where ::1 is listed first. */
  const struct addrinfo *pick = res;
  for (const struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next)
    if (ai->ai_family == AF_INET) {
      pick = ai;
      break;
    }
  ip[0] = '\0';
  if (pick->ai_family == AF_INET6)
    uv_ip6_name((const struct sockaddr_in6 *)pick->ai_addr, ip, sizeof ip);
  else
    uv_ip4_name((const struct sockaddr_in *)pick->ai_addr, ip, sizeof ip);
  uv_freeaddrinfo(res);
  rl->state = RL_IDLE;
  connect_to(rl, ip);
  if (rl->state == RL_CONNECTING)
    arm_connect_timeout(rl);
}

static void start_connect(tg__redis_loop_t *rl) {
  unsigned char buf[sizeof(struct in6_addr)];
  const char *host = rl->r->host;

  if (rl->closing || rl->ac != NULL)
    return;
  if (inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1) {
    connect_to(rl, host);
    if (rl->state == RL_CONNECTING)
      arm_connect_timeout(rl);
    return;
  }
  /* A name: resolve it off the loop. */
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  rl->gai.data = rl;
  int rc = uv_getaddrinfo(rl->loop, &rl->gai, on_resolved, host, NULL, &hints);
  if (rc < 0) {
    schedule_reconnect(rl);
    return;
  }
  rl->gai_busy = 1;
  rl->open++;
  rl->state = RL_RESOLVING;
}

static void on_conn_timer(uv_timer_t *t) {
  tg__redis_loop_t *rl = t->data;
  if (rl->state == RL_CONNECTING)
    drop(rl, "connect timed out");
  else if (rl->state == RL_HANDSHAKE)
    drop(rl, "handshake failed or timed out");
  else if (rl->state == RL_IDLE)
    start_connect(rl);
}

static void schedule_reconnect(tg__redis_loop_t *rl) {
  if (rl->closing)
    return;
  uv_timer_start(&rl->conn_timer, on_conn_timer, rl->backoff_ms, 0);
  rl->backoff_ms *= 2;
  if (rl->backoff_ms > TG_REDIS_BACKOFF_MAX_MS)
    rl->backoff_ms = TG_REDIS_BACKOFF_MAX_MS;
}

/* ---- tick: late replies, lease renewal ----------------------------------- */

/* Sends the renewals of one round from the cursor on; stops early when the
 * connection takes no more (the pending bound) and goes on at the next
 * tick, so a loop with many leases still renews them all in time. */
static void renew_leases(tg__redis_loop_t *rl) {
  for (; rl->renew_cursor < rl->lease_cap; rl->renew_cursor++) {
    lease_t *l = &rl->leases[rl->renew_cursor];
    if (l->state != LEASE_ACTIVE)
      continue;
    call_t *c = call_new(rl, CALL_RENEW);
    if (c == NULL)
      return;
    snprintf(c->tenant, sizeof c->tenant, "%s", l->tenant);
    /* XX: a lease already expired and swept stays gone. */
    if (arg(c, "ZADD") || arg_key(c, "leases") || arg(c, "XX") ||
        arg_i64(c, rl->renew_expiry) || arg(c, "%s", l->id) || send_call(rl, c) < 0) {
      free(c);
      return;
    }
  }
  rl->renewing = 0;
}

static void on_tick(uv_timer_t *t) {
  tg__redis_loop_t *rl = t->data;
  uint64_t now = uv_now(rl->loop);

  if (rl->head != NULL && now - rl->head->sent_ms >= TG_REDIS_REPLY_TIMEOUT_MS) {
    drop(rl, "no reply within 2 s");
    return;
  }
  if (rl->state != RL_UP)
    return; /* renewals wait for the connection; a round under way goes on after */
  if (!rl->renewing && now - rl->last_renew_ms >= TG_REDIS_LEASE_RENEW_MS) {
    rl->renewing = 1;
    rl->renew_cursor = 0;
    rl->renew_expiry = loop_clock(rl) + TG_REDIS_LEASE_TTL_MS;
    rl->last_renew_ms = now;
  }
  if (rl->renewing)
    renew_leases(rl);
}

/* ---- public -------------------------------------------------------------- */

int tg__redis_loop_new(tg__redis_t *r, uv_loop_t *loop, tg__redis_loop_t **out) {
  unsigned char rnd[8];
  tg__redis_loop_t *rl;

  if (r == NULL || loop == NULL || out == NULL)
    return TG_EINVAL;
  *out = NULL;
  rl = calloc(1, sizeof *rl);
  if (rl == NULL)
    return TG_ENOMEM;
  if (RAND_bytes(rnd, sizeof rnd) != 1) {
    free(rl);
    return TG_EIO;
  }
  for (size_t i = 0; i < sizeof rnd; i++)
    snprintf(rl->lease_prefix + 2 * i, 3, "%02x", rnd[i]);
  rl->r = r;
  rl->loop = loop;
  rl->state = RL_IDLE;
  rl->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
  uv_timer_init(loop, &rl->conn_timer);
  uv_timer_init(loop, &rl->tick);
  rl->conn_timer.data = rl;
  rl->tick.data = rl;
  rl->open = 2;
  rl->last_renew_ms = uv_now(loop);
  uv_timer_start(&rl->tick, on_tick, TG_REDIS_TICK_MS, TG_REDIS_TICK_MS);
  start_connect(rl);
  *out = rl;
  return 0;
}

static void on_timer_closed(uv_handle_t *h) {
  maybe_free(h->data);
}

void tg__redis_loop_close(tg__redis_loop_t *rl) {
  if (rl == NULL || rl->closing)
    return;
  rl->closing = 1;
  if (rl->ac != NULL) {
    redisAsyncContext *ac = rl->ac;
    if (rl->state == RL_CONNECTING) {
      rl->ac = NULL;
      ac->data = NULL;
    }
    rl->state = RL_CLOSED;
    /* Pending calls are answered now (admissions: UNAVAILABLE). */
    redisAsyncFree(ac);
    rl->ac = NULL;
  }
  rl->state = RL_CLOSED;
  if (rl->gai_busy)
    uv_cancel((uv_req_t *)&rl->gai);
  uv_close((uv_handle_t *)&rl->conn_timer, on_timer_closed);
  uv_close((uv_handle_t *)&rl->tick, on_timer_closed);
}

int tg__redis_connected(const tg__redis_loop_t *rl) {
  return rl != NULL && rl->state == RL_UP;
}

int tg__redis_admit(tg__redis_loop_t *rl, const tg_admit_req_t *r, int64_t now_ms,
                    tg_admit_cb cb, void *arg_) {
  call_t *c;
  size_t tlen;
  int rc;

  if (rl == NULL || r == NULL || r->tenant == NULL || cb == NULL)
    return TG_EINVAL;
  tlen = strlen(r->tenant);
  if (tlen == 0)
    return TG_EINVAL;
  if (tlen > TG_REDIS_MAX_TENANT)
    return TG_ETOOBIG;
  if (rl->state != RL_UP || rl->n_pending >= TG_REDIS_MAX_PENDING)
    return TG_EUNAVAIL;
  if ((c = call_new(rl, CALL_ADMIT)) == NULL)
    return TG_ENOMEM;
  note_clock(rl, now_ms);
  memcpy(c->tenant, r->tenant, tlen + 1);
  c->req = *r;
  c->req.tenant = c->tenant;
  c->now_ms = now_ms;
  c->cb = cb;
  c->arg = arg_;
  c->a.backend = TG_BACKEND_REDIS;
  if ((rc = lease_alloc(rl, c->tenant, &c->slot)) < 0) {
    free(c);
    return rc;
  }
  memcpy(c->a.lease, rl->leases[c->slot].id, sizeof c->a.lease);
  if (r->global_rps > 0) {
    c->stage = STAGE_GLOBAL;
    rc = build_global(c);
  } else {
    c->stage = STAGE_TENANT;
    rc = build_admit(c);
  }
  if (rc == 0)
    rc = send_call(rl, c);
  if (rc < 0) {
    lease_put(rl, c->slot);
    free(c);
    return rc;
  }
  return 0;
}

void tg__redis_settle(tg__redis_loop_t *rl, const tg_admit_req_t *r, const tg_admission_t *a,
                      int64_t actual_tokens, tg_nano_t actual_cost, int64_t now_ms) {
  uint32_t slot;
  call_t *c;
  size_t tlen;

  if (rl == NULL || r == NULL || a == NULL || r->tenant == NULL)
    return;
  if (a->v.refused != TG_LIMIT_NONE || a->lease[0] == '\0')
    return; /* nothing was charged */
  /* Stop renewing the lease whatever happens next: if the settlement is
   * lost, the lease and its reservation expire on their own. */
  if (lease_find(rl, a->lease, &slot) == 0)
    lease_put(rl, slot);
  tlen = strlen(r->tenant);
  if (tlen == 0 || tlen > TG_REDIS_MAX_TENANT)
    return;
  if (rl->state != RL_UP) {
    log_event("state_redis_settle_lost", rl->r, "not connected");
    return;
  }
  if ((c = call_new(rl, CALL_SETTLE)) == NULL)
    return;
  note_clock(rl, now_ms);
  memcpy(c->tenant, r->tenant, tlen + 1);
  c->req = *r;
  c->req.tenant = c->tenant;
  c->now_ms = now_ms;
  c->a = *a;
  c->day = a->v.day;
  c->month = a->v.month;
  if (build_settle(c, actual_tokens, actual_cost) < 0 || send_call(rl, c) < 0) {
    log_event("state_redis_settle_lost", rl->r, "could not send");
    free(c);
    return;
  }
  /* Put the release on the wire now, before the caller sends its answer's
   * last bytes: the client's next request must not find the slot still
   * taken. (Not from inside a reply callback: hiredis writes after it.) */
  if (rl->ac != NULL && !(rl->ac->c.flags & REDIS_IN_CALLBACK))
    redisAsyncHandleWrite(rl->ac);
}
