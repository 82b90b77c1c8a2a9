/* SSE splitting and classification; see sse.h. Events end with a blank line;
 * lines end with LF, CRLF or a lone CR, as the SSE format allows (vLLM and
 * OpenAI send LF; servers built on some frameworks send CRLF). Only events
 * that mention "usage" or "role" are parsed as JSON: ordinary token chunks
 * are relayed after a byte scan. Also here: reading a usage object, from a tree or its
 * text, and the generated text of a whole answer that came without one. */
#define _GNU_SOURCE /* memmem */
#include "api/sse.h"

#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/json.h"

void tg_sse_init(tg_sse_t *p, size_t max_event) {
  memset(p, 0, sizeof(*p));
  p->max = max_event;
}

void tg_sse_free(tg_sse_t *p) {
  free(p->buf);
  p->buf = NULL;
  p->len = p->cap = 0;
}

size_t tg_sse_pending(const tg_sse_t *p) {
  return p->len;
}

/* The first line end (CR or LF) in [q, end), or NULL. */
static const char *next_eol(const char *q, const char *end) {
  const char *lf = memchr(q, '\n', (size_t)(end - q));
  const char *cr = memchr(q, '\r', (size_t)((lf ? lf : end) - q));
  return cr ? cr : lf;
}

/* Returns the length of the first whole event in s[0..n), or 0: the bytes
 * up to and including the line end of its first empty line.
 *
 * A CR that is the last byte so far may be a lone CR or the first half of a
 * CRLF. Ending an empty line there would leave the LF to come as a stray
 * byte after the event; waiting would hold a CR-only stream's event until
 * its next one. The stream's own style decides: once a CR was followed by
 * something other than LF (p->lone_cr), a last CR ends the line; before
 * that, the LF is waited for, as CRLF streams send it in the same write. */
static size_t event_end(tg_sse_t *p, const char *s, size_t n) {
  const char *line = s, *end = s + n, *q;
  while ((q = next_eol(line, end)) != NULL) {
    size_t term = 1;
    if (*q == '\r') {
      if (q + 1 < end) {
        if (q[1] == '\n')
          term = 2;
        else
          p->lone_cr = 1;
      } else if (!p->lone_cr) {
        return 0; /* a CR last: CRLF's first half, perhaps */
      }
    }
    if (q == line)
      return (size_t)(q + term - s); /* an empty line ends the event */
    line = q + term;
  }
  return 0;
}

/* Appends data to the held bytes. The buffer holds at most one partial
 * event (p->max) plus the read being joined to it, so it stays bounded
 * while the bound itself applies to each event, wherever reads cut. */
static int keep(tg_sse_t *p, const char *data, size_t len) {
  size_t need = p->len + len;
  if (need > p->cap) {
    size_t cap = p->cap ? p->cap : 1024;
    char *nb;
    while (cap < need)
      cap *= 2;
    if (cap > p->max && cap > need)
      cap = need > p->max ? need : p->max;
    nb = realloc(p->buf, cap);
    if (nb == NULL)
      return TG_ENOMEM;
    p->buf = nb;
    p->cap = cap;
  }
  memcpy(p->buf + p->len, data, len);
  p->len += len;
  return 0;
}

/* An event, or the start of one, longer than the bound: the stream is cut,
 * and what was held is dropped with it. */
static int too_big(tg_sse_t *p) {
  p->len = 0;
  return TG_ETOOBIG;
}

int tg_sse_feed(tg_sse_t *p, const char *data, size_t len, tg_sse_event_cb cb, void *arg) {
  size_t e, used = 0;
  int r;

  if (p->len > 0) {
    /* An event began in an earlier chunk: join, then split the buffer. */
    if ((r = keep(p, data, len)) < 0)
      return r;
    while (used < p->len && (e = event_end(p, p->buf + used, p->len - used)) > 0) {
      if (e > p->max)
        return too_big(p);
      if ((r = cb(arg, p->buf + used, e)) < 0)
        return r;
      used += e;
    }
    memmove(p->buf, p->buf + used, p->len - used);
    p->len -= used;
    return p->len > p->max ? too_big(p) : 0;
  }
  while (used < len && (e = event_end(p, data + used, len - used)) > 0) {
    if (e > p->max)
      return too_big(p);
    if ((r = cb(arg, data + used, e)) < 0)
      return r;
    used += e;
  }
  if (used < len)
    return len - used > p->max ? too_big(p) : keep(p, data + used, len - used);
  return 0;
}

