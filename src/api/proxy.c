/* The OpenAI-compatible API: route, authenticate, parse, dispatch to an
 * upstream endpoint, relay, log.
 *
 * A call (tg_call_t) is one API request from the moment its body is parsed
 * until it is answered; it lives on the loop thread that accepted it and is
 * freed in call_finish(), its single exit. Upstream attempts are retried on
 * another endpoint only while nothing was relayed to the client. A stream is
 * relayed event by event: each upstream chunk's whole events go out as one
 * HTTP chunk, and when the client's pending output passes the high-water mark
 * the upstream transfer is paused until it drains.
 *
 * When every endpoint of a model is at max_inflight, an admitted call waits
 * in its loop's fair queue for that model (sched/fairq.h: weighted round
 * robin across tenants) up to queue_timeout; a full queue or the timeout
 * sheds it with 503 and Retry-After. A call giving back an endpoint slot
 * wakes the loops that have waiters (uv_async), and each loop dispatches its
 * own waiters: a call never leaves its loop. A loop's queue of a model is
 * made when a call first waits for it and freed once empty when the model
 * has left the config or the queue went unused a while (wqueue_sweep). */
#define _GNU_SOURCE /* memmem */
#include <jansson.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <llhttp.h>

#include "api/api.h"
#include "api/sse.h"
#include "core/err.h"
#include "core/fault.h"
#include "core/json.h"
#include "core/strbuf.h"
#include "obs/accesslog.h"
#include "meter/ledger.h"
#include "policy/state.h"
#include "sched/fairq.h"

#define RESP_KEEP_MAX (1024u * 1024)   /* a non-streamed answer kept whole; a 200
                                       * past it is relayed as it comes */
#define ANSWER_TAIL_MAX 256            /* a relayed answer's end held for the ledger */
#define EVENT_MAX (1024u * 1024)       /* one SSE event */
#define WQUEUES_MAX 4096               /* models with a queue, per loop */
#define WQUEUE_IDLE_NS (60 * UINT64_C(1000000000))  /* an empty queue unused
                                       * this long is freed */
#define WQUEUE_SWEEP_NS UINT64_C(1000000000)        /* how often the tick
                                       * looks for queues and tenants to free */
#define MAX_FWD_HEADERS 16

enum { DL_NONE, DL_FIRST_BYTE, DL_IDLE };

struct tg_call_s {
  tg_http_req_t *req;
  tg_worker_t *w;
  tg_runtime_t *rt;
  const tg_model_cfg_t *model;
  const tg_pool_t *pool;
  const tg_tenant_cfg_t *tenant;
  char key_id[TG_KEY_ID_LEN + 1];
  char request_id[32];
  const char *path;               /* upstream path, e.g. /v1/chat/completions */
  int embeddings;                 /* path is /v1/embeddings (set with path) */
  char *body_owned;               /* rewritten body, or NULL */
  const char *body;
  size_t body_len;
  int stream;
  int client_usage;               /* client asked for the usage chunk */

  tg_endpoint_t *ep;              /* endpoint of the current attempt */
  int holding;                    /* holds a slot of ep (and counts in flight) */
  void *mslot;                    /* the (tenant, model) metrics, once looked up */
  tg_fq_waiter_t qw;              /* place in the model's fair queue */
  struct tg_wqueue_s *wq;         /* that queue while waiting, else NULL */
  uint64_t q_deadline;            /* when waiting ends with 503 */
  uint64_t t_queued, queue_ns;    /* start and length of the wait */
  int pick_why;                   /* TG_PICK_* when no endpoint was left */
  tg_tried_t tried;                /* endpoints of the pool already tried */
  int attempts;
  tg_xfer_t *xfer;
  int up_status;
  char up_retry_after[TG_RETRY_AFTER_MAX + 1]; /* the attempt's answer's, or "" */
  int last_failure;               /* TG_XFER_* of the last failed attempt */
  const char *hdr_lines[MAX_FWD_HEADERS + 4]; /* NULL-terminated */
  size_t n_hdr_lines;
  char *hdr_owned[MAX_FWD_HEADERS]; /* the forwarded lines, malloc'd */
  size_t n_hdr_owned;
  char rid_line[48];              /* "X-Request-Id: <id>" */
  char url[1024];

  char *resp;                     /* non-streamed answer, kept whole */
  size_t resp_len, resp_cap;
  tg_ascan_t *scan;               /* a 200 answer past RESP_KEEP_MAX, relayed */
  tg_sse_t sse;
  char *out;                      /* events of one upstream chunk; a relayed
                                   * answer's closing brace and what follows */
  size_t out_len, out_cap;
  int relayed;                    /* response head sent to the client */
  int saw_done;
  int resp_too_big;               /* an error answer passed RESP_KEEP_MAX */

  int64_t prompt_tokens, completion_tokens;
  int has_usage;                  /* the upstream reported usable usage */
  int counted;                    /* else: something was delivered, billed from above */
  int64_t counted_tokens;         /* its completion tokens: content events relayed,
                                   * the bytes of a whole answer's generated text,
                                   * or of a relayed answer */
  int64_t counted_at_usage;       /* content events relayed up to the last usage */

  tg_admit_req_t admit;           /* what the policy was asked */
  tg_admission_t admission;       /* its answer */
  int64_t prompt_estimate;        /* from above: bytes of the prompt text */
  int64_t send_max_tokens;        /* > 0: the body states no limit; the
                                     upstream is sent this one, reserved */
  int admitting;                  /* waiting for the policy's answer */
  int recording;                  /* waiting for the ledger's commit */
  int reached;                    /* an upstream saw the request: it gets a record */
  int fin;                        /* FIN_*: how the call ends once recorded */
  const char *fin_type;
  char fin_msg[256];
  uint64_t t_dispatch;
  int64_t t_start_ms;             /* wall clock at arrival: the record's time */
  int admitted;                   /* holds a reservation to settle */
  int abandoned;                  /* client left while admitting */
  char rl_headers[512];           /* x-ratelimit-* for the answer */

  uint64_t t_start, t_first_byte;
  uint64_t deadline;
  int deadline_kind;
  int status;                     /* what the client got, for the log */
  int shed;                       /* refused because the pool was saturated */
  const char *retry_after;        /* the answer's Retry-After: "1" when shed or for a
                                   * local shortage, up_retry_after with the
                                   * upstream's error answer, else NULL */
  const char *err_code;

  tg_call_t *prev, *next;
};
_Static_assert(sizeof(tg_call_t) <= TG_API_BLOCK,
               "a call must fit a block of the loop's recycle");

/* ---- helpers ------------------------------------------------------------ */

static uint64_t now_ns(void) {
  return uv_hrtime();
}

void tg_api_request_id(tg_worker_t *w, char *buf, size_t size) {
  tg_sb_t b;
  tg_sb_init(&b, buf, size);
  tg_sb_lit(&b, "req_");
  tg_sb_puts(&b, w->app->id_prefix);
  tg_sb_puthex(&b, (unsigned)(w->id & 0xff), 2);
  tg_sb_puthex(&b, ++w->seq, 10);
}

static void call_link(tg_call_t *c) {
  tg_worker_t *w = c->w;
  c->next = w->calls;
  if (w->calls)
    w->calls->prev = c;
  w->calls = c;
}

