/* tollgate-sim's process: command line, the worker threads (one libuv loop
 * and one HTTP server each, sharing the port), the router, /metrics and an
 * orderly shutdown on SIGTERM or SIGINT that frees everything, so the
 * simulator stays clean under the sanitizers the tests run with. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <llhttp.h>

#include "core/err.h"
#include "sim.h"

#define MAX_WORKERS 256u
#define MAX_SEQS 1000000u

/* ---- command line ---------------------------------------------------- */

static void usage(FILE *f) {
  fputs("usage: tollgate-sim --listen HOST:PORT [--workers N] [--ttft-ms MS]\n"
        "         [--token-ms MS] [--max-num-seqs N] [--default-tokens N]\n"
        "         [--answer-tokens N] [--models a,b,c] [--strict-models]\n"
        "         [--embedding-dim N]\n",
        f);
}

static int parse_num(const char *s, uint64_t min, uint64_t max, uint64_t *out) {
  char *end;
  unsigned long long v;

  if (s == NULL || *s < '0' || *s > '9')
    return TG_EINVAL;
  errno = 0;
  v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0' || v < min || v > max)
    return TG_EINVAL;
  *out = v;
  return 0;
}

/* HOST:PORT, HOST an IPv4 or IPv6 address, the latter in brackets ([::1]:8000);
 * names are not resolved, as the server binds addresses only. */
static int parse_listen(tg__sim_opts_t *o, const char *s) {
  const char *colon = strrchr(s, ':');
  unsigned char addr[16];
  size_t hlen;
  uint64_t port;

  if (colon == NULL || parse_num(colon + 1, 0, 65535, &port) != 0)
    return TG_EINVAL;
  hlen = (size_t)(colon - s);
  if (hlen >= 2 && s[0] == '[' && s[hlen - 1] == ']') {
    s++;
    hlen -= 2;
  }
  if (hlen == 0 || hlen >= sizeof o->host)
    return TG_EINVAL;
  memcpy(o->host, s, hlen);
  o->host[hlen] = '\0';
  if (uv_inet_pton(AF_INET, o->host, addr) != 0 && uv_inet_pton(AF_INET6, o->host, addr) != 0)
    return TG_EINVAL;
  o->port = (int)port;
  return 0;
}

/* "HOST:PORT", with an IPv6 HOST in brackets so the port reads apart. */
static const char *host_port(char *out, size_t len, const char *host, int port) {
  snprintf(out, len, strchr(host, ':') != NULL ? "[%s]:%d" : "%s:%d", host, port);
  return out;
}

static int parse_models(tg__sim_opts_t *o, const char *s) {
  char *p, *next;

  free(o->models_text);
  o->models_text = strdup(s);
  if (o->models_text == NULL)
    return TG_ENOMEM;
  o->n_models = 0;
  for (p = o->models_text; p != NULL; p = next) {
    next = strchr(p, ',');
    if (next != NULL)
      *next++ = '\0';
    if (*p == '\0' || strlen(p) > TG__SIM_MAX_NAME || o->n_models == TG__SIM_MAX_MODELS)
      return TG_EINVAL;
    o->models[o->n_models++] = p;
  }
  return 0;
}

/* Fills *o from argv. Returns 0, 1 after printing --help, or TG_EINVAL
 * after saying what is wrong. */