static void *find(const char *s, size_t n, const char *needle) {
  return memmem(s, n, needle, strlen(needle));
}

int tg_usage_read(const cJSON *usage, int64_t *prompt, int64_t *completion) {
  int64_t pt, ct;
  if (!tg_json_int(tg_json_get(usage, "prompt_tokens"), &pt) || pt < 0 ||
      pt > TG_USAGE_TOKENS_MAX)
    return 0;
  if (!tg_json_int(tg_json_get(usage, "completion_tokens"), &ct) || ct < 0)
    ct = -1;
  else if (ct > TG_USAGE_TOKENS_MAX)
    return 0;
  *prompt = pt;
  *completion = ct;
  return 1;
}

/* ---- usage from text, without a tree ----
 *
 * The shape read here: '{' members '}' with JSON whitespace around tokens,
 * at most USAGE_MEMBERS members, each a key of [a-z_] (1 to 32 bytes, so
 * no escape) and a value that is null or an integer in plain decimal
 * without sign or leading zero, of at most 15 digits (below 2^53, so
 * tg_json_int takes it as it is). That is what upstreams send, and every
 * text of that shape means the same to cJSON. Anything else, including a
 * key twice (which the strict parser refuses), is left to the parser: the
 * fast path answers "not mine" and never a different result. */

#define USAGE_MEMBERS 8
#define USAGE_KEY_MAX 32
#define USAGE_DIGITS_MAX 15

/* 1 (read: *found says whether prompt_tokens was there), or -1 when the
 * text is not of the shape above. *used is the length of the object. */
static int usage_flat(const char *p, size_t n, int64_t *pt, int64_t *ct,
                      int *found_pt, int *found_ct, size_t *used) {
  const char *keys[USAGE_MEMBERS];
  size_t klen[USAGE_MEMBERS], i = 0, m = 0;

  *found_pt = *found_ct = 0;
  while (i < n && tg_json_ws(p[i]))
    i++;
  if (i >= n || p[i++] != '{')
    return -1;
  for (;;) {
    size_t k0, kl;
    while (i < n && tg_json_ws(p[i]))
      i++;
    if (i < n && p[i] == '}' && m == 0)
      break;
    if (i >= n || p[i++] != '"' || m == USAGE_MEMBERS)
      return -1;
    k0 = i;
    while (i < n && ((p[i] >= 'a' && p[i] <= 'z') || p[i] == '_'))
      i++;
    kl = i - k0;
    if (i >= n || p[i++] != '"' || kl == 0 || kl > USAGE_KEY_MAX)
      return -1;
    for (size_t j = 0; j < m; j++)
      if (klen[j] == kl && memcmp(keys[j], p + k0, kl) == 0)
        return -1;   /* a key twice: the strict parser's call */
    keys[m] = p + k0;
    klen[m++] = kl;
    while (i < n && tg_json_ws(p[i]))
      i++;
    if (i >= n || p[i++] != ':')
      return -1;
    while (i < n && tg_json_ws(p[i]))
      i++;
    if (i + 4 <= n && memcmp(p + i, "null", 4) == 0) {
      i += 4;
    } else {
      int64_t v = 0;
      size_t d0 = i;
      while (i < n && p[i] >= '0' && p[i] <= '9') {
        if (i - d0 == USAGE_DIGITS_MAX)
          return -1;   /* past 15 digits: the parser's call */
        v = v * 10 + (p[i++] - '0');
      }
      if (i == d0 || (p[d0] == '0' && i - d0 > 1))
        return -1;
      if (kl == 13 && memcmp(p + k0, "prompt_tokens", 13) == 0) {
        *pt = v;
        *found_pt = 1;
      } else if (kl == 17 && memcmp(p + k0, "completion_tokens", 17) == 0) {
        *ct = v;
        *found_ct = 1;
      }
    }
    /* a number must end at a delimiter, as in "16}" and not "16.5}" */
    while (i < n && tg_json_ws(p[i]))
      i++;
    if (i < n && p[i] == ',') {
      i++;
      continue;
    }
    if (i < n && p[i] == '}')
      break;
    return -1;
  }
  *used = i + 1;
  return 1;
}

