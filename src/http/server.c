/* HTTP/1.1 server: accept, parse with llhttp, hand whole requests to a
 * handler, write responses, keep connections alive, enforce every bound.
 *
 * One request per connection is active at a time. Bytes that arrive while a
 * request is active (pipelining) wait in the connection's pending buffer and
 * are parsed once the request completes and the answers waiting for the
 * client are under the write high-water mark; that continuation runs from an
 * idle handle, never from inside the completing call, so a handler that
 * completes a request from a library callback is never re-entered. A
 * connection whose client left while a request is active stays allocated
 * until the handler completes the request; it is freed from its close
 * callbacks only. */
#include "http/server.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/err.h"
#include "core/recycle.h"
#include "core/strbuf.h"

#define MAX_HEADERS 100
#define READ_BUF_SIZE 65536
#define PEND_MAX (256 * 1024)      /* pipelined bytes held before reading stops */
#define STACK_RESP 8192
/* A refused connection's input is read and dropped for at most this long
 * and this many bytes before it closes (see conn_linger). */
#define LINGER_MS 2000
#define LINGER_MAX (8 * 1024 * 1024)
/* How often a connection whose reading stopped under an active request
 * (pipelined input past PEND_MAX) is checked for a client that left. */
#define PROBE_MS 250

enum { TIMER_NONE, TIMER_REQUEST, TIMER_KEEPALIVE, TIMER_SEND, TIMER_LINGER, TIMER_PROBE };

/* A request's head: its URL and headers, NUL-separated in text (bounded by
 * max_header_bytes), and where each header starts. Taken from the server's
 * recycle when a request begins and given back when it completes, or
 * earlier when the handler says it is done with it
 * (tg_http_req_drop_head), so an idle keep-alive connection holds none and
 * a long stream none after its first moments. */
typedef struct {
  uint32_t name_off[MAX_HEADERS], value_off[MAX_HEADERS];
  tg_http_header_t hdrs[MAX_HEADERS];
  char text[];
} head_t;

/* Heads a server keeps for the next requests. */
#define HEADS_KEPT 256

struct tg_http_server_s {
  uv_loop_t *loop;
  uv_tcp_t listener;
  uv_idle_t idle;              /* resumes pipelined parsing */
  /* Out of descriptors on accept: the listener is closed for a while (else
   * libuv's accept loop retries for ever without returning to the loop)
   * and opened again from spare_fd, a second descriptor of the listening
   * socket, which keeps it and its backlog meanwhile. */
  uv_timer_t resume;
  uv_os_sock_t spare_fd;       /* -1: none */
  int resume_open;
  int paused;
  uint64_t pause_logged_ms;
  tg_http_limits_t lim;
  tg_http_handler_cb handler;
  tg_http_reject_cb on_reject;
  void *data;
  int port;
  int draining;
  int closing;
  int listener_open;
  int idle_open;
  size_t active;
  size_t n_conns;
  tg_http_conn_t *conns;       /* all open connections, doubly linked */
  tg_http_conn_t *ready;       /* connections with pipelined bytes to parse */
  void (*done)(void *);
  void *done_arg;
  llhttp_settings_t settings;
  size_t hcap;                 /* bytes of a head's text */
  tg_recycle_t heads;          /* head_t blocks of hcap bytes of text */
  char rbuf[READ_BUF_SIZE];
};

struct tg_http_conn_s {
  uv_tcp_t tcp;
  uv_timer_t timer;
  tg_http_server_t *srv;
  tg_http_conn_t *prev, *next;
  tg_http_conn_t *ready_next;
  llhttp_t parser;
  tg_http_req_t req;

  head_t *head;                /* the request's head, while one is parsed or served */
  size_t hlen;                 /* bytes of head->text used */
  size_t n_hdrs;
  int in_field;
  int value_open;
  int reject;                  /* status decided by a bound, or 0 */
  const char *reject_msg;      /* a 400's message, when not the generic one */
  /* The head's bytes as they came, separators and whitespace included, for
   * max_header_bytes: those in earlier reads, and where they start in the
   * current one (NULL outside a head). */
  size_t head_raw;
  const char *head_from;
  /* For obs-fold (fold_between): where the head's last URL, name or value
   * piece ended in the current read (NULL: none there yet), where the read
   * starts, and whether the head's bytes scanned last ended in LF. */
  const char *piece_end;
  const char *feed_from;
  unsigned gap_lf : 1;

  char *body;
  size_t body_len, body_cap;

  char *pend;                  /* unparsed bytes (pipelining) */
  size_t pend_len;
  size_t linger_bytes;         /* input dropped while lingering */

  size_t out_pending;
  int timer_mode;
  uint64_t due;                /* loop ms when timer_mode's limit passes */
  uint64_t armed_due;          /* when the uv timer fires, while armed */
  int handles;                 /* open uv handles; freed at 0 */
  unsigned in_message : 1;
  unsigned in_head : 1;        /* from the method to the end of the headers */
  unsigned active : 1;         /* handed to the handler, not completed */
  unsigned gone : 1;           /* client left or socket failed */
  unsigned closing : 1;
  unsigned close_after : 1;    /* close once output is flushed */
  unsigned reading : 1;
  unsigned armed : 1;          /* the uv timer is running */
  unsigned queued : 1;         /* on srv->ready */
  unsigned chunked : 1;        /* current response is chunked */
  unsigned begun : 1;          /* response head sent */
  unsigned above_high : 1;     /* pending crossed the high-water mark */
  unsigned held : 1;           /* input held until pending falls under low water */
  unsigned trailers : 1;       /* headers complete: fields now are trailers */
  unsigned lingering : 1;      /* refused: reply flushed, input dropped */
  unsigned http10 : 1;
  unsigned abort_sent : 1;     /* on_abort delivered for the active request */
  unsigned promised : 1;       /* the answer's head said keep-alive */
};

typedef struct {
  uv_write_t w;
  tg_http_conn_t *conn;
  size_t len;
  char data[];
} write_req_t;

static void conn_close(tg_http_conn_t *c);
static void conn_process(tg_http_conn_t *c);
static void conn_timer_update(tg_http_conn_t *c);
static void conn_timer_arm(tg_http_conn_t *c, uint64_t ms);
static void on_timer(uv_timer_t *t);
static void conn_start_reading(tg_http_conn_t *c);
static void conn_stop_reading(tg_http_conn_t *c);
static void conn_resume_input(tg_http_conn_t *c);
static void conn_linger_timer(tg_http_conn_t *c);
static void on_idle(uv_idle_t *h);

void tg_http_limits_default(tg_http_limits_t *lim) {
  lim->max_header_bytes = 16 * 1024;
  lim->max_body_bytes = 1024 * 1024;
  lim->request_timeout_ms = 30000;
  lim->keepalive_timeout_ms = 60000;
  lim->send_timeout_ms = 60000;
  lim->write_high_water = 256 * 1024;
  lim->write_low_water = 64 * 1024;
}

const char *tg_http_reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 200: return "OK";
  case 201: return "Created";
  case 204: return "No Content";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 402: return "Payment Required";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 411: return "Length Required";
  case 413: return "Payload Too Large";
  case 415: return "Unsupported Media Type";
  case 422: return "Unprocessable Entity";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  case 505: return "HTTP Version Not Supported";
  default: return "Unknown";
  }
}