static void call_unlink(tg_call_t *c) {
  tg_worker_t *w = c->w;
  if (c->prev) c->prev->next = c->next;
  else if (w->calls == c) w->calls = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

static void call_log(tg_call_t *c) {
  tg_access_rec_t r;
  uint64_t end = now_ns();

  memset(&r, 0, sizeof(r));
  r.request_id = c->request_id;
  r.tenant = c->tenant ? c->tenant->name : NULL;
  r.key_id = c->key_id[0] ? c->key_id : NULL;
  r.model = c->model ? c->model->name : NULL;
  r.endpoint = c->ep ? tg_endpoint_url(c->ep) : NULL;
  r.path = c->path;
  r.status = c->status;
  r.error = c->err_code;
  r.stream = c->stream;
  r.attempts = c->attempts;
  r.prompt_tokens = c->prompt_tokens;
  r.completion_tokens = c->completion_tokens;
  r.usage_reported = c->has_usage;
  r.duration_ms = (double)(end - c->t_start) / 1e6;
  r.ttfb_ms = c->t_first_byte ? (double)(c->t_first_byte - c->t_start) / 1e6 : -1;
  tg_access_log(c->w->alog, &r);
  {
    tg_metrics_obs_t o;
    memset(&o, 0, sizeof(o));
    o.tenant = c->tenant ? c->tenant->name : NULL;
    o.model = c->model ? c->model->name : NULL;
    o.status = c->status;
    o.refused = c->admission.v.refused;
    if (c->status != 429 && c->status != 402)
      o.refused = TG_LIMIT_NONE;
    o.shed = c->shed;
    /* the cached slot is (tenant, model): only for calls that resolved both */
    o.slot = o.tenant && o.model ? c->mslot : NULL;
    o.prompt_tokens = c->prompt_tokens;
    o.completion_tokens = c->completion_tokens;
    o.duration_s = (double)(end - c->t_start) / 1e9;
    o.ttft_s = c->t_first_byte ? (double)(c->t_first_byte - c->t_start) / 1e9 : -1;
    /* the gateway's own share: arrival to the upstream request going out */
    o.overhead_s = c->t_dispatch ? (double)(c->t_dispatch - c->t_start) / 1e9 : -1;
    tg_metrics_observe(c->w->app->metrics, (size_t)c->w->id, &o);
  }
}

static void queue_leave(tg_call_t *c, int served);

static void resp_drop(tg_call_t *c) {
  if (c->resp_cap == TG_API_BLOCK)
    tg_recycle_free(&c->w->mem, c->resp); /* never grown: the recycle's block */
  else
    free(c->resp);
  c->resp = NULL;
  c->resp_len = c->resp_cap = 0;
}

static void call_free(tg_call_t *c) {
  tg_recycle_t *mem = &c->w->mem;
  size_t i;
  queue_leave(c, 0);
  call_unlink(c);
  tg_metrics_slot_put(c->mslot);
  for (i = 0; i < c->n_hdr_owned; i++)
    free(c->hdr_owned[i]);
  free(c->body_owned);
  resp_drop(c);
  free(c->scan);
  free(c->out);
  tg_sse_free(&c->sse);
  if (c->rt)
    tg_runtime_unref(c->rt);
  tg_recycle_free(mem, c);
}

/* Releases the current attempt's transfer and endpoint slot. */
/* An attempt took a slot of c->ep: count it in flight for the tenant. */
static void *call_mslot(tg_call_t *c) {
  if (c->mslot == NULL)
    c->mslot = tg_metrics_slot(c->w->app->metrics, (size_t)c->w->id, c->tenant->name,
                               c->model->name);
  return c->mslot;
}

static void call_hold(tg_call_t *c) {
  c->holding = 1;
  tg_metrics_inflight(call_mslot(c), 1);
}

/* Gives back the attempt's endpoint slot, once. c->ep stays for the log. */
static void wake_waiters(tg_app_t *app);

static void call_unhold(tg_call_t *c) {
  if (!c->holding)
    return;
  c->holding = 0;
  tg_endpoint_release(c->ep);
  tg_metrics_inflight(call_mslot(c), -1);
  wake_waiters(c->w->app);
}

static void call_drop_attempt(tg_call_t *c) {
  if (c->xfer) {
    tg_xfer_cancel(c->xfer);
    c->xfer = NULL;
  }
  call_unhold(c);
}

/* What the call really used: the upstream's usage when it reported one
 * (plus a token for each content event relayed after a stream's last
 * usage: a usage is the total so far, and what follows it was generated
 * too); else, for what was delivered without it (a stream's content
 * events, a whole answer), the prompt estimate and the counted completion
 * tokens, both from above; else nothing. Every figure is at most
 * TG_USAGE_TOKENS_MAX, so with the bounded prices the cost is exact. Sets
 * the call's token figures and returns the cost. */
static tg_nano_t call_usage(tg_call_t *c) {
  tg_nano_t cost, more;

  if (!c->has_usage) {
    c->prompt_tokens = c->counted ? c->prompt_estimate : 0;
    c->completion_tokens = c->counted ? c->counted_tokens : 0;
  } else if (c->counted_tokens > c->counted_at_usage) {
    c->completion_tokens += c->counted_tokens - c->counted_at_usage;
    c->counted_at_usage = c->counted_tokens; /* added once: called again, the same */
  }
  if (c->prompt_tokens > TG_USAGE_TOKENS_MAX)
    c->prompt_tokens = TG_USAGE_TOKENS_MAX;
  if (c->completion_tokens > TG_USAGE_TOKENS_MAX)
    c->completion_tokens = TG_USAGE_TOKENS_MAX;
  if (c->model == NULL)
    return 0;
  cost = tg_money_cost(c->prompt_tokens, c->model->prompt_nano_per_token);
  more = tg_money_cost(c->completion_tokens, c->model->completion_nano_per_token);
  return cost < INT64_MAX - more ? cost + more : INT64_MAX;
}

/* Settles the reservation with what the call really used. */
static void call_settle(tg_call_t *c) {
  tg_nano_t cost;

  if (!c->admitted)
    return;
  c->admitted = 0;
  cost = call_usage(c);
  tg_policy_settle(c->w->policy, &c->admit, &c->admission,
                   c->prompt_tokens + c->completion_tokens, cost);
}

/* The single exit of a call: the request is complete when this returns. */
static void call_finish(tg_call_t *c) {
  c->deadline_kind = DL_NONE;
  call_settle(c);
  /* the request is complete: the server has already cleared its hooks */
  call_log(c);
  call_free(c);
}

enum { FIN_RESPOND, FIN_END_STREAM, FIN_END_ANSWER, FIN_ERROR, FIN_ABORT };

/* The Retry-After header line of c's answer, written into buf, or NULL
 * when it has none. A wait in seconds (not a date) also goes out as
 * retry-after-ms, which the official clients read first: both lines say
 * the same, so no client waits differently for reading one or the other. */
static const char *retry_after_line(const tg_call_t *c, char *buf, size_t size) {
  tg_sb_t b;
  const char *p;

  if (c->retry_after == NULL)
    return NULL;
  tg_sb_init(&b, buf, size);
  tg_sb_lit(&b, "Retry-After: ");
  tg_sb_puts(&b, c->retry_after);
  tg_sb_lit(&b, "\r\n");
  for (p = c->retry_after; *p >= '0' && *p <= '9'; p++)
    ;
  if (*p == '\0' && p > c->retry_after) {
    /* at most 10 digits (TG_RETRY_AFTER_MAX's check), so the ms fit */
    tg_sb_lit(&b, "retry-after-ms: ");
    tg_sb_putu(&b, strtoull(c->retry_after, NULL, 10) * 1000);
    tg_sb_lit(&b, "\r\n");
  }
  return b.err ? NULL : buf;
}

/* Sends what ends the call (its last bytes) and finishes it. The policy is
 * settled first, so the concurrency slot is free before the client can see
 * the answer end and send its next request. */
static void call_fin(tg_call_t *c) {
  static const char done[] = "data: [DONE]\n\n";
  char hdr[640], ra[96];
  tg_sb_t b;

  call_settle(c);

  switch (c->fin) {
  case FIN_RESPOND:
    tg_sb_init(&b, hdr, sizeof(hdr));
    tg_sb_lit(&b, "x-request-id: ");
    tg_sb_puts(&b, c->request_id);
    tg_sb_lit(&b, "\r\n");
    if (c->status < 300)
      tg_sb_puts(&b, c->rl_headers);
    if (retry_after_line(c, ra, sizeof(ra)) != NULL)
      tg_sb_puts(&b, ra);
    tg_http_respond(c->req, c->status, "application/json", hdr, c->resp ? c->resp : "",
                    c->resp_len);
    break;
  case FIN_END_STREAM:
    /* [DONE] was held back until the record was durable */
    if (tg_http_write(c->req, done, sizeof(done) - 1) < 0)
      tg_http_abort(c->req);
    else
      tg_http_end(c->req);
    break;
  case FIN_END_ANSWER:
    /* the answer's closing brace was held back until the record was durable */
    if (c->out_len > 0 && tg_http_write(c->req, c->out, c->out_len) < 0)
      tg_http_abort(c->req);
    else
      tg_http_end(c->req);
    break;
  case FIN_ERROR:
    tg_api_error(c->req, c->status, c->fin_type, c->err_code, c->request_id,
                 retry_after_line(c, ra, sizeof(ra)), "%s", c->fin_msg);
    break;
  default:
    tg_http_abort(c->req);
    break;
  }
  call_finish(c);
}

/* The record could not be made durable (the ledger refused it, or lost it
 * with the database and the spool both failing): the answer must not
 * complete, or the client would hold a response no record bills. A whole
 * answer becomes a 503 to retry; a stream ends without [DONE]. */
static void call_unrecorded(tg_call_t *c) {
  if (c->fin == FIN_RESPOND) {
    c->fin = FIN_ERROR;
    c->status = 503;
    c->fin_type = "server_error";
    c->err_code = "ledger_unavailable";
    c->retry_after = "1";
    tg_str_copy(c->fin_msg, sizeof(c->fin_msg),
                "the usage record of this answer could not be stored, so the answer is "
                "withheld; retry shortly");
  } else if (c->fin == FIN_END_STREAM || c->fin == FIN_END_ANSWER) {
    c->fin = FIN_ABORT;
  }
}

static void on_recorded(void *arg, int status) {
  tg_call_t *c = arg;
  c->recording = 0;
  if (status != 0)
    call_unrecorded(c);
  if (c->abandoned) {
    call_finish(c); /* the client left while the record was written */
    return;
  }
  call_fin(c);
}

static void on_recorded_detached(void *arg, int status) {
  (void)arg;
  (void)status;
}

/* The record's time: the request's arrival, or, when its admission came
 * in a later UTC day (its body arrived after midnight), the first
 * millisecond of the day the admission charged. A record's day and month
 * are then the budget windows its cost went to, which a restart rebuilds
 * from the ledger and which `usage --day` and the invoice report. */
static int64_t record_ts_ms(const tg_call_t *c) {
  const tg_verdict_t *v = &c->admission.v;
  if (v->refused == TG_LIMIT_NONE && v->day > tg_day_of(c->t_start_ms))
    return tg_day_end_ms(v->day - 1);
  return c->t_start_ms;
}

/* Ends a call: when an upstream saw the request, its ledger record is made
 * durable before the answer's last byte goes out, so a response that
 * completed at the client always has its record. */
static void call_close(tg_call_t *c, int fin) {
  tg_ledger_port_t *port = c->w->ledger;
  tg_ledger_rec_t rec;
  int gone;

  c->fin = fin;
  c->deadline_kind = DL_NONE;
  if (!c->reached || port == NULL) {
    call_fin(c);
    return;
  }
  memset(&rec, 0, sizeof(rec));
  tg_str_copy(rec.request_id, sizeof(rec.request_id), c->request_id);
  rec.ts_ms = record_ts_ms(c);
  tg_str_copy(rec.tenant, sizeof(rec.tenant), c->tenant->name);
  tg_str_copy(rec.key_id, sizeof(rec.key_id), c->key_id);
  tg_str_copy(rec.model, sizeof(rec.model), c->model->name);
  tg_str_copy(rec.endpoint, sizeof(rec.endpoint), c->ep ? tg_endpoint_url(c->ep) : "");
  rec.cost_nano = call_usage(c);
  rec.prompt_tokens = c->prompt_tokens;
  rec.completion_tokens = c->completion_tokens;
  rec.usage_counted = !c->has_usage && c->counted;
  rec.status = c->status;
  /* arrival until the upstream request went out, waiting in the queue included */
  rec.queue_us =
      c->t_dispatch ? (int64_t)(c->t_dispatch - c->t_start + c->queue_ns) / 1000 : -1;
  rec.ttft_us = c->t_first_byte ? (int64_t)(c->t_first_byte - c->t_start) / 1000 : -1;
  rec.total_us = (int64_t)(now_ns() - c->t_start) / 1000;
  gone = tg_http_req_gone(c->req);
  if (tg_ledger_append(port, &rec, gone ? on_recorded_detached : on_recorded,
                       gone ? NULL : c) < 0) {
    /* over the backlog bound (admission keeps headroom, so this is rare):
     * the answer is withheld, and the record, for work the upstream did,
     * goes to stderr whole rather than nowhere */
    fprintf(stderr,
            "{\"event\":\"ledger_append_refused\",\"request_id\":\"%s\",\"tenant\":\"%s\","
            "\"model\":\"%s\",\"prompt_tokens\":%lld,\"completion_tokens\":%lld,"
            "\"cost_nano\":%lld,\"status\":%d}\n",
            rec.request_id, rec.tenant, rec.model, (long long)rec.prompt_tokens,
            (long long)rec.completion_tokens, (long long)rec.cost_nano, rec.status);
    call_unrecorded(c);
    call_fin(c);
    return;
  }
  if (gone) {
    call_fin(c);
    return;
  }
  c->recording = 1;
}

static void call_error(tg_call_t *c, int status, const char *type, const char *code,
                       const char *msg) {
  c->status = status;
  c->err_code = code;
  c->fin_type = type;
  tg_str_copy(c->fin_msg, sizeof(c->fin_msg), msg);
  call_close(c, c->relayed ? FIN_ABORT : FIN_ERROR);
}

/* Refuses the request before any upstream attempt: answers, logs, frees. */
static void call_refuse(tg_call_t *c, int status, const char *type, const char *code,
                        const char *extra, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

static void call_refuse(tg_call_t *c, int status, const char *type, const char *code,
                        const char *extra, const char *fmt, ...) {
  char msg[512];
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  c->status = status;
  c->err_code = code;
  tg_api_error(c->req, status, type, code, c->request_id, extra, "%s", msg);
  call_finish(c);
}

/* ---- upstream attempt ---------------------------------------------------- */

static int try_next(tg_call_t *c);
static void wait_or_shed(tg_call_t *c);

static int on_up_status(tg_xfer_t *x, int status, void *arg) {
  tg_call_t *c = arg;
  const char *ra;

  /* an error answer's Retry-After, for the client (deliver_buffered) */
  if (status >= 400 && (ra = tg_xfer_retry_after(x)) != NULL)
    tg_str_copy(c->up_retry_after, sizeof(c->up_retry_after), ra);
  /* A success is a success: vLLM and OpenAI answer 200, and a 201 or 203
   * from something between carries the same answer, to be relayed and
   * billed as one (the client sees 200). */
  if (status >= 200 && status < 300)
    status = 200;
  c->up_status = status;
  c->reached = 1;
  if (c->stream && status == 200)
    return 0; /* vLLM sends a stream's head at once, before it queues the
               * request or makes a token: the first-byte deadline and the
               * time to first token wait for the first event (on_up_data) */
  c->t_first_byte = now_ns();
  c->deadline_kind = DL_IDLE;
  c->deadline = c->t_first_byte + c->rt->cfg->upstream_idle_timeout_ms * 1000000;
  return 0;
}

static int out_append(tg_call_t *c, const char *ev, size_t len) {
  if (c->out_len + len > c->out_cap) {
    size_t cap = c->out_cap ? c->out_cap : 4096;
    char *nb;
    while (cap < c->out_len + len)
      cap *= 2;
    nb = realloc(c->out, cap);
    if (nb == NULL)
      return TG_ENOMEM;
    c->out = nb;
    c->out_cap = cap;
  }
  memcpy(c->out + c->out_len, ev, len);
  c->out_len += len;
  return 0;
}

static int on_event(void *arg, const char *ev, size_t len) {
  tg_call_t *c = arg;
  tg_sse_info_t info;

  (void)tg_sse_inspect(ev, len, &info); /* an event it cannot read is relayed as is */
  if (info.done) {
    c->saw_done = 1;
    return 0; /* sent once the ledger record is durable (call_fin) */
  }
  if (info.has_choices && !c->saw_done) {
    c->counted = 1; /* the prompt was read: billed even with no token */
    if (!info.role_only)
      c->counted_tokens++;
  }
  if (info.has_usage) {
    c->has_usage = 1;
    c->prompt_tokens = info.prompt_tokens;
    c->completion_tokens = info.completion_tokens;
    c->counted_at_usage = c->counted_tokens;
  }
  if (info.usage_only && !c->client_usage)
    return 0; /* the client did not ask for it: we did */
  if (c->saw_done)
    return 0; /* [DONE] ends the client's stream: later events are read, not relayed */
  if (info.null_usage_len > 0 && !c->client_usage) {
    /* "usage": null on every chunk, as an upstream asked for usage writes
     * it (we asked): the client that did not ask gets none, as from OpenAI */
    size_t rest = info.null_usage_at + info.null_usage_len;
    int r = out_append(c, ev, info.null_usage_at);
    return r < 0 ? r : out_append(c, ev + rest, len - rest);
  }
  return out_append(c, ev, len);
}

static int resp_append(tg_call_t *c, const char *data, size_t len) {
  if (c->resp_len + len > RESP_KEEP_MAX) {
    c->resp_too_big = 1;
    return TG_ETOOBIG;
  }
  if (c->resp_len + len + 1 > c->resp_cap) {
    size_t cap = c->resp_cap ? c->resp_cap : TG_API_BLOCK;
    char *nb;
    while (cap < c->resp_len + len + 1)
      cap *= 2;
    /* the usual answer fits a block of the loop's recycle */
    nb = c->resp == NULL && cap == TG_API_BLOCK ? tg_recycle_alloc(&c->w->mem)
                                                : realloc(c->resp, cap);
    if (nb == NULL)
      return TG_ENOMEM;
    c->resp = nb;
    c->resp_cap = cap;
  }
  memcpy(c->resp + c->resp_len, data, len);
  c->resp_len += len;
  c->resp[c->resp_len] = '\0';
  return 0;
}

static int is_embeddings(const tg_call_t *c) {
  return c->embeddings;
}

/* The head of a relayed answer (a stream, or a whole answer too big to
 * keep): chunked, with the request id and the rate-limit headers. */
static int relay_begin(tg_call_t *c, const char *content_type, const char *more) {
  char hdr[640];
  tg_sb_t b;

  tg_sb_init(&b, hdr, sizeof(hdr));
  tg_sb_lit(&b, "x-request-id: ");
  tg_sb_puts(&b, c->request_id);
  tg_sb_lit(&b, "\r\n");
  tg_sb_puts(&b, more);
  tg_sb_puts(&b, c->rl_headers);
  if (tg_http_begin(c->req, 200, content_type, hdr) < 0)
    return -1;
  c->relayed = 1;
  c->status = 200;
  return 0;
}

static int stream_begin(tg_call_t *c) {
  return relay_begin(c, "text/event-stream", "Cache-Control: no-cache\r\n");
}

/* Relays bytes of a whole answer as they come, all but its closing brace
 * and what follows it (kept in c->out, up to ANSWER_TAIL_MAX bytes; only
 * whitespace may follow), which go out once the ledger record is durable.
 * What is relayed is counted, in case no usable usage comes: every byte of
 * a chat or completions answer, none of an embeddings one. */
static int answer_pass(tg_call_t *c, const char *data, size_t len) {
  size_t send = c->out_len > 0 ? 0 : tg_ascan_feed(c->scan, data, len);

  if (c->out_len > 0)
    (void)tg_ascan_feed(c->scan, data, len); /* after the end: checked, not sent */
  c->counted = 1;
  if (!is_embeddings(c))
    c->counted_tokens += (int64_t)len;
  if (send > 0 && tg_http_write(c->req, data, send) < 0)
    return -1;
  if (send < len) {
    size_t keep = len - send;
    if (keep > ANSWER_TAIL_MAX - c->out_len)
      keep = ANSWER_TAIL_MAX - c->out_len;
    if (keep > 0 && out_append(c, data + send, keep) < 0)
      return -1;
  }
  return 0;
}

/* A 200 answer that outgrew RESP_KEEP_MAX: the head goes out, then what
 * was kept, and the rest as it comes. */
static int answer_begin(tg_call_t *c) {
  int r;

  c->scan = malloc(sizeof(*c->scan));
  if (c->scan == NULL)
    return -1;
  tg_ascan_init(c->scan);
  if (relay_begin(c, "application/json", "") < 0)
    return -1;
  r = answer_pass(c, c->resp, c->resp_len);
  resp_drop(c);
  return r;
}

/* Bytes of a non-streamed 200 answer. */
static int answer_data(tg_call_t *c, const char *data, size_t len) {
  if (!c->relayed) {
    if (c->resp_len + len <= RESP_KEEP_MAX)
      return resp_append(c, data, len) < 0 ? -1 : 0;
    if (answer_begin(c) < 0)
      return -1;
  } else if (tg_http_congested(c->req)) {
    c->deadline_kind = DL_NONE; /* as a paused stream: on_client_drain resumes */
    return TG_XFER_PAUSE;
  }
  return answer_pass(c, data, len) < 0 ? -1 : 0;
}

static int on_up_data(tg_xfer_t *x, const char *data, size_t len, void *arg) {
  tg_call_t *c = arg;
  int r;

  (void)x;
  if (c->t_first_byte == 0)
    c->t_first_byte = now_ns();
  if (c->deadline_kind == DL_FIRST_BYTE)
    c->deadline_kind = DL_IDLE;
  c->deadline = now_ns() + c->rt->cfg->upstream_idle_timeout_ms * 1000000;
  if (tg_http_req_gone(c->req))
    return -1;
  if (!c->stream && c->up_status == 200)
    return answer_data(c, data, len);
  if (!c->stream || c->up_status != 200)
    return resp_append(c, data, len) < 0 ? -1 : 0;

  if (c->relayed && tg_http_congested(c->req)) {
    /* the upstream waits for the client now, not the other way round: no
     * idle deadline until on_client_drain resumes it (client_send bounds
     * a client that stops reading) */
    c->deadline_kind = DL_NONE;
    return TG_XFER_PAUSE;
  }
  c->out_len = 0;
  r = tg_sse_feed(&c->sse, data, len, on_event, c);
  if (r < 0)
    return -1;
  if (c->out_len == 0)
    return 0;
  /* The client's 200 goes with the first whole event: an attempt that
   * breaks before one (inside it, or after the upstream's head alone) has
   * relayed nothing, and is retried on another endpoint. */
  if (!c->relayed && stream_begin(c) < 0)
    return -1;
  return tg_http_write(c->req, c->out, c->out_len) < 0 ? -1 : 0;
}

static void on_client_drain(tg_http_req_t *req) {
  tg_call_t *c = req->data;
  if (c && c->xfer && tg_xfer_paused(c->xfer)) {
    c->deadline_kind = DL_IDLE;
    c->deadline = now_ns() + c->rt->cfg->upstream_idle_timeout_ms * 1000000;
    tg_xfer_resume(c->xfer);
  }
}

/* Takes the upstream's usage from the text of its value: a chat or
 * completions usage needs both counts, embeddings' the prompt's. Returns 1
 * when it was usable. */
static int usage_take(tg_call_t *c, const char *u, size_t n) {
  if (tg_usage_read_text(u, n, &c->prompt_tokens, &c->completion_tokens) &&
      (c->completion_tokens >= 0 || is_embeddings(c))) {
    c->has_usage = 1;
    /* a whole answer's usage is its total: the bytes counted as it was
     * relayed are not added to it (they were, a token a byte) */
    c->counted_at_usage = c->counted_tokens;
    if (c->completion_tokens < 0)
      c->completion_tokens = 0;
    return 1;
  }
  return 0;
}

/* 1 when the text from q, inside the answer's object, to end (the
 * object's closing brace) closes that object and nothing more: read
 * lexically, its nesting returns to the object's level only at the last
 * byte. So a key at q is one of the answer's own, not one nested deeper. */
static int closes_answer(const char *q, const char *end) {
  int depth = 1, in_str = 0, esc = 0;

  for (; q < end; q++) {
    char ch = *q;
    if (in_str) {
      if (esc)
        esc = 0;
      else if (ch == '\\')
        esc = 1;
      else if (ch == '"')
        in_str = 0;
    } else if (ch == '"') {
      in_str = 1;
    } else if (ch == '{' || ch == '[') {
      depth++;
    } else if ((ch == '}' || ch == ']') && --depth == 0) {
      return q == end - 1;
    }
  }
  return 0;
}

/* Reads usage from a whole JSON answer without parsing all of it: the
 * answer must look like one JSON object, and the value of its own last
 * "usage" member is parsed alone. Upstreams put usage last, so the key is
 * found from the end and checked to be the answer's own (not a "usage"
 * nested in a later member, nor a string "usage") by reading only what
 * follows it; an answer whose last "usage" key is nested deeper is read
 * whole by the lexical scanner instead. A chat or completions usage needs
 * both counts; one without a usable usage is counted from the answer
 * instead (call_usage): its generated text's bytes, or none for
 * embeddings. Returns 0, or TG_EPARSE for an answer that is not a JSON
 * object. */
static int scan_usage(tg_call_t *c, const char *body, size_t len) {
  const char *p = body, *end = body + len, *u = NULL, *q, *v;

  while (p < end && tg_json_ws(*p))
    p++;
  while (end > p && tg_json_ws(end[-1]))
    end--;
  if (p >= end || *p != '{' || end[-1] != '}')
    return TG_EPARSE;
  /* the last "usage" key of the text: a few dozen bytes from the end */
  for (q = end; u == NULL && (q = memrchr(p, '"', (size_t)(q - p))) != NULL;) {
    if (end - q < 7 || memcmp(q, "\"usage\"", 7) != 0)
      continue;
    for (v = q + 7; v < end && tg_json_ws(*v); v++)
      ;
    if (v < end && *v == ':')
      u = q; /* else a string "usage" that is a value: look further back */
  }
  if (u != NULL && closes_answer(u, end)) {
    for (v = u + 7; v < end && (tg_json_ws(*v) || *v == ':'); v++)
      ;
    if (usage_take(c, v, (size_t)(end - v)))
      return 0;
  } else if (u != NULL) {
    tg_ascan_t scan;
    size_t n = 0;
    tg_ascan_init(&scan);
    (void)tg_ascan_feed(&scan, body, len);
    if (tg_ascan_whole(&scan) && (v = tg_ascan_usage(&scan, &n)) != NULL &&
        usage_take(c, v, n))
      return 0;
  }
  c->counted = 1;
  c->counted_tokens = is_embeddings(c) ? 0 : tg_answer_text_bytes(body, len);
  return 0;
}

/* The upstream finished a relayed answer: its usage is the scan's, and an
 * answer that was not one JSON object is cut (the client sees a truncated
 * response, as for a stream without [DONE]), billed for what it carried. */
static void answer_end(tg_call_t *c) {
  size_t n = 0;
  const char *u = tg_ascan_usage(c->scan, &n);

  if (u != NULL)
    (void)usage_take(c, u, n);
  if (!tg_ascan_whole(c->scan)) {
    tg_endpoint_error(c->ep, TG_UPERR_BAD_RESPONSE);
    call_error(c, 502, "server_error", "bad_upstream_response",
               "the upstream returned a response that is not valid JSON");
    return;
  }
  call_close(c, FIN_END_ANSWER);
}

/* 1 when text[0..len) is one JSON object (an upstream's error body). */
static int is_json_object(const char *text, size_t len) {
  cJSON *v = text != NULL ? tg_json_parse(text, len, 1, NULL) : NULL;
  int ok = cJSON_IsObject(v);
  tg_json_free(v);
  return ok;
}

/* The upstream's whole non-streamed answer is in c->resp. */
static void deliver_buffered(tg_call_t *c) {
  if (c->up_status == 200 && scan_usage(c, c->resp ? c->resp : "", c->resp_len) < 0) {
    tg_endpoint_error(c->ep, TG_UPERR_BAD_RESPONSE);
    call_error(c, 502, "server_error", "bad_upstream_response",
               "the upstream returned a response that is not valid JSON");
    return;
  }
  if (c->up_status < 400 && c->up_status != 200) {
    /* a redirect or an informational status is no answer to relay */
    char msg[64];
    snprintf(msg, sizeof(msg), "the upstream answered %d", c->up_status);
    tg_endpoint_error(c->ep, TG_UPERR_BAD_RESPONSE);
    call_error(c, 502, "server_error", "bad_upstream_response", msg);
    return;
  }
  if (c->up_status >= 400 && c->up_retry_after[0] != '\0') {
    /* A replica or hosted backend saying when to come back (429, 503):
     * the client's backoff needs it, and the last answer's is the one
     * that goes out when a 503 was retried on other endpoints first. */
    c->retry_after = c->up_retry_after;
  }
  if (c->up_status >= 400 && !is_json_object(c->resp, c->resp_len)) {
    /* an HTML page of a proxy before the upstream, an empty body: the
     * client still gets an error it can parse, with the upstream's status */
    char msg[96];
    snprintf(msg, sizeof(msg), "the upstream answered %d with a body that is not JSON",
             c->up_status);
    call_error(c, c->up_status, c->up_status >= 500 ? "server_error" : "invalid_request_error",
               "upstream_status", msg);
    return;
  }
  c->status = c->up_status;
  if (c->up_status >= 400)
    c->err_code = "upstream_status";
  call_close(c, FIN_RESPOND);
}

/* Counts an attempt's failure against its endpoint (llm_upstream_errors_total). */
static void count_up_error(tg_call_t *c, int result) {
  tg_uperr_t kind;
  switch (result) {
  case TG_XFER_OK:
    if (c->up_status >= 500)
      kind = TG_UPERR_STATUS;
    else if ((c->stream && c->up_status == 200 && !(c->relayed && c->saw_done)) ||
             (c->resp == NULL && c->up_status == 0))
      kind = TG_UPERR_BAD_RESPONSE;
    else
      return;
    break;
  case TG_XFER_CONNECT: kind = TG_UPERR_CONNECT; break;
  case TG_XFER_TIMEOUT: kind = TG_UPERR_TIMEOUT; break;
  case TG_XFER_BROKEN: kind = TG_UPERR_BROKEN; break;
  case TG_XFER_LOCAL:
    return; /* the gateway's shortage, not the upstream's error */
  default:
    if (!c->resp_too_big)
      return; /* our own abort (the client left): not the upstream's fault */
    kind = TG_UPERR_BAD_RESPONSE;
    break;
  }
  tg_endpoint_error(c->ep, kind);
}

/* The connection went: the client left (499), or a stop past its drain
 * timeout cut it (503 gateway_stopped, so the log and the ledger do not
 * blame the client). */
static void abort_status(tg_call_t *c) {
  c->status = c->w->cutting ? 503 : 499;
  c->err_code = c->w->cutting ? "gateway_stopped" : "client_closed";
}

static void on_up_done(int result, const char *detail, void *arg) {
  tg_call_t *c = arg;
  int retryable;

  c->xfer = NULL;
  c->deadline_kind = DL_NONE;
  call_unhold(c);

  if (result == TG_XFER_BROKEN)
    c->reached = 1; /* the request went out; the answer broke */
  count_up_error(c, result);
  if (tg_http_req_gone(c->req)) {
    abort_status(c);
    call_close(c, FIN_ABORT);
    return;
  }
  if (result == TG_XFER_OK) {
    if (c->stream && c->up_status == 200) {
      if (c->saw_done && (c->relayed || stream_begin(c) == 0)) {
        /* (a stream of no event but [DONE] begins here) */
        call_close(c, FIN_END_STREAM);
      } else {
        call_error(c, 502, "server_error", "bad_upstream_response",
                   "the upstream stream ended before [DONE]");
      }
      return;
    }
    if (c->relayed) {
      answer_end(c);
      return;
    }
    if ((c->up_status == 429 || c->up_status == 503) && c->up_retry_after[0] != '\0')
      /* the endpoint says it is overloaded: others get the next requests */
      tg_endpoint_back_off(c->ep, tg_retry_after_wait_ms(c->up_retry_after, tg_now_ms()));
    retryable = c->up_status == 502 || c->up_status == 503 || c->up_status == 504;
    if (retryable && try_next(c) == 0)
      return;
    if (c->resp == NULL && c->up_status == 0) {
      call_error(c, 502, "server_error", "bad_upstream_response",
                 "the upstream sent no response");
      return;
    }
    deliver_buffered(c);
    return;
  }

  c->last_failure = result;
  if (result == TG_XFER_LOCAL) {
    /* No descriptor, memory or local port for a connection: the endpoint
     * is not at fault (it stays routable) and another would fail alike. */
    c->retry_after = "1";
    if (c->relayed) {
      /* Out of memory to keep a paused stream's bytes: the stream is cut. */
      c->err_code = "gateway_overloaded";
      c->status = 503;
      call_close(c, FIN_ABORT);
      return;
    }
    call_error(c, 503, "server_error", "gateway_overloaded",
               "the gateway could not open an upstream connection (out of file "
               "descriptors, memory or local ports); retry shortly");
    return;
  }
  if (result == TG_XFER_CONNECT || result == TG_XFER_TIMEOUT)
    tg_endpoint_failed(c->ep);
  if (!c->relayed && result != TG_XFER_ABORTED) {
    if (try_next(c) == 0)
      return;
    if (c->pick_why == TG_PICK_SATURATED) {
      /* the endpoints left are up but full: wait for a slot like any call */
      wait_or_shed(c);
      return;
    }
  }
  if (c->relayed) {
    c->err_code = "upstream_broken";
    c->status = 502;
    call_close(c, FIN_ABORT);
    return;
  }
  if (result == TG_XFER_CONNECT || result == TG_XFER_TIMEOUT) {
    call_error(c, 503, "server_error", "no_healthy_endpoint",
               "no upstream endpoint of this model could be reached");
    return;
  }
  (void)detail;
  call_error(c, 502, "server_error", "bad_upstream_response",
             c->resp_too_big ? "the upstream response exceeds the size limit"
                                     : "the upstream connection failed before a complete response");
}

static const tg_xfer_cbs_t xfer_cbs = { on_up_status, on_up_data, on_up_done };

/* Starts an attempt on the best untried endpoint. Returns 0 when one
 * started (or the call was finished with an error response), -1 when no
 * endpoint is left (the caller decides what to answer). */
/* Starts an attempt on ep (index idx of the pool), whose slot the caller
 * took. Returns 0, or -1 when it could not start (the slot is given back). */
static int start_attempt(tg_call_t *c, tg_endpoint_t *ep, size_t idx) {
  const tg_config_t *cfg = c->rt->cfg;
  tg_xfer_opts_t opts;
  int r;

  {
    tg_tried_add(&c->tried, idx);
    c->ep = ep;
    c->attempts++;
    c->up_status = 0;
    c->up_retry_after[0] = '\0';
    c->resp_len = 0;
    if (c->attempts > 1 && c->stream) {
      /* what a broken attempt gave and nothing of which was relayed (a
       * part of its first event, a usage chunk or [DONE] held back) */
      tg_sse_free(&c->sse);
      tg_sse_init(&c->sse, EVENT_MAX);
      c->saw_done = c->has_usage = c->counted = 0;
      c->counted_tokens = c->counted_at_usage = 0;
      c->prompt_tokens = c->completion_tokens = 0;
      c->t_first_byte = 0;
    }
    {
      size_t n = tg_str_copy(c->url, sizeof(c->url), tg_endpoint_url(ep));
      tg_str_copy(c->url + n, sizeof(c->url) - n, c->path);
    }
    memset(&opts, 0, sizeof(opts));
    opts.url = c->url;
    opts.body = c->body;
    opts.body_len = c->body_len;
    opts.headers = (const char *const *)c->hdr_lines;
    opts.connect_timeout_ms = cfg->upstream_connect_timeout_ms;
    /* held before the start: a client may report the end from inside it */
    call_hold(c);
    c->t_first_byte = 0; /* this attempt's, not an earlier one's */
    c->deadline_kind = DL_FIRST_BYTE;
    c->deadline = now_ns() + cfg->upstream_first_byte_timeout_ms * 1000000;
    r = tg_xfer_start(c->w->up, &opts, &xfer_cbs, c, &c->xfer);
    if (r == 0)
      return 0;
    c->deadline_kind = DL_NONE;
    call_unhold(c);
    return -1;
  }
}

static int try_next(tg_call_t *c) {
  size_t idx = 0;
  int why = 0;

  for (;;) {
    tg_endpoint_t *ep = tg_pool_pick(c->pool, &c->tried, &idx, &why);
    if (ep == NULL) {
      c->pick_why = why;
      return -1;
    }
    if (start_attempt(c, ep, idx) == 0)
      return 0;
  }
}

/* ---- waiting for a saturated pool --------------------------------------- */

struct tg_wqueue_s {
  char *model;
  uint64_t used_ns;                /* when a call last entered */
  tg_fairq_t q;
};

/* Orders wake-ups from other loops against a loop closing its async handle. */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;

static tg_call_t *waiter_call(tg_fq_waiter_t *qw) {
  return (tg_call_t *)(void *)((char *)qw - offsetof(tg_call_t, qw));
}

static struct tg_wqueue_s *wqueue_find(tg_worker_t *w, const char *model) {
  size_t i;
  for (i = 0; i < w->n_queues; i++)
    if (strcmp(w->queues[i]->model, model) == 0)
      return w->queues[i];
  return NULL;
}

static void wqueue_free(struct tg_wqueue_s *wq) {
  tg_fairq_fini(&wq->q);
  free(wq->model);
  free(wq);
}

static int tenant_gone(const char *tenant, void *cfg) {
  return tg_config_tenant(cfg, tenant) == NULL;
}

/* Frees this loop's queues no call waits in whose model the current config
 * no longer has or that went unused for WQUEUE_IDLE_NS (every empty one
 * when all_empty is set), and in the others the tenant nodes the fair
 * queue no longer needs (tg_fairq_prune). An empty queue holds no call, so
 * nothing points to it; it is never freed while a queue is being served
 * (w->serving), whose loop still holds it. */
static void wqueue_sweep(tg_worker_t *w, uint64_t now, int all_empty) {
  const tg_runtime_t *rt = tg_worker_runtime(w);
  size_t i = 0;

  if (w->serving || rt == NULL)
    return;
  while (i < w->n_queues) {
    struct tg_wqueue_s *wq = w->queues[i];
    if (wq->q.len == 0 && (all_empty || now - wq->used_ns >= WQUEUE_IDLE_NS ||
                           tg_config_model(rt->cfg, wq->model) == NULL)) {
      wqueue_free(wq);
      w->queues[i] = w->queues[--w->n_queues];
      continue;
    }
    tg_fairq_prune(&wq->q, tenant_gone, (void *)rt->cfg);
    i++;
  }
}

/* This loop's queue for model, made on first use; NULL when out of memory
 * or past WQUEUES_MAX models with a waiter. */
static struct tg_wqueue_s *wqueue_get(tg_worker_t *w, const char *model) {
  struct tg_wqueue_s *wq = wqueue_find(w, model), **nv;
  if (wq != NULL)
    return wq;
  if (w->n_queues == WQUEUES_MAX) {
    /* full: the queues of models gone first, then any empty one */
    wqueue_sweep(w, now_ns(), 0);
    if (w->n_queues == WQUEUES_MAX)
      wqueue_sweep(w, now_ns(), 1);
    if (w->n_queues == WQUEUES_MAX)
      return NULL;
  }
  nv = realloc(w->queues, (w->n_queues + 1) * sizeof(*nv));
  if (nv == NULL)
    return NULL;
  w->queues = nv;
  wq = calloc(1, sizeof(*wq));
  if (wq == NULL || (wq->model = strdup(model)) == NULL) {
    free(wq);
    return NULL;
  }
  tg_fairq_init(&wq->q);
  w->queues[w->n_queues++] = wq;
  return wq;
}

/* The tenant's share in the fair queue: its priority class weight (the
 * queue uses only ratios; the config bounds it to the queue's range). */
static unsigned tenant_weight(const tg_call_t *c) {
  int64_t wt = c->tenant->priority_weight;
  return wt < 1 ? 1 : wt > TG_FQ_WEIGHT_MAX ? TG_FQ_WEIGHT_MAX : (unsigned)wt;
}

static void queue_count(tg_call_t *c, int delta) {
  tg_worker_t *w = c->w;
  atomic_fetch_add(&w->queued, delta);
  atomic_fetch_add(&w->app->queued, delta);
  tg_metrics_queued(call_mslot(c), delta);
}

/* Puts an admitted call in its model's queue. Returns 0, or -1 when the
 * queue is full (or memory ran out): the caller sheds the call. */
static int queue_enter(tg_call_t *c) {
  const tg_config_t *cfg = c->rt->cfg;
  struct tg_wqueue_s *wq = wqueue_get(c->w, c->model->name);
  uint64_t now = now_ns();

  /* the model's bound counts every loop's waiters (a config reload starts
   * a new count: its calls and the old config's wait side by side) */
  atomic_int *queued = &c->rt->queued[c->model - cfg->models];

  if (wq == NULL)
    return -1;
  if ((size_t)atomic_fetch_add(queued, 1) >= cfg->queue_max ||
      tg_fairq_push(&wq->q, c->tenant->name, tenant_weight(c), &c->qw) < 0) {
    atomic_fetch_sub(queued, 1);
    return -1;
  }
  c->wq = wq;
  wq->used_ns = now;
  c->t_queued = now;
  /* waits after a failed attempt share the first one's bound: what is left
   * of it, not counting the attempts in between */
  c->q_deadline = now + (c->queue_ns < cfg->queue_timeout_ms * 1000000
                             ? cfg->queue_timeout_ms * 1000000 - c->queue_ns
                             : 0);
  queue_count(c, 1);
  return 0;
}

/* Takes a call out of its queue (served=1: it leaves in turn, at the head). */
static void queue_leave(tg_call_t *c, int served) {
  if (c->wq == NULL)
    return;
  if (served)
    tg_fairq_serve(&c->wq->q, &c->qw);
  else
    tg_fairq_remove(&c->wq->q, &c->qw);
  c->wq = NULL;
  c->queue_ns += now_ns() - c->t_queued; /* a call may wait again after a failed attempt */
  atomic_fetch_sub(&c->rt->queued[c->model - c->rt->cfg->models], 1);
  queue_count(c, -1);
}

static void shed(tg_call_t *c, const char *code, const char *msg) {
  c->shed = 1;
  c->retry_after = "1";
  call_error(c, 503, "server_error", code, msg);
}

/* A slot came free somewhere: wake every loop with waiters (cheap when
 * none: one relaxed load). */
static void wake_waiters(tg_app_t *app) {
  int i;
  if (atomic_load_explicit(&app->queued, memory_order_relaxed) == 0)
    return;
  pthread_mutex_lock(&wake_lock);
  for (i = 0; i < app->n_workers; i++) {
    tg_worker_t *o = &app->workers[i];
    if (!o->async_closed && atomic_load(&o->queued) > 0)
      uv_async_send(&o->async);
  }
  pthread_mutex_unlock(&wake_lock);
}

void tg_api_worker_closing(tg_worker_t *w) {
  pthread_mutex_lock(&wake_lock);
  w->async_closed = 1;
  pthread_mutex_unlock(&wake_lock);
}

void tg_api_worker_fini(tg_worker_t *w) {
  size_t i;
  tg_recycle_clear(&w->mem);
  for (i = 0; i < w->n_queues; i++)
    wqueue_free(w->queues[i]);
  free(w->queues);
  w->queues = NULL;
  w->n_queues = 0;
}

/* A waiter back after a failed attempt is passed over while it can go
 * nowhere but a free slot is left on an endpoint it tried: the waiters
 * behind it may take that slot (else they all wait for its timeout). So
 * is a waiter admitted under an earlier config, which waits for that
 * config's endpoints, while they are full: the waiters behind it that
 * came under the current one may take the room a reload gave (an endpoint
 * added or moved), instead of waiting for a slot they do not need. */
static int waiter_blocked(tg_fq_waiter_t *qw, void *arg) {
  tg_call_t *c = waiter_call(qw);
  tg_endpoint_t *ep;
  size_t idx = 0;
  int why = 0;

  (void)arg;
  if (c->rt != c->w->rt) {
    ep = tg_pool_pick(c->pool, &c->tried, &idx, &why);
    if (ep != NULL) {
      tg_endpoint_release(ep);
      return 0;
    }
    return why == TG_PICK_SATURATED;
  }
  if (c->attempts == 0)
    return 0;
  ep = tg_pool_pick(c->pool, &c->tried, &idx, &why);
  if (ep != NULL || why != TG_PICK_SATURATED) {
    if (ep != NULL)
      tg_endpoint_release(ep);
    return 0;
  }
  ep = tg_pool_pick(c->pool, NULL, &idx, &why);
  if (ep == NULL)
    return 0;
  tg_endpoint_release(ep);
  return 1;
}

/* Sends one model's waiters, in fair order, while its endpoints have room.
 * A call it ends may start others (a pipelined request) that make a queue:
 * w->serving keeps wq, then maybe empty, from being swept under it. */
static void serve_queue(tg_worker_t *w, struct tg_wqueue_s *wq) {
  tg_fq_waiter_t *qw;

  w->serving++;
  while ((qw = tg_fairq_peek_skip(&wq->q, waiter_blocked, NULL)) != NULL) {
    tg_call_t *c = waiter_call(qw);
    size_t idx = 0;
    int why = 0;
    /* a call back in the queue after a failed attempt is not sent to an
     * endpoint it has tried */
    tg_endpoint_t *ep = tg_pool_pick(c->pool, &c->tried, &idx, &why);
    if (ep == NULL && why == TG_PICK_SATURATED)
      break; /* still full: the next freed slot wakes us again */
    queue_leave(c, 1);
    if (ep == NULL) {
      call_error(c, 503, "server_error", "no_healthy_endpoint",
                 "no healthy upstream endpoint serves this model");
      continue;
    }
    if (start_attempt(c, ep, idx) == 0 || try_next(c) == 0)
      continue;
    call_error(c, 503, "server_error", "no_healthy_endpoint",
               "no upstream endpoint of this model could be reached");
  }
  w->serving--;
}

void tg_api_serve_queues(tg_worker_t *w) {
  if (atomic_load(&w->queued) == 0)
    return;
  for (size_t i = 0; i < w->n_queues; i++)
    serve_queue(w, w->queues[i]);
}

/* Every endpoint the call may still use is at max_inflight: it waits in
 * the model's queue, or is shed when the queue is full (or off). */
static void wait_or_shed(tg_call_t *c) {
  if (c->rt->cfg->queue_max > 0 && queue_enter(c) == 0)
    return;
  shed(c, "queue_full",
       "every endpoint of this model is at capacity and its queue is full; retry shortly");
}

static void start_dispatch(tg_call_t *c) {
  tg_worker_t *w = c->w;
  struct tg_wqueue_s *wq = wqueue_find(w, c->model->name);

  c->t_dispatch = now_ns();
  /* waiters of this model on this loop go first, when one of them can go:
   * a queue of waiters that are all passed over (back from a failed
   * attempt, or of an earlier config, whose endpoints are full) takes no
   * free slot, so the call tries the endpoints first, and is not shed
   * with queue_full beside an idle one */
  if (wq != NULL && wq->q.len > 0 && tg_fairq_peek_skip(&wq->q, waiter_blocked, NULL) != NULL) {
    w->serving++; /* c may end here, and the requests it lets in make
                   * queues: wq is kept for what follows */
    wait_or_shed(c);
    /* a slot free while others wait is one those ahead cannot take (back
     * from a failed attempt, it is on the endpoint they tried): it is
     * served now, in fair order, not at the next freed slot or tick */
    serve_queue(w, wq);
    w->serving--;
    return;
  }
  if (try_next(c) == 0)
    return;
  if (c->pick_why == TG_PICK_SATURATED) {
    wait_or_shed(c);
    return;
  }
  call_error(c, 503, "server_error", "no_healthy_endpoint",
             "no healthy upstream endpoint serves this model");
}

static void on_client_abort(tg_http_req_t *req) {
  tg_call_t *c = req->data;
  if (c == NULL)
    return;
  if (c->admitting || c->recording) {
    /* the policy's answer or the ledger's commit is still coming: the
     * call waits for it */
    c->abandoned = 1;
    if (c->admitting)
      abort_status(c);
    tg_http_abort(req);
    return;
  }
  if (c->xfer != NULL && !c->has_usage && !c->counted) {
    /* the request went upstream, which may have computed its prompt: a
     * client that leaves before anything was relayed pays the prompt
     * estimate, as one that leaves a stream pays what was relayed; else
     * a long prompt and a quick goodbye would cost the GPU and not the
     * tenant (nor its tokens-per-minute limit) */
    c->reached = 1;
    c->counted = 1;
  }
  if (c->w->cutting && !c->relayed)
    /* a stop past its drain timeout: the connection can still say that
     * the request was not served (the client may retry it elsewhere) */
    tg_api_error(req, 503, "server_error", "gateway_stopped", c->request_id,
                 TG_RETRY_AFTER_1S, "the gateway stopped before answering this request");
  queue_leave(c, 0);
  call_drop_attempt(c);
  abort_status(c);
  call_close(c, FIN_ABORT);
}

/* Why a waiting call may no longer go upstream, or NULL: its key was
 * revoked, expired or left the store since it was admitted. It has not
 * reached a GPU yet, so it is refused as a new request with that key is; a
 * call already upstream finishes. (A reload's changes are not looked at
 * here: a call keeps the config it was admitted under, docs/gateway.md.) */
static const char *key_lost(tg_call_t *c) {
  const tg_key_rec_t *rec = tg_keyset_find(tg_worker_keys(c->w), c->key_id, TG_KEY_ID_LEN);

  if (rec == NULL)
    return "invalid API key (unknown)";
  if (rec->revoked_at != 0)
    return "invalid API key (revoked)";
  if (rec->expires_at != 0 && (int64_t)time(NULL) >= rec->expires_at)
    return "invalid API key (expired)";
  return NULL;
}

void tg_api_tick(tg_worker_t *w) {
  uint64_t now = now_ns();
  tg_call_t *c, *next;
  const char *lost;

  tg_api_serve_queues(w); /* also serves waiters a reload gave room to */
  if (now - w->swept_ns >= WQUEUE_SWEEP_NS) {
    w->swept_ns = now;
    wqueue_sweep(w, now, 0);
    if (tg_worker_runtime(w) != NULL)
      tg_metrics_prune(w->app->metrics, (size_t)w->id, tenant_gone,
                       (void *)tg_worker_runtime(w)->cfg, now);
  }
  for (c = w->calls; c != NULL; c = next) {
    next = c->next;
    if (c->wq != NULL && now >= c->q_deadline) {
      queue_leave(c, 0);
      shed(c, "queue_timeout",
           "every endpoint of this model stayed at capacity for the queue timeout; retry shortly");
      continue;
    }
    if (c->wq != NULL && (lost = key_lost(c)) != NULL) {
      queue_leave(c, 0);
      call_error(c, 401, "authentication_error", "invalid_api_key", lost);
      continue;
    }
    if (c->deadline_kind == DL_NONE || now < c->deadline)
      continue;
    tg_endpoint_error(c->ep, TG_UPERR_TIMEOUT);
    call_drop_attempt(c);
    if (c->relayed) {
      c->status = 502;
      c->err_code = "upstream_idle_timeout";
      call_close(c, FIN_ABORT);
    } else {
      call_error(c, 504, "server_error", "upstream_timeout",
                 c->deadline_kind == DL_FIRST_BYTE
                     ? "the upstream did not answer in time"
                     : "the upstream stopped sending in the middle of its answer");
    }
  }
}

/* ---- request parsing and authentication -------------------------------- */

/* The value of header lname (lower case), or NULL; *dup is set when it
 * appears more than once. */
static const char *header_once(const tg_http_req_t *req, const char *lname, int *dup) {
  const char *v = NULL;
  for (size_t i = 0; i < req->n_headers; i++)
    if (strcmp(req->headers[i].name, lname) == 0) {
      if (v != NULL)
        *dup = 1;
      else
        v = req->headers[i].value;
    }
  return v;
}

const char *tg_api_credentials(const tg_http_req_t *req, const char **key) {
  int dup = 0;
  const char *auth = header_once(req, "authorization", &dup);
  const char *xkey = header_once(req, "x-api-key", &dup);
  const char *bearer = NULL;

  *key = NULL;
  (void)header_once(req, "x-tenant-id", &dup);
  if (dup)
    return "Authorization, X-Api-Key and X-Tenant-Id may each appear once";
  /* "Bearer" with no token is a Bearer key that is empty: missing alone,
   * and ambiguous next to an X-Api-Key, as an empty X-Api-Key next to a
   * Bearer key is */
  if (auth != NULL && strncasecmp(auth, "Bearer", 6) == 0 &&
      (auth[6] == ' ' || auth[6] == '\t' || auth[6] == '\0')) {
    bearer = auth + 6;
    while (*bearer == ' ' || *bearer == '\t')
      bearer++;
  }
  if (bearer != NULL && xkey != NULL && strcmp(bearer, xkey) != 0)
    return "Authorization and X-Api-Key carry different keys";
  /* Another scheme (a front proxy's Basic, say) leaves X-Api-Key to name
   * the key; alone, its value is judged as a key (and a bare key passes). */
  *key = bearer ? bearer : xkey ? xkey : auth;
  return NULL;
}

/* Resolves the caller into c->tenant and *rec. Returns 0, or refuses the
 * request (401), which finishes the call, and returns -1. */
static int authenticate(tg_call_t *c, const tg_key_rec_t **rec) {
  const tg_keyset_t *ks = tg_worker_keys(c->w);
  const char *key, *claimed, *bad = tg_api_credentials(c->req, &key);
  tg_key_verdict_t v;

  if (bad != NULL) {
    call_refuse(c, 400, "invalid_request_error", "ambiguous_credentials", NULL, "%s", bad);
    return -1;
  }
  if (key == NULL || *key == '\0') {
    call_refuse(c, 401, "authentication_error", "missing_api_key",
                "WWW-Authenticate: Bearer\r\n",
                "no API key: send Authorization: Bearer <key> or X-Api-Key");
    return -1;
  }
  *rec = NULL;
  v = ks ? tg_keyset_verify(ks, key, strlen(key), (int64_t)time(NULL), rec)
         : TG_KEY_UNKNOWN;
  if (*rec != NULL)
    memcpy(c->key_id, (*rec)->id, sizeof(c->key_id));
  if (v != TG_KEY_OK) {
    call_refuse(c, 401, "authentication_error", "invalid_api_key",
                "WWW-Authenticate: Bearer\r\n", "invalid API key (%s)",
                v == TG_KEY_REVOKED ? "revoked" : v == TG_KEY_EXPIRED ? "expired" : "unknown");
    return -1;
  }
  claimed = tg_http_req_header(c->req, "x-tenant-id");
  if (claimed != NULL && strcmp(claimed, (*rec)->tenant) != 0) {
    call_refuse(c, 401, "authentication_error", "tenant_mismatch", NULL,
                "X-Tenant-Id does not match the tenant of this API key");
    return -1;
  }
  c->tenant = tg_config_tenant(c->rt->cfg, (*rec)->tenant);
  if (c->tenant == NULL) {
    call_refuse(c, 401, "authentication_error", "invalid_api_key", NULL,
                "the tenant of this API key is not configured");
    return -1;
  }
  return 0;
}

static int may_use(const tg_tenant_cfg_t *t, const tg_key_rec_t *k, const char *model) {
  return tg_tenant_allows(t, model) && tg_key_allows_model(k, model);
}

/* A model as /v1/models lists it and /v1/models/{model} answers it. */
static json_t *model_object(const tg_model_cfg_t *m) {
  return json_pack("{s:s,s:s,s:i,s:s}", "id", m->name, "object", "model", "created", 0,
                   "owned_by", "tollgate");
}

/* Answers 200 with root (taken) and finishes the call. */
static void respond_json(tg_call_t *c, json_t *root) {
  char *text = root != NULL ? json_dumps(root, JSON_COMPACT) : NULL;
  char hdr[96];

  json_decref(root);
  if (text == NULL) {
    call_refuse(c, 500, "server_error", "internal_error", NULL, "out of memory");
    return;
  }
  snprintf(hdr, sizeof(hdr), "x-request-id: %s\r\n", c->request_id);
  c->status = 200;
  tg_http_respond(c->req, 200, "application/json", hdr, text, strlen(text));
  free(text);
  call_finish(c);
}

static void list_models(tg_call_t *c, const tg_key_rec_t *rec) {
  const tg_config_t *cfg = c->rt->cfg;
  json_t *root, *data;
  size_t i;

  root = json_object();
  data = json_array();
  json_object_set_new(root, "object", json_string("list"));
  for (i = 0; i < cfg->n_models; i++) {
    const tg_model_cfg_t *m = &cfg->models[i];
    if (!may_use(c->tenant, rec, m->name))
      continue;
    json_array_append_new(data, model_object(m));
  }
  json_object_set_new(root, "data", data);
  respond_json(c, root);
}

/* GET /v1/models/{model}: the model as the list shows it, refused as a
 * completion naming it is (404 unknown, 403 not the caller's). */
static void retrieve_model(tg_call_t *c, const tg_key_rec_t *rec, const char *name) {
  const tg_model_cfg_t *m = tg_config_model(c->rt->cfg, name);

  if (m == NULL) {
    call_refuse(c, 404, "invalid_request_error", "model_not_found", NULL,
                "the model '%.200s' does not exist", name);
    return;
  }
  if (!may_use(c->tenant, rec, m->name)) {
    call_refuse(c, 403, "permission_error", "model_not_allowed", NULL,
                "this API key may not use the model '%s'", m->name);
    return;
  }
  respond_json(c, model_object(m));
}

/* The model a "/v1/models/{model}" path names, percent-decoded into buf
 * (the official clients send a '/' of a name as %2F); NULL when path is
 * not one, or names nothing, or does not decode (a bad escape, a NUL, a
 * name longer than buf). */
static const char *model_in_path(const char *path, char *buf, size_t size) {
  static const char prefix[] = "/v1/models/";
  const char *p;

  if (strncmp(path, prefix, sizeof(prefix) - 1) != 0)
    return NULL;
  p = path + sizeof(prefix) - 1;
  if (*p == '\0' || tg_pct_decode(buf, size, p, strlen(p), 1) < 0)
    return NULL;
  return buf;
}

/* Forwards the configured client headers and names the request upstream.
 * The fixed lines are static or in the call; only forwarded ones are
 * allocated (a value is as long as the client's header bound allows). */
static int build_upstream_headers(tg_call_t *c) {
  const tg_config_t *cfg = c->rt->cfg;
  tg_sb_t b;
  size_t i;

  tg_sb_init(&b, c->rid_line, sizeof(c->rid_line));
  tg_sb_lit(&b, "X-Request-Id: ");
  tg_sb_puts(&b, c->request_id);
  if (b.err)
    return TG_ETOOBIG; /* cannot happen: ids are 31 bytes at most */
  c->n_hdr_lines = 0;
  c->hdr_lines[c->n_hdr_lines++] = "Content-Type: application/json";
  c->hdr_lines[c->n_hdr_lines++] = "Expect:";
  c->hdr_lines[c->n_hdr_lines++] = c->rid_line;
  for (i = 0; i < cfg->n_forward_headers && c->n_hdr_owned < MAX_FWD_HEADERS; i++) {
    const char *name = cfg->forward_headers[i];
    const char *v = tg_http_req_header(c->req, name);
    size_t nl, vl;
    char *line;
    if (v == NULL)
      continue;
    nl = strlen(name);
    vl = strlen(v);
    line = malloc(nl + 2 + vl + 1);
    if (line == NULL)
      return TG_ENOMEM;
    memcpy(line, name, nl);
    memcpy(line + nl, ": ", 2);
    memcpy(line + nl + 2, v, vl + 1);
    c->hdr_owned[c->n_hdr_owned++] = line;
    c->hdr_lines[c->n_hdr_lines++] = line;
  }
  c->hdr_lines[c->n_hdr_lines] = NULL;
  return 0;
}

/* Bytes of prompt text in a content value: a string, an array of strings,
 * of token ids (one each) or of parts with "text". Tokens never outnumber
 * the bytes they were cut from, so this bounds the prompt from above. A
 * part of another type (image_url, input_audio, video_url, ...) counts the
 * model's media_tokens: its tokens depend on the model and the picture's
 * size, not on the bytes that carry it. */
static int64_t text_bytes(const cJSON *v, int64_t media) {
  int64_t n = 0;
  const cJSON *e, *type;

  if (cJSON_IsString(v))
    return (int64_t)strlen(v->valuestring); /* no NUL inside: tg_json_parse */
  if (cJSON_IsNumber(v))
    return 1;
  if (cJSON_IsObject(v)) {
    type = tg_json_get(v, "type");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "text") != 0 &&
        strcmp(type->valuestring, "refusal") != 0)
      return media;
    return text_bytes(tg_json_get(v, "text"), media);
  }
  if (cJSON_IsArray(v))
    cJSON_ArrayForEach(e, v) {
      if (cJSON_IsArray(e))
        n += (int64_t)cJSON_GetArraySize(e); /* a list of token ids */
      else
        n += text_bytes(e, media);
    }
  return n;
}