int tg_usage_read_text(const char *p, size_t n, int64_t *prompt, int64_t *completion) {
  int64_t pt = 0, ct = 0;
  int fpt, fct, r;
  size_t used = 0;
  cJSON *usage;

  if (usage_flat(p, n, &pt, &ct, &fpt, &fct, &used) == 1 &&
      tg_json_check_text(p + used, n - used, NULL) == 0) {
    if (!fpt || pt > TG_USAGE_TOKENS_MAX || (fct && ct > TG_USAGE_TOKENS_MAX))
      return 0;
    *prompt = pt;
    *completion = fct ? ct : -1;
    return 1;
  }
  usage = tg_json_parse(p, n, 0, NULL);
  r = tg_usage_read(usage, prompt, completion);
  tg_json_free(usage);
  return r;
}

/* The first line of ev that is a data field ("data:" at the line's start),
 * or NULL. Other fields and comments may mention "data:" anywhere. */
static const char *data_field(const char *ev, const char *end) {
  const char *line = ev, *q;
  while (line < end) {
    if ((size_t)(end - line) >= 5 && memcmp(line, "data:", 5) == 0)
      return line;
    if ((q = next_eol(line, end)) == NULL)
      return NULL;
    line = q + 1;
  }
  return NULL;
}

/* 1 when d[0..end) has a "choices" key whose value is an array that is not
 * empty, whitespace allowed anywhere JSON allows it ("choices" : [ ] is
 * empty). An event without choices (vLLM's {"error": ...}) carries no
 * content. */
static int choices_nonempty(const char *d, const char *end) {
  const char *q = d;
  while ((q = find(q, (size_t)(end - q), "\"choices\"")) != NULL) {
    q += 9;
    while (q < end && tg_json_ws(*q))
      q++;
    if (q >= end || *q != ':')
      continue; /* a value "choices", not the key */
    q++;
    while (q < end && tg_json_ws(*q))
      q++;
    if (q >= end || *q != '[')
      return 0;
    q++;
    while (q < end && tg_json_ws(*q))
      q++;
    return q < end && *q != ']';
  }
  return 0;
}

/* 1 for a member that carries nothing: null, "", [] or {}. */
static int carries_nothing(const cJSON *m) {
  if (cJSON_IsString(m))
    return m->valuestring[0] == '\0';
  if (cJSON_IsArray(m) || cJSON_IsObject(m))
    return m->child == NULL;
  return cJSON_IsNull(m);
}

/* 1 when the delta of every choice holds a "role" and nothing generated:
 * every other member empty, whatever its name (vLLM writes "content": "",
 * OpenAI "refusal": null, SGLang every field it has as null, others an
 * empty "tool_calls": []). vLLM opens each choice of a chat stream with
 * one such chunk before its first token; a stream cut without usage is
 * counted a token an event, and this event is none. A null role
 * announces nothing: SGLang writes one on every token's event and on its
 * closing one. */
static int choices_role_only(const cJSON *choices) {
  const cJSON *ch, *delta, *m;
  cJSON_ArrayForEach(ch, choices) {
    delta = tg_json_get(ch, "delta");
    if (!cJSON_IsObject(delta) || !cJSON_IsString(tg_json_get(delta, "role")))
      return 0;
    cJSON_ArrayForEach(m, delta) {
      if (strcmp(m->string, "role") != 0 && !carries_nothing(m))
        return 0;
    }
  }
  return 1;
}

/* The value of the data line starting at line (its "data:" and one space
 * left out): [*v, returned end). */
static const char *data_value(const char *line, const char *end, const char **v) {
  const char *d = line + 5, *le;
  if (d < end && *d == ' ')
    d++;
  le = d < end ? next_eol(d, end) : NULL;
  *v = d;
  return le != NULL ? le : end;
}

/* An event's data lines joined with LF, as the SSE format reads an event
 * of several (an upstream that pretty-prints its chunks): malloc'd in *out
 * (NUL-terminated), its length returned; 0 with *out NULL when the event
 * has one data line (read in place) or no memory is left (then the first
 * line alone is read, as before). */
static size_t data_joined(const char *first, const char *end, char **out) {
  const char *line, *v, *le;
  size_t n = 0, lines = 0;
  char *buf;

  *out = NULL;
  for (line = first; line < end;) {
    le = next_eol(line, end);
    if ((size_t)(end - line) >= 5 && memcmp(line, "data:", 5) == 0 && ++lines == 2)
      break; /* two are enough to know */
    if (le == NULL)
      break;
    line = le + (le[0] == '\r' && le + 1 < end && le[1] == '\n' ? 2 : 1);
  }
  if (lines < 2 || (buf = malloc((size_t)(end - first) + 1)) == NULL)
    return 0;
  for (line = first; line < end;) {
    le = next_eol(line, end);
    if ((size_t)(end - line) >= 5 && memcmp(line, "data:", 5) == 0) {
      const char *ve = data_value(line, end, &v);
      if (n > 0)
        buf[n++] = '\n';
      memcpy(buf + n, v, (size_t)(ve - v));
      n += (size_t)(ve - v);
    }
    if (le == NULL)
      break;
    line = le + (le[0] == '\r' && le + 1 < end && le[1] == '\n' ? 2 : 1);
  }
  buf[n] = '\0';
  *out = buf;
  return n;
}

