/* tollgate-sim: an OpenAI-compatible inference backend that answers like a
 * server doing continuous batching, without a model. It exists so tests,
 * benchmarks and the demo can drive the gateway with realistic timing,
 * capacity, usage numbers and faults.
 *
 * Pieces, one file each: buf.c (bounded text builder and JSON escaping),
 * api.c (request parsing and every JSON body), pool.c (the per-process
 * capacity of concurrent sequences and its FIFO of waiting requests),
 * seq.c (one admitted request's life: timers, streaming, faults, aborts),
 * main.c (options, worker threads, signals, /metrics and the router).
 *
 * Threads: one libuv loop per worker, each with its own HTTP server on the
 * shared port. A sequence lives on the loop of the connection that brought
 * it; the only shared mutable state is the pool (one mutex) and the per
 * worker counters (relaxed atomics, summed when /metrics is scraped). */
#ifndef TG_SIM_SIM_H
#define TG_SIM_SIM_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "http/server.h"

/* Hard bounds on what a request may ask for. */
#define TG__SIM_MAX_TOKENS 100000u      /* completion tokens per choice */
#define TG__SIM_MAX_CHOICES 16u         /* n times prompts in one request */
#define TG__SIM_MAX_INPUTS 2048u        /* embedding inputs per request */
#define TG__SIM_MAX_DELAY_MS 3600000u   /* ttft / token-ms overrides */
#define TG__SIM_MAX_MODELS 64u
#define TG__SIM_MAX_NAME 256u           /* a model name */
#define TG__SIM_MAX_DIM 65536u          /* embedding dimensions */
#define TG__SIM_MAX_BODY (64u << 20)    /* any response body we build */

/* ---- buf.c: a growable text buffer with a hard maximum ---------------- */

typedef struct {
  char *p;    /* NUL-terminated while len < cap */
  size_t len;
  size_t cap;
  size_t max; /* appends that would pass it fail with TG_ETOOBIG */
  int err;    /* first error; later appends are no-ops */
} tg__sim_buf_t;

/* Starts an empty buffer that may grow to max bytes. Never fails. */
void tg__sim_buf_init(tg__sim_buf_t *b, size_t max);
/* Empties the buffer (keeps its memory) and clears the error. */
void tg__sim_buf_reset(tg__sim_buf_t *b);
void tg__sim_buf_free(tg__sim_buf_t *b);
/* Appends; each returns 0 or the buffer's sticky error (TG_ENOMEM,
 * TG_ETOOBIG). */