static int parse_args(tg__sim_opts_t *o, int argc, char **argv) {
  int i, at = 0;

  memset(o, 0, sizeof *o);
  snprintf(o->host, sizeof o->host, "%s", "127.0.0.1");
  o->port = 8000;
  o->workers = 1;
  o->max_num_seqs = 256;
  o->default_tokens = 16;
  o->embedding_dim = 8;
  if (parse_models(o, "sim-model") != 0)
    return TG_ENOMEM;
  for (i = 1; i < argc; i++) {
    const char *name = argv[at = i], *val, *eq = strchr(name, '=');
    char key[32];
    uint64_t v = 0;
    int rc = 0;

    if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
      usage(stdout);
      return 1;
    }
    if (strcmp(name, "--strict-models") == 0) {
      o->strict_models = 1;
      continue;
    }
    if (eq != NULL) {
      if ((size_t)(eq - name) >= sizeof key)
        goto bad;
      memcpy(key, name, (size_t)(eq - name));
      key[eq - name] = '\0';
      val = eq + 1;
    } else {
      if (strlen(name) >= sizeof key || i + 1 >= argc)
        goto bad;
      memcpy(key, name, strlen(name) + 1);
      val = argv[++i];
    }
    if (strcmp(key, "--listen") == 0)
      rc = parse_listen(o, val);
    else if (strcmp(key, "--models") == 0)
      rc = parse_models(o, val);
    else if (strcmp(key, "--workers") == 0 && (rc = parse_num(val, 1, MAX_WORKERS, &v)) == 0)
      o->workers = (uint32_t)v;
    else if (strcmp(key, "--ttft-ms") == 0 &&
             (rc = parse_num(val, 0, TG__SIM_MAX_DELAY_MS, &v)) == 0)
      o->ttft_ms = v;
    else if (strcmp(key, "--token-ms") == 0 &&
             (rc = parse_num(val, 0, TG__SIM_MAX_DELAY_MS, &v)) == 0)
      o->token_ms = v;
    else if (strcmp(key, "--max-num-seqs") == 0 && (rc = parse_num(val, 1, MAX_SEQS, &v)) == 0)
      o->max_num_seqs = (uint32_t)v;
    else if (strcmp(key, "--default-tokens") == 0 &&
             (rc = parse_num(val, 1, TG__SIM_MAX_TOKENS, &v)) == 0)
      o->default_tokens = (uint32_t)v;
    else if (strcmp(key, "--answer-tokens") == 0 &&
             (rc = parse_num(val, 0, TG__SIM_MAX_TOKENS, &v)) == 0)
      o->answer_tokens = (uint32_t)v;
    else if (strcmp(key, "--embedding-dim") == 0 &&
             (rc = parse_num(val, 1, TG__SIM_MAX_DIM, &v)) == 0)
      o->embedding_dim = (uint32_t)v;
    else if (rc == 0)
      goto bad;
    if (rc != 0) {
      fprintf(stderr, "tollgate-sim: bad value for %s: %s\n", key, val);
      return TG_EINVAL;
    }
  }
  return 0;
bad:
  fprintf(stderr, "tollgate-sim: unknown or incomplete option: %s\n", argv[at]);
  usage(stderr);
  return TG_EINVAL;
}

/* ---- small endpoints ------------------------------------------------- */

static void add_label(tg__sim_buf_t *b, const char *s) {
  for (; *s != '\0'; s++) {
    if (*s == '"' || *s == '\\')
      tg__sim_buf_add(b, "\\", 1);
    if (*s == '\n')
      tg__sim_buf_add(b, "\\n", 2);
    else
      tg__sim_buf_add(b, s, 1);
  }
}

#define SUM(field) sum_stat(sim, offsetof(tg__sim_stats_t, field))

static uint64_t sum_stat(const tg__sim_t *sim, size_t off) {
  uint64_t total = 0;
  uint32_t i;

  for (i = 0; i < sim->n_workers; i++) {
    atomic_uint_fast64_t *c =
        (atomic_uint_fast64_t *)((char *)&sim->workers[i].stats + off);
    total += atomic_load_explicit(c, memory_order_relaxed);
  }
  return total;
}

static void reply_metrics(tg_http_req_t *req, tg__sim_t *sim, tg__sim_buf_t *b) {
  uint32_t running, waiting;
  const char *m = sim->opt.models[0];
  static const char *const gauge = "gauge", *const counter = "counter";
  struct {
    const char *name, *type, *help;
    uint64_t v;
  } rows[9];
  size_t i, n = 0;

  tg__sim_pool_counts(&sim->pool, &running, &waiting);
#define ROW(nm, ty, hp, val) rows[n].name = nm, rows[n].type = ty, rows[n].help = hp, rows[n++].v = val
  ROW("sim_requests_running", gauge, "Sequences holding a slot.", running);
  ROW("sim_requests_waiting", gauge, "Requests waiting for a slot.", waiting);
  ROW("sim_max_num_seqs", gauge, "Slots in the process.", sim->opt.max_num_seqs);
  ROW("sim_requests_total", counter, "Inference requests received.", SUM(requests));
  ROW("sim_requests_completed_total", counter, "Requests answered in full.", SUM(completed));
  ROW("sim_requests_aborted_total", counter, "Sequences cancelled by their client.", SUM(aborted));
  ROW("sim_requests_faulted_total", counter, "Requests answered by an injected fault.", SUM(faults));
  ROW("sim_prompt_tokens_total", counter, "Prompt tokens of admitted requests.", SUM(prompt_tokens));
  ROW("sim_generation_tokens_total", counter, "Completion tokens generated.", SUM(gen_tokens));
#undef ROW
  tg__sim_buf_reset(b);
  for (i = 0; i < n; i++)
    tg__sim_buf_addf(b, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", rows[i].name, rows[i].help,
                     rows[i].name, rows[i].type, rows[i].name, (unsigned long long)rows[i].v);
  /* the gauges a router reads from a vLLM server, under their names */
  for (i = 0; i < 2; i++) {
    tg__sim_buf_addf(b, "# TYPE vllm:num_requests_%s gauge\nvllm:num_requests_%s{model_name=\"",
                     i == 0 ? "running" : "waiting", i == 0 ? "running" : "waiting");
    add_label(b, m);
    tg__sim_buf_addf(b, "\"} %llu\n", (unsigned long long)rows[i].v);
  }
  if (b->err != 0) {
    tg__sim_reply_error(req, 500, "metrics too large");
    return;
  }
  tg_http_respond(req, 200, "text/plain; version=0.0.4", NULL, b->p, b->len);
}