/* The client is gone: tell the handler of the active request, once. Never
 * called from inside a handler's own write call (that call's result says
 * it), so the handler is not re-entered. */
static void conn_gone_notify(tg_http_conn_t *c) {
  c->gone = 1;
  if (c->active && !c->abort_sent) {
    c->abort_sent = 1;
    if (c->req.on_abort)
      c->req.on_abort(&c->req);
  }
}

/* ---- output ---------------------------------------------------------- */

static void on_write(uv_write_t *w, int status) {
  write_req_t *wr = (write_req_t *)w;
  tg_http_conn_t *c = wr->conn;
  tg_http_server_t *srv = c->srv;

  c->out_pending -= wr->len;
  free(wr);
  if (status < 0)
    conn_gone_notify(c);
  if (c->closing)
    return;
  if (c->lingering) {
    if (status < 0)
      conn_close(c); /* the refusal cannot reach the client */
    else
      conn_linger_timer(c);
    return;
  }
  if (c->out_pending == 0 && (c->gone || (c->close_after && !c->active))) {
    conn_close(c);
    return;
  }
  /* bytes left: the client reads, so its send deadline starts again */
  if (status == 0 && c->timer_mode == TIMER_SEND)
    c->timer_mode = TIMER_NONE;
  conn_timer_update(c);
  if (c->held && c->out_pending <= srv->lim.write_low_water) {
    c->held = 0;
    if (!c->active && !c->close_after)
      conn_resume_input(c);
  }
  if (c->active && c->above_high && c->out_pending <= srv->lim.write_low_water) {
    c->above_high = 0;
    if (c->req.on_drain)
      c->req.on_drain(&c->req);
  }
}

/* Queues the bytes of bufs[0..nb). Tries a direct write first so a small
 * response costs no allocation; copies what the socket did not take. */
static int conn_sendv(tg_http_conn_t *c, const uv_buf_t *bufs, unsigned nb) {
  size_t total = 0, skip = 0, off = 0;
  write_req_t *wr;
  uv_buf_t one;
  unsigned i;
  int r;

  if (c->gone || c->closing)
    return TG_ECANCELED;
  for (i = 0; i < nb; i++)
    total += bufs[i].len;
  if (total == 0)
    return 0;
  if (c->out_pending == 0) {
    r = uv_try_write((uv_stream_t *)&c->tcp, bufs, nb);
    if (r > 0)
      skip = (size_t)r;
    else if (r != UV_EAGAIN && r != UV_ENOSYS) {
      c->gone = 1;
      return r;
    }
    if (skip == total)
      return 0;
  }
  wr = malloc(sizeof(*wr) + total - skip);
  if (wr == NULL)
    return TG_ENOMEM;
  wr->conn = c;
  wr->len = total - skip;
  for (i = 0; i < nb; i++) {
    size_t l = bufs[i].len;
    if (skip >= l) {
      skip -= l;
      continue;
    }
    memcpy(wr->data + off, bufs[i].base + skip, l - skip);
    off += l - skip;
    skip = 0;
  }
  one = uv_buf_init(wr->data, (unsigned)wr->len);
  r = uv_write(&wr->w, (uv_stream_t *)&c->tcp, &one, 1, on_write);
  if (r < 0) {
    free(wr);
    c->gone = 1;
    return r;
  }
  c->out_pending += wr->len;
  if (c->out_pending >= c->srv->lim.write_high_water)
    c->above_high = c->held = 1;
  conn_timer_update(c);
  return 0;
}

static int conn_send2(tg_http_conn_t *c, const char *a, size_t alen,
                      const char *b, size_t blen) {
  uv_buf_t bufs[2];
  bufs[0] = uv_buf_init((char *)a, (unsigned)alen);
  bufs[1] = uv_buf_init((char *)b, (unsigned)blen);
  return conn_sendv(c, bufs, blen ? 2 : 1);
}

static int conn_send(tg_http_conn_t *c, const char *data, size_t len) {
  return conn_send2(c, data, len, NULL, 0);
}

/* ---- request completion ---------------------------------------------- */

static void conn_reset_request(tg_http_conn_t *c) {
  free(c->body);
  c->body = NULL;
  c->body_len = c->body_cap = 0;
  tg_recycle_free(&c->srv->heads, c->head);
  c->head = NULL;
  c->hlen = 0;
  c->in_head = 0;
  c->head_raw = 0;
  c->head_from = NULL;
  c->piece_end = NULL;
  c->gap_lf = 0;
  c->n_hdrs = 0;
  c->in_field = 0;
  c->value_open = 0;
  c->reject = 0;
  c->reject_msg = NULL;
  c->chunked = c->begun = c->above_high = c->abort_sent = c->trailers = 0;
  c->promised = 0;
  memset(&c->req, 0, sizeof(c->req));
  c->req.conn = c;
  c->req.server = c->srv;
}

static void srv_queue_ready(tg_http_conn_t *c) {
  tg_http_server_t *srv = c->srv;
  if (c->queued)
    return;
  c->queued = 1;
  c->ready_next = srv->ready;
  srv->ready = c;
  if (srv->idle_open && !uv_is_active((uv_handle_t *)&srv->idle))
    uv_idle_start(&srv->idle, on_idle);
}

static void req_complete(tg_http_conn_t *c, int keep) {
  tg_http_server_t *srv = c->srv;

  if (!c->active)
    return;
  c->active = 0;
  srv->active--;
  /* A drain that began after the head said keep-alive (a stream) does not
   * drop a request the client already sent on that promise: it is served,
   * its own answer saying close. */
  if (!keep || srv->closing ||
      ((!c->req.keep_alive || srv->draining) && !(c->promised && c->pend_len > 0)))
    c->close_after = 1;
  conn_reset_request(c);
  if (c->closing)
    return;
  if (c->gone || (c->close_after && c->out_pending == 0)) {
    conn_close(c);
    return;
  }
  if (c->close_after)
    return; /* closes from on_write once flushed */
  conn_timer_update(c);
  if (c->held) {
    conn_stop_reading(c); /* on_write resumes under the low-water mark */
    return;
  }
  conn_resume_input(c);
}

/* Goes on with the connection's input: the pipelined bytes first, then the
 * socket. */
static void conn_resume_input(tg_http_conn_t *c) {
  if (c->pend_len > 0)
    srv_queue_ready(c);
  else
    conn_start_reading(c);
}

/* ---- llhttp callbacks ------------------------------------------------- */

