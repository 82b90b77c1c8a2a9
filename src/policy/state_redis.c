/* The Redis backend of the policy state (state.h): admissions and
 * settlements run in Lua scripts (redis_scripts.h), so any number of
 * gateways share exact limits. docs/state-redis.md describes the keys, the
 * scripts and what happens when Redis fails.
 *
 * Each loop thread owns one tg__redis_loop_t: one hiredis async connection
 * driven by that loop, a reconnect timer (100 ms doubling to 2 s), and a
 * tick timer that renews the loop's concurrency leases every 10 s and gives
 * up on replies that do not come. Admissions and settlements are not sent
 * one by one: each is an op_t queued in a batch call_t per tenant (and one
 * for the global limit), and a prepare and a check handle send every batch
 * of the loop iteration as one script call each, just before the loop
 * polls and just after. Every call sent is kept in a list in send order
 * until hiredis hands back its reply; hiredis answers every pending command
 * exactly once, with NULL when the connection goes, and a batch that cannot
 * be sent is answered at once, so each admission callback runs exactly
 * once.
 *
 * The backend also keeps each tenant's spend of the current UTC day and
 * month (for the /metrics gauges, which read it from another thread): from
 * the batches' replies, and refreshed every 2 s by one loop for every
 * tenant asked about, so a gateway that serves no traffic still shows what
 * the others spent.
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
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "core/err.h"
#include "core/strbuf.h"
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
/* Bounds: calls and operations waiting for a reply and leases held per
 * loop thread; operations in one script call. */
#define TG_REDIS_MAX_PENDING 20000
#define TG_REDIS_MAX_OPS 20000
#define TG_REDIS_BATCH_MAX 64
/* Global give-backs sent by one flush (one loop iteration's refusals). */
#define UNDO_MAX 512
/* Spend figures: refreshed this often, for at most this many tenants. */
#define TG_REDIS_SPEND_REFRESH_MS 2000
#define TG_REDIS_SPEND_MAX 4096
#define SPEND_SLOTS (2 * TG_REDIS_SPEND_MAX) /* a power of two, half full at most */
#define TG_REDIS_MAX_LEASES 65536
#define TG_REDIS_MAX_TENANT 128
/* Set (without a TTL) by the gateway that re-seeded Redis's budget windows
 * from its ledger; missing, Redis lost its data (docs/state-redis.md). */
#define TG_REDIS_EPOCH_KEY "tg:epoch"
/* Window keys outlive their period by this much (late settlements,
 * inspection by an operator). */
#define TG_REDIS_DAY_KEEP_MS (INT64_C(3) * 86400000)
#define TG_REDIS_MONTH_KEEP_MS (INT64_C(62) * 86400000)
/* Same clamp as limits.c: tokens and token rates above this are taken as it. */
#define TG_REDIS_TOKENS_MAX INT64_C(1000000000000)
/* Holdings (docs/state-redis.md, Holdings): a busy tenant's loop thread
 * takes a grant of requests, tokens, money and slots in one script call and
 * admits from it locally. A grant is usable for TG_REDIS_HOLD_MS; the
 * script makes none smaller than 8 requests or above 1/8 of what any limit
 * has left (HMIN, HF there). A tenant counts as busy with this many
 * admissions on the loop over the last two periods. */
#define TG_REDIS_HOLD_MS 200
#define TG_REDIS_HOLD_BUSY 8
#define TG_REDIS_HOLD_MAX_REQ 4096
#define TG_REDIS_HOLD_MIN_SLOTS 16
/* At most one sync per tenant and loop this often from the admission path. */
#define TG_REDIS_HOLD_RESYNC_MS 20
/* Tenants with a holding per loop thread; others are admitted one by one. */
#define TG_REDIS_MAX_HOLDS 64
/* Grants stay below 2^53 in every figure: Lua's numbers are doubles. */
#define TG_REDIS_HOLD_EXACT (INT64_C(1) << 53)

enum { SCRIPT_GLOBAL, SCRIPT_BATCH, SCRIPT_RENEW, N_SCRIPTS };

static const char *const script_text[N_SCRIPTS] = {
    TG_REDIS_LUA_GLOBAL,
    TG_REDIS_LUA_BATCH,
    TG_REDIS_LUA_RENEW,
};

/* A tenant's spend as last heard: the figure of the window of that period
 * (a later period replaces it; spend only grows within one). */
typedef struct {
  char tenant[TG_REDIS_MAX_TENANT + 1];
  int64_t day, month;         /* periods of the figures; -1 = none yet */
  tg_nano_t day_spent, month_spent;
} spend_t;

struct tg__redis_s {
  tg_redis_url_t u;         /* host, port, db, user, password */
  char sha[N_SCRIPTS][41];
  int hold_off;               /* tg__redis_holding(r, 0): one by one */
  atomic_int n_loops;         /* loops made and not closed */
  atomic_int n_up;            /* of which connected (RL_UP) */
  atomic_uint lost;           /* counts the losses of Redis's data seen
                               * (tg__redis_lost): each loop renews its
                               * leases at once when it moves */

  /* Spend figures, read by the admin thread: under spend_lock. */
  pthread_mutex_t spend_lock;
  spend_t *spend;
  size_t n_spend, cap_spend;
  uint16_t *spend_slot;       /* SPEND_SLOTS: index + 1 of an entry, by its
                               * tenant's hash (linear probing; 0 empty) */
  size_t untracked;           /* tenants the last tg__redis_keep() had no room for */
  tg__redis_loop_t *refresher; /* the loop that refreshes them */
};

/* ---- calls --------------------------------------------------------------- */

/* CALL_BATCH: a tenant's admissions and settlements (TG_REDIS_LUA_BATCH);
 * CALL_GLOBAL: global-limit checks of admissions, which then go on to
 * their tenant's batch; the others are plain commands. */
enum { CALL_SETUP, CALL_BATCH, CALL_GLOBAL, CALL_RENEW, CALL_SPEND };
enum { OP_ADMIT, OP_SETTLE, OP_HOLD };

#define CALL_MAX_ARGS 32
#define CALL_BUF 1024
/* A lease's member in tg:{T}:leases: "<id> <day> <month> <cost>", the
 * lease and the money it reserved in those periods. */
#define LEASE_MEMBER_MAX 112


/* One admission or settlement, from tg__redis_admit/settle until its
 * reply (the admission's callback) has been handled. */
typedef struct {
  int kind;
  char tenant[TG_REDIS_MAX_TENANT + 1];
  tg_admit_req_t req;         /* req.tenant points at tenant above */
  int64_t now_ms;
  tg_admit_cb cb;
  void *arg;
  uint32_t slot;              /* lease table slot of an admission */
  tg_admission_t a;           /* admission: the answer being built;
                               * settlement: the admission settled */
  int64_t day, month;         /* periods admitted in */
  char member[LEASE_MEMBER_MAX]; /* the lease's member in tg:{T}:leases */
  int64_t actual_tokens;      /* settlement */
  tg_nano_t actual_cost;
  /* holding sync: the H record's figures (redis_scripts.h) */
  uint32_t hold;              /* index in the loop's holdings */
  int64_t oday, omonth;       /* periods of the holding being replaced */
  int64_t ret_n, ret_ts, refund_mt, keep_slots, want, per_mt, want_slots, until;
  tg_nano_t spent, keep_cost, per_cost;
} op_t;

typedef struct call_s call_t;
struct call_s {
  call_t *prev, *next;        /* pending list, in send order */
  call_t *qnext;              /* the loop's queue of batches not sent yet */
  tg__redis_loop_t *rl;
  int kind;
  int stage;                  /* CALL_SETUP: 1 on the handshake's last call;
                               * CALL_SPEND: 1 for the month's figure */
  int script;                 /* index for EVALSHA, or -1 for a plain command */
  int eval_retry;             /* already sent again with EVAL after NOSCRIPT */
  uint64_t sent_ms;           /* uv_now() when sent */
  /* plain commands */
  int argc;
  const char *argv[CALL_MAX_ARGS];
  size_t argvlen[CALL_MAX_ARGS];
  size_t used;
  char buf[CALL_BUF];

  char tenant[TG_REDIS_MAX_TENANT + 1]; /* batch, renewal, spend */
  int64_t period;             /* CALL_SPEND */
  /* batches: the operations in order, and the distinct windows they name */
  size_t n_ops;
  op_t *ops[TG_REDIS_BATCH_MAX];
  int n_win;
  int64_t win_period[4 * TG_REDIS_BATCH_MAX];
  uint8_t win_month[4 * TG_REDIS_BATCH_MAX];
};

/* ---- per loop ------------------------------------------------------------ */

/* IDLE (waiting to reconnect) -> RESOLVING (a host name) -> CONNECTING ->
 * HANDSHAKE (AUTH, SELECT, SCRIPT LOAD under way) -> UP: usable. */
enum { RL_IDLE, RL_RESOLVING, RL_CONNECTING, RL_HANDSHAKE, RL_UP, RL_CLOSED };
enum { LEASE_FREE, LEASE_PENDING, LEASE_ACTIVE };

/* A tenant's holding on this loop thread. Its member in tg:{T}:holds holds
 * `slots` slots and the money of the requests running on it plus what is
 * left of the grant; local admissions take from the grant until `until`;
 * settlements are added up here and reported at the next sync. */
typedef struct {
  char tenant[TG_REDIS_MAX_TENANT + 1];
  char hid[40];               /* "<lease prefix>-h<index>": its lease text */
  int in_use;
  int syncing;                /* a sync is on its way to Redis */
  int in_redis;               /* a member is (believed) held in Redis */
  int lost;                   /* Redis lost its data: sync as soon as may be */
  tg_limits_t lim;            /* the limits of the grant */
  int64_t day, month;         /* periods of the member */
  int64_t sync_day, sync_month; /* periods of the sync on its way */
  int64_t until;              /* grant usable while now < until; 0 = none */
  int64_t at_ts;              /* where its requests are counted in the log */
  int64_t req_left, mt_left;
  tg_nano_t cost_left;
  int64_t slots, used;        /* slots held; taken by running requests */
  tg_nano_t running_cost;     /* reservations of the running requests */
  tg_nano_t pend_spent;       /* settled, not reported yet */
  int64_t pend_refund_mt;     /* tokens settled below (above) reservation */
  int64_t last_sync;          /* ms */
  int64_t last_seen;          /* ms of the last admission asked for */
  int64_t win_start, win_n, prev_n; /* admissions in this and the last period */
  int64_t peak_used;
  int64_t per_mt;             /* largest reservation seen lately */
  tg_nano_t per_cost;
  int64_t rem_req, reset_req, rem_tok, reset_tok; /* from the last sync */
} hold_t;