static void reply_models(tg_http_req_t *req, tg__sim_t *sim, tg__sim_buf_t *b,
                         const char *only) {
  uint32_t i, shown = 0;

  tg__sim_buf_reset(b);
  if (only == NULL)
    tg__sim_buf_adds(b, "{\"object\":\"list\",\"data\":[");
  for (i = 0; i < sim->opt.n_models; i++) {
    const char *m = sim->opt.models[i];
    if (only != NULL && strcmp(only, m) != 0)
      continue;
    tg__sim_buf_adds(b, shown++ == 0 ? "{\"id\":" : ",{\"id\":");
    tg__sim_buf_add_jstr(b, m, strlen(m));
    tg__sim_buf_addf(b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"tollgate-sim\"}",
                     (long long)sim->started);
  }
  if (only == NULL)
    tg__sim_buf_adds(b, "]}");
  if (only != NULL && shown == 0) {
    tg__sim_reply_error(req, 404, "model not found");
    return;
  }
  if (b->err != 0) {
    tg__sim_reply_error(req, 500, "model list too large");
    return;
  }
  tg_http_respond(req, 200, "application/json", NULL, b->p, b->len);
}

/* ---- inference ------------------------------------------------------- */

static void reply_garbage(tg_http_req_t *req, int stream) {
  static const char body[] = "this is not JSON {\"choices\": [";
  static const char event[] = "data: {not json\n\n";

  if (!stream) {
    tg_http_respond(req, 200, "application/json", NULL, body, sizeof body - 1);
    return;
  }
  if (tg_http_begin(req, 200, "text/event-stream", NULL) != 0) {
    tg_http_abort(req);
    return;
  }
  tg_http_write(req, event, sizeof event - 1);
  tg_http_end(req);
}

/* Plays the x-sim-fault faults that need no body. Returns 1 when the
 * request has been answered. A bad value is left to the full parse. */
static int header_fault(tg_http_req_t *req, tg__sim_worker_t *w, char *msg, size_t len) {
  const char *v = tg_http_req_header(req, "x-sim-fault");
  tg__sim_fault_t fault;
  uint32_t arg;

  if (v == NULL || tg__sim_fault_parse(v, &fault, &arg) != 0)
    return 0;
  if (fault == TG__SIM_FAULT_STATUS) {
    snprintf(msg, len, "simulated fault: status %u", arg);
    tg__sim_reply_error(req, (int)arg, msg);
  } else if (fault == TG__SIM_FAULT_DISCONNECT) {
    tg_http_abort(req);
  } else {
    return 0;
  }
  atomic_fetch_add_explicit(&w->stats.faults, 1, memory_order_relaxed);
  return 1;
}

static void infer(tg_http_req_t *req, tg__sim_worker_t *w, tg__sim_kind_t kind) {
  tg__sim_t *sim = w->sim;
  tg__sim_call_t call;
  char msg[256];
  int rc;

  atomic_fetch_add_explicit(&w->stats.requests, 1, memory_order_relaxed);
  /* a status or a disconnect is injected whatever the body holds */
  if (header_fault(req, w, msg, sizeof msg))
    return;
  rc = tg__sim_call_parse(&call, sim, kind, req, ((uint64_t)sim->started << 8) | w->id,
                          ++w->next_id, msg, sizeof msg);
  if (rc != 0) {
    tg__sim_reply_error(req, rc, msg);
    return;
  }
  if (call.fault == TG__SIM_FAULT_GARBAGE) {
    reply_garbage(req, call.stream);
    atomic_fetch_add_explicit(&w->stats.faults, 1, memory_order_relaxed);
    tg__sim_call_free(&call);
    return;
  }
  /* the benchmark path: nothing to wait for, answer from the handler */
  if (call.fault == TG__SIM_FAULT_NONE && call.ttft_ms == 0 && call.token_ms == 0 &&
      !call.stream && tg__sim_pool_try_instant(&sim->pool)) {
    tg__sim_buf_reset(&w->scratch);
    if (tg__sim_body_full(&w->scratch, &call) != 0) {
      tg__sim_reply_error(req, 500, "response too large");
    } else {
      tg_http_respond(req, 200, "application/json", NULL, w->scratch.p, w->scratch.len);
      atomic_fetch_add_explicit(&w->stats.completed, 1, memory_order_relaxed);
      atomic_fetch_add_explicit(&w->stats.prompt_tokens, call.prompt_tokens,
                                memory_order_relaxed);
      atomic_fetch_add_explicit(&w->stats.gen_tokens, (uint64_t)call.tokens * call.n_choices,
                                memory_order_relaxed);
    }
    tg__sim_call_free(&call);
    return;
  }
  if (tg__sim_seq_start(w, req, &call) != 0)
    tg__sim_reply_error(req, 500, "out of memory");
}