static int head_append(tg_http_conn_t *c, const char *at, size_t len, int lower) {
  char *t = c->head->text;
  size_t i;
  if (c->hlen + len + 1 > c->srv->hcap) {
    c->reject = 431;
    return -1;
  }
  if (lower) {
    for (i = 0; i < len; i++) {
      char ch = at[i];
      t[c->hlen + i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
    }
  } else {
    memcpy(t + c->hlen, at, len);
  }
  c->hlen += len;
  return 0;
}

static int head_terminate(tg_http_conn_t *c) {
  if (c->hlen + 1 > c->srv->hcap) {
    c->reject = 431;
    return -1;
  }
  c->head->text[c->hlen++] = '\0';
  return 0;
}

static tg_http_conn_t *parser_conn(llhttp_t *p) {
  return (tg_http_conn_t *)p->data;
}

/* The raw head so far, up to end in the current read, against the bound:
 * what the stored copy leaves out (the method, spaces, colons, line ends)
 * counts too, so the bound is on the bytes the client sent. */
static int head_within(tg_http_conn_t *c, const char *end) {
  if (c->head_raw + (size_t)(end - c->head_from) > c->srv->lim.max_header_bytes) {
    c->reject = 431;
    return -1;
  }
  return 0;
}

/* Trailers (fields after a chunked body) are bounded like a head, on their
 * own: measured from the first trailer's start by the same machinery (the
 * head's own count ended with its headers), and dropped, since nothing
 * reads them. */
static int trailer_within(tg_http_conn_t *c, const char *at, size_t len) {
  if (!c->in_head) {
    c->in_head = 1;
    c->head_raw = 0;
    c->head_from = at;
  }
  return head_within(c, at + len);
}

/* An obs-fold (RFC 9112 5.2) is a line end followed by a blank inside a
 * field value. llhttp 8 takes it as part of the value: the line end is
 * left out of its pieces (the blank starts the next one, or is left out
 * too when the first line was empty). So it is looked for in the head's
 * bytes from where its last piece (URL, name, value) ended, or from the
 * start of the read, carrying the LF of the one before, up to end.
 * Whether one was found. */
static int fold_between(tg_http_conn_t *c, const char *end) {
  const char *s = c->piece_end != NULL ? c->piece_end : c->feed_from;
  int lf = c->gap_lf;

  for (; s < end; s++) {
    if (lf && (*s == ' ' || *s == '\t'))
      return 1;
    lf = *s == '\n';
  }
  c->gap_lf = lf;
  return 0;
}

/* RFC 9112 5.2 lets a server refuse a folded value or read the fold as a
 * space. A front proxy may have read it otherwise ("Transfer-Encoding:" as
 * empty and a bad line after it): for the framing fields that would be a
 * request smuggled past it, so none is taken. */
static int fold_refuse(tg_http_conn_t *c) {
  c->reject = 400;
  c->reject_msg = "obsolete line folding is not accepted";
  return -1;
}

/* A piece of the head at..at+len: the bytes before it, and its first,
 * hold no fold; the next gap starts after it. */
static int head_piece(tg_http_conn_t *c, const char *at, size_t len) {
  if (fold_between(c, at + (len > 0))) /* the piece's first byte too */
    return fold_refuse(c);
  c->piece_end = at + len;
  c->gap_lf = 0;
  return 0;
}

static int on_method(llhttp_t *p, const char *at, size_t len) {
  tg_http_conn_t *c = parser_conn(p);
  if (!c->in_head) {
    c->in_head = 1;
    c->head_raw = 0;
    c->head_from = at;
  }
  return head_within(c, at + len);
}

static int on_message_begin(llhttp_t *p) {
  tg_http_conn_t *c = parser_conn(p);
  if (c->head == NULL && (c->head = tg_recycle_alloc(&c->srv->heads)) == NULL) {
    c->reject = 500;
    return -1;
  }
  c->in_message = 1;
  c->req.start_ns = uv_hrtime();
  c->timer_mode = TIMER_NONE;
  conn_timer_update(c);
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  tg_http_conn_t *c = parser_conn(p);
  if (head_within(c, at + len) < 0 || head_piece(c, at, len) < 0)
    return -1;
  return head_append(c, at, len, 0);
}

static int on_url_complete(llhttp_t *p) {
  return head_terminate(parser_conn(p));
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  tg_http_conn_t *c = parser_conn(p);
  if (c->trailers)
    return trailer_within(c, at, len);
  if (!c->in_field) {
    if (c->value_open) {
      if (head_terminate(c) < 0)
        return -1;
      c->value_open = 0;
    }
    if (c->n_hdrs == MAX_HEADERS) {
      c->reject = 431;
      return -1;
    }
    c->head->name_off[c->n_hdrs] = (uint32_t)c->hlen;
    c->head->value_off[c->n_hdrs] = (uint32_t)c->hlen;
    c->n_hdrs++;
    c->in_field = 1;
  }
  if (head_within(c, at + len) < 0 || head_piece(c, at, len) < 0)
    return -1;
  return head_append(c, at, len, 1);
}

static int on_header_field_complete(llhttp_t *p) {
  tg_http_conn_t *c = parser_conn(p);
  if (c->trailers)
    return 0;
  if (!c->in_field || c->hlen == c->head->name_off[c->n_hdrs - 1]) {
    /* ": value", a line with no name: a field name is a token (RFC 9110
     * 5.1), and llhttp 8 lets an empty one through */
    c->reject = 400;
    c->reject_msg = "a header field has no name";
    return -1;
  }
  if (head_terminate(c) < 0)
    return -1;
  c->in_field = 0;
  c->head->value_off[c->n_hdrs - 1] = (uint32_t)c->hlen;
  c->value_open = 1;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  tg_http_conn_t *c = parser_conn(p);
  if (c->trailers)
    return trailer_within(c, at, len);
  if (head_within(c, at + len) < 0 || head_piece(c, at, len) < 0)
    return -1;
  return head_append(c, at, len, 0);
}

static int on_header_value_complete(llhttp_t *p) {
  tg_http_conn_t *c = parser_conn(p);
  if (c->trailers || !c->value_open)
    return 0;
  c->value_open = 0;
  return head_terminate(c);
}

static char *trim(char *s) {
  char *e;
  while (*s == ' ' || *s == '\t')
    s++;
  e = s + strlen(s);
  while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
    *--e = '\0';
  return s;
}

/* Whether a[0..n) is an http(s) URI's authority as a server may take it:
 * host, an IP literal in brackets or a reg-name / IPv4 of unreserved,
 * percent-encoded and sub-delim characters (RFC 3986 3.2.2), not empty
 * (RFC 9110 4.2.1), then an optional port of at most 5 digits up to 65535.
 * No userinfo: RFC 9110 4.2.4 has a recipient treat it as an error. */
static int authority_ok(const char *a, size_t n) {
  const char *end = a + n, *h = a;
  long port = 0;

  if (n == 0)
    return 0;
  if (*h == '[') {
    for (h++; h < end && strchr("0123456789abcdefABCDEF:.", *h) != NULL; h++)
      ;
    if (h == a + 1 || h == end || *h != ']')
      return 0;
    h++;
  } else {
    for (; h < end && *h != ':'; h++) {
      if (*h == '%' && end - h > 2 && isxdigit((unsigned char)h[1]) &&
          isxdigit((unsigned char)h[2]))
        h += 2;
      else if (!isalnum((unsigned char)*h) && strchr("-._~!$&'()*+,;=", *h) == NULL)
        return 0;
    }
    if (h == a)
      return 0;
  }
  if (h == end)
    return 1;
  if (*h != ':' || end - h > 6)
    return 0;
  for (h++; h < end; h++) {
    if (!isdigit((unsigned char)*h))
      return 0;
    port = port * 10 + (*h - '0');
  }
  return port <= 65535;
}

/* The path a request is routed on (RFC 9112 3.2), url being its target
 * without the query. The origin-form ("/v1/models") is its own path. The
 * absolute-form ("http://authority/v1/models"), which a client talking to
 * a proxy sends and a server MUST accept (3.2.2), is routed on its path,
 * "/" when it has none; its authority stands for the Host header then, and
 * the gateway reads neither. The asterisk form and anything else are left
 * as they are: no route has them (404, as ever; CONNECT's authority-form
 * was refused before). Returns NULL, with why, for an absolute-form
 * target whose scheme is not http or https or whose authority is
 * malformed. */
static const char *target_path(const char *url, const char **why) {
  const char *s = url, *auth, *path;
  size_t n;

  if (!isalpha((unsigned char)*s))
    return url;
  for (s++; isalnum((unsigned char)*s) || *s == '+' || *s == '-' || *s == '.'; s++)
    ;
  if (*s != ':')
    return url;
  n = (size_t)(s - url);
  if (!(n == 4 && strncasecmp(url, "http", 4) == 0) &&
      !(n == 5 && strncasecmp(url, "https", 5) == 0)) {
    *why = "the request target's scheme must be http or https";
    return NULL;
  }
  if (strncmp(s, "://", 3) != 0) {
    *why = "malformed absolute-form request target";
    return NULL;
  }
  auth = s + 3;
  path = auth + strcspn(auth, "/");
  if (!authority_ok(auth, (size_t)(path - auth))) {
    *why = "malformed authority in the request target";
    return NULL;
  }
  return *path != '\0' ? path : "/";
}

static int on_headers_complete(llhttp_t *p) {
  tg_http_conn_t *c = parser_conn(p);
  head_t *h = c->head;
  size_t i;
  char *url, *q;
  const char *expect, *te;
  int hosts = 0;

  c->in_head = 0;
  c->trailers = 1;
  if (c->value_open) {
    if (head_terminate(c) < 0)
      return -1;
    c->value_open = 0;
  }
  for (i = 0; i < c->n_hdrs; i++) {
    h->hdrs[i].name = h->text + h->name_off[i];
    h->hdrs[i].value = trim(h->text + h->value_off[i]);
    hosts += strcmp(h->hdrs[i].name, "host") == 0; /* names are lower-cased */
  }
  url = h->text; /* the URL comes first */
  q = strchr(url, '?');
  if (q != NULL) {
    *q = '\0';
    c->req.query = q + 1;
  } else {
    c->req.query = "";
  }
  c->req.headers = h->hdrs;
  c->req.n_headers = c->n_hdrs;
  c->req.method = (int)p->method;
  c->http10 = (p->http_major == 1 && p->http_minor == 0);
  if (p->http_major != 1 || p->http_minor > 1) {
    c->reject = 505; /* HTTP/0.9's bare request line, or a later version */
    return -1;
  }
  if (hosts > 1 || (hosts == 0 && !c->http10)) {
    /* RFC 9112 3.2: which authority was meant would be a guess, and a
     * front proxy may have guessed otherwise. It holds for an
     * absolute-form target too, whose authority then stands for Host
     * (3.2.2): a client MUST send Host whatever the form. */
    c->reject = 400;
    c->reject_msg = "one Host header is needed (HTTP/1.0: at most one)";
    return -1;
  }
  te = tg_http_req_header(&c->req, "transfer-encoding");
  if (te != NULL && (c->http10 || strcasecmp(te, "chunked") != 0)) {
    /* RFC 9112 6.1: in HTTP/1.0 it is faulty framing; and the body of a
     * coding other than chunked alone could not be read */
    c->reject = c->http10 ? 400 : 501;
    return -1;
  }

  /* The server speaks HTTP/1.1 only and never switches protocols. An
   * Upgrade offer (curl --http2 sends h2c) may be ignored (RFC 9110 7.8):
   * the request is answered as plain HTTP/1.1 and the connection goes on
   * as such, so llhttp must not stop at its end as if a new protocol
   * followed. CONNECT asks for a tunnel; this is no proxy, and what the
   * client sends after it is meant for the tunnel, not as requests. */
  if (p->method == HTTP_CONNECT) {
    c->reject = 405;
    return -1;
  }
  p->upgrade = 0;

  c->req.path = target_path(url, &c->reject_msg);
  if (c->req.path == NULL) {
    c->reject = 400;
    return -1;
  }
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->srv->lim.max_body_bytes) {
    c->reject = 413;
    return -1;
  }
  expect = tg_http_req_header(&c->req, "expect");
  if (expect != NULL && strcasecmp(expect, "100-continue") == 0 && !c->http10) {
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    conn_send(c, cont, sizeof(cont) - 1);
  }
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0) {
    c->body_cap = (size_t)p->content_length + 1;
    c->body = malloc(c->body_cap);
    if (c->body == NULL) {
      c->reject = 500;
      return -1;
    }
  }
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  tg_http_conn_t *c = parser_conn(p);
  size_t max = c->srv->lim.max_body_bytes;

  if (c->body_len + len > max) {
    c->reject = 413;
    return -1;
  }
  if (c->body_len + len + 1 > c->body_cap) {
    size_t cap = c->body_cap ? c->body_cap * 2 : 4096;
    char *nb;
    while (cap < c->body_len + len + 1)
      cap *= 2;
    if (cap > max + 1)
      cap = max + 1;
    nb = realloc(c->body, cap);
    if (nb == NULL) {
      c->reject = 500;
      return -1;
    }
    c->body = nb;
    c->body_cap = cap;
  }
  memcpy(c->body + c->body_len, at, len);
  c->body_len += len;
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  tg_http_conn_t *c = parser_conn(p);
  c->in_message = 0;
  c->in_head = 0; /* the trailers' count, if any, ends here */
  c->req.keep_alive = llhttp_should_keep_alive(p) && !c->srv->draining;
  return HPE_PAUSED;
}