typedef struct {
  char id[40];
  char member[LEASE_MEMBER_MAX];
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
  call_t *q_head, *q_tail;    /* batches to send at the next flush */
  size_t n_ops;               /* admissions and settlements not answered */
  int64_t undo_at[UNDO_MAX];  /* times of global admissions to give back
                                 (their tenants' limits refused them) */
  uint32_t n_undo;
  int flushed_at_close;       /* what the loop owed Redis went out at close */
  uv_prepare_t flush_prepare; /* flush before the loop polls ... */
  uv_check_t flush_check;     /* ... and after its I/O callbacks */
  uint64_t last_refresh_ms;
  uint64_t last_renew_ms;     /* start of the last renewal round */
  int renewing;               /* a round is under way */
  uint32_t renew_cursor;      /* next lease slot of the round */
  int64_t renew_expiry;       /* the round's new expiry */
  unsigned lost_seen;         /* r->lost when the loop last looked */
  int restore_logged;         /* the round's first lease added again was logged */
  uint64_t last_err_log_ms;
  /* The gateway's clock minus uv_now(), learnt from the now_ms of each call,
   * so renewals use the same clock as admissions (injected in tests). */
  int64_t clock_offset_ms;
  hold_t *holds;              /* TG_REDIS_MAX_HOLDS, allocated on first use */
  lease_t *leases;
  uint32_t lease_cap;
  uint32_t lease_free;        /* head of the free list; lease_cap = none */
  uint32_t lease_gen;
  char lease_prefix[17];
};

/* Every change of a loop's state goes through here: the shared count of
 * connected loops (readiness, tg__redis_ready) follows it. */
static void set_state(tg__redis_loop_t *rl, int st) {
  if (rl->state == RL_UP && st != RL_UP)
    atomic_fetch_sub(&rl->r->n_up, 1);
  else if (rl->state != RL_UP && st == RL_UP)
    atomic_fetch_add(&rl->r->n_up, 1);
  rl->state = st;
}

static void start_connect(tg__redis_loop_t *rl);
static void schedule_reconnect(tg__redis_loop_t *rl);
static void become_up(tg__redis_loop_t *rl);
static void on_conn_timer(uv_timer_t *t);
static void on_reply(redisAsyncContext *ac, void *reply, void *priv);
static void hold_tick(tg__redis_loop_t *rl);
static void hold_lost(tg__redis_loop_t *rl);

/* ---- small helpers ------------------------------------------------------- */

static int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : v > hi ? hi : v;
}

static void log_event(const char *event, const tg__redis_t *r, const char *why) {
  char detail[1024];
  snprintf(detail, sizeof detail, "redis %.255s:%d: %.600s", r->u.host, r->u.port, why);
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

/* Unix ms, as tg_now_ms() gives (kept here so the backend does not need
 * the dispatcher, and its tests can stand alone). */
static int64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- URL ----------------------------------------------------------------- */

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
  if ((rc = tg_config_redis_url(url, &r->u)) < 0)
    goto fail;
  for (int i = 0; i < N_SCRIPTS; i++)
    if ((rc = sha1_hex(script_text[i], r->sha[i])) < 0)
      goto fail;
  if (pthread_mutex_init(&r->spend_lock, NULL) != 0) {
    rc = TG_ENOMEM;
    goto fail;
  }
  *out = r;
  return 0;
fail:
  free(r);
  return rc;
}