/* Steps back over JSON whitespace in [d, q). */
static const char *back_ws(const char *d, const char *q) {
  while (q > d && tg_json_ws(q[-1]))
    q--;
  return q;
}

/* The member "usage": null that ends the object text d[0..le), from the
 * comma before it up to the closing brace: [*at, returned end), or NULL.
 * The text is one object (the strict parser said so): its last '}' closes
 * it, a '"' after a ',' opens a key (inside a string it would close the
 * string, and what follows could not be JSON), and no bracket between
 * that comma and the brace puts the member at the top level. */
static const char *null_usage_tail(const char *d, const char *le, const char **at) {
  static const char *const tokens[] = {"}", "null", ":", "\"usage\"", ","}; /* read backwards */
  const char *q = le, *end = NULL;
  for (size_t i = 0; i < sizeof(tokens) / sizeof(tokens[0]); i++) {
    size_t n = strlen(tokens[i]);
    q = back_ws(d, q);
    if ((size_t)(q - d) < n || memcmp(q - n, tokens[i], n) != 0)
      return NULL;
    q -= n;
    if (i == 0)
      end = q; /* the closing brace */
  }
  *at = q;
  return end;
}

int tg_sse_inspect(const char *ev, size_t len, tg_sse_info_t *info) {
  const char *d, *end = ev + len, *le;
  char *joined;
  cJSON *root;
  const cJSON *usage, *choices;
  int n_choices, mentions_usage, rc = 0;
  size_t jlen;

  memset(info, 0, sizeof(*info));
  d = data_field(ev, end);
  if (d == NULL)
    return 0; /* comment or other field: relayed as is */
  if ((jlen = data_joined(d, end, &joined)) > 0 || joined != NULL) {
    d = joined;
    le = joined + jlen;
  } else {
    le = data_value(d, end, &d); /* data never holds a CR or LF: its line ends there */
  }
  if (d >= le) {
    rc = TG_EPARSE;
    goto out;
  }
  if ((size_t)(le - d) == 6 && memcmp(d, "[DONE]", 6) == 0) {
    info->done = 1;
    goto out;
  }
  mentions_usage = find(d, (size_t)(le - d), "\"usage\"") != NULL;
  if (!mentions_usage && find(d, (size_t)(le - d), "\"role\"") == NULL) {
    info->has_choices = choices_nonempty(d, le);
    rc = *d == '{' ? 0 : TG_EPARSE;
    goto out;
  }
  root = tg_json_parse(d, (size_t)(le - d), 1, NULL);
  if (!cJSON_IsObject(root)) {
    /* counted, as unparsed ones are, "usage": null on it or not (an
     * upstream asked for usage may put one on every chunk) */
    tg_json_free(root);
    info->has_choices = choices_nonempty(d, le);
    rc = TG_EPARSE;
    goto out;
  }
  choices = tg_json_get(root, "choices");
  n_choices = cJSON_IsArray(choices) ? cJSON_GetArraySize(choices) : 0;
  info->has_choices = n_choices > 0;
  info->role_only = n_choices > 0 && choices_role_only(choices);
  usage = tg_json_get(root, "usage");
  if (cJSON_IsNull(usage) && joined == NULL) {
    const char *at, *e = null_usage_tail(d, le, &at);
    if (e != NULL) {
      info->null_usage_at = (size_t)(at - ev);
      info->null_usage_len = (size_t)(e - at);
    }
  }
  /* usage without both counts is none: the stream is counted instead, as a
   * whole answer's is (an upstream prompt beside our completion would mix
   * a figure from below with one from above) */
  info->usage_only = cJSON_IsObject(usage) && cJSON_IsArray(choices) && n_choices == 0;
  if (tg_usage_read(usage, &info->prompt_tokens, &info->completion_tokens) &&
      info->completion_tokens >= 0)
    info->has_usage = 1;
  else
    info->prompt_tokens = info->completion_tokens = 0;
  tg_json_free(root);
out:
  free(joined);
  return rc;
}

/* ---- generated text of a whole answer ---- */