/* ---- protocol errors -------------------------------------------------- */

static void on_shutdown(uv_shutdown_t *sr, int status) {
  tg_http_conn_t *c = sr->data;
  free(sr);
  if (status < 0 && !c->closing)
    conn_close(c);
}

/* A lingering connection's deadline: client_send while output it queued
 * before the refusal (answers to earlier pipelined requests, the refusal
 * itself) still waits for the client, restarted as bytes leave; once all
 * is out, LINGER_MS for the client to close its side. */
static void conn_linger_timer(tg_http_conn_t *c) {
  if (c->out_pending > 0) {
    c->timer_mode = TIMER_SEND;
    conn_timer_arm(c, c->srv->lim.send_timeout_ms);
  } else if (c->timer_mode != TIMER_LINGER) {
    c->timer_mode = TIMER_LINGER;
    conn_timer_arm(c, LINGER_MS);
  }
}

/* A refused connection closes gently. Its client may still be sending (a
 * body over the limit, say), and closing a socket with unread input sends
 * a reset, which can destroy the reply before the client read it. So, as
 * nginx's lingering close: the reply is flushed (within client_send, like
 * any output), the write side shut, and input read and dropped until the
 * client closes, for at most LINGER_MS from then and LINGER_MAX bytes. The
 * connection holds no buffer meanwhile. */