void tg__sim_handle(tg_http_req_t *req) {
  static const struct {
    const char *path;
    tg__sim_kind_t kind;
  } infer_routes[] = {
    {"/v1/chat/completions", TG__SIM_CHAT},
    {"/v1/completions", TG__SIM_COMPLETION},
    {"/v1/embeddings", TG__SIM_EMBEDDING},
  };
  tg__sim_worker_t *w = tg_http_server_data(req->server);
  const char *p = req->path, *model;
  size_t i;

  for (i = 0; i < sizeof infer_routes / sizeof infer_routes[0]; i++) {
    if (strcmp(p, infer_routes[i].path) != 0)
      continue;
    if (req->method == HTTP_POST)
      infer(req, w, infer_routes[i].kind);
    else /* a known path asked with another method: 405, as vLLM answers */
      tg__sim_reply_error_h(req, 405, "Allow: POST\r\n", "method not allowed");
    return;
  }
  model = strncmp(p, "/v1/models/", 11) == 0 && p[11] != '\0' ? p + 11 : NULL;
  if (strcmp(p, "/health") != 0 && strcmp(p, "/metrics") != 0 &&
      strcmp(p, "/v1/models") != 0 && model == NULL)
    tg__sim_reply_error(req, 404, "not found");
  else if (req->method != HTTP_GET)
    tg__sim_reply_error_h(req, 405, "Allow: GET\r\n", "method not allowed");
  else if (strcmp(p, "/health") == 0)
    tg_http_respond(req, 200, "text/plain", NULL, "ok", 2);
  else if (strcmp(p, "/metrics") == 0)
    reply_metrics(req, w->sim, &w->scratch);
  else
    reply_models(req, w->sim, &w->scratch, model);
}

/* ---- workers and shutdown -------------------------------------------- */

static void on_wake(uv_async_t *a) {
  tg__sim_seq_run_handoff(a->data);
}

static void on_server_closed(void *arg) {
  tg__sim_worker_t *w = arg;

  w->srv = NULL;
  tg__sim_pool_worker_closed(&w->sim->pool, w);
  uv_close((uv_handle_t *)&w->wake, NULL);
}

static void on_stop(uv_async_t *a) {
  tg__sim_worker_t *w = a->data;

  uv_close((uv_handle_t *)&w->stop, NULL);
  if (w->srv != NULL)
    tg_http_server_close(w->srv, on_server_closed, w);
  else
    on_server_closed(w);
}

static void worker_main(void *arg) {
  tg__sim_worker_t *w = arg;

  uv_run(&w->loop, UV_RUN_DEFAULT);
}

/* Loop, wake-ups and server of worker i; worker 0 picks the port when it
 * is 0 and the others follow it. w->sim is set once the handles exist. */
static int worker_init(tg__sim_t *sim, uint32_t i) {
  tg__sim_worker_t *w = &sim->workers[i];
  int port = i == 0 ? sim->opt.port : tg_http_server_port(sim->workers[0].srv);
  int rc;

  w->id = i;
  tg__sim_buf_init(&w->scratch, TG__SIM_MAX_BODY);
  if ((rc = uv_loop_init(&w->loop)) != 0)
    return rc;
  w->wake.data = w;
  w->stop.data = w;
  uv_async_init(&w->loop, &w->wake, on_wake);
  uv_async_init(&w->loop, &w->stop, on_stop);
  w->sim = sim;
  return tg_http_server_init(&w->srv, &w->loop, sim->opt.host, port, sim->opt.workers > 1,
                             &sim->lim, tg__sim_handle, w);
}