/* The members of a request body the gateway reads, found in one walk over
 * the object (tg_json_parse has made sure no key appears twice). */
typedef struct {
  const cJSON *model, *messages, *prompt, *input, *max_completion_tokens, *max_tokens,
      *n, *best_of, *stream, *stream_options, *priority, *cache_salt, *kv_transfer_params,
      *vllm_xargs, *chat_template;
} body_fields_t;

static void body_fields(const cJSON *root, body_fields_t *f) {
  const cJSON *e;
  memset(f, 0, sizeof(*f));
  cJSON_ArrayForEach(e, root) {
    const char *k = e->string;
    switch (k[0]) {
    case 'm':
      if (strcmp(k, "model") == 0) f->model = e;
      else if (strcmp(k, "messages") == 0) f->messages = e;
      else if (strcmp(k, "max_tokens") == 0) f->max_tokens = e;
      else if (strcmp(k, "max_completion_tokens") == 0) f->max_completion_tokens = e;
      break;
    case 'n':
      if (strcmp(k, "n") == 0) f->n = e;
      break;
    case 'b':
      if (strcmp(k, "best_of") == 0) f->best_of = e;
      break;
    case 'k':
      if (strcmp(k, "kv_transfer_params") == 0) f->kv_transfer_params = e;
      break;
    case 'v':
      if (strcmp(k, "vllm_xargs") == 0) f->vllm_xargs = e;
      break;
    case 'p':
      if (strcmp(k, "prompt") == 0) f->prompt = e;
      else if (strcmp(k, "priority") == 0) f->priority = e;
      break;
    case 'i':
      if (strcmp(k, "input") == 0) f->input = e;
      break;
    case 'c':
      if (strcmp(k, "cache_salt") == 0) f->cache_salt = e;
      else if (strcmp(k, "chat_template") == 0) f->chat_template = e;
      break;
    case 's':
      if (strcmp(k, "stream") == 0) f->stream = e;
      else if (strcmp(k, "stream_options") == 0) f->stream_options = e;
      break;
    default:
      break;
    }
  }
}