static void conn_linger(tg_http_conn_t *c) {
  uv_shutdown_t *sr;

  conn_reset_request(c);
  free(c->pend);
  c->pend = NULL;
  c->pend_len = 0;
  c->in_message = 0;
  c->lingering = 1;
  c->linger_bytes = 0;
  sr = malloc(sizeof(*sr));
  if (sr == NULL) {
    conn_close(c);
    return;
  }
  sr->data = c;
  /* libuv shuts the write side once the queued reply is written */
  if (uv_shutdown(sr, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
    free(sr);
    conn_close(c);
    return;
  }
  c->timer_mode = TIMER_NONE;
  conn_linger_timer(c);
  conn_start_reading(c);
}

static void conn_reject(tg_http_conn_t *c, int status, const char *code,
                        const char *msg) {
  char head[512], body[512], extra[256];
  int bl, hl;

  extra[0] = '\0';
  if (c->srv->on_reject)
    c->srv->on_reject(c->srv, status, code, c->req.start_ns, extra, sizeof(extra));
  bl = snprintf(body, sizeof(body),
                "{\"error\":{\"message\":\"%s\",\"type\":\"invalid_request_error\","
                "\"param\":null,\"code\":\"%s\"}}",
                msg, code);
  /* A 405 names the target's methods (RFC 9110 15.5.6). The server's own
   * is CONNECT's, whose authority-form target names no resource here: an
   * empty Allow, which says none is allowed (10.2.1). */
  hl = snprintf(head, sizeof(head),
                "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n%s%sConnection: close\r\n\r\n",
                status, tg_http_reason(status), bl, extra,
                status == 405 ? "Allow: \r\n" : "");
  c->close_after = 1;
  if (conn_send2(c, head, (size_t)hl, body, (size_t)bl) < 0) {
    conn_close(c);
    return;
  }
  conn_linger(c);
}

static void conn_parse_error(tg_http_conn_t *c, llhttp_errno_t err) {
  switch (c->reject) {
  case 413:
    conn_reject(c, 413, "body_too_large", "request body exceeds the limit");
    return;
  case 431:
    conn_reject(c, 431, "headers_too_large", "request headers exceed the limit");
    return;
  case 405:
    conn_reject(c, 405, "method_not_allowed", "CONNECT is not supported");
    return;
  case 501:
    conn_reject(c, 501, "unsupported_transfer_encoding",
                "only the chunked transfer coding is supported");
    return;
  case 505:
    conn_reject(c, 505, "http_version_not_supported", "HTTP/1.1 and HTTP/1.0 are spoken here");
    return;
  case 500:
    conn_reject(c, 500, "internal_error", "out of memory");
    return;
  default:
    break;
  }
  (void)err;
  conn_reject(c, 400, "bad_request",
              c->reject_msg != NULL ? c->reject_msg : "malformed HTTP request");
}

/* Parses data; returns the number of bytes consumed. On a complete request
 * it dispatches to the handler. */
static size_t conn_feed(tg_http_conn_t *c, const char *data, size_t len) {
  llhttp_errno_t err;
  size_t used;

  if (c->in_head)
    c->head_from = data;   /* the head goes on from the start of this read */
  c->feed_from = data;
  c->piece_end = NULL;
  err = llhttp_execute(&c->parser, data, len);
  if (err == HPE_OK) {
    if (c->in_head) {
      /* the headers go on past this read: all of its rest is head,
       * whitespace that reached no callback included */
      if ((!c->trailers && fold_between(c, data + len) && fold_refuse(c) < 0) ||
          head_within(c, data + len) < 0) {
        conn_parse_error(c, HPE_USER);
        return len;
      }
      c->head_raw += (size_t)(data + len - c->head_from);
    }
    return len;
  }
  if (err != HPE_PAUSED) {
    conn_parse_error(c, err);
    return len;
  }
  used = (size_t)(llhttp_get_error_pos(&c->parser) - data);
  llhttp_resume(&c->parser);
  c->req.body = c->body ? c->body : "";
  if (c->body)
    c->body[c->body_len] = '\0';
  c->req.body_len = c->body_len;
  c->active = 1;
  c->srv->active++;
  c->timer_mode = TIMER_NONE; /* an armed timer fires and finds nothing due */
  c->srv->handler(&c->req);
  return used;
}

static int pend_append(tg_http_conn_t *c, const char *data, size_t len) {
  char *np;
  if (len == 0)
    return 0;
  np = realloc(c->pend, c->pend_len + len);
  if (np == NULL)
    return TG_ENOMEM;
  memmove(np + c->pend_len, data, len);
  c->pend = np;
  c->pend_len += len;
  return 0;
}

/* Feeds bytes while no request is active and the answers already queued
 * are under the high-water mark; keeps the rest for later. A client that
 * pipelines and never reads so holds at most that much output (plus one
 * answer) and PEND_MAX of input, and reading stops until on_write sees the
 * output fall under the low-water mark. */
static void conn_consume(tg_http_conn_t *c, const char *data, size_t len) {
  size_t used;
  while (len > 0 && !c->active && !c->held && !c->closing && !c->close_after) {
    used = conn_feed(c, data, len);
    data += used;
    len -= used;
  }
  if (c->closing || c->close_after)
    return;
  if (len > 0 && pend_append(c, data, len) < 0) {
    conn_close(c);
    return;
  }
  if (c->pend_len > PEND_MAX || (c->held && !c->active))
    conn_stop_reading(c);
}

/* Parses the pipelined bytes kept while the previous request was active. */
static void conn_process(tg_http_conn_t *c) {
  char *buf = c->pend;
  size_t len = c->pend_len;

  c->pend = NULL;
  c->pend_len = 0;
  conn_consume(c, buf, len);
  free(buf);
  if (c->closing || c->active || c->close_after || c->gone)
    return;
  /* Bytes that started no message (a stray CRLF, which RFC 9112 2.2 lets a
   * server ignore before a request) leave the connection idle: back to the
   * keep-alive deadline, not the request one armed while they waited. */
  conn_timer_update(c);
  if (!c->held)
    conn_start_reading(c);
}

static void on_idle(uv_idle_t *h) {
  tg_http_server_t *srv = h->data;
  while (srv->ready != NULL) {
    tg_http_conn_t *c = srv->ready;
    srv->ready = c->ready_next;
    c->queued = 0;
    if (!c->closing && !c->active && !c->lingering)
      conn_process(c);
  }
  uv_idle_stop(h);
}

/* ---- connection lifecycle --------------------------------------------- */

/* Timers are armed lazily: a connection changes its deadline (c->due) on
 * every request, several times, and moving a libuv timer costs a heap
 * update each time. The uv timer is only moved when the new deadline is
 * earlier than the one it is armed for; when it fires early, it is armed
 * again for what is left. A connection going idle, busy and idle again
 * touches the timer heap about once per timeout, not three times a
 * request. */
static void conn_timer_arm(tg_http_conn_t *c, uint64_t ms) {
  uint64_t now = uv_now(c->srv->loop);
  c->due = now + ms;
  if (c->armed && c->armed_due <= c->due)
    return;
  uv_timer_start(&c->timer, on_timer, ms, 0);
  c->armed = 1;
  c->armed_due = c->due;
}

/* With reading stopped, a client's FIN or RST is never read: the socket's
 * TCP state says whether it closed (its FIN arrived: CLOSE_WAIT) or reset
 * (CLOSE). As with an EOF read, a half close counts as leaving. A FIN
 * stuck behind input the receive buffer cannot take is not seen. */
static int peer_left(tg_http_conn_t *c) {
  struct tcp_info ti;
  socklen_t len = sizeof(ti);
  uv_os_fd_t fd;

  if (uv_fileno((const uv_handle_t *)&c->tcp, &fd) != 0 ||
      getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
    return 0;
  return ti.tcpi_state == TCP_CLOSE_WAIT || ti.tcpi_state == TCP_CLOSE ||
         ti.tcpi_state == TCP_LAST_ACK;
}

static void on_timer(uv_timer_t *t) {
  tg_http_conn_t *c = t->data;
  uint64_t now = uv_now(c->srv->loop);

  c->armed = 0;
  if (c->timer_mode == TIMER_NONE)
    return;
  if (now < c->due) {
    conn_timer_arm(c, c->due - now);
    return;
  }
  switch (c->timer_mode) {
  case TIMER_REQUEST:
    if (c->active)
      return;
    conn_reject(c, 408, "request_timeout", "request not received in time");
    return;
  case TIMER_LINGER:
    conn_close(c);
    return;
  case TIMER_SEND:
    if (c->active) {
      conn_gone_notify(c);
      return;
    }
    c->gone = 1;
    conn_close(c);
    return;
  case TIMER_PROBE:
    if (!c->active || c->reading)
      return;
    if (peer_left(c)) {
      conn_gone_notify(c);
      return;
    }
    conn_timer_arm(c, PROBE_MS);
    return;
  case TIMER_KEEPALIVE:
  default:
    if (!c->active)
      conn_close(c);
  }
}

static void conn_timer_update(tg_http_conn_t *c) {
  const tg_http_limits_t *lim = &c->srv->lim;
  int mode;
  uint64_t ms = 0;

  if (c->closing || c->lingering)
    return;
  if (c->out_pending > 0) {
    mode = TIMER_SEND;
    ms = lim->send_timeout_ms;
  } else if (c->active) {
    /* input paused behind pipelined bytes: nothing reads the client's EOF */
    mode = c->reading || c->gone ? TIMER_NONE : TIMER_PROBE;
    ms = PROBE_MS;
  } else if (c->in_message || c->pend_len > 0) {
    mode = TIMER_REQUEST;
    ms = lim->request_timeout_ms;
  } else {
    mode = TIMER_KEEPALIVE;
    ms = lim->keepalive_timeout_ms;
  }
  if (mode == TIMER_NONE || ms == 0) {
    c->timer_mode = TIMER_NONE; /* an armed timer fires and finds nothing due */
    return;
  }
  /* The request timer measures the whole request, so it is not restarted
   * by each arriving piece; the send timer is restarted only by bytes
   * leaving (on_write), not by more output queued behind those that do not
   * move; the keep-alive one neither by bytes that start no request (a
   * client sending an empty line now and then would hold its connection
   * for ever): it starts when an answer ends. */
  if ((mode == TIMER_REQUEST || mode == TIMER_SEND || mode == TIMER_KEEPALIVE) &&
      c->timer_mode == mode)
    return;
  c->timer_mode = mode;
  conn_timer_arm(c, ms);
}

static void srv_free(tg_http_server_t *srv) {
  tg_recycle_clear(&srv->heads);
  if (srv->spare_fd >= 0)
    close(srv->spare_fd);
  free(srv);
}

static void on_conn_closed(uv_handle_t *h) {
  tg_http_conn_t *c = h->data;
  tg_http_server_t *srv = c->srv;

  if (--c->handles > 0)
    return;
  if (c->prev) c->prev->next = c->next;
  else srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  srv->n_conns--;
  tg_recycle_free(&srv->heads, c->head);
  free(c->body);
  free(c->pend);
  free(c);
  if (srv->closing && srv->n_conns == 0 && !srv->listener_open && !srv->idle_open &&
      !srv->resume_open) {
    void (*done)(void *) = srv->done;
    void *arg = srv->done_arg;
    srv_free(srv);
    if (done)
      done(arg);
  }
}

static void conn_close(tg_http_conn_t *c) {
  if (c->closing)
    return;
  if (c->active) {
    /* the handler still owns the request: close once it completes */
    c->close_after = 1;
    if (c->reading) {
      uv_read_stop((uv_stream_t *)&c->tcp);
      c->reading = 0;
    }
    conn_gone_notify(c);
    return;
  }
  c->closing = 1;
  if (c->queued) {
    /* unlink from the ready list */
    tg_http_conn_t **pp = &c->srv->ready;
    while (*pp && *pp != c)
      pp = &(*pp)->ready_next;
    if (*pp)
      *pp = c->ready_next;
    c->queued = 0;
  }
  uv_close((uv_handle_t *)&c->timer, on_conn_closed);
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  tg_http_conn_t *c = h->data;
  (void)suggested;
  buf->base = c->srv->rbuf;
  buf->len = sizeof(c->srv->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  tg_http_conn_t *c = s->data;

  if (nread == 0)
    return;
  if (c->lingering) {
    c->linger_bytes += nread > 0 ? (size_t)nread : 0;
    if (nread < 0 || c->linger_bytes > LINGER_MAX)
      conn_close(c);
    return;
  }
  if (nread < 0) {
    uv_read_stop(s);
    c->reading = 0;
    if (c->active) {
      conn_gone_notify(c);
      return;
    }
    c->gone = 1;
    if (c->out_pending == 0)
      conn_close(c);
    return;
  }
  if (c->close_after)
    return; /* input after the last answer is ignored */
  if (c->active || c->pend_len > 0 || c->held) {
    if (pend_append(c, buf->base, (size_t)nread) < 0) {
      conn_close(c);
      return;
    }
    if (c->pend_len > PEND_MAX || (c->held && !c->active))
      conn_stop_reading(c);
    if (!c->active && !c->held)
      srv_queue_ready(c);
    return;
  }
  conn_consume(c, buf->base, (size_t)nread);
  if (!c->closing && !c->active)
    conn_timer_update(c);
}

static void conn_start_reading(tg_http_conn_t *c) {
  if (c->reading || c->closing || c->gone)
    return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
    c->reading = 1;
}

static void conn_stop_reading(tg_http_conn_t *c) {
  if (!c->reading)
    return;
  uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
  if (c->active)
    conn_timer_update(c); /* probes for a client that leaves meanwhile */
}

static void on_listener_closed(uv_handle_t *h);
static void accept_pause(tg_http_server_t *srv);

static void on_connection(uv_stream_t *server, int status) {
  tg_http_server_t *srv = server->data;
  tg_http_conn_t *c;

  if (status == UV_EMFILE || status == UV_ENFILE) {
    accept_pause(srv);
    return;
  }
  if (status < 0 || srv->draining || srv->closing)
    return;
  c = calloc(1, sizeof(*c));
  if (c == NULL)
    return;
  c->srv = srv;
  uv_tcp_init(srv->loop, &c->tcp);
  uv_timer_init(srv->loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  c->handles = 2;
  c->next = srv->conns;
  if (srv->conns)
    srv->conns->prev = c;
  srv->conns = c;
  srv->n_conns++;
  llhttp_init(&c->parser, HTTP_REQUEST, &srv->settings);
  c->parser.data = c;
  conn_reset_request(c);
  if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  conn_start_reading(c);
  conn_timer_update(c);
}

/* ---- server ----------------------------------------------------------- */

static int bind_socket(const char *host, int port, int reuseport, uv_os_sock_t *out) {
  struct sockaddr_storage ss;
  int fd, one = 1, r;

  memset(&ss, 0, sizeof(ss));
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0)
    return TG_EINVAL;
  fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0)
    return -errno;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (reuseport)
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  r = bind(fd, (struct sockaddr *)&ss,
           ss.ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6));
  if (r < 0) {
    r = -errno;
    close(fd);
    return r;
  }
  *out = fd;
  return 0;
}

int tg_http_listen_probe(const char *host, int port) {
  uv_os_sock_t fd = -1;
  int r = bind_socket(host, port, 0, &fd);
  if (r == 0)
    close(fd);
  return r;
}

int tg_http_server_init(tg_http_server_t **out, uv_loop_t *loop,
                        const char *host, int port, int reuseport,
                        const tg_http_limits_t *lim,
                        tg_http_handler_cb handler, void *data) {
  tg_http_server_t *srv;
  uv_os_sock_t fd = -1;
  struct sockaddr_storage ss;
  int r, namelen = sizeof(ss);

  srv = calloc(1, sizeof(*srv));
  if (srv == NULL)
    return TG_ENOMEM;
  srv->loop = loop;
  srv->spare_fd = -1;
  if (lim)
    srv->lim = *lim;
  else
    tg_http_limits_default(&srv->lim);
  /* the stored head never exceeds the head as sent, plus a NUL a part */
  srv->hcap = srv->lim.max_header_bytes + MAX_HEADERS * 2 + 2;
  tg_recycle_init(&srv->heads, sizeof(head_t) + srv->hcap, HEADS_KEPT);
  srv->handler = handler;
  srv->data = data;
  llhttp_settings_init(&srv->settings);
  srv->settings.on_message_begin = on_message_begin;
  srv->settings.on_method = on_method;
  srv->settings.on_url = on_url;
  srv->settings.on_url_complete = on_url_complete;
  srv->settings.on_header_field = on_header_field;
  srv->settings.on_header_field_complete = on_header_field_complete;
  srv->settings.on_header_value = on_header_value;
  srv->settings.on_header_value_complete = on_header_value_complete;
  srv->settings.on_headers_complete = on_headers_complete;
  srv->settings.on_body = on_body;
  srv->settings.on_message_complete = on_message_complete;

  r = bind_socket(host, port, reuseport, &fd);
  if (r < 0) {
    srv_free(srv);
    return r;
  }
  uv_tcp_init(loop, &srv->listener);
  srv->listener.data = srv;
  srv->listener_open = 1;
  uv_idle_init(loop, &srv->idle);
  srv->idle.data = srv;
  srv->idle_open = 1;
  uv_timer_init(loop, &srv->resume);
  srv->resume.data = srv;
  srv->resume_open = 1;
  srv->spare_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  r = uv_tcp_open(&srv->listener, fd);
  if (r < 0)
    close(fd);
  else
    r = uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection);
  if (r < 0) {
    srv->closing = 1;
    tg_http_server_close(srv, NULL, NULL);
    return r;
  }
  if (uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&ss, &namelen) == 0)
    srv->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  *out = srv;
  return 0;
}