static int64_t str_bytes(const cJSON *v) {
  return cJSON_IsString(v) ? (int64_t)strlen(v->valuestring) : 0; /* no NUL inside */
}

/* A message's content: a string, or a list of parts (strings or objects
 * with "text"). */
static int64_t content_bytes(const cJSON *v) {
  const cJSON *e;
  int64_t n = 0;

  if (!cJSON_IsArray(v))
    return str_bytes(v);
  cJSON_ArrayForEach(e, v) {
    n += cJSON_IsObject(e) ? str_bytes(tg_json_get(e, "text")) : str_bytes(e);
  }
  return n;
}

/* The length of s written as a JSON string, quotes included. */
static int64_t quoted_len(const char *s) {
  int64_t n = 2;
  for (const unsigned char *p = (const unsigned char *)s; *p; p++)
    n += *p == '"' || *p == '\\' || *p == '\b' || *p == '\f' || *p == '\n' || *p == '\r' ||
                 *p == '\t'
             ? 2
             : *p < 0x20 ? 6 : 1;
  return n;
}

/* The length of v written as compact JSON (what cJSON_PrintUnformatted
 * makes of it), counted without writing it: a walk over the tree the
 * answer's parse built, so bounded by that answer's size, and no deeper
 * than the parser's nesting bound. */
static int64_t json_len(const cJSON *v) {
  const cJSON *e;
  int64_t n;

  if (cJSON_IsString(v))
    return quoted_len(v->valuestring);
  if (cJSON_IsNumber(v)) {
    char b[32];
    int k = snprintf(b, sizeof(b), "%.15g", v->valuedouble);
    if (k > 0 && (size_t)k < sizeof(b) && strtod(b, NULL) != v->valuedouble)
      k = snprintf(b, sizeof(b), "%.17g", v->valuedouble);
    return k > 0 ? k : 1;
  }
  if (cJSON_IsArray(v) || cJSON_IsObject(v)) {
    n = 2; /* the brackets */
    cJSON_ArrayForEach(e, v) {
      n += (e != v->child) + json_len(e); /* a comma before all but the first */
      if (cJSON_IsObject(v))
        n += quoted_len(e->string) + 1; /* the key and its colon */
    }
    return n;
  }
  return cJSON_IsFalse(v) ? 5 : v != NULL ? 4 : 0; /* true, null */
}

/* A function's name and arguments ({"name","arguments"}). The arguments
 * are a JSON text in a string (OpenAI, vLLM), or the JSON itself (TGI
 * writes an object): that one counts its length as text, as the string
 * holding it would. */
static int64_t call_bytes(const cJSON *f) {
  const cJSON *a = tg_json_get(f, "arguments");
  return str_bytes(tg_json_get(f, "name")) +
         (cJSON_IsString(a) || cJSON_IsNull(a) ? str_bytes(a) : json_len(a));
}

/* A message's chain of thought: "reasoning" (vLLM's name, OpenRouter's)
 * and "reasoning_content" (vLLM's old one, DeepSeek's), one text when
 * both say the same (vLLM sent both while it renamed it). */
static int64_t reasoning_bytes(const cJSON *m) {
  const cJSON *r = tg_json_get(m, "reasoning"), *rc = tg_json_get(m, "reasoning_content");
  if (cJSON_IsString(r) && cJSON_IsString(rc) && strcmp(r->valuestring, rc->valuestring) == 0)
    return str_bytes(r);
  return str_bytes(r) + str_bytes(rc);
}

static int64_t message_bytes(const cJSON *m) {
  const cJSON *t;
  int64_t n = content_bytes(tg_json_get(m, "content")) + str_bytes(tg_json_get(m, "refusal")) +
              reasoning_bytes(m) + call_bytes(tg_json_get(m, "function_call"));
  t = tg_json_get(m, "tool_calls");
  if (cJSON_IsArray(t)) {
    const cJSON *e;
    cJSON_ArrayForEach(e, t) {
      n += call_bytes(tg_json_get(e, "function"));
    }
  }
  return n;
}

int64_t tg_answer_text_bytes(const char *body, size_t len) {
  cJSON *root;
  const cJSON *choices, *e;
  int64_t n = 0;

  if (len > TG_ANSWER_WALK_MAX || (root = tg_json_parse(body, len, 1, NULL)) == NULL)
    return (int64_t)len;
  choices = tg_json_get(root, "choices");
  if (cJSON_IsArray(choices))
    cJSON_ArrayForEach(e, choices) {
      n += str_bytes(tg_json_get(e, "text")) + message_bytes(tg_json_get(e, "message"));
    }
  tg_json_free(root);
  return n;
}