/* How many completions the upstream may write: `n` for each prompt (or
 * `best_of`, when larger: an upstream that supports it generates that many
 * and returns the best n), and a /v1/completions prompt that is a list of
 * prompts (strings or lists of token ids, not one list of token ids) has a
 * set for each. */
static int64_t completions(const tg_call_t *c, const body_fields_t *f) {
  const cJSON *e;
  int64_t n, best, prompts = 0;

  if (!tg_json_int(f->n, &n) || n < 1)
    n = 1; /* absent, or a value the upstream refuses */
  if (tg_json_int(f->best_of, &best) && best > n)
    n = best;
  if (strcmp(c->path, "/v1/completions") == 0 && cJSON_IsArray(f->prompt))
    cJSON_ArrayForEach(e, f->prompt) {
      if (cJSON_IsNumber(e)) {
        prompts = 0; /* one prompt given as token ids */
        break;
      }
      prompts++;
    }
  if (prompts > 1 && n > INT64_MAX / prompts)
    return INT64_MAX;
  return prompts > 1 ? n * prompts : n;
}

/* The completion cap the upstream applies, as vLLM reads it: on chat
 * `max_completion_tokens` when it is set and not 0, else `max_tokens`;
 * /v1/completions knows only `max_tokens`. 0 when the request states none
 * the upstream would take (absent, null, 0, negative: refused upstream). */