void tg_http_server_on_reject(tg_http_server_t *srv, tg_http_reject_cb cb) {
  srv->on_reject = cb;
}

void *tg_http_server_data(const tg_http_server_t *srv) { return srv->data; }
int tg_http_server_port(const tg_http_server_t *srv) { return srv->port; }
uv_loop_t *tg_http_server_loop(const tg_http_server_t *srv) { return srv->loop; }
size_t tg_http_server_active(const tg_http_server_t *srv) { return srv->active; }
size_t tg_http_server_conns(const tg_http_server_t *srv) { return srv->n_conns; }

static void on_listener_closed(uv_handle_t *h) {
  tg_http_server_t *srv = h->data;
  if (h == (uv_handle_t *)&srv->listener)
    srv->listener_open = 0;
  else if (h == (uv_handle_t *)&srv->idle)
    srv->idle_open = 0;
  else
    srv->resume_open = 0;
  if (srv->closing && srv->n_conns == 0 && !srv->listener_open && !srv->idle_open &&
      !srv->resume_open) {
    void (*done)(void *) = srv->done;
    void *arg = srv->done_arg;
    srv_free(srv);
    if (done)
      done(arg);
  }
}

/* Accepting stops for ACCEPT_PAUSE_MS when the process has no descriptor
 * left (as nginx's accept_mutex_delay): the connections open meanwhile
 * finish or time out and give theirs back, the kernel holds the new ones in
 * the backlog, and other workers' listeners go on. */