/* Closes what worker_init made, for a worker whose thread never ran. */
static void worker_abandon(tg__sim_worker_t *w) {
  if (w->srv != NULL)
    tg_http_server_close(w->srv, NULL, NULL);
  w->srv = NULL;
  uv_close((uv_handle_t *)&w->wake, NULL);
  uv_close((uv_handle_t *)&w->stop, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT);
}

static tg__sim_t *g_sim;

/* Asks every running worker to close, and lets the main loop end. */
static void on_signal(uv_signal_t *s, int signum) {
  uv_signal_t *sigs = s->data;
  uint32_t i;

  for (i = 0; i < g_sim->n_started; i++)
    uv_async_send(&g_sim->workers[i].stop);
  uv_close((uv_handle_t *)&sigs[0], NULL);
  uv_close((uv_handle_t *)&sigs[1], NULL);
}

static int run(tg__sim_t *sim) {
  uv_loop_t main_loop;
  uv_signal_t sigs[2];
  char addr[sizeof sim->opt.host + 16];
  uint32_t i;
  int rc;

  if ((rc = uv_loop_init(&main_loop)) != 0)
    return rc;
  for (i = 0; i < 2; i++) {
    uv_signal_init(&main_loop, &sigs[i]);
    sigs[i].data = sigs;
    uv_signal_start(&sigs[i], on_signal, i == 0 ? SIGTERM : SIGINT);
  }
  /* several workers' listeners share the port (SO_REUSEPORT), and would
   * share it with another process's already there: check that none is */
  if (sim->n_workers > 1 && sim->opt.port != 0 &&
      (rc = tg_http_listen_probe(sim->opt.host, sim->opt.port)) != 0)
    fprintf(stderr, "tollgate-sim: cannot listen on %s: %s\n",
            host_port(addr, sizeof addr, sim->opt.host, sim->opt.port), tg_strerror(rc));
  for (i = 0; i < sim->n_workers && rc == 0; i++)
    if ((rc = worker_init(sim, i)) != 0)
      fprintf(stderr, "tollgate-sim: cannot listen on %s: %s\n",
              host_port(addr, sizeof addr, sim->opt.host, sim->opt.port), tg_strerror(rc));
  if (rc == 0) {
    fprintf(stderr, "tollgate-sim listening on %s\n",
            host_port(addr, sizeof addr, sim->opt.host,
                      tg_http_server_port(sim->workers[0].srv)));
    for (; sim->n_started < sim->n_workers; sim->n_started++)
      if ((rc = uv_thread_create(&sim->workers[sim->n_started].thread, worker_main,
                                 &sim->workers[sim->n_started])) != 0)
        break;
  }
  if (rc != 0) /* stop what started; the rest never ran */
    on_signal(&sigs[0], SIGTERM);
  uv_run(&main_loop, UV_RUN_DEFAULT);
  for (i = 0; i < sim->n_workers; i++) {
    tg__sim_worker_t *w = &sim->workers[i];
    if (i < sim->n_started)
      uv_thread_join(&w->thread);
    else if (w->sim != NULL)
      worker_abandon(w);
    if (w->sim != NULL && uv_loop_close(&w->loop) != 0)
      fprintf(stderr, "tollgate-sim: worker %u left handles open\n", i);
    tg__sim_buf_free(&w->scratch);
  }
  uv_loop_close(&main_loop);
  return rc;
}

int main(int argc, char **argv) {
  tg__sim_t sim;
  int rc;

  signal(SIGPIPE, SIG_IGN);
  memset(&sim, 0, sizeof sim);
  if ((rc = parse_args(&sim.opt, argc, argv)) != 0) {
    free(sim.opt.models_text);
    return rc > 0 ? 0 : 2; /* --help, or a bad command line */
  }
  sim.n_workers = sim.opt.workers;
  sim.started = (int64_t)time(NULL);
  tg_http_limits_default(&sim.lim);
  sim.lim.max_body_bytes = 16u << 20;
  sim.workers = calloc(sim.n_workers, sizeof *sim.workers);
  if (sim.workers == NULL || tg__sim_pool_init(&sim.pool, sim.opt.max_num_seqs) != 0) {
    fprintf(stderr, "tollgate-sim: out of memory\n");
    free(sim.workers);
    free(sim.opt.models_text);
    return 1;
  }
  g_sim = &sim;
  rc = run(&sim);
  tg__sim_pool_destroy(&sim.pool);
  free(sim.workers);
  free(sim.opt.models_text);
  return rc == 0 ? 0 : 1;
}
