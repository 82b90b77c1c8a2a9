/* Server-sent events as OpenAI-compatible servers stream them: split the
 * upstream's bytes into whole events, and tell what an event is ([DONE], a
 * usage report, a usage-only chunk, a content chunk) without parsing the
 * JSON of ordinary chunks. */
#ifndef TG_API_SSE_H
#define TG_API_SSE_H

#include <stddef.h>
#include <stdint.h>

#include "core/json.h"

typedef struct {
  char *buf;        /* bytes of an event not yet complete */
  size_t len, cap;
  size_t max;       /* an event longer than this is an error */
  int lone_cr;      /* the stream ends lines with a lone CR (seen once) */
} tg_sse_t;

/* Called once per whole event, terminator included. A negative return stops
 * tg_sse_feed, which returns it. */
typedef int (*tg_sse_event_cb)(void *arg, const char *ev, size_t len);

void tg_sse_init(tg_sse_t *p, size_t max_event);
void tg_sse_free(tg_sse_t *p);

/* Feeds upstream bytes; calls cb for each event completed by them. Whole
 * events inside data are passed without copying. Returns 0, TG_ETOOBIG (an
 * event over max), TG_ENOMEM, or cb's negative result. */
int tg_sse_feed(tg_sse_t *p, const char *data, size_t len, tg_sse_event_cb cb, void *arg);

/* Bytes held of an incomplete event. */
size_t tg_sse_pending(const tg_sse_t *p);

typedef struct {
  int done;                 /* data: [DONE] */
  int has_usage;            /* carries a usage object with both token counts */
  int usage_only;           /* a usage object and "choices": [] (the include_usage chunk) */
  int has_choices;          /* a chunk with at least one choice */
  int role_only;            /* its every choice only announces the role, with no
                             * content: vLLM's first chat chunk, not a token */
  int64_t prompt_tokens;
  int64_t completion_tokens;
  size_t null_usage_at;     /* > 0: ev[null_usage_at..+null_usage_len) is a */
  size_t null_usage_len;    /* last member "usage": null, its comma before it */
} tg_sse_info_t;

/* Classifies one event. Returns 0, or TG_EPARSE when its data is not
 * [DONE] and not a JSON object. The "usage": null found is that of an
 * event of one data line whose object the strict parser took and which
 * ends with that member (where OpenAI, vLLM and SGLang write it, whitespace
 * allowed): cutting those bytes out leaves the same object without it. */
int tg_sse_inspect(const char *ev, size_t len, tg_sse_info_t *info);

/* A usage figure above this is no request's (a billion tokens is 21 hours
 * of 128 sequences at 100 tokens a second): an upstream reporting one is
 * broken, and its usage is none, counted instead, never billed as exact.
 * It also keeps every cost below 2^63 nano-USD: prices are at most
 * TG_PRICE_NANO_PER_TOKEN_MAX (config.h), so a request costs at most
 * 2 x 10^18. */
#define TG_USAGE_TOKENS_MAX INT64_C(1000000000)

/* Reads an OpenAI "usage" object, streamed or not: 1 with the token counts
 * when prompt_tokens is an integer in [0, TG_USAGE_TOKENS_MAX], 0
 * otherwise. *completion is -1 when completion_tokens is absent or not a
 * non-negative integer (an embeddings answer has none; for a completion the
 * caller decides); a completion_tokens above the bound makes the whole
 * usage none. usage may be NULL or not an object. */
int tg_usage_read(const cJSON *usage, int64_t *prompt, int64_t *completion);

/* The same reading from the text of a usage value at p[0..n) (what follows
 * the value is ignored, as tg_json_parse's prefix mode ignores it, but is
 * still checked as text): exactly tg_usage_read(tg_json_parse(p, n, 0)).
 * The usual shape, a flat object of small integers and nulls with plain
 * keys, is read in one pass without building a tree; anything else goes
 * through the strict parser. */
int tg_usage_read_text(const char *p, size_t n, int64_t *prompt, int64_t *completion);

/* Bytes in a whole chat or completions answer body[0..len) (a JSON object)
 * that the model generated: for each choice its text (completions), or its
 * message's content (a string, or parts' "text"), refusal, reasoning
 * ("reasoning", "reasoning_content"), and each tool call's or function
 * call's name and arguments (chat). A token never covers less than one byte, so this
 * bounds the completion tokens from above. A body over TG_ANSWER_WALK_MAX,
 * or one the strict parser refuses, is not walked: every byte of generated
 * text is in it (escaped, never shorter), so its length is returned. */
#define TG_ANSWER_WALK_MAX (1024u * 1024)
int64_t tg_answer_text_bytes(const char *body, size_t len);

/* A whole (non-streamed) JSON answer read as it passes, for one too big to
 * keep: follows strings and nesting, keeps the text of the top-level
 * object's "usage" value (the last such member, up to TG_ASCAN_USAGE_MAX
 * bytes), and tells where that object closes. A few bytes of state, no
 * allocation, any split of the bytes into pieces. A key written with an
 * escape is never taken for "usage" (the proxy looks for the key as plain
 * text too). */
#define TG_ASCAN_USAGE_MAX 1024
typedef struct {
  unsigned depth;              /* nesting of the object; 0 outside it */
  unsigned char st;            /* before, inside, after the object, or bad */
  unsigned char in_str, esc;
  unsigned char key_next;      /* at depth 1: the next string is a key */
  unsigned char in_key;        /* reading a top-level key */
  unsigned char key_len;       /* its bytes, counted up to 255 (255 too
                                  once it has an escape) */
  unsigned char key_usage;     /* the last top-level key was "usage" */
  unsigned char value_next;    /* after its ':': the value starts next */
  unsigned char capturing;     /* in the usage value */
  unsigned char compound;      /* that value is an object or an array */
  unsigned char over;          /* that value passed TG_ASCAN_USAGE_MAX */
  unsigned char usage_ok;      /* usage[0..usage_len) is a whole value */
  char key[5];
  size_t usage_len;
  char usage[TG_ASCAN_USAGE_MAX];
} tg_ascan_t;

void tg_ascan_init(tg_ascan_t *s);

/* Reads data[0..len). Returns the offset in data of the top-level object's
 * closing brace when these bytes close it, else len: a caller holding back
 * an answer's end sends data[0..return) now. */
size_t tg_ascan_feed(tg_ascan_t *s, const char *data, size_t len);

/* 1 when every byte fed so far is one JSON object (closed; only
 * whitespace after it): a lexical check of nesting and strings, not a
 * full parse. */
int tg_ascan_whole(const tg_ascan_t *s);

/* The text of the last top-level "usage" value, or NULL (none, or over
 * the bound). */
const char *tg_ascan_usage(const tg_ascan_t *s, size_t *len);

#endif