static int64_t stated_max_tokens(const tg_call_t *c, const body_fields_t *f) {
  int64_t mt;
  if (strcmp(c->path, "/v1/chat/completions") == 0 &&
      tg_json_int(f->max_completion_tokens, &mt) && mt != 0)
    return mt > 0 ? mt : 0;
  return tg_json_int(f->max_tokens, &mt) && mt > 0 ? mt : 0;
}

/* A bound of the prompt text a JSON value can render to: the bytes of its
 * strings and keys, a number's digits (24 for one with a fraction or an
 * exponent), 5 for a literal. */
static int64_t json_text_bytes(const cJSON *v) {
  const cJSON *e;
  int64_t n = 0;

  if (cJSON_IsString(v))
    return (int64_t)strlen(v->valuestring);
  if (cJSON_IsNumber(v)) {
    double d = v->valuedouble;
    if (d != floor(d) || fabs(d) >= 1e15)
      return 24;
    n = d < 0 ? 2 : 1;
    for (d = fabs(d); d >= 10; d = floor(d / 10))
      n++;
    return n;
  }
  if (cJSON_IsObject(v) || cJSON_IsArray(v)) {
    cJSON_ArrayForEach(e, v) {
      n += (cJSON_IsObject(v) ? (int64_t)strlen(e->string) : 0) + json_text_bytes(e);
    }
    return n;
  }
  return 5;
}