void tg__redis_free(tg__redis_t *r) {
  if (r == NULL)
    return;
  OPENSSL_cleanse(r->u.pass, sizeof r->u.pass);
  pthread_mutex_destroy(&r->spend_lock);
  free(r->spend);
  free(r->spend_slot);
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

/* ---- batches ------------------------------------------------------------ */

/* The arguments of one script call, sized for its batch: argument texts go
 * into one buffer that never moves (hiredis copies them when the command is
 * queued, so they live only while it is sent). */
typedef struct {
  const char **argv;
  size_t *len;
  int argc, cap;
  char *buf;
  size_t used, size;
} args_t;

static void args_free(args_t *a) {
  free(a->argv);
  free(a->len);
  free(a->buf);
  memset(a, 0, sizeof *a);
}

static int args_init(args_t *a, int cap, size_t size) {
  memset(a, 0, sizeof *a);
  a->argv = malloc((size_t)cap * sizeof *a->argv);
  a->len = malloc((size_t)cap * sizeof *a->len);
  a->buf = malloc(size);
  a->cap = cap;
  a->size = size;
  if (a->argv == NULL || a->len == NULL || a->buf == NULL) {
    args_free(a);
    return TG_ENOMEM;
  }
  return 0;
}

static int args_add(args_t *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int args_add(args_t *a, const char *fmt, ...) {
  va_list ap;
  if (a->argc >= a->cap)
    return TG_ETOOBIG;
  size_t room = a->size - a->used;
  va_start(ap, fmt);
  int n = vsnprintf(a->buf + a->used, room, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= room)
    return TG_ETOOBIG;
  a->argv[a->argc] = a->buf + a->used;
  a->len[a->argc] = (size_t)n;
  a->argc++;
  a->used += (size_t)n + 1;
  return 0;
}

/* Appends one integer argument. Batches carry thousands of them, and
 * vsnprintf is the largest cost of building one. */
static int args_int(args_t *a, int64_t v) {
  tg_sb_t b;
  if (a->argc >= a->cap)
    return TG_ETOOBIG;
  tg_sb_init(&b, a->buf + a->used, a->size - a->used);
  tg_sb_puti(&b, v);
  if (b.err)
    return TG_ETOOBIG;
  a->argv[a->argc] = b.p;
  a->len[a->argc] = b.len;
  a->argc++;
  a->used += b.len + 1;
  return 0;
}

/* Appends a string argument, copied. */
static int args_str(args_t *a, const char *v) {
  size_t n = strlen(v);
  if (a->argc >= a->cap || a->size - a->used <= n)
    return TG_ETOOBIG;
  memcpy(a->buf + a->used, v, n + 1);
  a->argv[a->argc] = a->buf + a->used;
  a->len[a->argc] = n;
  a->argc++;
  a->used += n + 1;
  return 0;
}

/* EVALSHA <sha> <numkeys>, or EVAL <text> <numkeys> after NOSCRIPT. */
static int args_head(args_t *a, const call_t *c, int numkeys) {
  if (a->argc + 3 > a->cap)
    return TG_ETOOBIG;
  if (c->eval_retry) {
    a->argv[0] = "EVAL";
    a->len[0] = 4;
    a->argv[1] = script_text[c->script];
    a->len[1] = strlen(script_text[c->script]);
    a->argc = 2;
  } else if (args_add(a, "EVALSHA") < 0 || args_add(a, "%s", c->rl->r->sha[c->script]) < 0) {
    return TG_ETOOBIG;
  }
  return args_add(a, "%d", numkeys);
}

/* The 1-based index of a window among the batch's keys, added if new. */
static int win_index(call_t *c, int month, int64_t period) {
  for (int i = 0; i < c->n_win; i++)
    if (c->win_month[i] == month && c->win_period[i] == period)
      return i + 1;
  c->win_month[c->n_win] = (uint8_t)month;
  c->win_period[c->n_win] = period;
  return ++c->n_win;
}

#define A_(...)                                                                         \
  do {                                                                                  \
    if ((rc = args_add(a, __VA_ARGS__)) < 0)                                            \
      return rc;                                                                        \
  } while (0)
#define S_(v)                                                                           \
  do {                                                                                  \
    if ((rc = args_str(a, (v))) < 0)                                                    \
      return rc;                                                                        \
  } while (0)
#define I_(v)                                                                           \
  do {                                                                                  \
    if ((rc = args_int(a, (int64_t)(v))) < 0)                                           \
      return rc;                                                                        \
  } while (0)

static int build_global(call_t *c, args_t *a) {
  int rc;
  if ((rc = args_init(a, (int)(6 + 2 * c->n_ops), 256 + 48 * c->n_ops)) < 0)
    return rc;
  if ((rc = args_head(a, c, 2)) < 0)
    return rc;
  A_("tg:{global}:rps");
  A_("tg:{global}:rps:n");
  I_(c->n_ops);
  for (size_t i = 0; i < c->n_ops; i++) {
    I_(c->ops[i]->now_ms);
    I_(c->ops[i]->req.global_rps);
  }
  return 0;
}

static tg_nano_t alert_threshold(tg_nano_t limit, int pct);

/* An 'L' record: the limits of the operations after it. */
static int build_limits(args_t *a, const tg_limits_t *lim) {
  int rc;
  S_("L");
  I_(lim->rpm > 0 ? lim->rpm : 0);
  I_(clamp64(lim->tpm, 0, TG_REDIS_TOKENS_MAX));
  I_(lim->concurrency > 0 ? lim->concurrency : 0);
  I_(lim->day_limit > 0 ? lim->day_limit : 0);
  I_(lim->month_limit > 0 ? lim->month_limit : 0);
  I_(alert_threshold(lim->day_limit, lim->alert_pct));
  I_(alert_threshold(lim->month_limit, lim->alert_pct));
  return 0;
}

static int same_limits(const tg_limits_t *x, const tg_limits_t *y) {
  return x->rpm == y->rpm && x->tpm == y->tpm && x->concurrency == y->concurrency &&
         x->day_limit == y->day_limit && x->month_limit == y->month_limit &&
         x->alert_pct == y->alert_pct;
}

#define OP_REC_MAX (LEASE_MEMBER_MAX + 20 * 24 + 8)

/* One operation is one argument, its fields separated by spaces: Redis
 * and hiredis handle one argument per operation instead of ten. */
static int build_op(args_t *a, const op_t *o, int dw, int mw, int odw, int omw) {
  char rec[OP_REC_MAX];
  size_t ml = strlen(o->member);
  tg_sb_t b;
  if (ml >= LEASE_MEMBER_MAX)
    return TG_ETOOBIG;
  tg_sb_init(&b, rec, sizeof(rec));
#define PUT_INT(v) (tg_sb_lit(&b, " "), tg_sb_puti(&b, (int64_t)(v)))
  if (o->kind == OP_HOLD) {
    tg_sb_lit(&b, "H");
    PUT_INT(o->now_ms);
    tg_sb_lit(&b, " ");
    tg_sb_put(&b, o->member, ml); /* the holding's id */
    PUT_INT(odw);
    PUT_INT(omw);
    PUT_INT(dw);
    PUT_INT(mw);
    PUT_INT(o->ret_n);
    PUT_INT(o->ret_ts);
    PUT_INT(o->refund_mt);
    PUT_INT(o->spent);
    PUT_INT(o->keep_slots);
    PUT_INT(o->keep_cost);
    PUT_INT(o->want);
    PUT_INT(o->per_mt);
    PUT_INT(o->per_cost);
    PUT_INT(o->want_slots);
    PUT_INT(o->until);
    return b.err ? TG_ETOOBIG : args_str(a, rec);
  }
  if (o->kind == OP_ADMIT) {
    tg_sb_lit(&b, "A");
    PUT_INT(o->now_ms);
    PUT_INT(clamp64(o->req.reserve.tokens, 0, TG_REDIS_TOKENS_MAX) * 1000);
    PUT_INT(o->req.reserve.cost > 0 ? o->req.reserve.cost : 0);
  } else {
    tg_sb_lit(&b, "S");
    PUT_INT(o->now_ms);
    PUT_INT(o->a.v.limit_tokens > 0 && o->req.limits.tpm > 0); /* charged */
  }
  tg_sb_lit(&b, " ");
  tg_sb_put(&b, o->member, ml);
  if (o->kind == OP_SETTLE) {
    PUT_INT(clamp64(o->req.reserve.tokens, 0, TG_REDIS_TOKENS_MAX) * 1000);
    PUT_INT(clamp64(o->actual_tokens, 0, TG_REDIS_TOKENS_MAX) * 1000);
    PUT_INT(o->req.reserve.cost > 0 ? o->req.reserve.cost : 0);
    PUT_INT(o->actual_cost > 0 ? o->actual_cost : 0);
  }
  PUT_INT(dw);
  PUT_INT(mw);
#undef PUT_INT
  if (b.err)
    return TG_ETOOBIG;
  return args_str(a, rec);
}

static int build_batch(call_t *c, args_t *a) {
  static const char *const fixed[5] = {"rpm", "rpm:n", "tpm", "leases", "holds"};
  int dw[TG_REDIS_BATCH_MAX], mw[TG_REDIS_BATCH_MAX];
  int odw[TG_REDIS_BATCH_MAX], omw[TG_REDIS_BATCH_MAX];
  const tg_limits_t *last = NULL;
  int rc;

  c->n_win = 0;
  for (size_t i = 0; i < c->n_ops; i++) {
    const op_t *o = c->ops[i];
    dw[i] = win_index(c, 0, o->day);
    mw[i] = win_index(c, 1, o->month);
    odw[i] = o->kind == OP_HOLD ? win_index(c, 0, o->oday) : 0;
    omw[i] = o->kind == OP_HOLD ? win_index(c, 1, o->omonth) : 0;
  }
  int nkeys = 5 + c->n_win;
  int cap = 6 + nkeys + 3 * c->n_win + (int)c->n_ops * (2 + TG_REDIS_LIMIT_FIELDS);
  size_t size = (size_t)nkeys * (TG_REDIS_MAX_TENANT + 48) + (size_t)c->n_win * 64 +
                c->n_ops * 800 + 256;
  if ((rc = args_init(a, cap, size)) < 0)
    return rc;
  if ((rc = args_head(a, c, nkeys)) < 0)
    return rc;
  for (int i = 0; i < 5; i++)
    A_("tg:{%s}:%s", c->tenant, fixed[i]);
  for (int i = 0; i < c->n_win; i++)
    A_("tg:{%s}:%s:%" PRId64, c->tenant, c->win_month[i] ? "month" : "day", c->win_period[i]);
  I_(TG_REDIS_LEASE_TTL_MS);
  I_(c->n_win);
  for (int i = 0; i < c->n_win; i++) {
    int64_t p = c->win_period[i];
    I_(p);
    I_(c->win_month[i] ? tg_month_end_ms(p) : tg_day_end_ms(p));
    I_(c->win_month[i] ? TG_REDIS_MONTH_KEEP_MS : TG_REDIS_DAY_KEEP_MS);
  }
  for (size_t i = 0; i < c->n_ops; i++) {
    const op_t *o = c->ops[i];
    if (last == NULL || !same_limits(last, &o->req.limits)) {
      if ((rc = build_limits(a, &o->req.limits)) < 0)
        return rc;
      last = &o->req.limits;
    }
    if ((rc = build_op(a, o, dw[i], mw[i], odw[i], omw[i])) < 0)
      return rc;
  }
  return 0;
}

#undef A_
#undef I_
#undef S_

/* ceil(limit * pct / 100) without overflow: spent >= it exactly when
 * spent * 100 >= limit * pct, the rule of limits.c. 0 = no alert. */
static tg_nano_t alert_threshold(tg_nano_t limit, int pct) {
  if (limit <= 0)
    return 0;
  pct = pct < 1 ? 1 : pct > 100 ? 100 : pct;
  return (limit / 100) * pct + ((limit % 100) * pct + 99) / 100;
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

/* Sends a batch or global call (EVALSHA, or EVAL after NOSCRIPT). Returns
 * 0 (on_reply follows, exactly once) or a negative error (no reply). */
static int send_script(tg__redis_loop_t *rl, call_t *c) {
  args_t a;
  int rc;
  if (c->kind == CALL_RENEW) {
    /* a plain call: its text in place of EVALSHA <sha> */
    c->argv[0] = "EVAL";
    c->argvlen[0] = 4;
    c->argv[1] = script_text[c->script];
    c->argvlen[1] = strlen(script_text[c->script]);
    return send_call(rl, c);
  }
  if (rl->ac == NULL || rl->state != RL_UP || rl->n_pending >= TG_REDIS_MAX_PENDING)
    return TG_EUNAVAIL;
  rc = c->kind == CALL_GLOBAL ? build_global(c, &a) : build_batch(c, &a);
  if (rc == 0 &&
      redisAsyncCommandArgv(rl->ac, on_reply, c, a.argc, a.argv, a.len) != REDIS_OK)
    rc = TG_EUNAVAIL;
  args_free(&a);
  if (rc < 0)
    return rc;
  c->sent_ms = uv_now(rl->loop);
  pending_add(rl, c);
  return 0;
}

/* The connection is going (or has gone): new calls are refused from now on.
 * hiredis answers what is pending with NULL and then calls on_disconnect. */
static void mark_down(tg__redis_loop_t *rl, const char *why) {
  if (rl->state == RL_UP || rl->state == RL_HANDSHAKE) {
    set_state(rl, RL_IDLE);
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
    set_state(rl, RL_IDLE);
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

/* Finishes an operation. An admission's lease is live or given back, then
 * the caller hears once. o is freed. */
static void op_done(tg__redis_loop_t *rl, op_t *o, int admitted) {
  rl->n_ops--;
  if (o->kind != OP_ADMIT) {
    free(o);
    return;
  }
  if (admitted) {
    rl->leases[o->slot].state = LEASE_ACTIVE;
  } else {
    lease_put(rl, o->slot);
    o->a.lease[0] = '\0';
  }
  tg_admit_cb cb = o->cb;
  void *arg = o->arg;
  tg_admission_t a = o->a;
  free(o);
  cb(arg, &a);
}

/* An operation whose answer cannot come: admissions are UNAVAILABLE,
 * settlements are lost (their leases then expire on their own). */
static void hold_failed(tg__redis_loop_t *rl, op_t *o, const char *why);

static void op_fail(tg__redis_loop_t *rl, op_t *o, const char *why) {
  if (o->kind == OP_ADMIT)
    unavailable(&o->a);
  else if (rl->closing && rl->flushed_at_close)
    ; /* sent before the connection closed, its answer not awaited */
  else if (o->kind == OP_HOLD)
    hold_failed(rl, o, why);
  else
    log_event("state_redis_settle_lost", rl->r, why);
  op_done(rl, o, 0);
}

/* Answers every operation of a call that failed as a whole; frees it. */
static void call_fail(call_t *c, const char *why) {
  tg__redis_loop_t *rl = c->rl;
  size_t n = c->n_ops;
  c->n_ops = 0;
  for (size_t i = 0; i < n; i++)
    op_fail(rl, c->ops[i], why);
  free(c);
}

static void spend_note(tg__redis_t *r, const char *tenant, int month, int64_t period,
                       tg_nano_t spent);
static int enqueue(tg__redis_loop_t *rl, op_t *o, int global);

static const tg_limit_kind_t code_kind[] = {
    [TG_REDIS_OK] = TG_LIMIT_NONE,
    [TG_REDIS_CONCURRENCY] = TG_LIMIT_CONCURRENCY,
    [TG_REDIS_REQUESTS] = TG_LIMIT_REQUESTS,
    [TG_REDIS_TOKENS] = TG_LIMIT_TOKENS,
    [TG_REDIS_DAILY] = TG_LIMIT_DAILY_BUDGET,
    [TG_REDIS_MONTHLY] = TG_LIMIT_MONTHLY_BUDGET,
};

/* Redis counts this loop's grant as used: what is left of it is still
 * there for the tenant's next requests here, and the x-ratelimit figures
 * say so, as they do for requests admitted from the grant. */
static void hold_headers(tg__redis_loop_t *rl, const op_t *o, tg_verdict_t *v) {
  if (rl->holds == NULL)
    return;
  for (uint32_t i = 0; i < TG_REDIS_MAX_HOLDS; i++) {
    hold_t *h = &rl->holds[i];
    if (!h->in_use || strcmp(h->tenant, o->tenant) != 0)
      continue;
    if (same_limits(&h->lim, &o->req.limits)) {
      /* the latest figures, for the grant's own requests */
      h->rem_req = v->remaining_requests;
      h->reset_req = v->reset_requests_ms;
      h->rem_tok = v->remaining_tokens;
      h->reset_tok = v->reset_tokens_ms;
    }
    if (h->req_left > 0 && same_limits(&h->lim, &o->req.limits)) {
      if (v->remaining_requests >= 0)
        v->remaining_requests += h->req_left;
      if (v->remaining_tokens >= 0 && h->lim.tpm > 0)
        v->remaining_tokens += h->mt_left / 1000;
    }
    return;
  }
}

/* e[0..7] of a batch reply answer admission o: 0, or -1 when malformed. */
static int admit_reply(tg__redis_loop_t *rl, op_t *o, redisReply *const *e) {
  tg_verdict_t *v = &o->a.v;
  for (int i = 0; i < 8; i++)
    if (e[i]->type != REDIS_REPLY_INTEGER)
      return -1;
  int64_t code = reply_int(e[0]);
  if (code < 0 || code > TG_REDIS_MONTHLY)
    return -1;
  memset(v, 0, sizeof *v);
  v->refused = code_kind[code];
  v->retry_after_ms = reply_int(e[1]);
  v->limit_requests = reply_int(e[2]);
  v->remaining_requests = reply_int(e[3]);
  v->reset_requests_ms = reply_int(e[4]);
  v->limit_tokens = reply_int(e[5]);
  v->remaining_tokens = reply_int(e[6]);
  v->reset_tokens_ms = reply_int(e[7]);
  v->day = o->day;
  v->month = o->month;
  /* It passed the global check to get here. Past the bound (as many
   * refusals in one loop iteration), it stays counted: toward refusing. */
  if (o->req.global_rps > 0 && v->refused != TG_LIMIT_NONE && rl->n_undo < UNDO_MAX)
    rl->undo_at[rl->n_undo++] = o->now_ms;
  hold_headers(rl, o, v);
  op_done(rl, o, v->refused == TG_LIMIT_NONE);
  return 0;
}

/* e[0..3]: alert and spent for the day and the month of a settlement or
 * sync that added spend in periods day and month: raises what it crossed. */
static void raise_alerts(const op_t *o, redisReply *const *e, int64_t day, int64_t month) {
  static const char *const window[2] = {"day", "month"};
  for (int w = 0; w < 2; w++) {
    if (reply_int(e[2 * w]) != 1)
      continue;
    tg_nano_t spent = reply_int(e[1 + 2 * w]);
    tg_nano_t limit = w == 0 ? o->req.limits.day_limit : o->req.limits.month_limit;
    tg_policy_alert(o->tenant, window[w], w == 0 ? day : month, spent, limit,
                    o->req.limits.alert_pct);
  }
}

/* e[0..4] of a batch reply answer settlement o (held, then alert and
 * spent for the day and the month): raises the alerts it crossed. */
static void settle_reply(tg__redis_loop_t *rl, op_t *o, redisReply *const *e) {
  raise_alerts(o, e + 1, o->day, o->month);
  op_done(rl, o, 0);
}

/* e[0..15] of a batch reply answer holding sync o: held, the grant
 * (requests, milli-tokens, cost, slots, where its requests are counted),
 * the x-ratelimit figures after it, then alerts as a settlement's. */
static int hold_reply(tg__redis_loop_t *rl, op_t *o, redisReply *const *e) {
  hold_t *h = &rl->holds[o->hold];
  for (int i = 0; i < 12; i++)
    if (e[i]->type != REDIS_REPLY_INTEGER)
      return -1;
  int64_t k = reply_int(e[1]), mt = reply_int(e[2]), cost = reply_int(e[3]);
  int64_t sl = reply_int(e[4]);
  if (k < 0 || mt < 0 || cost < 0 || sl < 0)
    return -1;
  h->syncing = 0;
  h->lim = o->req.limits;
  h->day = o->day;
  h->month = o->month;
  h->slots += sl;
  h->in_redis = o->keep_slots + sl > 0 || o->keep_cost + cost > 0;
  if (k > 0) {
    h->req_left = k;
    h->mt_left = mt;
    h->cost_left = cost;
    h->at_ts = reply_int(e[5]);
    h->until = o->until;
  }
  h->rem_req = reply_int(e[7]);
  h->reset_req = reply_int(e[8]);
  h->rem_tok = reply_int(e[10]);
  h->reset_tok = reply_int(e[11]);
  raise_alerts(o, e + 12, o->oday, o->omonth);
  op_done(rl, o, 0);
  return 0;
}

/* A batch's reply is flat: 8 elements per admission, 5 per settlement,
 * in order, then the spent of each window. */
static void batch_reply(call_t *c, const redisReply *rep) {
  tg__redis_loop_t *rl = c->rl;
  size_t n = c->n_ops, want = (size_t)c->n_win, at = 0;

  for (size_t i = 0; i < n; i++)
    want += c->ops[i]->kind == OP_ADMIT ? 8 : c->ops[i]->kind == OP_HOLD ? 16 : 5;
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements != want) {
    log_reply_error(rl, "admission", "unexpected reply shape");
    call_fail(c, "unexpected reply");
    return;
  }
  /* The windows' spend first: the callbacks below may close the loop. */
  for (int w = 0; w < c->n_win; w++) {
    const redisReply *e = rep->element[want - (size_t)c->n_win + (size_t)w];
    if (e->type == REDIS_REPLY_STRING && e->len > 0)
      spend_note(rl->r, c->tenant, c->win_month[w], c->win_period[w], reply_int(e));
  }
  c->n_ops = 0;
  for (size_t i = 0; i < n; i++) {
    op_t *o = c->ops[i];
    redisReply *const *e = rep->element + at;
    if (o->kind == OP_SETTLE) {
      at += 5;
      settle_reply(rl, o, e);
    } else if (o->kind == OP_HOLD) {
      at += 16;
      if (hold_reply(rl, o, e) < 0) {
        log_reply_error(rl, "holding sync", "unexpected reply shape");
        op_fail(rl, o, "unexpected reply");
      }
    } else {
      at += 8;
      if (admit_reply(rl, o, e) < 0) {
        log_reply_error(rl, "admission", "unexpected reply shape");
        op_fail(rl, o, "unexpected reply");
      }
    }
  }
  free(c);
}

/* Global checks answered: the refused are answered, the others go on to
 * their tenants' batches (sent at the next flush). */
static void global_reply(call_t *c, const redisReply *rep) {
  tg__redis_loop_t *rl = c->rl;
  size_t n = c->n_ops;

  if (rep->type != REDIS_REPLY_ARRAY || rep->elements != n) {
    log_reply_error(rl, "admission", "unexpected reply shape");
    call_fail(c, "unexpected reply");
    return;
  }
  c->n_ops = 0;
  for (size_t i = 0; i < n; i++) {
    op_t *o = c->ops[i];
    const redisReply *e = rep->element[i];
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2) {
      op_fail(rl, o, "unexpected reply");
    } else if (reply_int(e->element[0]) != 1) {
      tg_verdict_t *v = &o->a.v;
      memset(v, 0, sizeof *v);
      v->refused = TG_LIMIT_GLOBAL;
      v->retry_after_ms = reply_int(e->element[1]);
      v->limit_requests = v->remaining_requests = v->reset_requests_ms = -1;
      v->limit_tokens = v->remaining_tokens = v->reset_tokens_ms = -1;
      op_done(rl, o, 0);
    } else if (rl->state != RL_UP || enqueue(rl, o, 0) < 0) {
      op_fail(rl, o, "connection lost");
    }
  }
  free(c);
}

static void spend_reply(call_t *c, const redisReply *rep) {
  if (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_NIL)
    spend_note(c->rl->r, c->tenant, c->stage, c->period,
               rep->type == REDIS_REPLY_STRING ? reply_int(rep) : 0);
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
    if (send_script(rl, c) == 0)
      return;
  }
  if (rep != NULL && rep->type == REDIS_REPLY_ERROR) {
    switch (c->kind) {
    case CALL_BATCH:
    case CALL_GLOBAL: log_reply_error(rl, "admission or settlement", rep->str); break;
    case CALL_RENEW: log_reply_error(rl, "lease renewal", rep->str); break;
    case CALL_SPEND: log_reply_error(rl, "spend refresh", rep->str); break;
    default: break;
    }
  }
  switch (c->kind) {
  case CALL_BATCH:
  case CALL_GLOBAL:
    if (rep == NULL)
      call_fail(c, "connection lost before the reply");
    else if (rep->type == REDIS_REPLY_ERROR)
      call_fail(c, "error reply");
    else if (c->kind == CALL_BATCH)
      batch_reply(c, rep);
    else
      global_reply(c, rep);
    return; /* c is freed */
  case CALL_SPEND:
    if (rep != NULL)
      spend_reply(c, rep);
    break;
  case CALL_RENEW:
    if (rep != NULL && rep->type == REDIS_REPLY_INTEGER && rep->integer == 1 &&
        !rl->restore_logged) {
      rl->restore_logged = 1;
      log_event("state_redis_lease_restored", rl->r,
                "a running request's lease was gone from redis: added again with its "
                "reservation (once per renewal round)");
    }
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

/* ---- queue and flush ----------------------------------------------------- */

static call_t *call_new(tg__redis_loop_t *rl, int kind);

/* Adds o to the newest queued batch of its tenant (or the global one) that
 * has room, or to a new one at the end of the queue. Operations of one
 * tenant thus reach Redis in the order they were made. */
static int enqueue(tg__redis_loop_t *rl, op_t *o, int global) {
  int kind = global ? CALL_GLOBAL : CALL_BATCH;
  call_t *last = NULL;
  for (call_t *c = rl->q_head; c != NULL; c = c->qnext)
    if (c->kind == kind && (global || strcmp(c->tenant, o->tenant) == 0))
      last = c;
  if (last == NULL || last->n_ops >= TG_REDIS_BATCH_MAX) {
    if ((last = call_new(rl, kind)) == NULL)
      return TG_ENOMEM;
    last->script = global ? SCRIPT_GLOBAL : SCRIPT_BATCH;
    memcpy(last->tenant, o->tenant, sizeof last->tenant);
    if (rl->q_tail)
      rl->q_tail->qnext = last;
    else
      rl->q_head = last;
    rl->q_tail = last;
  }
  last->ops[last->n_ops++] = o;
  return 0;
}

/* The loop's first connection is under way and has not failed yet. */
static int starting(const tg__redis_loop_t *rl) {
  return !rl->ever_up && !rl->down && !rl->closing &&
         (rl->state == RL_RESOLVING || rl->state == RL_CONNECTING || rl->state == RL_HANDSHAKE);
}

/* Sends the give-back of the loop's global admissions that their tenants
 * refused, by the times the global script stamped them with. */
static int send_undo(tg__redis_loop_t *rl) {
  char at[UNDO_MAX * 21];
  tg_sb_t b;
  tg_sb_init(&b, at, sizeof at);
  for (uint32_t i = 0; i < rl->n_undo; i++) {
    tg_sb_puti(&b, rl->undo_at[i]);
    tg_sb_put(&b, " ", 1);
  }
  return redisAsyncCommand(rl->ac, NULL, NULL, "EVAL %s 2 %s %s %s", TG_REDIS_LUA_GLOBAL_UNDO,
                           "tg:{global}:rps", "tg:{global}:rps:n", at);
}

/* Sends every queued batch; one that cannot be sent is answered now. The
 * queue is taken first: callbacks may queue more (for the next flush).
 * While the first connection is under way the queue waits for it: a
 * gateway that has just started does not decide by state_failure because
 * its connection is a few milliseconds from answering. */
static void flush(tg__redis_loop_t *rl) {
  call_t *q = rl->q_head;
  int sent = 0;
  if (starting(rl))
    return;
  rl->q_head = rl->q_tail = NULL;
  if (rl->n_undo > 0) {
    /* No answer is awaited. Give-backs that cannot go now are dropped, not
     * kept for a later connection: those slots stay counted until they
     * leave the second, as they were before give-backs. */
    if (rl->ac != NULL && rl->state == RL_UP && send_undo(rl) == REDIS_OK)
      sent = 1;
    rl->n_undo = 0;
  }
  while (q != NULL) {
    call_t *c = q;
    q = q->qnext;
    c->qnext = NULL;
    if (send_script(rl, c) == 0)
      sent = 1;
    else
      call_fail(c, "could not send");
  }
  /* Onto the wire now rather than at the next poll: a settlement then
   * leaves before the client can follow up with its next request. */
  if (sent && rl->ac != NULL && !(rl->ac->c.flags & REDIS_IN_CALLBACK))
    redisAsyncHandleWrite(rl->ac);
}

static void on_flush_prepare(uv_prepare_t *h) {
  tg__redis_loop_t *rl = h->data;
  if (rl->q_head != NULL || rl->n_undo > 0)
    flush(rl);
}

static void on_flush_check(uv_check_t *h) {
  tg__redis_loop_t *rl = h->data;
  if (rl->q_head != NULL || rl->n_undo > 0)
    flush(rl);
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
  set_state(rl, RL_UP);
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
    set_state(rl, RL_IDLE);
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
  set_state(rl, RL_HANDSHAKE);
  const tg__redis_t *r = rl->r;
  if (r->u.has_pass)
    c[n++] = r->u.user[0] ? setup_call(rl, "AUTH", r->u.user, r->u.pass, NULL)
                        : setup_call(rl, "AUTH", r->u.pass, NULL, NULL);
  if (r->u.db != 0) {
    snprintf(db, sizeof db, "%d", r->u.db);
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
    set_state(rl, RL_CLOSED);
    return;
  }
  mark_down(rl, status == REDIS_OK   ? "disconnected"
                : ac->errstr[0] ? ac->errstr
                                : "connection lost");
  set_state(rl, RL_IDLE);
  schedule_reconnect(rl);
}

static void connect_to(tg__redis_loop_t *rl, const char *ip) {
  redisAsyncContext *ac = redisAsyncConnect(ip, rl->r->u.port);
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
  set_state(rl, RL_CONNECTING);
}

static void arm_connect_timeout(tg__redis_loop_t *rl) {
  uv_timer_start(&rl->conn_timer, on_conn_timer, TG_REDIS_CONNECT_TIMEOUT_MS, 0);
}

static void maybe_free(tg__redis_loop_t *rl) {
  if (--rl->open > 0)
    return;
  free(rl->leases);
  free(rl->holds);
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
    set_state(rl, RL_IDLE);
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
  set_state(rl, RL_IDLE);
  connect_to(rl, ip);
  if (rl->state == RL_CONNECTING)
    arm_connect_timeout(rl);
}

static void start_connect(tg__redis_loop_t *rl) {
  unsigned char buf[sizeof(struct in6_addr)];
  const char *host = rl->r->u.host;

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
  set_state(rl, RL_RESOLVING);
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

/* Sends one lease's renewal (TG_REDIS_LUA_RENEW): a lease Redis lost comes
 * back with its reservation. Returns 0, or a negative error when the
 * connection takes no more. */
static int send_renewal(tg__redis_loop_t *rl, const lease_t *l) {
  char id[sizeof l->id];
  int64_t day, month, cost, now = loop_clock(rl);
  call_t *c;

  if (sscanf(l->member, "%39s %" SCNd64 " %" SCNd64 " %" SCNd64, id, &day, &month, &cost) != 4)
    return 0; /* not ours to renew: every member is built by lease_member */
  if ((c = call_new(rl, CALL_RENEW)) == NULL)
    return TG_ENOMEM;
  c->script = SCRIPT_RENEW;
  snprintf(c->tenant, sizeof c->tenant, "%s", l->tenant);
  if (arg(c, "EVALSHA") || arg(c, "%s", rl->r->sha[SCRIPT_RENEW]) || arg(c, "3") ||
      arg_key(c, "leases") || arg(c, "tg:{%s}:day:%" PRId64, c->tenant, day) ||
      arg(c, "tg:{%s}:month:%" PRId64, c->tenant, month) || arg_i64(c, rl->renew_expiry) ||
      arg(c, "%s", l->member) || arg_i64(c, cost) ||
      arg_i64(c, tg_day_end_ms(day) + TG_REDIS_DAY_KEEP_MS - now) ||
      arg_i64(c, tg_month_end_ms(month) + TG_REDIS_MONTH_KEEP_MS - now) || send_call(rl, c) < 0) {
    free(c);
    return TG_EUNAVAIL;
  }
  return 0;
}

/* Sends the renewals of one round from the cursor on; stops early when the
 * connection takes no more (the pending bound) and goes on at the next
 * tick, so a loop with many leases still renews them all in time. */
static void renew_leases(tg__redis_loop_t *rl) {
  for (; rl->renew_cursor < rl->lease_cap; rl->renew_cursor++) {
    lease_t *l = &rl->leases[rl->renew_cursor];
    if (l->state != LEASE_ACTIVE)
      continue;
    if (send_renewal(rl, l) < 0)
      return;
  }
  rl->renewing = 0;
}

/* ---- spend figures ------------------------------------------------------- */

/* The slot of tenant in slots: its entry's, or the free one it would take. */
static size_t spend_slot_of(const spend_t *sp, const uint16_t *slots, const char *tenant) {
  size_t i = tg_hash_str(tenant) & (SPEND_SLOTS - 1);
  while (slots[i] != 0 && strcmp(sp[slots[i] - 1].tenant, tenant) != 0)
    i = (i + 1) & (SPEND_SLOTS - 1);
  return i;
}

/* The entry of tenant, added when create is set and there is room; NULL
 * otherwise. Called with spend_lock held. Every settlement's reply and a
 * scrape's every tenant look one up: by hash, not a scan of thousands. */
static spend_t *spend_find(tg__redis_t *r, const char *tenant, int create) {
  size_t i;
  if (r->spend_slot == NULL &&
      (!create || (r->spend_slot = calloc(SPEND_SLOTS, sizeof *r->spend_slot)) == NULL))
    return NULL;
  i = spend_slot_of(r->spend, r->spend_slot, tenant);
  if (r->spend_slot[i] != 0)
    return &r->spend[r->spend_slot[i] - 1];
  if (!create || strlen(tenant) > TG_REDIS_MAX_TENANT || r->n_spend >= TG_REDIS_SPEND_MAX)
    return NULL;
  if (r->n_spend == r->cap_spend) {
    size_t cap = r->cap_spend ? r->cap_spend * 2 : 16;
    spend_t *n = realloc(r->spend, cap * sizeof *n);
    if (n == NULL)
      return NULL;
    r->spend = n;
    r->cap_spend = cap;
  }
  spend_t *e = &r->spend[r->n_spend++];
  r->spend_slot[i] = (uint16_t)r->n_spend;
  memset(e, 0, sizeof *e);
  snprintf(e->tenant, sizeof e->tenant, "%s", tenant);
  e->day = e->month = -1;
  return e;
}

size_t tg__redis_keep(tg__redis_t *r, const char *const *tenants, size_t n) {
  spend_t *old;
  uint16_t *old_slot, *slot = calloc(SPEND_SLOTS, sizeof *slot);
  size_t i, untracked = 0;

  if (r == NULL)
    return 0;
  pthread_mutex_lock(&r->spend_lock);
  if (slot == NULL) { /* out of memory: the table stays as it was */
    untracked = r->untracked;
    goto out;
  }
  old = r->spend;
  old_slot = r->spend_slot;
  r->spend = NULL;
  r->n_spend = r->cap_spend = 0;
  r->spend_slot = slot;
  for (i = 0; i < n; i++) {
    spend_t *e = spend_find(r, tenants[i], 1);
    size_t j;
    if (e == NULL) {
      untracked++;
      continue;
    }
    j = old_slot != NULL ? spend_slot_of(old, old_slot, tenants[i]) : 0;
    if (old_slot != NULL && old_slot[j] != 0)
      *e = old[old_slot[j] - 1]; /* its figures go on */
  }
  free(old);
  free(old_slot);
  r->untracked = untracked;
out:
  pthread_mutex_unlock(&r->spend_lock);
  return untracked;
}

/* A window's spent as Redis reported it: a later period replaces the
 * figure, the same period keeps the larger (replies from several loops
 * may arrive out of order, and spend only grows within a period). */
static void spend_note(tg__redis_t *r, const char *tenant, int month, int64_t period,
                       tg_nano_t spent) {
  pthread_mutex_lock(&r->spend_lock);
  spend_t *e = spend_find(r, tenant, 0);
  if (e != NULL) {
    int64_t *p = month ? &e->month : &e->day;
    tg_nano_t *v = month ? &e->month_spent : &e->day_spent;
    if (period > *p || (period == *p && spent > *v)) {
      *p = period;
      *v = spent;
    }
  }
  pthread_mutex_unlock(&r->spend_lock);
}

int tg__redis_spend(tg__redis_t *r, const char *tenant, int64_t now_ms, tg_nano_t *day,
                    tg_nano_t *month) {
  int rc = TG_ENOTFOUND;
  *day = *month = 0;
  if (r == NULL || tenant == NULL || tenant[0] == '\0')
    return TG_EINVAL;
  pthread_mutex_lock(&r->spend_lock);
  spend_t *e = spend_find(r, tenant, 0);
  if (e == NULL && r->untracked > 0)
    rc = TG_ETOOBIG; /* the tenants kept are all configured ones it had room for */
  if (e != NULL && (e->day >= 0 || e->month >= 0)) {
    /* A figure of an earlier period is that period's: nothing is spent in
     * the current one until Redis says otherwise. */
    if (e->day == tg_day_of(now_ms))
      *day = e->day_spent;
    if (e->month == tg_month_of(now_ms))
      *month = e->month_spent;
    rc = 0;
  }
  pthread_mutex_unlock(&r->spend_lock);
  return rc;
}

/* One round of HGETs of every known tenant's current day and month spent,
 * on the refreshing loop's connection. */
static void refresh_spend(tg__redis_loop_t *rl) {
  tg__redis_t *r = rl->r;
  int64_t now = loop_clock(rl);
  int64_t day = tg_day_of(now), month = tg_month_of(now);
  char (*names)[TG_REDIS_MAX_TENANT + 1] = NULL;
  size_t n = 0;

  pthread_mutex_lock(&r->spend_lock);
  if (r->n_spend > 0 && (names = malloc(r->n_spend * sizeof *names)) != NULL) {
    n = r->n_spend;
    for (size_t i = 0; i < n; i++)
      memcpy(names[i], r->spend[i].tenant, sizeof names[i]);
  }
  pthread_mutex_unlock(&r->spend_lock);
  for (size_t i = 0; i < n; i++) {
    for (int w = 0; w < 2; w++) {
      call_t *c = call_new(rl, CALL_SPEND);
      if (c == NULL)
        goto out;
      memcpy(c->tenant, names[i], sizeof c->tenant);
      c->stage = w;
      c->period = w ? month : day;
      if (arg(c, "HGET") || arg(c, "tg:{%s}:%s:%" PRId64, c->tenant, w ? "month" : "day",
                                c->period) ||
          arg(c, "spent") || send_call(rl, c) < 0) {
        free(c);
        goto out;
      }
    }
  }
out:
  free(names);
}

static void on_tick(uv_timer_t *t) {
  tg__redis_loop_t *rl = t->data;
  tg__redis_t *r = rl->r;
  uint64_t now = uv_now(rl->loop);

  if (rl->head != NULL && now - rl->head->sent_ms >= TG_REDIS_REPLY_TIMEOUT_MS) {
    drop(rl, "no reply within 2 s");
    return;
  }
  if (rl->state != RL_UP)
    return; /* renewals wait for the connection; a round under way goes on after */
  unsigned lost = atomic_load(&r->lost);
  if (lost != rl->lost_seen) {
    /* Redis lost its data: the leases of the running requests go back
     * now (a round under way starts again), and each holding's member
     * with its next sync. */
    rl->lost_seen = lost;
    rl->renewing = 0;
    rl->last_renew_ms = now - TG_REDIS_LEASE_RENEW_MS;
    hold_lost(rl);
  }
  if (!rl->renewing && now - rl->last_renew_ms >= TG_REDIS_LEASE_RENEW_MS) {
    rl->renewing = 1;
    rl->restore_logged = 0;
    rl->renew_cursor = 0;
    rl->renew_expiry = loop_clock(rl) + TG_REDIS_LEASE_TTL_MS;
    rl->last_renew_ms = now;
  }
  if (rl->renewing)
    renew_leases(rl);
  hold_tick(rl);
  /* One loop refreshes the spend figures; another takes over when it
   * closes. */
  pthread_mutex_lock(&r->spend_lock);
  if (r->refresher == NULL)
    r->refresher = rl;
  int mine = r->refresher == rl;
  pthread_mutex_unlock(&r->spend_lock);
  if (mine && now - rl->last_refresh_ms >= TG_REDIS_SPEND_REFRESH_MS) {
    rl->last_refresh_ms = now;
    refresh_spend(rl);
  }
}

/* ---- public -------------------------------------------------------------- */

void tg__redis_lost(tg__redis_t *r) {
  if (r != NULL)
    atomic_fetch_add(&r->lost, 1);
}

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
  set_state(rl, RL_IDLE);
  rl->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
  uv_timer_init(loop, &rl->conn_timer);
  uv_timer_init(loop, &rl->tick);
  uv_prepare_init(loop, &rl->flush_prepare);
  uv_check_init(loop, &rl->flush_check);
  rl->conn_timer.data = rl;
  rl->tick.data = rl;
  rl->flush_prepare.data = rl;
  rl->flush_check.data = rl;
  rl->open = 4;
  rl->last_renew_ms = uv_now(loop);
  /* The wall clock until admissions give it theirs: a loop that serves no
   * traffic still refreshes the spend of the right day. */
  note_clock(rl, wall_ms());
  /* The first refresh comes a tick after connecting. */
  rl->last_refresh_ms = uv_now(loop) - TG_REDIS_SPEND_REFRESH_MS;
  uv_timer_start(&rl->tick, on_tick, TG_REDIS_TICK_MS, TG_REDIS_TICK_MS);
  /* Always running, but they never keep the loop alive by themselves. */
  uv_prepare_start(&rl->flush_prepare, on_flush_prepare);
  uv_check_start(&rl->flush_check, on_flush_check);
  uv_unref((uv_handle_t *)&rl->flush_prepare);
  uv_unref((uv_handle_t *)&rl->flush_check);
  start_connect(rl);
  atomic_fetch_add(&r->n_loops, 1);
  *out = rl;
  return 0;
}

static void on_timer_closed(uv_handle_t *h) {
  maybe_free(h->data);
}

static int hold_sync(tg__redis_loop_t *rl, hold_t *h, int64_t now, const tg_limits_t *lim);

/* At close, before the connection goes: what the loop owes Redis is sent,
 * the holdings' spend not reported yet (each hands its grant back and asks
 * for none) and the settlements queued in this iteration, the last ones of
 * a drained gateway. Their answers are not awaited: the bytes are on the
 * socket, and Redis runs what it has read before it sees the close. Without
 * this, a restart under load left Redis's spend short of the ledger by the
 * holdings' last period (a few percent of a second's traffic). */
static void flush_at_close(tg__redis_loop_t *rl) {
  int64_t now = loop_clock(rl);
  if (rl->state != RL_UP || rl->ac == NULL)
    return;
  if (rl->holds != NULL)
    for (uint32_t i = 0; i < TG_REDIS_MAX_HOLDS; i++) {
      hold_t *h = &rl->holds[i];
      if (h->in_use && !h->syncing &&
          (h->pend_spent > 0 || h->pend_refund_mt != 0 || h->req_left > 0 || h->in_redis))
        (void)hold_sync(rl, h, now, &h->lim);
    }
  flush(rl);
  rl->flushed_at_close = 1;
}

void tg__redis_loop_close(tg__redis_loop_t *rl) {
  if (rl == NULL || rl->closing)
    return;
  rl->closing = 1;
  atomic_fetch_sub(&rl->r->n_loops, 1);
  pthread_mutex_lock(&rl->r->spend_lock);
  if (rl->r->refresher == rl)
    rl->r->refresher = NULL;
  pthread_mutex_unlock(&rl->r->spend_lock);
  flush_at_close(rl);
  /* Batches not sent yet are answered now, like the pending ones below. */
  while (rl->q_head != NULL) {
    call_t *c = rl->q_head;
    rl->q_head = c->qnext;
    if (rl->q_head == NULL)
      rl->q_tail = NULL;
    call_fail(c, "closed before it was sent");
  }
  if (rl->ac != NULL) {
    redisAsyncContext *ac = rl->ac;
    if (rl->state == RL_CONNECTING) {
      rl->ac = NULL;
      ac->data = NULL;
    }
    set_state(rl, RL_CLOSED);
    /* Pending calls are answered now (admissions: UNAVAILABLE). */
    redisAsyncFree(ac);
    rl->ac = NULL;
  }
  set_state(rl, RL_CLOSED);
  if (rl->gai_busy)
    uv_cancel((uv_req_t *)&rl->gai);
  uv_close((uv_handle_t *)&rl->conn_timer, on_timer_closed);
  uv_close((uv_handle_t *)&rl->tick, on_timer_closed);
  uv_close((uv_handle_t *)&rl->flush_prepare, on_timer_closed);
  uv_close((uv_handle_t *)&rl->flush_check, on_timer_closed);
}

int tg__redis_connected(const tg__redis_loop_t *rl) {
  return rl != NULL && !rl->closing && (rl->state == RL_UP || starting(rl));
}

int tg__redis_ready(tg__redis_t *r) {
  int loops = atomic_load(&r->n_loops);
  return loops > 0 && atomic_load(&r->n_up) == loops;
}

/* ---- re-seeding: a blocking connection ---------------------------------- */

/* The re-seeding thread's own connection (hiredis' blocking API): it never
 * runs on a loop thread. */
struct tg__redis_sync_s {
  redisContext *c;
};

/* One command; the reply (freed by the caller) or NULL on failure, then
 * the connection is no longer usable. */
static redisReply *sync_cmd(tg__redis_sync_t *s, int argc, const char **argv) {
  redisReply *rep = redisCommandArgv(s->c, argc, argv, NULL);
  if (rep != NULL && rep->type == REDIS_REPLY_ERROR) {
    tg_policy_log("state_redis_error", rep->str);
    freeReplyObject(rep);
    return NULL;
  }
  return rep;
}

int tg__redis_sync_open(tg__redis_t *r, int timeout_ms, tg__redis_sync_t **out) {
  struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  tg__redis_sync_t *s = calloc(1, sizeof *s);
  redisReply *rep = NULL;
  char db[16];
  int rc = TG_EUNAVAIL;

  if (s == NULL)
    return TG_ENOMEM;
  s->c = redisConnectWithTimeout(r->u.host, r->u.port, tv);
  if (s->c == NULL || s->c->err || redisSetTimeout(s->c, tv) != REDIS_OK)
    goto out;
  if (r->u.has_pass) {
    const char *a[3] = {"AUTH", r->u.user[0] ? r->u.user : r->u.pass, r->u.pass};
    if ((rep = sync_cmd(s, r->u.user[0] ? 3 : 2, a)) == NULL)
      goto out;
    freeReplyObject(rep);
  }
  if (r->u.db != 0) {
    snprintf(db, sizeof db, "%d", r->u.db);
    const char *a[2] = {"SELECT", db};
    if ((rep = sync_cmd(s, 2, a)) == NULL)
      goto out;
    freeReplyObject(rep);
  }
  *out = s;
  s = NULL;
  rc = 0;
out:
  tg__redis_sync_close(s);
  return rc;
}

void tg__redis_sync_close(tg__redis_sync_t *s) {
  if (s == NULL)
    return;
  if (s->c != NULL)
    redisFree(s->c);
  free(s);
}

int tg__redis_epoch_get(tg__redis_sync_t *s, char *epoch, size_t size) {
  const char *a[2] = {"GET", TG_REDIS_EPOCH_KEY};
  redisReply *rep = sync_cmd(s, 2, a);
  int rc = TG_EUNAVAIL;
  if (rep == NULL)
    return rc;
  if (rep->type == REDIS_REPLY_NIL) {
    rc = TG_ENOTFOUND;
  } else if (rep->type == REDIS_REPLY_STRING && rep->len < size) {
    memcpy(epoch, rep->str, rep->len + 1);
    rc = 0;
  }
  freeReplyObject(rep);
  return rc;
}

int tg__redis_epoch_mark(tg__redis_sync_t *s, char *epoch, size_t size) {
  unsigned char rnd[16];
  char hex[33];
  const char *a[4] = {"SET", TG_REDIS_EPOCH_KEY, hex, "NX"};
  redisReply *rep;

  if (RAND_bytes(rnd, sizeof rnd) != 1)
    return TG_EIO;
  for (size_t i = 0; i < sizeof rnd; i++)
    snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
  /* Another gateway may have marked it first: theirs stands. */
  if ((rep = sync_cmd(s, 4, a)) == NULL)
    return TG_EUNAVAIL;
  freeReplyObject(rep);
  return tg__redis_epoch_get(s, epoch, size);
}

int tg__redis_raise(tg__redis_sync_t *s, const char *tenant, int month, int64_t period,
                    tg_nano_t spent, int alerted, int64_t now_ms) {
  char key[TG_REDIS_MAX_TENANT + 64], sp[24], ttl[24];
  int64_t end = month ? tg_month_end_ms(period) : tg_day_end_ms(period);
  int64_t keep = month ? TG_REDIS_MONTH_KEEP_MS : TG_REDIS_DAY_KEEP_MS;
  const char *a[7] = {"EVAL", TG_REDIS_LUA_RESEED, "1", key, sp, ttl, alerted ? "1" : "0"};
  redisReply *rep;

  if (strlen(tenant) > TG_REDIS_MAX_TENANT)
    return 0; /* no such tenant's keys exist in Redis */
  snprintf(key, sizeof key, "tg:{%s}:%s:%" PRId64, tenant, month ? "month" : "day", period);
  snprintf(sp, sizeof sp, "%" PRId64, spent < 0 ? 0 : spent);
  snprintf(ttl, sizeof ttl, "%" PRId64, end + keep - now_ms);
  if ((rep = sync_cmd(s, 7, a)) == NULL)
    return TG_EUNAVAIL;
  freeReplyObject(rep);
  return 0;
}

int tg__redis_add_spent(tg__redis_sync_t *s, const char *tenant, int month, int64_t period,
                        tg_nano_t amount, int64_t now_ms) {
  char key[TG_REDIS_MAX_TENANT + 64], am[24], ttl[24];
  int64_t end = month ? tg_month_end_ms(period) : tg_day_end_ms(period);
  int64_t keep = month ? TG_REDIS_MONTH_KEEP_MS : TG_REDIS_DAY_KEEP_MS;
  const char *a[6] = {"EVAL", TG_REDIS_LUA_ADD_SPENT, "1", key, am, ttl};
  redisReply *rep;

  if (strlen(tenant) > TG_REDIS_MAX_TENANT || amount <= 0 || end + keep <= now_ms)
    return 0; /* no such tenant's keys, nothing to add, or the window is gone */
  snprintf(key, sizeof key, "tg:{%s}:%s:%" PRId64, tenant, month ? "month" : "day", period);
  snprintf(am, sizeof am, "%" PRId64, amount);
  snprintf(ttl, sizeof ttl, "%" PRId64, end + keep - now_ms);
  if ((rep = sync_cmd(s, 6, a)) == NULL)
    return TG_EUNAVAIL;
  freeReplyObject(rep);
  return 0;
}

/* ---- holdings ------------------------------------------------------------ */

void tg__redis_holding(tg__redis_t *r, int on) {
  if (r != NULL)
    r->hold_off = !on;
}

/* Starts a new demand period when the current one is over. */
static void hold_roll(hold_t *h, int64_t now) {
  if (now - h->win_start >= TG_REDIS_HOLD_MS || now < h->win_start) {
    h->prev_n = now - h->win_start < 2 * TG_REDIS_HOLD_MS ? h->win_n : 0;
    h->win_n = 0;
    h->win_start = now;
  }
}

static int hold_busy(const hold_t *h) {
  return h->win_n + h->prev_n >= TG_REDIS_HOLD_BUSY;
}

/* Nothing of the holding is in Redis or on its way, nothing runs on it,
 * nothing is left to report: its entry may serve another tenant. */
static int hold_idle(const hold_t *h) {
  return !h->syncing && !h->in_redis && h->used == 0 && h->pend_spent == 0 &&
         h->pend_refund_mt == 0 && h->req_left == 0;
}

/* The tenant's holding on this loop, made when there is room (an unused
 * entry, or one idle for 10 s); NULL otherwise. */
static hold_t *hold_get(tg__redis_loop_t *rl, const char *tenant, int64_t now) {
  hold_t *spare = NULL;
  if (rl->holds == NULL && (rl->holds = calloc(TG_REDIS_MAX_HOLDS, sizeof *rl->holds)) == NULL)
    return NULL;
  for (uint32_t i = 0; i < TG_REDIS_MAX_HOLDS; i++) {
    hold_t *h = &rl->holds[i];
    if (!h->in_use) {
      if (spare == NULL)
        spare = h;
      continue;
    }
    if (h->tenant[0] == tenant[0] && strcmp(h->tenant, tenant) == 0)
      return h;
    if (spare == NULL && hold_idle(h) && now - h->last_seen > 10000)
      spare = h;
  }
  if (spare == NULL)
    return NULL;
  uint32_t i = (uint32_t)(spare - rl->holds);
  memset(spare, 0, sizeof *spare);
  spare->in_use = 1;
  snprintf(spare->tenant, sizeof spare->tenant, "%s", tenant);
  snprintf(spare->hid, sizeof spare->hid, "%s-h%" PRIx32, rl->lease_prefix, i);
  spare->win_start = now;
  return spare;
}

/* The holding whose requests carry lease text `lease`, or NULL. */
static hold_t *hold_of_lease(tg__redis_loop_t *rl, const char *lease, const char *tenant) {
  size_t n = strlen(rl->lease_prefix);
  char *end;
  if (rl->holds == NULL || strncmp(lease, rl->lease_prefix, n) != 0 || lease[n] != '-' ||
      lease[n + 1] != 'h')
    return NULL;
  unsigned long i = strtoul(lease + n + 2, &end, 16);
  if (end == lease + n + 2 || *end != '\0' || i >= TG_REDIS_MAX_HOLDS)
    return NULL;
  hold_t *h = &rl->holds[i];
  if (!h->in_use || strcmp(h->hid, lease) != 0 || strcmp(h->tenant, tenant) != 0)
    return NULL;
  return h;
}

/* Queues the holding's sync: hands back what is left of its grant and
 * reports what its requests settled, keeps the slots and money of those
 * still running, and asks for a new grant sized to twice the demand of a
 * period when the tenant is busy. Returns 0 or a negative error (nothing
 * changed). */
static int hold_sync(tg__redis_loop_t *rl, hold_t *h, int64_t now, const tg_limits_t *lim) {
  op_t *o = calloc(1, sizeof *o);
  if (o == NULL)
    return TG_ENOMEM;
  o->kind = OP_HOLD;
  h->lost = 0;
  memcpy(o->tenant, h->tenant, sizeof o->tenant);
  o->req.tenant = o->tenant;
  o->req.limits = *lim;
  o->now_ms = now;
  o->hold = (uint32_t)(h - rl->holds);
  memcpy(o->member, h->hid, sizeof h->hid);
  o->day = tg_day_of(now);
  o->month = tg_month_of(now);
  o->oday = h->in_redis ? h->day : o->day;
  o->omonth = h->in_redis ? h->month : o->month;
  o->ret_n = h->req_left;
  o->ret_ts = h->at_ts;
  o->refund_mt = h->pend_refund_mt + (h->lim.tpm > 0 ? h->mt_left : 0);
  o->spent = h->pend_spent;
  o->keep_slots = h->used;
  o->keep_cost = h->running_cost;
  o->until = now + TG_REDIS_HOLD_MS;
  if (!rl->r->hold_off && !rl->closing && hold_busy(h)) {
    int64_t rate = h->win_n > h->prev_n ? h->win_n : h->prev_n;
    int64_t want = clamp64(2 * rate, TG_REDIS_HOLD_BUSY, TG_REDIS_HOLD_MAX_REQ);
    int64_t target = 2 * h->peak_used;
    /* Every figure of the grant stays below 2^53 (exact in Lua). */
    if (h->per_mt > 0 && want > TG_REDIS_HOLD_EXACT / 4 / h->per_mt)
      want = TG_REDIS_HOLD_EXACT / 4 / h->per_mt;
    if (h->per_cost > 0 && want > (TG_REDIS_HOLD_EXACT / 4 - o->keep_cost) / h->per_cost)
      want = (TG_REDIS_HOLD_EXACT / 4 - o->keep_cost) / h->per_cost;
    o->want = want > 0 ? want : 0;
    o->per_mt = h->per_mt;
    o->per_cost = h->per_cost;
    if (target < TG_REDIS_HOLD_MIN_SLOTS)
      target = TG_REDIS_HOLD_MIN_SLOTS;
    o->want_slots = target > h->used ? target - h->used : 0;
  }
  if (enqueue(rl, o, 0) < 0) {
    free(o);
    return TG_ENOMEM;
  }
  rl->n_ops++;
  /* What is left of the grant goes back with the sync. */
  h->syncing = 1;
  h->sync_day = o->day;
  h->sync_month = o->month;
  h->last_sync = now;
  h->req_left = h->mt_left = h->cost_left = 0;
  h->until = 0;
  h->pend_spent = 0;
  h->pend_refund_mt = 0;
  h->slots = h->used;
  h->peak_used = h->used;
  return 0;
}

/* A sync whose answer cannot come: what it reported is lost (logged), as a
 * settlement would be; the member left in Redis, if any, is replaced by
 * the next sync or expires. */
static void hold_failed(tg__redis_loop_t *rl, op_t *o, const char *why) {
  hold_t *h = &rl->holds[o->hold];
  h->syncing = 0;
  h->in_redis = 1;
  if (o->spent > 0 || o->refund_mt != 0)
    log_event("state_redis_settle_lost", rl->r, why);
}

/* Admits r from the tenant's holding when its grant covers it: answers
 * through cb and returns 1. Otherwise returns 0, after queueing a sync when
 * the tenant is busy, and r goes to Redis on its own. */
static int hold_admit(tg__redis_loop_t *rl, const tg_admit_req_t *r, int64_t now,
                      tg_admit_cb cb, void *arg_) {
  hold_t *h;
  if (rl->r->hold_off || r->global_rps > 0 || (h = hold_get(rl, r->tenant, now)) == NULL)
    return 0;
  int64_t mt = clamp64(r->reserve.tokens, 0, TG_REDIS_TOKENS_MAX) * 1000;
  tg_nano_t cost = r->reserve.cost > 0 ? r->reserve.cost : 0;
  hold_roll(h, now);
  h->win_n++;
  h->last_seen = now;
  if (mt > h->per_mt)
    h->per_mt = mt;
  if (cost > h->per_cost)
    h->per_cost = cost;
  if (h->syncing || now >= h->until || h->req_left <= 0 || !same_limits(&h->lim, &r->limits) ||
      h->day != tg_day_of(now) || h->month != tg_month_of(now) ||
      (h->lim.tpm > 0 && h->mt_left < mt) || h->cost_left < cost ||
      (h->lim.concurrency > 0 && h->used >= h->slots)) {
    /* A grant made under other limits goes back at once, ahead of this
     * request on the same connection: a lowered limit holds exactly. */
    int changed = !same_limits(&h->lim, &r->limits) && (h->in_redis || h->req_left > 0);
    if (!h->syncing &&
        (changed || (hold_busy(h) && now - h->last_sync >= TG_REDIS_HOLD_RESYNC_MS)))
      (void)hold_sync(rl, h, now, &r->limits);
    return 0;
  }
  h->req_left--;
  if (h->lim.tpm > 0)
    h->mt_left -= mt;
  h->cost_left -= cost;
  h->used++;
  if (h->used > h->peak_used)
    h->peak_used = h->used;
  h->running_cost += cost;

  tg_admission_t a;
  memset(&a, 0, sizeof a);
  a.backend = TG_BACKEND_REDIS;
  memcpy(a.lease, h->hid, sizeof a.lease);
  a.v.refused = TG_LIMIT_NONE;
  a.v.day = h->day;
  a.v.month = h->month;
  a.v.limit_requests = a.v.remaining_requests = a.v.reset_requests_ms = -1;
  a.v.limit_tokens = a.v.remaining_tokens = a.v.reset_tokens_ms = -1;
  if (h->lim.rpm > 0) {
    a.v.limit_requests = h->lim.rpm;
    a.v.remaining_requests = h->rem_req + h->req_left;
    a.v.reset_requests_ms = h->reset_req;
  }
  if (h->lim.tpm > 0) {
    a.v.limit_tokens = clamp64(h->lim.tpm, 0, TG_REDIS_TOKENS_MAX);
    a.v.remaining_tokens = h->rem_tok + h->mt_left / 1000;
    a.v.reset_tokens_ms = h->reset_tok;
  }
  cb(arg_, &a);
  return 1;
}

/* Settles a request admitted from a holding: its slot and reservation
 * return to the holding, its usage waits for the next sync. Returns 1, or
 * 0 when the request was admitted in a day or month the holding has left
 * since (a request running across midnight): the next sync reports spend
 * in the holding's new periods, so this usage must go to Redis on its own,
 * to the windows of the periods it was admitted in. */
static int hold_settle(hold_t *h, const tg_admit_req_t *r, const tg_admission_t *a,
                       int64_t actual_tokens, tg_nano_t actual_cost) {
  tg_nano_t cost = r->reserve.cost > 0 ? r->reserve.cost : 0;
  if (h->used > 0)
    h->used--;
  h->running_cost = h->running_cost > cost ? h->running_cost - cost : 0;
  if (a->v.day != (h->syncing ? h->sync_day : h->day) ||
      a->v.month != (h->syncing ? h->sync_month : h->month))
    return 0;
  h->pend_spent += actual_cost > 0 ? actual_cost : 0;
  if (a->v.limit_tokens > 0)
    h->pend_refund_mt += clamp64(r->reserve.tokens, 0, TG_REDIS_TOKENS_MAX) * 1000 -
                         clamp64(actual_tokens, 0, TG_REDIS_TOKENS_MAX) * 1000;
  return 1;
}

/* Each tick: a grant whose period is over goes back, settled usage is
 * reported within a period, and a member still held is renewed. */
static void hold_tick(tg__redis_loop_t *rl) {
  int64_t now = loop_clock(rl);
  if (rl->holds == NULL)
    return;
  for (uint32_t i = 0; i < TG_REDIS_MAX_HOLDS; i++) {
    hold_t *h = &rl->holds[i];
    if (!h->in_use || h->syncing)
      continue;
    hold_roll(h, now);
    if ((h->until != 0 && now >= h->until) ||
        ((h->pend_spent > 0 || h->pend_refund_mt != 0) && now - h->last_sync >= TG_REDIS_HOLD_MS) ||
        (h->in_redis && (h->lost || now - h->last_sync >= TG_REDIS_LEASE_RENEW_MS)))
      (void)hold_sync(rl, h, now, &h->lim);
  }
}

/* Redis lost its data: every holding's member is made again by its next
 * sync (the sync adds the member whole when Redis has none), sent at the
 * next tick, or after the one on its way is answered. */
static void hold_lost(tg__redis_loop_t *rl) {
  if (rl->holds == NULL)
    return;
  for (uint32_t i = 0; i < TG_REDIS_MAX_HOLDS; i++)
    if (rl->holds[i].in_use)
      rl->holds[i].lost = 1;
}

/* The member of o's lease: the same text at admission, renewal and
 * settlement, built from what each of them knows. */
static void lease_member(op_t *o) {
  snprintf(o->member, sizeof o->member, "%s %" PRId64 " %" PRId64 " %" PRId64, o->a.lease, o->day,
           o->month, o->req.reserve.cost > 0 ? o->req.reserve.cost : 0);
}

int tg__redis_admit(tg__redis_loop_t *rl, const tg_admit_req_t *r, int64_t now_ms,
                    tg_admit_cb cb, void *arg_) {
  op_t *o;
  size_t tlen;
  int rc;

  if (rl == NULL || r == NULL || r->tenant == NULL || cb == NULL)
    return TG_EINVAL;
  tlen = strlen(r->tenant);
  if (tlen == 0)
    return TG_EINVAL;
  if (tlen > TG_REDIS_MAX_TENANT)
    return TG_ETOOBIG;
  if (!tg__redis_connected(rl) || rl->n_ops >= TG_REDIS_MAX_OPS)
    return TG_EUNAVAIL;
  note_clock(rl, now_ms);
  if (hold_admit(rl, r, now_ms, cb, arg_))
    return 0;
  if ((o = calloc(1, sizeof *o)) == NULL)
    return TG_ENOMEM;
  o->kind = OP_ADMIT;
  memcpy(o->tenant, r->tenant, tlen + 1);
  o->req = *r;
  o->req.tenant = o->tenant;
  o->now_ms = now_ms;
  o->cb = cb;
  o->arg = arg_;
  o->day = tg_day_of(now_ms);
  o->month = tg_month_of(now_ms);
  o->a.backend = TG_BACKEND_REDIS;
  o->a.v.day = o->day;
  o->a.v.month = o->month;
  if ((rc = lease_alloc(rl, o->tenant, &o->slot)) < 0) {
    free(o);
    return rc;
  }
  memcpy(o->a.lease, rl->leases[o->slot].id, sizeof o->a.lease);
  lease_member(o);
  memcpy(rl->leases[o->slot].member, o->member, sizeof o->member);
  if ((rc = enqueue(rl, o, r->global_rps > 0)) < 0) {
    lease_put(rl, o->slot);
    free(o);
    return rc;
  }
  rl->n_ops++;
  return 0;
}

void tg__redis_settle(tg__redis_loop_t *rl, const tg_admit_req_t *r, const tg_admission_t *a,
                      int64_t actual_tokens, tg_nano_t actual_cost, int64_t now_ms) {
  uint32_t slot;
  op_t *o;
  size_t tlen;

  if (rl == NULL || r == NULL || a == NULL || r->tenant == NULL)
    return;
  if (a->v.refused != TG_LIMIT_NONE || a->lease[0] == '\0')
    return; /* nothing was charged */
  hold_t *h = hold_of_lease(rl, a->lease, r->tenant);
  if (h != NULL) {
    note_clock(rl, now_ms);
    if (hold_settle(h, r, a, actual_tokens, actual_cost))
      return;
    /* Admitted in a period the holding has left: settled below like a
     * lease that is gone (its reservation leaves with the holding's next
     * sync), its spend added to the windows it was admitted in. */
  } else if (lease_find(rl, a->lease, &slot) == 0) {
    /* Stop renewing the lease whatever happens next: if the settlement is
     * lost, the lease and its reservation expire on their own. */
    lease_put(rl, slot);
  }
  tlen = strlen(r->tenant);
  if (tlen == 0 || tlen > TG_REDIS_MAX_TENANT)
    return;
  if (rl->state != RL_UP || rl->closing) {
    log_event("state_redis_settle_lost", rl->r, "not connected");
    return;
  }
  if ((o = calloc(1, sizeof *o)) == NULL) {
    log_event("state_redis_settle_lost", rl->r, "out of memory");
    return;
  }
  note_clock(rl, now_ms);
  o->kind = OP_SETTLE;
  memcpy(o->tenant, r->tenant, tlen + 1);
  o->req = *r;
  o->req.tenant = o->tenant;
  o->now_ms = now_ms;
  o->a = *a;
  o->day = a->v.day;
  o->month = a->v.month;
  lease_member(o);
  o->actual_tokens = actual_tokens;
  o->actual_cost = actual_cost;
  /* Sent with this tenant's other operations at the end of this loop
   * iteration, the one in which the client gets its answer: a follow-up
   * request on this loop thread is queued behind the release on the same
   * connection. One on another thread may still get to Redis first
   * (docs/state-redis.md, Batches). */
  if (enqueue(rl, o, 0) < 0) {
    log_event("state_redis_settle_lost", rl->r, "out of memory");
    free(o);
    return;
  }
  rl->n_ops++;
}