int tg__sim_buf_add(tg__sim_buf_t *b, const char *s, size_t n);
int tg__sim_buf_adds(tg__sim_buf_t *b, const char *s);
int tg__sim_buf_addf(tg__sim_buf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Appends s (n bytes) as a quoted JSON string. */
int tg__sim_buf_add_jstr(tg__sim_buf_t *b, const char *s, size_t n);

/* ---- api.c: one parsed inference request and its bodies -------------- */

typedef enum {
  TG__SIM_CHAT = 1,
  TG__SIM_COMPLETION,
  TG__SIM_EMBEDDING
} tg__sim_kind_t;

typedef enum {
  TG__SIM_FAULT_NONE = 0,
  TG__SIM_FAULT_STATUS,           /* arg: HTTP status */
  TG__SIM_FAULT_STALL,            /* never answer */
  TG__SIM_FAULT_STALL_AFTER,      /* arg tokens, then hold */
  TG__SIM_FAULT_DISCONNECT,       /* close at once */
  TG__SIM_FAULT_DISCONNECT_AFTER, /* arg tokens, then close */
  TG__SIM_FAULT_GARBAGE,          /* 200 with a body that is not JSON */
  TG__SIM_FAULT_NO_USAGE          /* the answer in full, without its usage */
} tg__sim_fault_t;

typedef struct {
  tg__sim_kind_t kind;
  char *model;             /* owned; echoed in every body */
  int stream;
  int include_usage;       /* stream_options.include_usage */
  uint32_t n_choices;      /* n times the number of prompts, >= 1 */
  uint32_t tokens;         /* completion tokens per choice (0: embeddings) */
  int finish_length;       /* tokens == the max_tokens asked for */
  uint64_t prompt_tokens;  /* the deterministic estimate, >= 1 */
  int64_t priority;        /* lower is served first among the waiting */
  uint64_t ttft_ms;
  uint64_t token_ms;
  tg__sim_fault_t fault;
  uint32_t fault_arg;
  int64_t created;         /* unix seconds */
  char id[48];             /* "chatcmpl-..", "cmpl-..", "embd-.." */
  /* embeddings */
  uint64_t *seeds;         /* owned; one per input, from its text */
  uint32_t n_inputs;
  uint32_t dim;            /* --embedding-dim or the request's dimensions */
  int base64;              /* encoding_format "base64" */
  char *head;              /* owned; streams: "data: {...,\"choices\":[" */
} tg__sim_call_t;

typedef struct tg__sim_s tg__sim_t;

/* Parses the body of req for kind, with the sim's defaults and the
 * x-sim-* headers. On success fills *call (release with
 * tg__sim_call_free) and returns 0. On a client error returns the HTTP
 * status (400; 404 for a model not listed under --strict-models) and
 * writes a message into msg. */
int tg__sim_call_parse(tg__sim_call_t *call, const tg__sim_t *sim,
                       tg__sim_kind_t kind, const tg_http_req_t *req,
                       uint64_t id_hi, uint64_t id_lo, char *msg, size_t msg_len);
void tg__sim_call_free(tg__sim_call_t *call);

/* Parses an x-sim-fault value. Returns 0 or TG_EINVAL. */
int tg__sim_fault_parse(const char *v, tg__sim_fault_t *fault, uint32_t *arg);

/* Bodies. Each appends to b and returns 0 or the buffer's error. */
int tg__sim_body_full(tg__sim_buf_t *b, const tg__sim_call_t *call);
/* One SSE event: a chat choice's first, its role and no content, as vLLM
 * sends it with the first token. */
int tg__sim_event_role(tg__sim_buf_t *b, const tg__sim_call_t *call, uint32_t choice);
/* One SSE event: the token number step of choice. */
int tg__sim_event_token(tg__sim_buf_t *b, const tg__sim_call_t *call,
                        uint32_t choice, uint32_t step);
/* One SSE event: the empty chunk carrying finish_reason for choice. */
int tg__sim_event_finish(tg__sim_buf_t *b, const tg__sim_call_t *call, uint32_t choice);
/* The usage event ("choices": []) and then "data: [DONE]". */
int tg__sim_event_tail(tg__sim_buf_t *b, const tg__sim_call_t *call);
/* {"error":{"message","type","code"}} for an HTTP status. */
int tg__sim_body_error(tg__sim_buf_t *b, int status, const char *msg);

/* Answers req with an OpenAI error body and completes it; 429 and 503
 * carry Retry-After: 1. */
void tg__sim_reply_error(tg_http_req_t *req, int status, const char *msg);
/* The same with extra header lines ("Name: value\r\n", or NULL) instead. */
void tg__sim_reply_error_h(tg_http_req_t *req, int status, const char *extra,
                           const char *msg);

/* ---- main.c: the process -------------------------------------------- */

typedef struct {
  char host[256];
  int port;
  uint32_t workers;
  uint64_t ttft_ms;
  uint64_t token_ms;
  uint32_t max_num_seqs;
  uint32_t default_tokens;
  uint32_t answer_tokens;    /* > 0: an answer ends there ("stop") when its
                                limit allows more, as a model's does at its
                                end of sequence */
  uint32_t embedding_dim;
  int strict_models;         /* a model not in models[] is a 404, as vLLM's */
  char *models_text;                       /* owned; split in place */
  const char *models[TG__SIM_MAX_MODELS];  /* into models_text */
  uint32_t n_models;
} tg__sim_opts_t;

/* Counters of one worker: written by its loop only, read by any scrape. */
typedef struct {
  atomic_uint_fast64_t requests;      /* inference requests received */
  atomic_uint_fast64_t completed;     /* answered in full */
  atomic_uint_fast64_t aborted;       /* cancelled by the client */
  atomic_uint_fast64_t faults;        /* answered by an injected fault */
  atomic_uint_fast64_t prompt_tokens;
  atomic_uint_fast64_t gen_tokens;
} tg__sim_stats_t;

typedef struct tg__sim_seq_s tg__sim_seq_t;

typedef struct {
  tg__sim_t *sim;
  uint32_t id;
  uv_loop_t loop;
  uv_thread_t thread;
  uv_async_t wake;          /* the pool handed us admitted sequences */
  uv_async_t stop;          /* shut down */
  tg_http_server_t *srv;
  tg__sim_seq_t *handoff;   /* admitted, not started; pool mutex */
  int closed;               /* wake is closing; pool mutex */
  uint64_t next_id;
  tg__sim_buf_t scratch;    /* one body or event at a time */
  tg__sim_stats_t stats;
} tg__sim_worker_t;

/* ---- pool.c: capacity shared by every worker ------------------------- */

typedef enum {
  TG__SIM_SEQ_NEW = 0,
  TG__SIM_SEQ_WAITING,  /* in the pool's queue */
  TG__SIM_SEQ_HANDOFF,  /* holds a slot, in its worker's handoff list */
  TG__SIM_SEQ_RUNNING,  /* holds a slot, on its loop */
  TG__SIM_SEQ_DONE      /* slot released, request completed */
} tg__sim_seq_state_t;

typedef struct {
  uv_mutex_t mu;
  uint32_t max;
  uint32_t running;          /* slots held (running + handed off) */
  uint32_t n_waiting;
  tg__sim_seq_t *wait_head;  /* ordered by (priority, arrival) */
  tg__sim_seq_t *wait_tail;
} tg__sim_pool_t;

int tg__sim_pool_init(tg__sim_pool_t *p, uint32_t max);
void tg__sim_pool_destroy(tg__sim_pool_t *p);
/* 1 when a request finishing right now would have been admitted (a slot is
 * free and nobody waits); takes no slot. */
int tg__sim_pool_try_instant(tg__sim_pool_t *p);
/* Takes a slot for seq (returns 1, state RUNNING) or queues it (returns 0,
 * state WAITING; its worker's wake fires once it is admitted). */
int tg__sim_pool_admit(tg__sim_pool_t *p, tg__sim_seq_t *seq);
/* seq leaves, whatever its state: out of the queue or the handoff list,
 * and its slot (if any) goes to the first waiter. State becomes DONE. */
void tg__sim_pool_leave(tg__sim_pool_t *p, tg__sim_seq_t *seq);
/* Moves w's handed-off sequences out; returns the list (via ->next). */
tg__sim_seq_t *tg__sim_pool_take_handoff(tg__sim_pool_t *p, tg__sim_worker_t *w);
/* Marks w as gone so nobody wakes it any more. */
void tg__sim_pool_worker_closed(tg__sim_pool_t *p, tg__sim_worker_t *w);
void tg__sim_pool_counts(tg__sim_pool_t *p, uint32_t *running, uint32_t *waiting);

/* ---- seq.c: one admitted request ------------------------------------- */

struct tg__sim_seq_s {
  tg__sim_seq_t *next;       /* queue or handoff list; pool mutex */
  tg__sim_seq_t *prev;
  tg__sim_seq_state_t state; /* pool mutex */
  tg__sim_worker_t *w;
  tg_http_req_t *req;        /* NULL once completed */
  tg__sim_call_t call;
  uv_timer_t timer;
  int timer_init;
  uint64_t t0;               /* loop ms when admitted */
  uint32_t steps;            /* token steps written (streaming) */
  int busy;                  /* inside a step: defer the free */
  int gone;                  /* the client went away during a step */
  int began;                 /* chunked response started */
  int wait_drain;
  int finished;              /* request completed, slot released */
};

/* Takes ownership of call (moved from; the caller's copy is zeroed) and
 * runs the request through admission, timing and faults until it is
 * completed. Returns 0, or a negative error after which the caller still
 * owns req (call is released either way). */
int tg__sim_seq_start(tg__sim_worker_t *w, tg_http_req_t *req, tg__sim_call_t *call);
/* Starts sequences the pool handed to w (from its wake callback). */
void tg__sim_seq_run_handoff(tg__sim_worker_t *w);

struct tg__sim_s {
  tg__sim_opts_t opt;
  tg_http_limits_t lim;
  tg__sim_pool_t pool;
  tg__sim_worker_t *workers;
  uint32_t n_workers;
  uint32_t n_started;         /* worker threads running */
  int64_t started;           /* unix seconds, for /v1/models */
};

/* The HTTP handler of every worker (main.c). */
void tg__sim_handle(tg_http_req_t *req);

#endif