/* 1 for a request member that no upstream renders into the prompt: the
 * model, the counts and sampling parameters, the gateway's own. Every other
 * member (tools, functions, documents, a suffix, chat_template_kwargs, one
 * this list does not know) counts its text in the prompt estimate. */
static int not_rendered(const char *k) {
  static const char *const names[] = {
      "model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens", "n",
      "best_of", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "seed",
      "stop", "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty",
      "length_penalty", "logprobs", "top_logprobs", "logit_bias", "user", "cache_salt",
      "priority", "echo", "ignore_eos", "min_tokens", "skip_special_tokens",
      "spaces_between_special_tokens", "include_stop_str_in_output", "add_generation_prompt",
      "continue_final_message", "add_special_tokens", "parallel_tool_calls", "tool_choice",
      "encoding_format", "dimensions", "truncate_prompt_tokens", "request_id",
      "return_tokens_as_token_ids", "response_format", "guided_json", "guided_regex",
      "guided_choice", "guided_grammar", "structured_outputs"};
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
    if (strcmp(k, names[i]) == 0)
      return 1;
  return 0;
}

/* The strings of a list of prompts or inputs: each is tokenized on its
 * own, with the model's special tokens (a BOS; an embedding model's CLS
 * and SEP), so each adds a few tokens its bytes do not bound (a list of
 * 2,048 empty strings is 2,048 to 4,096 tokens, none of them a byte). A
 * list of token ids goes to the model as it is. */
static int64_t list_strings(const cJSON *v) {
  const cJSON *e;
  int64_t n = 0;

  if (cJSON_IsArray(v))
    cJSON_ArrayForEach(e, v) {
      n += cJSON_IsString(e);
    }
  return n;
}

/* The completion limit of a request that states none: the model's cap for
 * a chat, and for a completion the API's default of 16 (which vLLM's
 * completions also apply), below the cap. */
static int64_t default_max_tokens(const tg_call_t *c) {
  if (strcmp(c->path, "/v1/completions") == 0 && c->model->max_tokens > 16)
    return 16;
  return c->model->max_tokens;
}

/* 1 when the body has no completion limit at all (absent or null, or on
 * chat a max_completion_tokens of 0, which vLLM reads as none): the
 * upstream would then write up to its context's end, past what was
 * reserved, so the reserved limit is sent with the request. A max_tokens
 * of 0 or below, or a negative max_completion_tokens, is the client's own
 * and goes as it is (vLLM refuses it). */
static int states_no_max_tokens(const tg_call_t *c, const body_fields_t *f) {
  int64_t mct;
  if (f->max_tokens != NULL && !cJSON_IsNull(f->max_tokens))
    return 0;
  return strcmp(c->path, "/v1/chat/completions") != 0 || f->max_completion_tokens == NULL ||
         cJSON_IsNull(f->max_completion_tokens) ||
         (tg_json_int(f->max_completion_tokens, &mct) && mct == 0);
}

/* The prompt estimate (from above) and the completion tokens to reserve:
 * max_tokens for every completion the request asks for. The prompt: the
 * bytes of the messages' contents (the model's media_tokens for a picture,
 * sound or video part), of `prompt` and `input`, plus the text of every
 * other member an upstream may render into the prompt (a message's tool
 * calls, name or reasoning; the request's tools, documents, suffix...), and
 * a few tokens a message and a request for the chat template, and a string
 * of a list of prompts or inputs for its special tokens. */