#define ACCEPT_PAUSE_MS 250

static void on_resume(uv_timer_t *t) {
  tg_http_server_t *srv = t->data;
  uv_os_sock_t fd;

  if (srv->draining || srv->closing || !srv->paused)
    return;
  if (srv->listener_open || (fd = dup(srv->spare_fd)) < 0) {
    /* the old listener still closing, or still no descriptor */
    uv_timer_start(&srv->resume, on_resume, ACCEPT_PAUSE_MS, 0);
    return;
  }
  uv_tcp_init(srv->loop, &srv->listener);
  srv->listener.data = srv;
  srv->listener_open = 1;
  if (uv_tcp_open(&srv->listener, fd) < 0) {
    close(fd);
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    uv_timer_start(&srv->resume, on_resume, ACCEPT_PAUSE_MS, 0);
    return;
  }
  if (uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection) < 0) {
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    uv_timer_start(&srv->resume, on_resume, ACCEPT_PAUSE_MS, 0);
    return;
  }
  srv->paused = 0;
}

static void accept_pause(tg_http_server_t *srv) {
  uint64_t now = uv_now(srv->loop);

  if (srv->paused || srv->draining || srv->closing || srv->spare_fd < 0 || !srv->resume_open)
    return;
  srv->paused = 1;
  /* closing the handle ends libuv's accept loop; spare_fd keeps the socket */
  if (srv->listener_open && !uv_is_closing((uv_handle_t *)&srv->listener))
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
  uv_timer_start(&srv->resume, on_resume, ACCEPT_PAUSE_MS, 0);
  if (srv->pause_logged_ms == 0 || now - srv->pause_logged_ms >= 10000) {
    srv->pause_logged_ms = now;
    fprintf(stderr, "tollgate: no file descriptor left for a new connection: "
                    "accepting again in %d ms (raise the open-files limit?)\n",
            ACCEPT_PAUSE_MS);
  }
}

/* The listening socket's second descriptor goes with the listener: while
 * it is open the socket still listens, the kernel accepts connections
 * nobody will serve, and a successor cannot bind the port. */
static void close_spare(tg_http_server_t *srv) {
  if (srv->spare_fd >= 0) {
    close(srv->spare_fd);
    srv->spare_fd = -1;
  }
}

void tg_http_server_drain(tg_http_server_t *srv) {
  tg_http_conn_t *c, *next;

  if (srv->draining)
    return;
  srv->draining = 1;
  if (srv->listener_open && !uv_is_closing((uv_handle_t *)&srv->listener))
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
  close_spare(srv);
  /* Idle connections close now; the others finish the request they are in
   * (keep-alive is off while draining) and close after its answer. */
  for (c = srv->conns; c != NULL; c = next) {
    next = c->next;
    if (c->active)
      c->req.keep_alive = 0;
    else if (c->out_pending == 0 && !c->in_message && c->pend_len == 0)
      conn_close(c);
    else if (!c->in_message && c->pend_len == 0)
      c->close_after = 1;
  }
}