/* ---- a whole answer read as it passes ------------------------------------ */

enum { AS_BEFORE, AS_IN, AS_AFTER, AS_BAD };

void tg_ascan_init(tg_ascan_t *s) {
  memset(s, 0, offsetof(tg_ascan_t, usage));
}

static int as_ws(unsigned char ch) {
  return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r';
}

static void as_capture_end(tg_ascan_t *s) {
  s->capturing = 0;
  s->usage_ok = !s->over;
}

/* The bytes that matter inside a member's value, outside its strings
 * (separators, numbers and literals there only need to be passed over). */
static const unsigned char as_special[256] = {
  ['"'] = 1, ['{'] = 1, ['}'] = 1, ['['] = 1, [']'] = 1,
};

size_t tg_ascan_feed(tg_ascan_t *s, const char *data, size_t len) {
  const unsigned char *d = (const unsigned char *)data;
  size_t i, closed = len;

  for (i = 0; i < len && s->st != AS_BAD; i++) {
    unsigned char ch = d[i];

    if (s->in_str) {
      if (!s->capturing && !s->in_key && !s->esc) {
        /* inside a string only its end and escapes matter */
        while (i < len && d[i] != '"' && d[i] != '\\')
          i++;
        if (i == len)
          break;
        ch = d[i];
      }
      if (s->capturing) {
        if (s->usage_len < sizeof(s->usage))
          s->usage[s->usage_len++] = (char)ch;
        else
          s->over = 1;
      }
      if (s->esc) {
        s->esc = 0;
      } else if (ch == '\\') {
        s->esc = 1;
        if (s->in_key)
          s->key_len = 255; /* an escape in a key: not the "usage" key */
      } else if (ch == '"') {
        s->in_str = 0;
        if (s->in_key) {
          s->in_key = 0;
          s->key_usage = s->key_len == 5 && memcmp(s->key, "usage", 5) == 0;
        }
      } else if (s->in_key) {
        if (s->key_len < sizeof(s->key))
          s->key[s->key_len] = (char)ch;
        if (s->key_len < 255)
          s->key_len++;
      }
      continue;
    }
    if (s->depth >= 2 && !s->capturing && !as_special[ch])
      continue; /* a number or a literal inside a member's value */
    if (s->st != AS_IN) {
      if (as_ws(ch))
        continue;
      if (s->st == AS_BEFORE && ch == '{') {
        s->st = AS_IN;
        s->depth = 1;
        s->key_next = 1;
        continue;
      }
      s->st = AS_BAD; /* not an object, or bytes after it */
      break;
    }
    if (s->value_next && !as_ws(ch)) {
      s->value_next = 0;
      if (s->key_usage) {
        s->capturing = 1;
        s->compound = ch == '{' || ch == '[';
        s->over = 0;
        s->usage_ok = 0;
        s->usage_len = 0;
      }
    }
    if (s->capturing && !s->compound && s->depth == 1 && (ch == ',' || ch == '}'))
      as_capture_end(s);
    if (s->capturing) {
      if (s->usage_len < sizeof(s->usage))
        s->usage[s->usage_len++] = (char)ch;
      else
        s->over = 1;
    }
    switch (ch) {
    case '"':
      s->in_str = 1;
      if (s->depth == 1 && s->key_next) {
        s->key_next = 0;
        s->in_key = 1;
        s->key_len = 0;
      }
      break;
    case '{':
    case '[':
      if (s->depth == UINT_MAX) {
        s->st = AS_BAD;
        break;
      }
      s->depth++;
      break;
    case '}':
    case ']':
      if (s->depth == 1 && ch == ']') {
        s->st = AS_BAD; /* the object closed by a bracket */
        break;
      }
      if (--s->depth == 0) {
        s->st = AS_AFTER;
        closed = i;
        break;
      }
      if (s->capturing && s->compound && s->depth == 1)
        as_capture_end(s);
      break;
    case ',':
      if (s->depth == 1)
        s->key_next = 1;
      break;
    case ':':
      if (s->depth == 1)
        s->value_next = 1;
      break;
    default:
      break;
    }
  }
  return closed;
}

int tg_ascan_whole(const tg_ascan_t *s) {
  return s->st == AS_AFTER && !s->in_str;
}

const char *tg_ascan_usage(const tg_ascan_t *s, size_t *len) {
  if (!s->usage_ok)
    return NULL;
  *len = s->usage_len;
  return s->usage;
}