static void estimate(tg_call_t *c, const cJSON *root, const body_fields_t *f) {
  const cJSON *m, *e;
  int64_t est = 8, max_tokens = 0, mt, k, media = c->model->media_tokens;

  if (cJSON_IsArray(f->messages)) {
    cJSON_ArrayForEach(m, f->messages) {
      est += 8 + text_bytes(tg_json_get(m, "content"), media);
      if (cJSON_IsObject(m))
        cJSON_ArrayForEach(e, m) {
          if (strcmp(e->string, "role") != 0 && strcmp(e->string, "content") != 0)
            est += (int64_t)strlen(e->string) + json_text_bytes(e);
        }
    }
  }
  est += text_bytes(f->prompt, media) + 8 * list_strings(f->prompt);
  est += text_bytes(f->input, media) + 8 * list_strings(f->input);
  cJSON_ArrayForEach(e, root) {
    if (!not_rendered(e->string))
      est += (int64_t)strlen(e->string) + json_text_bytes(e);
  }
  c->prompt_estimate = est;

  if (!is_embeddings(c)) { /* the model's kind is the path's (parse_body) */
    mt = stated_max_tokens(c, f);
    max_tokens = mt > 0 ? mt : default_max_tokens(c);
    if (states_no_max_tokens(c, f))
      c->send_max_tokens = max_tokens;
    k = completions(c, f);
    max_tokens = max_tokens > INT64_MAX / k ? INT64_MAX : max_tokens * k;
  }
  c->admit.reserve.tokens = max_tokens < INT64_MAX - est ? est + max_tokens : INT64_MAX;
  c->admit.reserve.cost = tg_money_cost(est, c->model->prompt_nano_per_token);
  if (c->admit.reserve.cost < INT64_MAX - tg_money_cost(max_tokens, c->model->completion_nano_per_token))
    c->admit.reserve.cost += tg_money_cost(max_tokens, c->model->completion_nano_per_token);
  else
    c->admit.reserve.cost = INT64_MAX;
}

/* What the upstream's copy of a body gets: "stream_options":
 * {"include_usage":true} for a stream whose client did not ask for usage,
 * the tenant's "cache_salt" in place of any the client sent, the reserved
 * "max_tokens" when the body states no limit, and its media uuids in the
 * tenant's namespace. */
typedef struct {
  int usage, has_options; /* add include_usage; the body has stream_options */
  const char *salt;       /* NULL: leave cache_salt alone */
  int has_salt;           /* the body has a cache_salt of its own */
  int64_t max_tokens;     /* > 0: set "max_tokens" */
  int has_max_tokens;     /* the body has "max_tokens" (null) */
  const char *uuid_ns;    /* NULL: leave media uuids alone */
  size_t uuids;           /* media uuids (strings) in the body's messages */
} rewrite_t;

/* A media item's "uuid" is read by vLLM on each object of a message's
 * "content" array: it keys the multimodal caches in place of the item's
 * content hash, whatever the cache_salt, so a tenant's uuids go upstream
 * in its own namespace (docs/decisions.md).
 *
 * Counts the string uuids of messages' content parts in *n. Returns 0,
 * or -1 when one is neither a string nor null. */
static int count_media_uuids(const cJSON *messages, size_t *n) {
  const cJSON *m, *p;

  *n = 0;
  if (!cJSON_IsArray(messages))
    return 0;
  cJSON_ArrayForEach(m, messages) {
    const cJSON *content = tg_json_get(m, "content");
    if (!cJSON_IsArray(content))
      continue;
    cJSON_ArrayForEach(p, content) {
      const cJSON *u = tg_json_get(p, "uuid");
      if (u == NULL || cJSON_IsNull(u))
        continue;
      if (!cJSON_IsString(u))
        return -1;
      (*n)++;
    }
  }
  return 0;
}

/* Puts every string uuid of root's messages' content parts in namespace
 * ns ("<ns>:<uuid>"), as count_media_uuids found them. */
static int namespace_media_uuids(json_t *root, const char *ns) {
  json_t *messages = json_object_get(root, "messages"), *m, *p;
  size_t i, j, nl = strlen(ns);

  json_array_foreach(messages, i, m) {
    json_t *content = json_object_get(m, "content");
    json_array_foreach(content, j, p) {
      json_t *u = json_object_get(p, "uuid");
      size_t vl;
      char *text;
      int r;
      if (!json_is_string(u))
        continue;
      vl = json_string_length(u);
      text = malloc(nl + 1 + vl);
      if (text == NULL)
        return TG_ENOMEM;
      memcpy(text, ns, nl);
      text[nl] = ':';
      memcpy(text + nl + 1, json_string_value(u), vl);
      r = json_string_setn_nocheck(u, text, nl + 1 + vl);
      free(text);
      if (r < 0)
        return TG_ENOMEM;
    }
  }
  return 0;
}

/* The body rewritten as w says, in *out (malloc'd, NUL-terminated). When
 * no member to set is in the body already, the members are spliced in
 * before the closing brace, so every other byte goes upstream as the
 * client sent it; otherwise the body is rewritten through jansson, which
 * keeps each number's exact value. Returns 0, TG_ENOMEM, or TG_EPARSE for
 * a number jansson refuses where cJSON was lenient ("01", "1."). */
static int rewrite_body(const char *body, size_t len, const rewrite_t *w, char **out,
                        size_t *out_len) {
  static const char usage[] = ",\"stream_options\":{\"include_usage\":true}";
  static const char salt_key[] = ",\"cache_salt\":\"";
  const char *end = body + len;
  json_error_t jerr;
  json_t *root, *so;

  if (!(w->usage && w->has_options) && !(w->salt != NULL && w->has_salt) &&
      !(w->max_tokens > 0 && w->has_max_tokens) && !(w->uuid_ns != NULL && w->uuids > 0)) {
    size_t n, cap;
    while (end > body && end[-1] != '}')
      end--; /* trailing whitespace; the root is an object with "model" */
    if (end == body)
      return TG_EPARSE;
    end--;
    n = (size_t)(end - body);
    cap = n + sizeof(usage) + sizeof(salt_key) + TG_CACHE_SALT_LEN + 40;
    *out = malloc(cap);
    if (*out == NULL)
      return TG_ENOMEM;
    memcpy(*out, body, n);
    if (w->usage) {
      memcpy(*out + n, usage, sizeof(usage) - 1);
      n += sizeof(usage) - 1;
    }
    if (w->salt != NULL) {
      size_t sl = strlen(w->salt);
      memcpy(*out + n, salt_key, sizeof(salt_key) - 1);
      n += sizeof(salt_key) - 1;
      memcpy(*out + n, w->salt, sl);
      n += sl;
      (*out)[n++] = '"';
    }
    if (w->max_tokens > 0)
      n += (size_t)snprintf(*out + n, cap - n, ",\"max_tokens\":%lld", (long long)w->max_tokens);
    memcpy(*out + n, "}", 2);
    *out_len = n + 1;
    return 0;
  }
  root = json_loadb(body, len, 0, &jerr);
  if (root == NULL)
    return json_error_code(&jerr) == json_error_out_of_memory ? TG_ENOMEM : TG_EPARSE;
  if (w->usage) {
    so = json_object_get(root, "stream_options");
    if (!json_is_object(so)) {
      so = json_object();
      json_object_set_new(root, "stream_options", so);
    }
    json_object_set_new(so, "include_usage", json_true());
  }
  if (w->salt != NULL)
    json_object_set_new(root, "cache_salt", json_string(w->salt));
  if (w->max_tokens > 0)
    json_object_set_new(root, "max_tokens", json_integer((json_int_t)w->max_tokens));
  if (w->uuid_ns != NULL && w->uuids > 0 && namespace_media_uuids(root, w->uuid_ns) < 0) {
    json_decref(root);
    return TG_ENOMEM;
  }
  *out = json_dumps(root, JSON_COMPACT);
  json_decref(root);
  if (*out == NULL)
    return TG_ENOMEM;
  *out_len = strlen(*out);
  return 0;
}

/* The name of the first member the gateway reads for policy whose type is
 * not the one it reads, or NULL. The upstream (vLLM's pydantic models, in
 * their lax mode) coerces such values where the gateway would not:
 * "stream": "true" or 1 streams an answer the gateway takes for a whole
 * one (it cannot read its usage, so the work went unbilled), and "n": "4"
 * or "max_completion_tokens": "4096" writes more than was reserved. */
static const char *mistyped_field(const body_fields_t *f) {
  int64_t v;
  if (f->stream != NULL && !cJSON_IsBool(f->stream) && !cJSON_IsNull(f->stream))
    return "stream";
  if (f->stream_options != NULL && !cJSON_IsNull(f->stream_options)) {
    /* "continuous_usage_stats": "true" would pass the refusal below and
     * be read as true upstream; "include_usage": 1 would get the client a
     * usage chunk the gateway then takes away */
    static const char *const opt[] = {"include_usage", "continuous_usage_stats"};
    static const char *const name[] = {"stream_options.include_usage",
                                       "stream_options.continuous_usage_stats"};
    if (!cJSON_IsObject(f->stream_options))
      return "stream_options";
    for (size_t i = 0; i < sizeof opt / sizeof opt[0]; i++) {
      const cJSON *o = tg_json_get(f->stream_options, opt[i]);
      if (o != NULL && !cJSON_IsBool(o) && !cJSON_IsNull(o))
        return name[i];
    }
  }
  if (f->n != NULL && !cJSON_IsNull(f->n) && !tg_json_int(f->n, &v))
    return "n";
  if (f->max_tokens != NULL && !cJSON_IsNull(f->max_tokens) && !tg_json_int(f->max_tokens, &v))
    return "max_tokens";
  if (f->max_completion_tokens != NULL && !cJSON_IsNull(f->max_completion_tokens) &&
      !tg_json_int(f->max_completion_tokens, &v))
    return "max_completion_tokens";
  return NULL;
}

/* 1 when the body leaves the upstream's scheduling order alone: no
 * "priority", or the default 0. vLLM's priority scheduling serves a lower
 * value first among the requests it has waiting, whatever their tenant, so
 * a client's own value would put it ahead of every other tenant's requests
 * there, past the gateway's fair queue. (vLLM without priority scheduling
 * refuses any other value anyway.) */
static int client_priority_ok(const cJSON *v) {
  int64_t p;
  return v == NULL || cJSON_IsNull(v) || (tg_json_int(v, &p) && p == 0);
}

/* Reads what policy needs from the body and asks the upstream for usage on
 * streams. Returns 0, or refuses the request (finishing the call) and
 * returns -1. */
static int parse_body(tg_call_t *c, const tg_key_rec_t *rec) {
  tg_http_req_t *req = c->req;
  cJSON *root;
  const cJSON *model;
  const char *bad;
  body_fields_t f;
  rewrite_t w = {0};
  tg_json_err_t jerr;
  int rc = -1;

  root = tg_json_parse(req->body, req->body_len, 1, &jerr);
  if (root == NULL) {
    call_refuse(c, 400, "invalid_request_error", "invalid_json", NULL,
                "the request body is not valid JSON: %s (byte %zu)", jerr.why, jerr.at);
    goto out;
  }
  if (!cJSON_IsObject(root)) {
    call_refuse(c, 400, "invalid_request_error", "invalid_json", NULL,
                "the request body is not a JSON object");
    goto out;
  }
  body_fields(root, &f);
  model = f.model;
  if (!cJSON_IsString(model) || model->valuestring[0] == '\0') {
    call_refuse(c, 400, "invalid_request_error", "missing_model", NULL,
                "the request must name a model (a non-empty string)");
    goto out;
  }
  c->model = tg_config_model(c->rt->cfg, model->valuestring);
  if (c->model == NULL) {
    call_refuse(c, 404, "invalid_request_error", "model_not_found", NULL,
                "the model '%.200s' does not exist", model->valuestring);
    goto out;
  }
  if (!may_use(c->tenant, rec, c->model->name)) {
    call_refuse(c, 403, "permission_error", "model_not_allowed", NULL,
                "this API key may not use the model '%s'", c->model->name);
    goto out;
  }
  if ((bad = mistyped_field(&f)) != NULL) {
    call_refuse(c, 400, "invalid_request_error", "invalid_type", NULL,
                "'%s' must be %s", bad,
                strcmp(bad, "stream_options") == 0  ? "an object"
                : strncmp(bad, "stream", 6) == 0    ? "a boolean"
                                                    : "an integer");
    goto out;
  }
  /* the namespace of the tenant's media uuids (below): every model whose
   * requests get the tenant's cache_salt, and its embeddings */
  w.uuid_ns = c->model->cache_salt == TG_CACHE_SALT_TENANT
                  ? c->rt->salts[c->tenant - c->rt->cfg->tenants]
                  : NULL;
  if (w.uuid_ns != NULL && count_media_uuids(f.messages, &w.uuids) < 0) {
    call_refuse(c, 400, "invalid_request_error", "invalid_type", NULL,
                "'messages[].content[].uuid' must be a string or null");
    goto out;
  }
  if (!client_priority_ok(f.priority)) {
    call_refuse(c, 400, "invalid_request_error", "unsupported_parameter", NULL,
                "'priority' may not be set: the gateway orders requests across tenants "
                "by their priority class");
    goto out;
  }
  if (f.kv_transfer_params != NULL || f.vllm_xargs != NULL || f.chat_template != NULL) {
    /* kv_transfer_params names KV blocks and hosts of a disaggregated
     * deployment every tenant shares; vllm_xargs hands arbitrary arguments
     * to the upstream's plugins; a chat template of the client's own can
     * render a prompt of any size from a few bytes, past any estimate the
     * limits reserve: none is a tenant's to set */
    call_refuse(c, 400, "invalid_request_error", "unsupported_parameter", NULL,
                "'%s' may not be set through the gateway",
                f.kv_transfer_params != NULL ? "kv_transfer_params"
                : f.vllm_xargs != NULL       ? "vllm_xargs"
                                             : "chat_template");
    goto out;
  }
  if (cJSON_IsTrue(tg_json_get(f.stream_options, "continuous_usage_stats"))) {
    /* vLLM then puts a usage on every chunk, each choice's own when n > 1:
     * a stream cut before its last usage could not be billed exactly, and
     * a client that declined usage would get it anyway */
    call_refuse(c, 400, "invalid_request_error", "unsupported_parameter", NULL,
                "'stream_options.continuous_usage_stats' may not be set through the gateway: "
                "ask for 'include_usage' (the stream's total comes last)");
    goto out;
  }
  if ((c->model->kind == TG_MODEL_EMBEDDING) != is_embeddings(c)) {
    call_refuse(c, 400, "invalid_request_error", "model_not_supported", NULL,
                "the model '%s' is %s model: use %s", c->model->name,
                c->model->kind == TG_MODEL_EMBEDDING ? "an embedding" : "a chat",
                c->model->kind == TG_MODEL_EMBEDDING
                    ? "/v1/embeddings"
                    : "/v1/chat/completions or /v1/completions");
    goto out;
  }
  c->pool = tg_runtime_pool(c->rt, c->model);
  estimate(c, root, &f);
  /* embeddings never stream: the upstream ignores "stream" there and
   * answers with one JSON object, whose usage is read as such */
  c->stream = cJSON_IsTrue(f.stream) && !is_embeddings(c);
  c->body = req->body;
  c->body_len = req->body_len;
  if (c->stream)
    c->client_usage = cJSON_IsTrue(tg_json_get(f.stream_options, "include_usage"));
  w.usage = c->stream && !c->client_usage;
  w.has_options = f.stream_options != NULL;
  /* embeddings too: vLLM keeps a prefix cache for embedding models (on by
   * default for some) and its pooling requests take a cache_salt */
  w.salt = w.uuid_ns;
  w.has_salt = f.cache_salt != NULL;
  w.max_tokens = c->send_max_tokens;
  w.has_max_tokens = f.max_tokens != NULL;
  if (w.usage || w.salt != NULL || w.max_tokens > 0 || w.uuids > 0) {
    int r = rewrite_body(req->body, req->body_len, &w, &c->body_owned, &c->body_len);
    if (r == TG_EPARSE) {
      call_refuse(c, 400, "invalid_request_error", "invalid_json", NULL,
                  "the request body is not valid JSON (a number's form)");
      goto out;
    }
    if (r < 0) {
      call_refuse(c, 500, "server_error", "internal_error", NULL, "out of memory");
      goto out;
    }
    c->body = c->body_owned;
  }
  rc = 0;
out:
  tg_json_free(root);
  return rc;
}

