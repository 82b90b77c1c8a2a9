/* Strict JSON reading for the request path, on cJSON.
 *
 * Every request body and every upstream usage object is parsed once per
 * request, so the parser's speed is the gateway's speed (cJSON takes about a
 * quarter of jansson's time on a chat body). cJSON alone is laxer than the
 * upstream's parser in ways that matter for isolation: it keeps the first of
 * two equal keys where Python keeps the last, so {"model":"a","model":"b"}
 * would be authorised as one model and served as another; it cuts a string
 * at \u0000; it passes invalid UTF-8 through. tg_json_parse() adds what is
 * missing: the text is checked first (UTF-8, no control bytes, no \u0000),
 * and the tree after (no object with a key twice, at any depth). Anything
 * that fails is refused, with a short reason for the client.
 *
 * Memory. A chat body makes a dozen or two nodes and key strings, each its
 * own malloc() and free() with plain cJSON: about a fifth of the parse's
 * cost on the request path. tg_json_init() gives cJSON allocation hooks
 * through which a tree made by tg_json_parse() comes from a per-thread
 * arena (TG_JSON_ARENA bytes, reused from one parse to the next, and
 * malloc() beyond it), so tg_json_free() frees it at once. One arena tree
 * lives at a time per thread: a parse while one lives takes the heap. Every
 * other cJSON allocation (trees built to print, other threads' parses while
 * their arena is busy) goes to malloc() and free() as before.
 *
 * Thread safety: cJSON is safe across threads when cJSON_GetErrorPtr() is
 * never used (the error position comes back through return_parse_end) and
 * the locale is left alone, which this module keeps to. Its hooks are set
 * once, by tg_json_init(), before any other thread starts. */
#ifndef TG_CORE_JSON_H
#define TG_CORE_JSON_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

/* Why a text was refused: a static reason and the byte offset it refers
 * to (the offending byte, or where the parser stopped). */
typedef struct {
  const char *why;
  size_t at;
} tg_json_err_t;

/* Bytes of each thread's arena for parsed trees. */
#define TG_JSON_ARENA (16 * 1024)

/* Installs the allocation hooks. Idempotent; the first call must come
 * before a second thread uses cJSON (main() makes it). */
void tg_json_init(void);

/* Parses one JSON value from buf[0..len). With whole != 0 only whitespace
 * may follow it; otherwise the rest is ignored (a value read out of a larger
 * text) but still checked as text. Returns the tree, to be read only (never
 * added to or detached from) and given to tg_json_free() on the thread that
 * parsed it, or NULL and fills *err (may be NULL). */
cJSON *tg_json_parse(const char *buf, size_t len, int whole, tg_json_err_t *err);

/* Frees a tree of tg_json_parse() (NULL is fine). */
void tg_json_free(cJSON *root);

/* Tests only: 1 when p lies in the calling thread's arena. */
int tg__json_in_arena(const void *p);

/* 1 for JSON's whitespace: space, tab, LF, CR. */
static inline int tg_json_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The member `key` of object `o` (case-sensitive, as JSON is), or NULL when
 * o is not an object or has no such member. */
static inline cJSON *tg_json_get(const cJSON *o, const char *key) {
  return cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, key) : NULL;
}

/* 1 when v is a number with an integral value representable exactly
 * (|v| <= 2^53), stored in *out; 0 otherwise. */
int tg_json_int(const cJSON *v, int64_t *out);

/* Checks text alone: valid UTF-8 (no overlong forms, no surrogates, nothing
 * past U+10FFFF), no control byte but tab, LF and CR, and no \u0000 escape.
 * Returns 0, or -1 and fills *err. */
int tg_json_check_text(const char *buf, size_t len, tg_json_err_t *err);

/* The length (1 to 4) of the valid UTF-8 sequence at s[0..len), len > 0,
 * or 0 when the bytes there are not one (by tg_json_check_text's rules). */
size_t tg_utf8_len(const unsigned char *s, size_t len);

#endif
