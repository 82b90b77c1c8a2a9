/* The OpenAI-compatible surface of the simulator: reading a request body
 * into a tg__sim_call_t and writing every response body and SSE event.
 *
 * Parsing is strict where a real inference server is strict (wrong types,
 * max_tokens < 1, stream_options without stream are 400s) so a gateway bug
 * shows up against the simulator as it would in production. The numbers
 * are deterministic: the prompt estimate depends only on the prompt bytes,
 * the text is "tok0 tok1 ..." and an embedding depends only on its input,
 * which lets tests assert exact usage and exact vectors. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/err.h"
#include "sim.h"

/* ---- small readers --------------------------------------------------- */

__attribute__((format(printf, 3, 4)))
static void set_msg(char *msg, size_t len, const char *fmt, ...) {
  va_list ap;

  if (len == 0)
    return;
  va_start(ap, fmt);
  vsnprintf(msg, len, fmt, ap);
  va_end(ap);
}

/* Reads an optional non-negative integer member (null counts as absent).
 * Integral reals are accepted since many clients send 16.0. Returns 1 when
 * present, 0 when absent, -1 on a bad type or range (msg filled). */
static int get_uint(const json_t *obj, const char *name, uint64_t min,
                    uint64_t max, uint64_t *out, char *msg, size_t msg_len) {
  json_t *v = json_object_get(obj, name);
  double d;
  uint64_t u;

  if (v == NULL || json_is_null(v))
    return 0;
  if (json_is_integer(v)) {
    json_int_t i = json_integer_value(v);
    if (i < 0)
      goto range;
    u = (uint64_t)i;
  } else if (json_is_real(v)) {
    d = json_real_value(v);
    if (d != floor(d) || d < 0 || d > 1e15)
      goto range;
    u = (uint64_t)d;
  } else {
    set_msg(msg, msg_len, "'%s' must be an integer", name);
    return -1;
  }
  if (u < min)
    goto range;
  *out = u > max ? max + 1 : u; /* the caller caps or refuses */
  return 1;
range:
  set_msg(msg, msg_len, "'%s' is out of range", name);
  return -1;
}

/* Optional boolean member; 1 present, 0 absent, -1 bad type. */
static int get_bool(const json_t *obj, const char *name, int *out, char *msg,
                    size_t msg_len) {
  json_t *v = json_object_get(obj, name);

  if (v == NULL || json_is_null(v))
    return 0;
  if (!json_is_boolean(v)) {
    set_msg(msg, msg_len, "'%s' must be a boolean", name);
    return -1;
  }
  *out = json_is_true(v);
  return 1;
}

static uint64_t ceil4(size_t n) {
  return ((uint64_t)n + 3) / 4;
}