static const char *upstream_path(const char *path) {
  if (strcmp(path, "/v1/chat/completions") == 0) return "/v1/chat/completions";
  if (strcmp(path, "/v1/completions") == 0) return "/v1/completions";
  if (strcmp(path, "/v1/embeddings") == 0) return "/v1/embeddings";
  return NULL;
}

/* "850ms", "12s", "2m5s": how long until a limit frees up, in the form the
 * OpenAI API uses in x-ratelimit-reset-*. */
static void put_reset(tg_sb_t *b, int64_t ms) {
  int64_t s;
  if (ms < 0)
    ms = 0;
  if (ms < 1000) {
    tg_sb_puti(b, ms);
    tg_sb_lit(b, "ms");
    return;
  }
  s = (ms + 999) / 1000;
  if (s >= 60) {
    tg_sb_puti(b, s / 60);
    tg_sb_lit(b, "m");
  }
  tg_sb_puti(b, s < 60 ? s : s % 60);
  tg_sb_lit(b, "s");
}

/* "x-ratelimit-limit-<what>: ...", remaining and reset: one limit's lines. */
static void put_rl(tg_sb_t *b, const char *what, int64_t limit, int64_t remaining,
                   int64_t reset_ms) {
  tg_sb_lit(b, "x-ratelimit-limit-");
  tg_sb_puts(b, what);
  tg_sb_lit(b, ": ");
  tg_sb_puti(b, limit);
  tg_sb_lit(b, "\r\nx-ratelimit-remaining-");
  tg_sb_puts(b, what);
  tg_sb_lit(b, ": ");
  tg_sb_puti(b, remaining);
  tg_sb_lit(b, "\r\nx-ratelimit-reset-");
  tg_sb_puts(b, what);
  tg_sb_lit(b, ": ");
  put_reset(b, reset_ms);
  tg_sb_lit(b, "\r\n");
}

/* The x-ratelimit-* headers of a successful answer (limits the tenant
 * has; none when it has neither). Built on every admitted request. */
static void format_rl_headers(tg_call_t *c) {
  const tg_verdict_t *v = &c->admission.v;
  tg_sb_t b;

  tg_sb_init(&b, c->rl_headers, sizeof(c->rl_headers));
  if (v->limit_requests >= 0)
    put_rl(&b, "requests", v->limit_requests, v->remaining_requests, v->reset_requests_ms);
  if (v->limit_tokens >= 0)
    put_rl(&b, "tokens", v->limit_tokens, v->remaining_tokens, v->reset_tokens_ms);
  if (b.err)   /* cannot happen with int64 figures; never send half a line */
    c->rl_headers[0] = '\0';
}

/* The longest Retry-After a client should sleep through in its own retry
 * loop: every per-minute limit frees within a minute from a usual state. A
 * refusal that waits longer (one a budget also refused, so the wait runs to
 * the day's or month's end) says x-should-retry: false: the official
 * clients sleep whatever Retry-After says before retrying a 429, and would
 * hang in the call for hours; they raise at once instead, the Retry-After
 * still there for the caller. */
#define RETRY_SLEEP_MAX_S 60

static void refuse_by_policy(tg_call_t *c) {
  const tg_verdict_t *v = &c->admission.v;
  int64_t ms = v->retry_after_ms > 0 ? v->retry_after_ms : 1;
  int64_t secs = (ms + 999) / 1000;
  char extra[128];
  int status = 429;
  const char *type = "rate_limit_error", *what;

  /* Retry-After in whole seconds, rounded up; retry-after-ms, which the
   * official clients read first, the limiter's own wait, so a client
   * retries the moment the limit frees and not up to a second after */
  snprintf(extra, sizeof(extra), "Retry-After: %lld\r\nretry-after-ms: %lld\r\n%s",
           (long long)secs, (long long)ms,
           secs > RETRY_SLEEP_MAX_S ? "x-should-retry: false\r\n" : "");
  switch (v->refused) {
  case TG_LIMIT_GLOBAL: what = "the gateway's global request rate"; break;
  case TG_LIMIT_CONCURRENCY: what = "concurrent requests"; break;
  case TG_LIMIT_REQUESTS: what = "requests per minute"; break;
  case TG_LIMIT_TOKENS: what = "tokens per minute"; break;
  case TG_LIMIT_DAILY_BUDGET: what = "the daily budget"; status = 402; break;
  case TG_LIMIT_MONTHLY_BUDGET: what = "the monthly budget"; status = 402; break;
  default: what = "the limit state (unavailable)"; status = 503; break;
  }
  if (status == 402)
    type = "insufficient_quota";
  else if (status == 503)
    type = "server_error";
  c->status = status;
  c->err_code = status == 503 ? "state_unavailable" : tg_limit_detail(v->refused);
  tg_api_error(c->req, status, type, c->err_code, c->request_id, extra,
               "limit reached for tenant '%s': %s (%s); retry after %llds", c->tenant->name,
               what, tg_limit_detail(v->refused), (long long)secs);
  call_finish(c);
}

static void on_admitted(void *arg, const tg_admission_t *a) {
  tg_call_t *c = arg;

  c->admitting = 0;
  c->admission = *a;
  c->admitted = a->v.refused == TG_LIMIT_NONE;
  if (c->abandoned) {
    call_finish(c); /* settles nothing used; gives the lease back */
    return;
  }
  if (!c->admitted) {
    refuse_by_policy(c);
    return;
  }
  format_rl_headers(c);
  start_dispatch(c);
}

static void admit(tg_call_t *c) {
  const tg_tenant_cfg_t *t = c->tenant;
  tg_app_t *app = c->w->app;

  /* The ledger's write path is bounded: refuse new work before it is full,
   * so every request that runs can be recorded. */
  if (app->ledger != NULL && tg_ledger_backlog(app->ledger) >= app->ledger_refuse_at) {
    c->retry_after = "1";
    call_error(c, 503, "server_error", "ledger_backlog",
               "usage records are not being written fast enough; retry shortly");
    return;
  }

  c->admit.tenant = t->name;
  c->admit.limits.rpm = t->requests_per_minute;
  c->admit.limits.tpm = t->tokens_per_minute;
  c->admit.limits.concurrency = t->concurrent_requests;
  c->admit.limits.day_limit = t->daily_limit_nano;
  c->admit.limits.month_limit = t->monthly_limit_nano;
  c->admit.limits.alert_pct = t->alert_threshold_percent;
  c->admit.global_rps = c->rt->cfg->global_requests_per_second;
  c->admitting = 1;
  if (tg_policy_admit(c->w->policy, &c->admit, on_admitted, c) < 0) {
    c->admitting = 0;
    call_error(c, 500, "server_error", "internal_error", "out of memory");
  }
}

void tg_api_reject(tg_http_server_t *srv, int status, const char *code, uint64_t start_ns,
                   char *hdrs, size_t size) {
  tg_worker_t *w = tg_http_server_data(srv);
  tg_access_rec_t r;
  char rid[32];

  tg_api_request_id(w, rid, sizeof(rid));
  snprintf(hdrs, size, "x-request-id: %s\r\n", rid);
  memset(&r, 0, sizeof(r));
  r.request_id = rid;
  r.status = status;
  r.error = code;
  /* a 408 waited for client_request, a 413 may have read much of a body */
  r.duration_ms = start_ns != 0 ? (double)(now_ns() - start_ns) / 1e6 : 0;
  r.ttfb_ms = -1;
  tg_access_log(w->alog, &r);
}

void tg_api_handle(tg_http_req_t *req) {
  tg_worker_t *w = tg_http_server_data(req->server);
  const tg_key_rec_t *rec = NULL;
  int models;
  const char *model_id;
  char id_buf[512], path_buf[512];
  tg_call_t *c;

  tg_fault_stall("worker_stall"); /* tests of /healthz: this loop stuck */
  c = tg_recycle_alloc(&w->mem);
  if (c == NULL) {
    tg_api_error(req, 500, "server_error", "internal_error", NULL, NULL, "out of memory");
    return;
  }
  memset(c, 0, sizeof(*c));
  c->req = req;
  c->w = w;
  c->rt = tg_runtime_ref(tg_worker_runtime(w));
  c->t_start = req->start_ns;
  c->t_start_ms = tg_now_ms() - (int64_t)((now_ns() - req->start_ns) / 1000000);
  tg_api_request_id(w, c->request_id, sizeof(c->request_id));
  tg_sse_init(&c->sse, EVENT_MAX);
  call_link(c);

  models = strcmp(req->path, "/v1/models") == 0;
  model_id = model_in_path(req->path, id_buf, sizeof(id_buf));
  if (model_id != NULL) {
    /* the path as asked, for the log: the head goes once the answer is
     * queued, and the call is answered and logged before this returns */
    tg_str_copy(path_buf, sizeof(path_buf), req->path);
    c->path = path_buf;
    models = 1;
  } else {
    c->path = models ? "/v1/models" : upstream_path(req->path);
  }
  c->embeddings = c->path != NULL && strcmp(c->path, "/v1/embeddings") == 0;
  if (c->path == NULL) {
    /* logged as asked (JSON-escaped), so a scan of the API leaves a trace;
     * a copy, as the head goes once the answer is queued, and the call
     * is logged before call_refuse returns */
    char asked[512];
    tg_str_copy(asked, sizeof(asked), req->path);
    c->path = asked;
    call_refuse(c, 404, "invalid_request_error", "not_found", NULL,
                "unknown path '%.200s'", asked);
    return;
  }
  /* HEAD is served wherever GET is (RFC 9110 9.1): the HTTP layer sends
   * the head a GET gets, without its body. */
  if (models ? req->method != HTTP_GET && req->method != HTTP_HEAD
             : req->method != HTTP_POST) {
    /* a 405 names the methods the target allows (RFC 9110 15.5.6) */
    call_refuse(c, 405, "invalid_request_error", "method_not_allowed",
                models ? "Allow: GET, HEAD\r\n" : "Allow: POST\r\n",
                "use %s for %s", models ? "GET" : "POST", c->path);
    return;
  }
  if (authenticate(c, &rec) < 0)
    return;
  if (model_id != NULL) {
    retrieve_model(c, rec, model_id);
    return;
  }
  if (models) {
    list_models(c, rec);
    return;
  }
  if (parse_body(c, rec) < 0)
    return;
  if (build_upstream_headers(c) < 0) {
    call_error(c, 500, "server_error", "internal_error", "out of memory");
    return;
  }
  /* Every header the call needs is read or copied by now: the head's
   * buffer serves the next request while this one waits, streams or
   * waits for its ledger record. */
  tg_http_req_drop_head(req);
  req->data = c;
  req->on_abort = on_client_abort;
  req->on_drain = on_client_drain;
  admit(c);
}