void tg_http_server_close(tg_http_server_t *srv, void (*done)(void *arg), void *arg) {
  tg_http_conn_t *c, *next;

  srv->closing = 1;
  srv->draining = 1;
  srv->done = done;
  srv->done_arg = arg;
  if (srv->listener_open && !uv_is_closing((uv_handle_t *)&srv->listener))
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
  close_spare(srv);
  if (srv->idle_open && !uv_is_closing((uv_handle_t *)&srv->idle))
    uv_close((uv_handle_t *)&srv->idle, on_listener_closed);
  if (srv->resume_open && !uv_is_closing((uv_handle_t *)&srv->resume))
    uv_close((uv_handle_t *)&srv->resume, on_listener_closed);
  for (c = srv->conns; c != NULL; c = next) {
    next = c->next;
    /* The handler hears of it while the connection may still carry an
     * answer that has not begun (a 503 saying the request was not served):
     * gone is set after. tg_http_req_gone() is 1 from now on. */
    if (c->active && !c->abort_sent) {
      c->abort_sent = 1;
      if (c->req.on_abort)
        c->req.on_abort(&c->req);
    }
    c->gone = 1;
  }
  for (c = srv->conns; c != NULL; c = next) {
    next = c->next;
    conn_close(c);
  }
}

/* ---- responses -------------------------------------------------------- */

const char *tg_http_req_header(const tg_http_req_t *req, const char *lname) {
  size_t i;
  for (i = 0; i < req->n_headers; i++)
    if (strcmp(req->headers[i].name, lname) == 0)
      return req->headers[i].value;
  return NULL;
}

void tg_http_req_drop_head(tg_http_req_t *req) {
  tg_http_conn_t *c = req->conn;
  /* The parser reads no further head while this request is served (the
   * next pipelined one waits), so nothing else points into it. */
  tg_recycle_free(&c->srv->heads, c->head);
  c->head = NULL;
  c->hlen = 0;
  req->path = "";
  req->query = "";
  req->headers = NULL;
  req->n_headers = 0;
}

static int format_head(tg_http_conn_t *c, char *buf, size_t size, int status,
                       const char *ctype, const char *extra, int chunked,
                       size_t clen) {
  int keep = c->req.keep_alive && !c->srv->draining && !(chunked && c->http10);
  tg_sb_t b;

  tg_sb_init(&b, buf, size);
  tg_sb_lit(&b, "HTTP/1.");
  tg_sb_put(&b, c->http10 ? "0 " : "1 ", 2);
  tg_sb_puti(&b, status);
  tg_sb_lit(&b, " ");
  tg_sb_puts(&b, tg_http_reason(status));
  tg_sb_lit(&b, "\r\n");
  if (ctype) {
    tg_sb_lit(&b, "Content-Type: ");
    tg_sb_puts(&b, ctype);
    tg_sb_lit(&b, "\r\n");
  }
  if (chunked && !c->http10) {
    tg_sb_lit(&b, "Transfer-Encoding: chunked\r\n");
  } else if (!chunked) {
    tg_sb_lit(&b, "Content-Length: ");
    tg_sb_putu(&b, clen);
    tg_sb_lit(&b, "\r\n");
  }
  if (extra)
    tg_sb_puts(&b, extra);
  if (keep)
    tg_sb_lit(&b, "Connection: keep-alive\r\n\r\n");
  else
    tg_sb_lit(&b, "Connection: close\r\n\r\n");
  if (!keep)
    c->req.keep_alive = 0;
  c->promised = keep;
  if (b.err)
    return TG_ETOOBIG;
  return (int)b.len;
}

int tg_http_respond(tg_http_req_t *req, int status, const char *content_type,
                    const char *extra_headers, const char *body, size_t len) {
  tg_http_conn_t *c = req->conn;
  char stackbuf[STACK_RESP];
  char *head = stackbuf;
  size_t cap = sizeof(stackbuf), send;
  int hl, r = 0;

  if (!c->active)
    return TG_EINVAL;
  if (c->begun) {
    tg_http_abort(req);
    return TG_EINVAL;
  }
  /* HEAD: the head of the answer, its Content-Length included, no body */
  send = c->req.method == HTTP_HEAD ? 0 : len;
  if (!c->gone) {
    if (extra_headers && strlen(extra_headers) + 256 > cap) {
      cap = strlen(extra_headers) + 256;
      head = malloc(cap);
      if (head == NULL) {
        tg_http_abort(req);
        return TG_ENOMEM;
      }
    }
    hl = format_head(c, head, cap, status, content_type, extra_headers, 0, len);
    if (hl < 0)
      r = hl;
    else if (send + (size_t)hl <= cap) {
      /* one buffer, one syscall for the common small answer */
      memcpy(head + hl, body, send);
      r = conn_send(c, head, (size_t)hl + send);
    } else {
      r = conn_send2(c, head, (size_t)hl, body, send);
    }
    if (head != stackbuf)
      free(head);
  }
  req_complete(c, r == 0);
  return r;
}

int tg_http_begin(tg_http_req_t *req, int status, const char *content_type,
                  const char *extra_headers) {
  tg_http_conn_t *c = req->conn;
  char stackbuf[STACK_RESP];
  char *head = stackbuf;
  size_t cap = sizeof(stackbuf);
  int hl, r;

  if (!c->active || c->begun)
    return TG_EINVAL;
  c->begun = 1;
  c->chunked = 1;
  if (c->gone)
    return TG_ECANCELED;
  if (extra_headers && strlen(extra_headers) + 256 > cap) {
    cap = strlen(extra_headers) + 256;
    head = malloc(cap);
    if (head == NULL)
      return TG_ENOMEM;
  }
  hl = format_head(c, head, cap, status, content_type, extra_headers, 1, 0);
  r = hl < 0 ? hl : conn_send(c, head, (size_t)hl);
  if (head != stackbuf)
    free(head);
  return r;
}

int tg_http_write(tg_http_req_t *req, const char *data, size_t len) {
  tg_http_conn_t *c = req->conn;
  char prefix[24];
  int pl;

  if (!c->active || !c->begun)
    return TG_EINVAL;
  if (c->gone)
    return TG_ECANCELED;
  if (len == 0)
    return 0;
  if (c->http10)
    return conn_send(c, data, len);
  pl = snprintf(prefix, sizeof(prefix), "%zx\r\n", len);
  {
    uv_buf_t bufs[3];
    bufs[0] = uv_buf_init(prefix, (unsigned)pl);
    bufs[1] = uv_buf_init((char *)data, (unsigned)len);
    bufs[2] = uv_buf_init((char *)"\r\n", 2);
    return conn_sendv(c, bufs, 3);
  }
}

int tg_http_end(tg_http_req_t *req) {
  tg_http_conn_t *c = req->conn;
  int r = 0;

  if (!c->active)
    return TG_EINVAL;
  if (!c->begun) {
    tg_http_abort(req);
    return TG_EINVAL;
  }
  if (!c->gone) {
    if (c->http10)
      c->req.keep_alive = 0;
    else
      r = conn_send(c, "0\r\n\r\n", 5);
  }
  req_complete(c, r == 0);
  return r;
}

void tg_http_abort(tg_http_req_t *req) {
  tg_http_conn_t *c = req->conn;
  if (!c->active)
    return;
  c->gone = 1;
  req_complete(c, 0);
}

size_t tg_http_pending(const tg_http_req_t *req) {
  return req->conn->out_pending;
}

int tg_http_congested(const tg_http_req_t *req) {
  return req->conn->out_pending >= req->conn->srv->lim.write_high_water;
}

int tg_http_req_gone(const tg_http_req_t *req) {
  return req->conn->gone || req->conn->srv->closing;
}