/* FNV-1a, the seed of an embedding. */
static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
  const unsigned char *s = p;
  size_t i;

  for (i = 0; i < n; i++) {
    h ^= s[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

#define FNV_BASIS 0xcbf29ce484222325ull

/* An array of token ids; returns its length or -1 when it is not one. */
static long token_array_len(const json_t *a) {
  size_t i;
  json_t *v;

  if (!json_is_array(a))
    return -1;
  json_array_foreach(a, i, v) {
    if (!json_is_integer(v))
      return -1;
  }
  return (long)json_array_size(a);
}

static uint64_t token_array_seed(const json_t *a) {
  uint64_t h = FNV_BASIS;
  size_t i;
  json_t *v;

  json_array_foreach(a, i, v) {
    json_int_t t = json_integer_value(v);
    h = fnv1a(h, &t, sizeof t);
  }
  return h;
}

/* ---- prompts --------------------------------------------------------- */

/* Bytes of text in a message's content: a string, null, or a list of
 * parts whose "text" members count. Returns -1 on a bad shape. */
static long content_bytes(const json_t *content) {
  size_t i;
  json_t *part;
  long n = 0;

  if (content == NULL || json_is_null(content))
    return 0;
  if (json_is_string(content))
    return (long)json_string_length(content);
  if (!json_is_array(content))
    return -1;
  json_array_foreach(content, i, part) {
    json_t *text;
    if (!json_is_object(part))
      return -1;
    text = json_object_get(part, "text");
    if (text != NULL && json_is_string(text))
      n += (long)json_string_length(text);
  }
  return n;
}

static int parse_messages(tg__sim_call_t *call, const json_t *root, char *msg,
                          size_t msg_len) {
  json_t *msgs = json_object_get(root, "messages"), *m;
  size_t i;
  uint64_t est = 2;

  if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
    set_msg(msg, msg_len, "%s", "'messages' must be a non-empty array");
    return -1;
  }
  json_array_foreach(msgs, i, m) {
    long n;
    if (!json_is_object(m) || !json_is_string(json_object_get(m, "role"))) {
      set_msg(msg, msg_len, "%s", "each message needs a string 'role'");
      return -1;
    }
    n = content_bytes(json_object_get(m, "content"));
    if (n < 0) {
      set_msg(msg, msg_len, "%s", "message 'content' must be a string or a list of parts");
      return -1;
    }
    est += ceil4((size_t)n) + 4;
  }
  call->prompt_tokens = est;
  return 0;
}

/* prompt: a string, a list of strings, a list of token ids, or a list of
 * lists of token ids. *n_prompts receives how many prompts it holds. */
static int parse_prompt(tg__sim_call_t *call, const json_t *root,
                        uint32_t *n_prompts, char *msg, size_t msg_len) {
  json_t *p = json_object_get(root, "prompt"), *v;
  size_t i;
  uint64_t est = 0;
  long n;

  if (json_is_string(p)) {
    call->prompt_tokens = ceil4(json_string_length(p)) + 1;
    *n_prompts = 1;
    return 0;
  }
  if (!json_is_array(p) || json_array_size(p) == 0)
    goto bad;
  if ((n = token_array_len(p)) >= 0) {
    call->prompt_tokens = (uint64_t)n;
    *n_prompts = 1;
    return 0;
  }
  if (json_array_size(p) > TG__SIM_MAX_CHOICES) {
    set_msg(msg, msg_len, "%s", "too many prompts in one request");
    return -1;
  }
  json_array_foreach(p, i, v) {
    if (json_is_string(v))
      est += ceil4(json_string_length(v)) + 1;
    else if ((n = token_array_len(v)) > 0)
      est += (uint64_t)n;
    else
      goto bad;
  }
  call->prompt_tokens = est;
  *n_prompts = (uint32_t)json_array_size(p);
  return 0;
bad:
  set_msg(msg, msg_len, "%s", "'prompt' must be a string or a non-empty list of strings or token ids");
  return -1;
}

static int parse_input(tg__sim_call_t *call, const json_t *root, char *msg,
                       size_t msg_len) {
  json_t *in = json_object_get(root, "input"), *v;
  size_t i, n_in;
  uint64_t est = 0;
  long n;
  int single = json_is_string(in) || token_array_len(in) > 0;

  if (single)
    n_in = 1;
  else if (json_is_array(in) && json_array_size(in) > 0)
    n_in = json_array_size(in);
  else
    goto bad;
  if (n_in > TG__SIM_MAX_INPUTS) {
    set_msg(msg, msg_len, "%s", "too many inputs in one request");
    return -1;
  }
  call->seeds = calloc(n_in, sizeof *call->seeds);
  if (call->seeds == NULL) {
    set_msg(msg, msg_len, "%s", "out of memory");
    return -1;
  }
  call->n_inputs = (uint32_t)n_in;
  for (i = 0; i < n_in; i++) {
    v = single ? in : json_array_get(in, i);
    if (json_is_string(v)) {
      size_t len = json_string_length(v);
      call->seeds[i] = fnv1a(FNV_BASIS, json_string_value(v), len);
      est += len == 0 ? 1 : ceil4(len);
    } else if ((n = token_array_len(v)) > 0) {
      call->seeds[i] = token_array_seed(v);
      est += (uint64_t)n;
    } else {
      goto bad;
    }
  }
  call->prompt_tokens = est;
  return 0;
bad:
  set_msg(msg, msg_len, "%s", "'input' must be a string or a non-empty list of strings or token ids");
  return -1;
}

/* ---- headers --------------------------------------------------------- */

static int parse_u32(const char *s, uint32_t max, uint32_t *out) {
  char *end;
  unsigned long long v;

  if (s == NULL || *s < '0' || *s > '9')
    return TG_EINVAL;
  errno = 0;
  v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0' || v > max)
    return TG_EINVAL;
  *out = (uint32_t)v;
  return 0;
}

int tg__sim_fault_parse(const char *v, tg__sim_fault_t *fault, uint32_t *arg) {
  static const struct {
    const char *name;
    tg__sim_fault_t fault;
    int has_arg;
  } tab[] = {
    {"status:", TG__SIM_FAULT_STATUS, 1},
    {"stall-after:", TG__SIM_FAULT_STALL_AFTER, 1},
    {"stall", TG__SIM_FAULT_STALL, 0},
    {"disconnect-after:", TG__SIM_FAULT_DISCONNECT_AFTER, 1},
    {"disconnect", TG__SIM_FAULT_DISCONNECT, 0},
    {"garbage", TG__SIM_FAULT_GARBAGE, 0},
    {"no-usage", TG__SIM_FAULT_NO_USAGE, 0},
  };
  size_t i;

  *arg = 0;
  for (i = 0; i < sizeof tab / sizeof tab[0]; i++) {
    size_t n = strlen(tab[i].name);
    if (tab[i].has_arg) {
      if (strncmp(v, tab[i].name, n) != 0)
        continue;
      if (parse_u32(v + n, TG__SIM_MAX_TOKENS, arg) != 0)
        return TG_EINVAL;
      if (tab[i].fault == TG__SIM_FAULT_STATUS && (*arg < 400 || *arg > 599))
        return TG_EINVAL;
    } else if (strcmp(v, tab[i].name) != 0) {
      continue;
    }
    *fault = tab[i].fault;
    return 0;
  }
  return TG_EINVAL;
}

/* A header value as an error message may quote it: printable ASCII, at
 * most 48 bytes, anything else as '?' (the body stays valid UTF-8). */
static const char *quotable(const char *v, char *out, size_t len) {
  size_t i;

  for (i = 0; v[i] != '\0' && i + 1 < len; i++)
    out[i] = v[i] >= 0x20 && v[i] < 0x7f ? v[i] : '?';
  out[i] = '\0';
  return out;
}

static int parse_headers(tg__sim_call_t *call, const tg_http_req_t *req,
                         char *msg, size_t msg_len) {
  static const char *const delays[] = {"x-sim-ttft-ms", "x-sim-token-ms"};
  uint64_t *dst[] = {&call->ttft_ms, &call->token_ms};
  const char *v;
  char q[49];
  uint32_t ms;
  size_t i;

  for (i = 0; i < 2; i++) {
    if ((v = tg_http_req_header(req, delays[i])) == NULL)
      continue;
    if (parse_u32(v, TG__SIM_MAX_DELAY_MS, &ms) != 0) {
      set_msg(msg, msg_len, "%s: '%s' is not a whole number of milliseconds from 0 to %u",
              delays[i], quotable(v, q, sizeof q), TG__SIM_MAX_DELAY_MS);
      return -1;
    }
    *dst[i] = ms;
  }
  if ((v = tg_http_req_header(req, "x-sim-fault")) != NULL &&
      tg__sim_fault_parse(v, &call->fault, &call->fault_arg) != 0) {
    set_msg(msg, msg_len,
            "x-sim-fault: '%s' is not one of status:<400..599>, stall, stall-after:<n>, "
            "disconnect, disconnect-after:<n>, garbage, no-usage (n from 0 to %u)",
            quotable(v, q, sizeof q), TG__SIM_MAX_TOKENS);
    return -1;
  }
  return 0;
}

/* ---- the request ----------------------------------------------------- */

static int parse_stream(tg__sim_call_t *call, const json_t *root, char *msg,
                        size_t msg_len) {
  json_t *so = json_object_get(root, "stream_options");

  if (get_bool(root, "stream", &call->stream, msg, msg_len) < 0)
    return -1;
  if (so == NULL || json_is_null(so))
    return 0;
  if (!call->stream) {
    set_msg(msg, msg_len, "%s", "'stream_options' is only allowed with 'stream': true");
    return -1;
  }
  if (!json_is_object(so)) {
    set_msg(msg, msg_len, "%s", "'stream_options' must be an object");
    return -1;
  }
  return get_bool(so, "include_usage", &call->include_usage, msg, msg_len) < 0 ? -1 : 0;
}

/* max_tokens / max_completion_tokens and n, for the two generating kinds,
 * as vLLM reads them: on chat max_completion_tokens when set and not 0,
 * else max_tokens; completions know only max_tokens. A limit past what
 * the simulator generates is a 400, as vLLM refuses one past its context,
 * so a gateway that sends one is caught rather than served less. */
static int parse_generation(tg__sim_call_t *call, const tg__sim_t *sim,
                            const json_t *root, uint32_t n_prompts, char *msg,
                            size_t msg_len) {
  uint64_t asked = 0, n = 1;
  json_t *mct = json_object_get(root, "max_completion_tokens");
  int r = 0;

  if (call->kind == TG__SIM_CHAT && !(json_is_number(mct) && json_number_value(mct) == 0))
    r = get_uint(root, "max_completion_tokens", 1, UINT64_MAX - 1, &asked, msg, msg_len);
  if (r == 0)
    r = get_uint(root, "max_tokens", 1, UINT64_MAX - 1, &asked, msg, msg_len);
  if (r < 0)
    return -1;
  if (r > 0 && asked > TG__SIM_MAX_TOKENS) {
    set_msg(msg, msg_len,
            "'max_tokens' or 'max_completion_tokens' is too large: %llu. This model "
            "generates at most %u tokens per choice (%llu > %u).",
            (unsigned long long)asked, TG__SIM_MAX_TOKENS, (unsigned long long)asked,
            TG__SIM_MAX_TOKENS);
    return -1;
  }
  if (r > 0) {
    call->finish_length = 1;
    call->tokens = (uint32_t)asked;
  } else {
    call->tokens = sim->opt.default_tokens;
  }
  if (sim->opt.answer_tokens > 0 && call->tokens > sim->opt.answer_tokens) {
    /* the model's answer ends before its limit */
    call->tokens = sim->opt.answer_tokens;
    call->finish_length = 0;
  }
  if (get_uint(root, "n", 1, TG__SIM_MAX_CHOICES, &n, msg, msg_len) < 0)
    return -1;
  if (n * n_prompts > TG__SIM_MAX_CHOICES) {
    set_msg(msg, msg_len, "%s", "'n' times the number of prompts is too large");
    return -1;
  }
  call->n_choices = (uint32_t)(n * n_prompts);
  return 0;
}

static int parse_sched(tg__sim_call_t *call, const json_t *root, char *msg,
                       size_t msg_len) {
  json_t *v = json_object_get(root, "priority");

  if (v != NULL && !json_is_null(v)) {
    if (!json_is_integer(v)) {
      set_msg(msg, msg_len, "%s", "'priority' must be an integer");
      return -1;
    }
    call->priority = json_integer_value(v);
  }
  v = json_object_get(root, "cache_salt");
  if (v != NULL && !json_is_null(v) &&
      (!json_is_string(v) || json_string_length(v) == 0)) {
    set_msg(msg, msg_len, "%s", "'cache_salt' must be a non-empty string");
    return -1;
  }
  return 0;
}

static int parse_embedding_opts(tg__sim_call_t *call, const json_t *root,
                                char *msg, size_t msg_len) {
  json_t *fmt = json_object_get(root, "encoding_format");
  uint64_t dim = call->dim;

  if (fmt != NULL && !json_is_null(fmt)) {
    const char *s = json_string_value(fmt);
    if (s != NULL && strcmp(s, "base64") == 0) {
      call->base64 = 1;
    } else if (s == NULL || strcmp(s, "float") != 0) {
      set_msg(msg, msg_len, "%s", "'encoding_format' must be \"float\" or \"base64\"");
      return -1;
    }
  }
  if (get_uint(root, "dimensions", 1, TG__SIM_MAX_DIM, &dim, msg, msg_len) < 0)
    return -1;
  if (dim > TG__SIM_MAX_DIM) {
    set_msg(msg, msg_len, "%s", "'dimensions' is too large");
    return -1;
  }
  call->dim = (uint32_t)dim;
  /* refused now rather than built up to the bound: a float is at most 14
   * bytes of JSON ("-1.234567e-05,"), under 6 in base64; an item's frame
   * under 64 */
  if ((uint64_t)call->n_inputs * (dim * (call->base64 ? 6 : 14) + 64) + 256 >
      TG__SIM_MAX_BODY) {
    set_msg(msg, msg_len, "%u inputs of %u dimensions pass the simulator's %u MiB answer bound",
            call->n_inputs, call->dim, TG__SIM_MAX_BODY >> 20);
    return -1;
  }
  return 0;
}

static int build_head(tg__sim_call_t *call) {
  tg__sim_buf_t b;
  const char *obj = call->kind == TG__SIM_CHAT ? "chat.completion.chunk" : "text_completion";

  tg__sim_buf_init(&b, 4096);
  tg__sim_buf_addf(&b, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%lld,\"model\":",
                   call->id, obj, (long long)call->created);
  tg__sim_buf_add_jstr(&b, call->model, strlen(call->model));
  if (tg__sim_buf_adds(&b, ",\"choices\":[") != 0) {
    tg__sim_buf_free(&b);
    return -1;
  }
  call->head = b.p;
  return 0;
}

static int known_model(const tg__sim_t *sim, const char *name) {
  uint32_t i;

  for (i = 0; i < sim->opt.n_models; i++)
    if (strcmp(sim->opt.models[i], name) == 0)
      return 1;
  return 0;
}

int tg__sim_call_parse(tg__sim_call_t *call, const tg__sim_t *sim,
                       tg__sim_kind_t kind, const tg_http_req_t *req,
                       uint64_t id_hi, uint64_t id_lo, char *msg, size_t msg_len) {
  static const char *const prefix[] = {"", "chatcmpl", "cmpl", "embd"};
  json_error_t jerr;
  json_t *root = NULL, *model;
  const char *name;
  uint32_t n_prompts = 1;
  int rc = 400;

  memset(call, 0, sizeof *call);
  call->kind = kind;
  call->ttft_ms = sim->opt.ttft_ms;
  call->token_ms = sim->opt.token_ms;
  call->dim = sim->opt.embedding_dim;
  call->n_choices = 1;
  call->created = (int64_t)time(NULL);
  snprintf(call->id, sizeof call->id, "%s-%08llx%016llx", prefix[kind],
           (unsigned long long)id_hi, (unsigned long long)id_lo);

  if (parse_headers(call, req, msg, msg_len) != 0)
    goto out;
  root = json_loadb(req->body, req->body_len, 0, &jerr);
  if (root == NULL) {
    set_msg(msg, msg_len, "invalid JSON body: %s", jerr.text);
    goto out;
  }
  if (!json_is_object(root)) {
    set_msg(msg, msg_len, "%s", "the body must be a JSON object");
    goto out;
  }
  model = json_object_get(root, "model");
  if (model != NULL && !json_is_null(model) &&
      (!json_is_string(model) || json_string_length(model) == 0 ||
       json_string_length(model) > TG__SIM_MAX_NAME)) {
    set_msg(msg, msg_len, "'model' must be a non-empty string of at most %u bytes",
            TG__SIM_MAX_NAME);
    goto out;
  }
  name = json_is_string(model) ? json_string_value(model) : sim->opt.models[0];
  call->model = strdup(name);
  if (call->model == NULL) {
    rc = 500;
    set_msg(msg, msg_len, "%s", "out of memory");
    goto out;
  }
  if (parse_sched(call, root, msg, msg_len) != 0)
    goto out;
  switch (kind) {
  case TG__SIM_CHAT:
    if (parse_messages(call, root, msg, msg_len) != 0)
      goto out;
    break;
  case TG__SIM_COMPLETION:
    if (parse_prompt(call, root, &n_prompts, msg, msg_len) != 0)
      goto out;
    break;
  case TG__SIM_EMBEDDING:
    if (parse_input(call, root, msg, msg_len) != 0 ||
        parse_embedding_opts(call, root, msg, msg_len) != 0)
      goto out;
    break;
  }
  if (call->prompt_tokens == 0)
    call->prompt_tokens = 1;
  if (kind != TG__SIM_EMBEDDING &&
      (parse_stream(call, root, msg, msg_len) != 0 ||
       parse_generation(call, sim, root, n_prompts, msg, msg_len) != 0))
    goto out;
  if (sim->opt.strict_models && !known_model(sim, call->model)) {
    /* after the body's checks, as vLLM looks the model up */
    rc = 404;
    set_msg(msg, msg_len, "The model '%s' does not exist.", call->model);
    goto out;
  }
  if (call->stream && build_head(call) != 0) {
    rc = 500;
    set_msg(msg, msg_len, "%s", "out of memory");
    goto out;
  }
  rc = 0;
out:
  json_decref(root);
  if (rc != 0)
    tg__sim_call_free(call);
  return rc;
}

void tg__sim_call_free(tg__sim_call_t *call) {
  free(call->model);
  free(call->seeds);
  free(call->head);
  call->model = NULL;
  call->seeds = NULL;
  call->head = NULL;
}

/* ---- bodies ---------------------------------------------------------- */

static const char *finish_reason(const tg__sim_call_t *call) {
  return call->finish_length ? "length" : "stop";
}

static int add_usage(tg__sim_buf_t *b, const tg__sim_call_t *call) {
  uint64_t c = (uint64_t)call->tokens * call->n_choices;

  return tg__sim_buf_addf(b,
                          "\"usage\":{\"prompt_tokens\":%llu,\"completion_tokens\":%llu,"
                          "\"total_tokens\":%llu}",
                          (unsigned long long)call->prompt_tokens, (unsigned long long)c,
                          (unsigned long long)(call->prompt_tokens + c));
}

/* "tok0 tok1 ..." as a JSON string body (no quotes needed escaping). */
static int add_text(tg__sim_buf_t *b, uint32_t tokens) {
  uint32_t i;

  tg__sim_buf_add(b, "\"", 1);
  for (i = 0; i < tokens; i++)
    tg__sim_buf_addf(b, i == 0 ? "tok%u" : " tok%u", i);
  return tg__sim_buf_add(b, "\"", 1);
}

/* Unit vector number i of the call, from its seed, by xorshift64*. */
static void embedding(const tg__sim_call_t *call, uint32_t i, float *v) {
  uint64_t x = call->seeds[i] | 1;
  double norm = 0;
  uint32_t j;

  for (j = 0; j < call->dim; j++) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    v[j] = (float)((double)((x * 0x2545f4914f6cdd1dull) >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    norm += (double)v[j] * v[j];
  }
  norm = sqrt(norm);
  for (j = 0; j < call->dim && norm > 0; j++)
    v[j] = (float)(v[j] / norm);
}

static int add_base64(tg__sim_buf_t *b, const unsigned char *p, size_t n) {
  static const char tab[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  size_t i;
  char q[4];

  tg__sim_buf_add(b, "\"", 1);
  for (i = 0; i + 2 < n; i += 3) {
    q[0] = tab[p[i] >> 2];
    q[1] = tab[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
    q[2] = tab[((p[i + 1] & 15) << 2) | (p[i + 2] >> 6)];
    q[3] = tab[p[i + 2] & 63];
    tg__sim_buf_add(b, q, 4);
  }
  if (i < n) {
    q[0] = tab[p[i] >> 2];
    q[1] = tab[((p[i] & 3) << 4) | (i + 1 < n ? p[i + 1] >> 4 : 0)];
    q[2] = i + 1 < n ? tab[(p[i + 1] & 15) << 2] : '=';
    q[3] = '=';
    tg__sim_buf_add(b, q, 4);
  }
  return tg__sim_buf_add(b, "\"", 1);
}

static int add_embedding(tg__sim_buf_t *b, const tg__sim_call_t *call, uint32_t i,
                         float *v) {
  uint32_t j;

  embedding(call, i, v);
  tg__sim_buf_addf(b, "%s{\"object\":\"embedding\",\"index\":%u,\"embedding\":",
                   i == 0 ? "" : ",", i);
  if (call->base64) {
    /* little-endian float32, as the OpenAI clients decode it */
    unsigned char *raw = (unsigned char *)v;
    for (j = 0; j < call->dim; j++) {
      uint32_t u;
      memcpy(&u, &v[j], 4);
      raw[4 * j] = (unsigned char)u;
      raw[4 * j + 1] = (unsigned char)(u >> 8);
      raw[4 * j + 2] = (unsigned char)(u >> 16);
      raw[4 * j + 3] = (unsigned char)(u >> 24);
    }
    add_base64(b, raw, (size_t)call->dim * 4);
  } else {
    tg__sim_buf_add(b, "[", 1);
    for (j = 0; j < call->dim; j++)
      tg__sim_buf_addf(b, j == 0 ? "%.7g" : ",%.7g", (double)v[j]);
    tg__sim_buf_add(b, "]", 1);
  }
  return tg__sim_buf_add(b, "}", 1);
}

static int body_embeddings(tg__sim_buf_t *b, const tg__sim_call_t *call) {
  float *v = malloc((size_t)call->dim * sizeof *v);
  uint32_t i;

  if (v == NULL)
    return TG_ENOMEM;
  tg__sim_buf_addf(b, "{\"id\":\"%s\",\"object\":\"list\",\"created\":%lld,\"model\":",
                   call->id, (long long)call->created);
  tg__sim_buf_add_jstr(b, call->model, strlen(call->model));
  tg__sim_buf_adds(b, ",\"data\":[");
  for (i = 0; i < call->n_inputs && b->err == 0; i++)
    add_embedding(b, call, i, v);
  free(v);
  if (call->fault == TG__SIM_FAULT_NO_USAGE)
    return tg__sim_buf_adds(b, "]}");
  return tg__sim_buf_addf(b,
                          "],\"usage\":{\"prompt_tokens\":%llu,\"total_tokens\":%llu}}",
                          (unsigned long long)call->prompt_tokens,
                          (unsigned long long)call->prompt_tokens);
}

int tg__sim_body_full(tg__sim_buf_t *b, const tg__sim_call_t *call) {
  int chat = call->kind == TG__SIM_CHAT;
  uint32_t c;

  if (call->kind == TG__SIM_EMBEDDING)
    return body_embeddings(b, call);
  tg__sim_buf_addf(b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%lld,\"model\":",
                   call->id, chat ? "chat.completion" : "text_completion",
                   (long long)call->created);
  tg__sim_buf_add_jstr(b, call->model, strlen(call->model));
  tg__sim_buf_adds(b, ",\"choices\":[");
  for (c = 0; c < call->n_choices; c++) {
    tg__sim_buf_addf(b, "%s{\"index\":%u,", c == 0 ? "" : ",", c);
    tg__sim_buf_adds(b, chat ? "\"message\":{\"role\":\"assistant\",\"content\":" : "\"text\":");
    add_text(b, call->tokens);
    tg__sim_buf_addf(b, "%s,\"logprobs\":null,\"finish_reason\":\"%s\"}",
                     chat ? "}" : "", finish_reason(call));
  }
  if (call->fault == TG__SIM_FAULT_NO_USAGE)
    return tg__sim_buf_adds(b, "]}");
  tg__sim_buf_adds(b, "],");
  add_usage(b, call);
  return tg__sim_buf_adds(b, "}");
}

int tg__sim_event_role(tg__sim_buf_t *b, const tg__sim_call_t *call, uint32_t choice) {
  tg__sim_buf_adds(b, call->head);
  return tg__sim_buf_addf(b,
                          "{\"index\":%u,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                          "\"logprobs\":null,\"finish_reason\":null}]}\n\n",
                          choice);
}

int tg__sim_event_token(tg__sim_buf_t *b, const tg__sim_call_t *call,
                        uint32_t choice, uint32_t step) {
  const char *sp = step == 0 ? "" : " ";

  tg__sim_buf_adds(b, call->head);
  if (call->kind == TG__SIM_CHAT)
    tg__sim_buf_addf(b, "{\"index\":%u,\"delta\":{\"content\":\"%stok%u\"},", choice, sp,
                     step);
  else
    tg__sim_buf_addf(b, "{\"index\":%u,\"text\":\"%stok%u\",", choice, sp, step);
  return tg__sim_buf_adds(b, "\"logprobs\":null,\"finish_reason\":null}]}\n\n");
}

int tg__sim_event_finish(tg__sim_buf_t *b, const tg__sim_call_t *call, uint32_t choice) {
  tg__sim_buf_adds(b, call->head);
  return tg__sim_buf_addf(b,
                          "{\"index\":%u,%s\"logprobs\":null,\"finish_reason\":\"%s\"}]}\n\n",
                          choice, call->kind == TG__SIM_CHAT ? "\"delta\":{}," : "\"text\":\"\",",
                          finish_reason(call));
}

int tg__sim_event_tail(tg__sim_buf_t *b, const tg__sim_call_t *call) {
  if (call->include_usage && call->fault != TG__SIM_FAULT_NO_USAGE) {
    tg__sim_buf_adds(b, call->head);
    tg__sim_buf_adds(b, "],");
    add_usage(b, call);
    tg__sim_buf_adds(b, "}\n\n");
  }
  return tg__sim_buf_adds(b, "data: [DONE]\n\n");
}

/* ---- errors ---------------------------------------------------------- */

/* The type of an error body for an HTTP status, as vLLM's OpenAI server
 * names it: the class its handlers give (BadRequestError, NotFoundError,
 * InternalServerError), else the status's reason phrase, as its handler
 * of HTTP exceptions writes it ("Method Not Allowed"). */
static const char *error_type(int status) {
  const char *r;
  switch (status) {
  case 400: return "BadRequestError";
  case 404: return "NotFoundError";
  case 500: return "InternalServerError";
  default:
    r = tg_http_reason(status);
    if (strcmp(r, "Unknown") != 0)
      return r;
    return status >= 500 ? "InternalServerError" : "BadRequestError";
  }
}

/* vLLM's error body: {"error":{"message","type","param":null,"code"}}
 * with the HTTP status as a number in "code". */
int tg__sim_body_error(tg__sim_buf_t *b, int status, const char *msg) {
  tg__sim_buf_adds(b, "{\"error\":{\"message\":");
  tg__sim_buf_add_jstr(b, msg, strlen(msg));
  return tg__sim_buf_addf(b, ",\"type\":\"%s\",\"param\":null,\"code\":%d}}",
                          error_type(status), status);
}

void tg__sim_reply_error(tg_http_req_t *req, int status, const char *msg) {
  tg__sim_reply_error_h(req, status,
                        (status == 429 || status == 503) ? "Retry-After: 1\r\n" : NULL, msg);
}

void tg__sim_reply_error_h(tg_http_req_t *req, int status, const char *extra,
                           const char *msg) {
  tg__sim_buf_t b;

  tg__sim_buf_init(&b, 64 * 1024);
  if (tg__sim_body_error(&b, status, msg) != 0) {
    tg__sim_buf_free(&b);
    tg_http_abort(req);
    return;
  }
  tg_http_respond(req, status, "application/json", extra, b.p, b.len);
  tg__sim_buf_free(&b);
}
