/* Native HTTP/1.1 upstream client: upstream connections are uv_tcp_t
 * handles in the loop's own epoll set and answers are parsed with llhttp,
 * so a transfer on a pooled connection costs one write and the reads its
 * answer needs, with no extra poll(2) and no allocation beyond the transfer.
 *
 * Objects, all owned by one loop thread:
 * - host: one per upstream host:port; its resolved address (numeric hosts
 *   and "localhost" at once, names through uv_getaddrinfo) and a LIFO stack
 *   of idle keep-alive connections (at most IDLE_MAX idle in the loop,
 *   across hosts). At most HOSTS_MAX are kept, found by a hash of their
 *   "host[:port]"; past that, one that no connection, transfer or
 *   resolution uses any more is dropped.
 * - conn: a TCP connection with its parser and read buffer. Reading stays
 *   on while it idles, so an upstream that closes it is noticed (EOF) and
 *   the connection leaves the pool before anyone sends into it.
 * - xfer: one request. A request that fails on a reused connection before
 *   any answer byte arrived is sent again once on a fresh connection:
 *   nothing was relayed, and the upstream may have closed the connection
 *   just as we reused it.
 *
 * A paused transfer stops reading; the body bytes it refused and the bytes
 * the parser has not seen yet stay in the connection's read buffer (read
 * stopped, so nothing overwrites them) and are offered again on resume.
 *
 * on_done is never called from inside tg__h1_start() or tg__h1_resume():
 * completions found there go through a zero-delay timer, so the caller's
 * state is settled before it hears of the end. */
#include "upstream/h1client.h"

#include <llhttp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/fault.h"
#include "core/recycle.h"
#include "core/strbuf.h"

/* One read. Every connection of a loop reads into the loop's one buffer of
 * this size and is done with the bytes before the next read; only bytes a
 * paused transfer has not taken are copied out, into a block the
 * connection holds until it resumes. So an idle or busy connection costs
 * its ~1 KiB of state, not a read buffer of its own, and the buffer every
 * answer passes through stays in the cache. Also bounds a paused
 * transfer. */
#define RBUF_SIZE 16384
/* Idle connections kept by a loop, across its hosts: as many as libcurl's
 * connection cache holds (CURLMOPT_MAXCONNECTS), so the two clients pool
 * alike. A cap below the concurrency an endpoint sees closes connections
 * after every burst and opens them again on the next: at 1,024 concurrent
 * requests a cap of 256 made every second request open a connection. The
 * LIFO stack leaves the surplus at the bottom, where the sweep closes it. */
#define IDLE_MAX 4096
#define IDLE_TIMEOUT_MS 60000    /* an idle connection unused this long closes */
#define IDLE_SWEEP_MS 5000       /* how often idle connections are checked */
#define HEAD_INLINE 1024         /* request heads up to this size need no malloc */
#define HEAD_MAX (64 * 1024)     /* request line + headers we are asked to send */
#define RESP_HEAD_MAX (64 * 1024) /* status line + headers we accept */
#define AUTH_MAX 300             /* host[:port] of a URL */
#define HOSTS_MAX 4096           /* upstream hosts a loop keeps; when full, one
                                    that nothing uses makes room (host_evict) */
#define HOST_BUCKETS 4096        /* chains of the host table (a power of two):
                                    one host a chain on average when full */

typedef struct host_s host_t;
typedef struct conn_s conn_t;
typedef struct h1x_s h1x_t;

enum { C_CONNECTING, C_BUSY, C_IDLE, C_CLOSING };
enum { X_RESOLVING, X_ON_CONN, X_DONE_PENDING };

struct tg__h1_s {
  uv_loop_t *loop;
  host_t *hosts;             /* newest first: host_evict's order */
  host_t *hbuckets[HOST_BUCKETS]; /* the same hosts, chained by auth's hash */
  uint64_t host_compares;    /* keys compared by host lookups (diagnostics) */
  conn_t *conns;             /* every connection not yet closing */
  h1x_t *xfers;              /* every live transfer */
  h1x_t *done_q;             /* completions waiting for the defer timer */
  uv_timer_t defer;
  uv_timer_t sweep;          /* closes connections idle too long */
  tg_recycle_t xfer_mem;     /* freed transfers, for the next ones */
  size_t pending;            /* handles and getaddrinfo requests in flight */
  size_t n_conns, n_idle, n_hosts;
  int closing;
  char rbuf[RBUF_SIZE];      /* every connection's reads; see RBUF_SIZE */
};

typedef struct gai_s {
  uv_getaddrinfo_t req;
  host_t *host;              /* NULL once the host is gone */
  tg__h1_t *h;
} gai_t;

struct host_s {
  host_t *next;              /* h->hosts */
  host_t *hnext;             /* h->hbuckets chain */
  char auth[AUTH_MAX + 1];   /* "host[:port]" as in the URL: the key and Host: */
  char name[AUTH_MAX + 1];   /* host without brackets */
  char port[8];
  struct sockaddr_storage addr;
  int resolved;
  int numeric;               /* never re-resolved */
  gai_t *gai;                /* a resolution in flight */
  h1x_t *waiting;            /* transfers waiting for the address */
  conn_t *idle;              /* LIFO */
  size_t n_idle;
  int used;                  /* host_evict's mark */
  int telling;               /* on_resolved is telling its waiters: kept */
};

struct conn_s {
  uv_tcp_t tcp;
  uv_timer_t timer;          /* connect timeout */
  uint64_t idle_since;       /* loop time it went idle */
  uv_connect_t creq;
  tg__h1_t *h;
  host_t *host;
  h1x_t *x;                  /* the transfer on it, NULL while idle */
  conn_t *prev, *next;       /* h->conns */
  conn_t *iprev, *inext;     /* host->idle */
  llhttp_t parser;
  int state;
  int reused;                /* carried a transfer before this one */
  int wpending;              /* a uv_write is in flight */
  int reading;               /* uv_read_start is on */
  int handles;               /* open handles; freed at 0 */
  char *hold;                /* a paused transfer's bytes (malloc), or NULL */
};

struct h1x_s {
  tg__xfer_head_t head;
  tg__h1_t *h;
  host_t *host;
  conn_t *conn;
  h1x_t *prev, *next;        /* h->xfers */
  h1x_t *qnext;              /* host->waiting or h->done_q */
  tg_xfer_cbs_t cbs;
  void *arg;
  const char *body;
  size_t body_len;
  uint64_t connect_timeout_ms;
  char *req;                 /* request line and headers */
  size_t req_len;
  int state;
  int starting;              /* inside tg__h1_start: completions deferred */
  int in_cb;                 /* inside on_status / on_data */
  int canceled;              /* tg__h1_cancel came during a callback */
  int retried;
  int got_bytes;             /* an answer byte arrived */
  int interim;               /* parsing a 1xx answer */
  int spoilt;                /* a bodiless answer declared a body: no reuse */
  int paused;
  int aborted;               /* a callback refused */
  int complete;              /* message complete */
  int keep_alive;
  size_t head_bytes;
  const char *pend_body;     /* refused body bytes, in conn->hold */
  size_t pend_body_len;
  const char *pend_raw;      /* bytes the parser has not seen */
  size_t pend_raw_len;
  int result;                /* for a deferred completion */
  const char *detail;
  char req_inline[HEAD_INLINE];
};

typedef struct {
  uv_write_t req;
  conn_t *conn;
  char data[];
} wreq_t;

static const llhttp_settings_t *parser_settings(void);
static void conn_close(conn_t *c);
static void conn_fail(conn_t *c, int result, const char *detail);
static void xfer_connect(h1x_t *x);
static int conn_feed(conn_t *c, const char *data, size_t len);
static void h1_maybe_free(tg__h1_t *h);

/* ---- transfers ---------------------------------------------------------- */

static void xfer_free(h1x_t *x) {
  tg__h1_t *h = x->h;
  if (x->prev) x->prev->next = x->next;
  else h->xfers = x->next;
  if (x->next) x->next->prev = x->prev;
  if (x->req != x->req_inline)
    free(x->req);
  tg_recycle_free(&h->xfer_mem, x);
}

static void on_defer(uv_timer_t *t) {
  tg__h1_t *h = t->data;
  while (h->done_q) {
    h1x_t *x = h->done_q;
    tg_xfer_cbs_t cbs = x->cbs;
    void *arg = x->arg;
    int result = x->result;
    const char *detail = x->detail;
    h->done_q = x->qnext;
    xfer_free(x);
    cbs.on_done(result, detail, arg);
  }
}

/* Ends a transfer that no connection holds any more: frees it and calls
 * on_done, now or from the defer timer when the caller cannot take it. */
static void xfer_finish(h1x_t *x, int result, const char *detail, int defer) {
  tg__h1_t *h = x->h;
  x->conn = NULL;
  if (defer || x->starting) {
    h1x_t **pp = &h->done_q;
    x->state = X_DONE_PENDING;
    x->result = result;
    x->detail = detail;
    x->qnext = NULL;
    while (*pp)
      pp = &(*pp)->qnext;
    *pp = x;
    uv_timer_start(&h->defer, on_defer, 0, 0);
    return;
  }
  {
    tg_xfer_cbs_t cbs = x->cbs;
    void *arg = x->arg;
    xfer_free(x);
    cbs.on_done(result, detail, arg);
  }
}

/* ---- connections -------------------------------------------------------- */

static void idle_unlink(conn_t *c) {
  host_t *host = c->host;
  if (c->iprev) c->iprev->inext = c->inext;
  else host->idle = c->inext;
  if (c->inext) c->inext->iprev = c->iprev;
  c->iprev = c->inext = NULL;
  host->n_idle--;
  c->h->n_idle--;
}

static void on_conn_handle_closed(uv_handle_t *hd) {
  conn_t *c = hd->data;
  tg__h1_t *h = c->h;
  if (--c->handles == 0) {
    free(c->hold);
    free(c);
    h->pending--;
    h1_maybe_free(h);
  }
}

/* Closes the connection; a transfer on it must have been detached. */
static void conn_close(conn_t *c) {
  tg__h1_t *h = c->h;
  if (c->state == C_CLOSING)
    return;
  if (c->state == C_IDLE)
    idle_unlink(c);
  c->state = C_CLOSING;
  c->x = NULL;
  if (c->prev) c->prev->next = c->next;
  else h->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  h->n_conns--;
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Turns reading on or off; 0 or a libuv error. */
static int conn_read(conn_t *c, int on) {
  int r = 0;
  if (on && !c->reading)
    r = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  else if (!on && c->reading)
    r = uv_read_stop((uv_stream_t *)&c->tcp);
  if (r == 0)
    c->reading = on;
  return r;
}

/* Idle expiry is swept rather than timed per connection: a timer per idle
 * spell would cost two timer-heap operations per request. */
static void on_sweep(uv_timer_t *t) {
  tg__h1_t *h = t->data;
  uint64_t now = uv_now(h->loop);
  host_t *host;

  for (host = h->hosts; host != NULL; host = host->next) {
    conn_t *c = host->idle, *next;
    for (; c != NULL; c = next) {
      next = c->inext;
      if (now - c->idle_since >= IDLE_TIMEOUT_MS)
        conn_close(c);
    }
  }
}

/* The transfer on c ended well: keep c for the next one or close it. */
static void conn_release(conn_t *c, int keep) {
  host_t *host = c->host;
  c->x = NULL;
  if (!keep || c->wpending || c->h->n_idle >= IDLE_MAX || c->h->closing ||
      conn_read(c, 1) < 0) {
    conn_close(c);
    return;
  }
  c->state = C_IDLE;
  c->reused = 1;
  c->iprev = NULL;
  c->inext = host->idle;
  if (host->idle)
    host->idle->iprev = c;
  host->idle = c;
  host->n_idle++;
  c->h->n_idle++;
  c->idle_since = uv_now(c->h->loop);
}

static void on_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf) {
  conn_t *c = hd->data;
  (void)suggested;
  buf->base = c->h->rbuf;
  buf->len = sizeof(c->h->rbuf);
}

static void drop_hold(conn_t *c) {
  free(c->hold);
  c->hold = NULL;
}

/* The transfer on c paused with bytes it has not taken (in the loop's read
 * buffer, or in c->hold when a resumed feed paused again): they move into
 * a block of their own size, which c holds until the transfer resumes. */
static int hold_pending(conn_t *c, h1x_t *x) {
  size_t nb = x->pend_body_len, nr = x->pend_raw_len;
  char *p;

  if (nb + nr == 0) {
    drop_hold(c);
    return 0;
  }
  p = tg_fault("upstream_hold") ? NULL : malloc(nb + nr);
  if (p == NULL)
    return TG_ENOMEM;
  if (nb > 0)
    memcpy(p, x->pend_body, nb);
  if (nr > 0)
    memcpy(p + nb, x->pend_raw, nr);
  drop_hold(c); /* the old block, a source of the copy */
  c->hold = p;
  x->pend_body = p;
  x->pend_raw = p + nb;
  return 0;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = s->data;
  h1x_t *x = c->x;

  if (nread == 0 || c->state == C_CLOSING)
    return;
  if (c->state == C_IDLE || x == NULL) {
    /* EOF, an error or stray bytes on an idle connection: it is not
     * reusable. */
    conn_close(c);
    return;
  }
  if (nread < 0) {
    if (nread == UV_EOF && x->got_bytes) {
      /* An answer delimited by the end of the connection completes here. */
      llhttp_errno_t err = llhttp_finish(&c->parser);
      if ((err == HPE_OK || err == HPE_PAUSED) && x->complete && !x->aborted) {
        conn_close(c);
        xfer_finish(x, TG_XFER_OK, "ok", 0);
        return;
      }
    }
    conn_fail(c, TG_XFER_BROKEN,
              nread == UV_EOF ? "the upstream closed the connection" : uv_strerror((int)nread));
    return;
  }
  x->got_bytes = 1;
  conn_feed(c, buf->base, (size_t)nread);
}

/* The connection failed under its transfer (or while connecting). A
 * transfer that got no answer byte on a reused connection is sent again on
 * a fresh one; any other ends with result. */
static void conn_fail(conn_t *c, int result, const char *detail) {
  h1x_t *x = c->x;
  int reused = c->reused;

  c->x = NULL;
  conn_close(c);
  if (x == NULL)
    return;
  x->conn = NULL;
  if (reused && !x->got_bytes && !x->retried && !x->h->closing) {
    x->retried = 1;
    xfer_connect(x);
    return;
  }
  xfer_finish(x, result, detail, 0);
}

static void on_write(uv_write_t *w, int status) {
  wreq_t *wr = (wreq_t *)w;
  conn_t *c = wr->conn;
  free(wr);
  c->wpending = 0;
  if (status < 0 && c->state == C_BUSY && c->x != NULL)
    conn_fail(c, TG_XFER_BROKEN, uv_strerror(status));
}

/* Sends x's request on its connection: one uv_try_write for the head and
 * the body; what the socket did not take is copied and queued. */
static void xfer_send(h1x_t *x) {
  conn_t *c = x->conn;
  uv_buf_t bufs[2];
  unsigned nb = 1;
  size_t total = x->req_len, done, rest;
  wreq_t *wr;
  uv_buf_t one;
  int r;

  bufs[0] = uv_buf_init(x->req, (unsigned)x->req_len);
  if (x->body_len > 0) {
    bufs[1] = uv_buf_init((char *)x->body, (unsigned)x->body_len);
    total += x->body_len;
    nb = 2;
  }
  llhttp_init(&c->parser, HTTP_RESPONSE, parser_settings());
  c->parser.data = c;
  r = uv_try_write((uv_stream_t *)&c->tcp, bufs, nb);
  if (r == UV_EAGAIN || r == UV_ENOSYS)
    r = 0;
  if (r < 0) {
    conn_fail(c, TG_XFER_BROKEN, uv_strerror(r));
    return;
  }
  done = (size_t)r;
  if (done == total)
    return;
  rest = total - done;
  wr = malloc(sizeof(*wr) + rest);
  if (wr == NULL) {
    conn_fail(c, TG_XFER_BROKEN, "out of memory");
    return;
  }
  wr->conn = c;
  if (done < x->req_len) {
    memcpy(wr->data, x->req + done, x->req_len - done);
    if (x->body_len > 0)
      memcpy(wr->data + (x->req_len - done), x->body, x->body_len);
  } else {
    memcpy(wr->data, x->body + (done - x->req_len), rest);
  }
  one = uv_buf_init(wr->data, (unsigned)rest);
  r = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &one, 1, on_write);
  if (r < 0) {
    free(wr);
    conn_fail(c, TG_XFER_BROKEN, uv_strerror(r));
    return;
  }
  c->wpending = 1;
}

static void on_connect_timeout(uv_timer_t *t) {
  conn_t *c = t->data;
  if (c->state == C_CONNECTING)
    conn_fail(c, TG_XFER_TIMEOUT, "connect timed out");
}

static void on_connect(uv_connect_t *req, int status) {
  conn_t *c = req->data;
  h1x_t *x;

  if (c->state == C_CLOSING)
    return;
  x = c->x;
  if (status < 0) {
    if (!c->host->numeric)
      c->host->resolved = 0; /* the name may point elsewhere now */
    conn_fail(c, TG_XFER_CONNECT, uv_strerror(status));
    return;
  }
  uv_timer_stop(&c->timer);
  uv_tcp_nodelay(&c->tcp, 1);
  status = conn_read(c, 1);
  if (status < 0) {
    conn_fail(c, TG_XFER_CONNECT, uv_strerror(status));
    return;
  }
  c->state = C_BUSY;
  if (x != NULL)
    xfer_send(x);
  else
    conn_release(c, 1);
}

/* Opens a new connection for x to its host's address. */
static void xfer_connect(h1x_t *x) {
  tg__h1_t *h = x->h;
  conn_t *c = calloc(1, sizeof(*c));
  int r;

  x->state = X_ON_CONN;
  if (c == NULL) {
    xfer_finish(x, TG_XFER_LOCAL, "out of memory", 1);
    return;
  }
  c->h = h;
  c->host = x->host;
  c->state = C_CONNECTING;
  uv_tcp_init(h->loop, &c->tcp);
  uv_timer_init(h->loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  c->creq.data = c;
  c->handles = 2;
  h->pending++;
  c->next = h->conns;
  if (h->conns)
    h->conns->prev = c;
  h->conns = c;
  h->n_conns++;
  c->x = x;
  x->conn = c;
  x->got_bytes = 0;
  r = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)&x->host->addr, on_connect);
  if (r < 0) {
    c->x = NULL;
    x->conn = NULL;
    conn_close(c);
    /* the socket could not be made (uv errors are negative errno values) */
    xfer_finish(x, tg_xfer_errno_local(-r) ? TG_XFER_LOCAL : TG_XFER_CONNECT, uv_strerror(r), 1);
    return;
  }
  if (x->connect_timeout_ms > 0)
    uv_timer_start(&c->timer, on_connect_timeout, x->connect_timeout_ms, 0);
}

/* Puts x on a pooled connection of its host (the last one idled), or on a
 * new one. The host's address is known. */
static void xfer_dispatch(h1x_t *x) {
  host_t *host = x->host;
  conn_t *c = host->idle;

  if (c == NULL) {
    xfer_connect(x);
    return;
  }
  idle_unlink(c);
  c->state = C_BUSY;
  c->x = x;
  x->conn = c;
  x->state = X_ON_CONN;
  xfer_send(x);
}

/* ---- resolution --------------------------------------------------------- */

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  gai_t *g = (gai_t *)req;
  host_t *host = g->host;
  tg__h1_t *h = g->h;
  h1x_t *x;

  if (host != NULL) {
    host->gai = NULL;
    /* a waiter told of a failure may start a transfer to another host at
     * once, which may make room in a full table: not with this one */
    host->telling = 1;
    if (status == 0 && res != NULL && res->ai_addrlen <= sizeof(host->addr)) {
      memcpy(&host->addr, res->ai_addr, res->ai_addrlen);
      host->resolved = 1;
    }
    while ((x = host->waiting) != NULL) {
      host->waiting = x->qnext;
      x->qnext = NULL;
      if (host->resolved)
        xfer_dispatch(x);
      else
        xfer_finish(x, TG_XFER_CONNECT, "could not resolve the upstream host", 0);
    }
    host->telling = 0;
  }
  uv_freeaddrinfo(res);
  free(g);
  h->pending--;
  h1_maybe_free(h);
}

static int host_resolve_start(tg__h1_t *h, host_t *host) {
  struct addrinfo hints;
  gai_t *g = calloc(1, sizeof(*g));
  int r;

  if (g == NULL)
    return TG_ENOMEM;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  g->host = host;
  g->h = h;
  r = uv_getaddrinfo(h->loop, &g->req, on_resolved, host->name, host->port, &hints);
  if (r < 0) {
    free(g);
    return r;
  }
  host->gai = g;
  h->pending++;
  return 0;
}

/* Numeric addresses and "localhost" need no resolver. */
static int host_numeric(host_t *host) {
  int port = (int)strtol(host->port, NULL, 10);
  struct sockaddr_in *a4 = (struct sockaddr_in *)&host->addr;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&host->addr;
  const char *name = strcmp(host->name, "localhost") == 0 ? "127.0.0.1" : host->name;

  if (uv_ip4_addr(name, port, a4) == 0 || uv_ip6_addr(name, port, a6) == 0) {
    host->resolved = 1;
    host->numeric = 1;
    return 1;
  }
  return 0;
}

/* Splits "http://auth/path" into auth and path. Returns 0 or TG_EINVAL. */
static int url_split(const char *url, const char **auth, size_t *auth_len, const char **path) {
  const char *a, *p;
  if (strncmp(url, "http://", 7) != 0)
    return TG_EINVAL;
  a = url + 7;
  p = a + strcspn(a, "/");
  if (p == a || (size_t)(p - a) > AUTH_MAX)
    return TG_EINVAL;
  *auth = a;
  *auth_len = (size_t)(p - a);
  *path = *p ? p : "/";
  return 0;
}

static host_t **host_bucket(tg__h1_t *h, const char *auth, size_t auth_len) {
  return &h->hbuckets[tg_hash_mem(auth, auth_len) & (HOST_BUCKETS - 1)];
}

/* Frees the least recently added host that nothing uses: no connection
 * (open, connecting or idle), no transfer, no resolution in flight or
 * being told to its waiters.
 * Hosts are added for the endpoints of every config a loop has served
 * under; reloads that move endpoints (new addresses at each rollout) would
 * otherwise fill the table for good and every new endpoint be refused.
 * Runs only when the table is full, so its walk of the connections and
 * transfers costs nothing on the way of a request. Returns 1 when a host
 * was freed, 0 when every one is in use. */
static int host_evict(tg__h1_t *h) {
  host_t *host, **pp, **victim = NULL;
  conn_t *c;
  h1x_t *x;

  for (host = h->hosts; host != NULL; host = host->next)
    host->used = host->gai != NULL || host->waiting != NULL || host->idle != NULL ||
                 host->telling;
  for (c = h->conns; c != NULL; c = c->next)
    c->host->used = 1;
  for (x = h->xfers; x != NULL; x = x->next)
    if (x->host != NULL)
      x->host->used = 1;
  for (pp = &h->hosts; *pp != NULL; pp = &(*pp)->next)
    if (!(*pp)->used)
      victim = pp; /* the list is newest first: the last is the oldest */
  if (victim == NULL)
    return 0;
  host = *victim;
  *victim = host->next;
  for (pp = host_bucket(h, host->auth, strlen(host->auth)); *pp != host; pp = &(*pp)->hnext)
    ;
  *pp = host->hnext;
  h->n_hosts--;
  free(host);
  return 1;
}

static host_t *host_get(tg__h1_t *h, const char *auth, size_t auth_len) {
  host_t *host, **bucket;
  const char *colon;
  size_t nlen;

  for (host = *host_bucket(h, auth, auth_len); host != NULL; host = host->hnext) {
    h->host_compares++;
    if (strlen(host->auth) == auth_len && memcmp(host->auth, auth, auth_len) == 0)
      return host;
  }
  if (h->n_hosts >= HOSTS_MAX && !host_evict(h))
    return NULL;
  host = calloc(1, sizeof(*host));
  if (host == NULL)
    return NULL;
  memcpy(host->auth, auth, auth_len);
  host->auth[auth_len] = '\0';
  if (auth[0] == '[') {
    const char *end = memchr(auth, ']', auth_len);
    if (end == NULL)
      goto bad;
    nlen = (size_t)(end - auth - 1);
    memcpy(host->name, auth + 1, nlen);
    colon = end + 1 < auth + auth_len && end[1] == ':' ? end + 1 : NULL;
  } else {
    colon = memchr(auth, ':', auth_len);
    nlen = colon ? (size_t)(colon - auth) : auth_len;
    memcpy(host->name, auth, nlen);
  }
  host->name[nlen] = '\0';
  if (colon != NULL) {
    size_t plen = (size_t)(auth + auth_len - colon - 1);
    if (plen == 0 || plen >= sizeof(host->port))
      goto bad;
    memcpy(host->port, colon + 1, plen);
    host->port[plen] = '\0';
  } else {
    memcpy(host->port, "80", 3);
  }
  host_numeric(host);
  host->next = h->hosts;
  h->hosts = host;
  bucket = host_bucket(h, auth, auth_len);
  host->hnext = *bucket;
  *bucket = host;
  h->n_hosts++;
  return host;
bad:
  free(host);
  return NULL;
}

/* ---- the request -------------------------------------------------------- */

static int head_put(char *dst, size_t cap, size_t *len, const char *s, size_t n) {
  if (*len + n > cap)
    return TG_ETOOBIG;
  if (dst != NULL)
    memcpy(dst + *len, s, n);
  *len += n;
  return 0;
}

/* Writes the request head into dst (or only measures it when dst is NULL).
 * Header lines follow libcurl's conventions, which the callers use: "Name:"
 * with no value drops a header we would add, "Name;" sends it empty. */
static int head_build(char *dst, size_t cap, size_t *len, const tg_xfer_opts_t *opts,
                      const char *auth, size_t auth_len, const char *path) {
  char num[32];
  size_t i;
  int r = 0;

  *len = 0;
  r |= head_put(dst, cap, len, opts->body ? "POST " : "GET ", opts->body ? 5 : 4);
  r |= head_put(dst, cap, len, path, strlen(path));
  r |= head_put(dst, cap, len, " HTTP/1.1\r\nHost: ", 17);
  r |= head_put(dst, cap, len, auth, auth_len);
  r |= head_put(dst, cap, len, "\r\n", 2);
  if (opts->body) {
    tg_sb_t b;
    tg_sb_init(&b, num, sizeof(num));
    tg_sb_lit(&b, "Content-Length: ");
    tg_sb_putu(&b, opts->body_len);
    tg_sb_lit(&b, "\r\n");
    r |= head_put(dst, cap, len, num, b.len);
  }
  for (i = 0; opts->headers && opts->headers[i]; i++) {
    const char *l = opts->headers[i], *colon = strchr(l, ':');
    size_t n = strlen(l);
    /* libcurl's forms: "Name:" with nothing after the colon drops the
     * header (a value that itself ends in ':' is sent) */
    if (n == 0 || (colon != NULL && colon[1 + strspn(colon + 1, " \t")] == '\0'))
      continue;
    if (strchr(l, '\r') || strchr(l, '\n'))
      return TG_EINVAL;
    if (l[n - 1] == ';' && strchr(l, ':') == NULL) {
      r |= head_put(dst, cap, len, l, n - 1);
      r |= head_put(dst, cap, len, ":\r\n", 3);
      continue;
    }
    r |= head_put(dst, cap, len, l, n);
    r |= head_put(dst, cap, len, "\r\n", 2);
  }
  r |= head_put(dst, cap, len, "\r\n", 2);
  return r ? TG_ETOOBIG : 0;
}

/* ---- the answer --------------------------------------------------------- */

static conn_t *parser_conn(llhttp_t *p) {
  return p->data;
}

static int count_head(llhttp_t *p, const char *at, size_t len) {
  h1x_t *x = parser_conn(p)->x;
  (void)at;
  x->head_bytes += len;
  if (x->head_bytes > RESP_HEAD_MAX) {
    llhttp_set_error_reason(p, "answer headers too large");
    return HPE_USER;
  }
  return 0;
}

/* A head's fields also go to the Retry-After catcher, as pieces of a
 * name or a value (feed) and their ends (end); a chunked answer's
 * trailers do not (they come after its status was reported). */
static int ra_piece(llhttp_t *p, const char *at, size_t len,
                    void (*feed)(tg_retry_after_t *, const char *, size_t)) {
  if (!(p->flags & F_TRAILING))
    feed(&parser_conn(p)->x->head.ra, at, len);
  return count_head(p, at, len);
}

static int ra_end(llhttp_t *p, void (*end)(tg_retry_after_t *)) {
  if (!(p->flags & F_TRAILING))
    end(&parser_conn(p)->x->head.ra);
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  return ra_piece(p, at, len, tg_retry_after_name);
}

static int on_header_field_complete(llhttp_t *p) {
  return ra_end(p, tg_retry_after_name_end);
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  return ra_piece(p, at, len, tg_retry_after_value);
}

static int on_header_value_complete(llhttp_t *p) {
  return ra_end(p, tg_retry_after_value_end);
}

/* Whether the answer's head declares a body (RFC 9112 6.1, 6.2). */
static int declares_body(const llhttp_t *p) {
  return (p->flags & (F_CHUNKED | F_TRANSFER_ENCODING)) ||
         ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
}

/* A 1xx, 204 or 304 ends at its blank line whatever its fields say (RFC
 * 9112 6.3), which llhttp 8 leaves to the caller: it would read a declared
 * body, for a 1xx out of the real answer's bytes. Returning 1 skips it. A
 * connection whose upstream declared a body there is not reused: the bytes
 * may still be on their way. A 101 is refused: nothing asked for another
 * protocol, and what follows would not be HTTP. */
static int on_headers_complete(llhttp_t *p) {
  conn_t *c = parser_conn(p);
  h1x_t *x = c->x;
  int status = p->status_code;
  int bodiless = status < 200 || status == 204 || status == 304;

  x->head_bytes = 0;
  if (bodiless && declares_body(p))
    x->spoilt = 1;
  if (status == 101) {
    llhttp_set_error_reason(p, "the upstream switched protocols");
    return -1;
  }
  if (status < 200) {
    x->interim = 1; /* 100 Continue and friends: the real answer follows */
    tg_retry_after_reset(&x->head.ra); /* and the fields to read are its */
    return 1;
  }
  if (x->cbs.on_status) {
    int r;
    x->in_cb = 1;
    r = x->cbs.on_status((tg_xfer_t *)x, status, x->arg);
    x->in_cb = 0;
    if (r != 0 || x->canceled) {
      x->aborted = 1;
      return HPE_PAUSED;
    }
  }
  return bodiless ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = parser_conn(p);
  h1x_t *x = c->x;
  int r;

  if (x->interim || len == 0)
    return 0;
  x->in_cb = 1;
  r = x->cbs.on_data((tg_xfer_t *)x, at, len, x->arg);
  x->in_cb = 0;
  if (x->canceled || (r < 0 && r != TG_XFER_PAUSE)) {
    x->aborted = 1;
    return HPE_PAUSED;
  }
  if (r == TG_XFER_PAUSE) {
    x->paused = 1;
    x->pend_body = at;
    x->pend_body_len = len;
    return HPE_PAUSED;
  }
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  conn_t *c = parser_conn(p);
  h1x_t *x = c->x;

  if (x->interim) {
    x->interim = 0;
    return 0;
  }
  x->complete = 1;
  x->keep_alive = llhttp_should_keep_alive(p) && !x->spoilt;
  return HPE_PAUSED;
}

static const llhttp_settings_t *parser_settings(void) {
  static llhttp_settings_t s;
  static int ready;
  if (!ready) {
    llhttp_settings_init(&s);
    s.on_status = count_head;
    s.on_header_field = on_header_field;
    s.on_header_field_complete = on_header_field_complete;
    s.on_header_value = on_header_value;
    s.on_header_value_complete = on_header_value_complete;
    s.on_headers_complete = on_headers_complete;
    s.on_body = on_body;
    s.on_message_complete = on_message_complete;
    ready = 1;
  }
  return &s;
}

/* Runs the parser over bytes of the loop's read buffer or of c->hold and
 * acts on where it stopped.
 * Returns 1 when the transfer ended (freed, or queued for on_done), 0 when
 * it goes on (possibly paused). */
static int conn_feed(conn_t *c, const char *data, size_t len) {
  h1x_t *x = c->x;
  llhttp_errno_t err = llhttp_execute(&c->parser, data, len);
  const char *pos;

  if (err == HPE_OK)
    return 0;
  if (err != HPE_PAUSED || x->canceled || x->aborted) {
    c->x = NULL;
    conn_close(c);
    if (x->canceled)
      xfer_free(x);
    else if (x->aborted)
      xfer_finish(x, TG_XFER_ABORTED, "a callback refused the answer", 0);
    else
      xfer_finish(x, TG_XFER_BROKEN, "the upstream sent a malformed answer", 0);
    return 1;
  }
  pos = llhttp_get_error_pos(&c->parser);
  if (x->complete) {
    /* Bytes after the answer were not asked for: such a connection is not
     * in a state we can trust for the next request. */
    conn_release(c, x->keep_alive && pos == data + len);
    xfer_finish(x, TG_XFER_OK, "ok", 0);
    return 1;
  }
  if (x->paused) {
    x->pend_raw = pos;
    x->pend_raw_len = (size_t)(data + len - pos);
    if (hold_pending(c, x) != 0) {
      c->x = NULL;
      conn_close(c);
      xfer_finish(x, TG_XFER_LOCAL, "out of memory for a paused answer", 0);
      return 1;
    }
    conn_read(c, 0);
  }
  return 0;
}

/* ---- public (to client.c) ----------------------------------------------- */

int tg__h1_accepts(const char *url) {
  return strncmp(url, "http://", 7) == 0;
}

int tg__h1_init(tg__h1_t **out, uv_loop_t *loop) {
  tg__h1_t *h = calloc(1, sizeof(*h));
  if (h == NULL)
    return TG_ENOMEM;
  h->loop = loop;
  tg_recycle_init(&h->xfer_mem, sizeof(h1x_t), TG_RECYCLE_MAX);
  uv_timer_init(loop, &h->defer);
  h->defer.data = h;
  uv_timer_init(loop, &h->sweep);
  h->sweep.data = h;
  uv_timer_start(&h->sweep, on_sweep, IDLE_SWEEP_MS, IDLE_SWEEP_MS);
  uv_unref((uv_handle_t *)&h->sweep); /* never what keeps a loop running */
  h->pending = 2;
  *out = h;
  return 0;
}

static void h1_maybe_free(tg__h1_t *h) {
  if (h->closing && h->pending == 0) {
    tg_recycle_clear(&h->xfer_mem);
    free(h);
  }
}

static void on_h1_handle_closed(uv_handle_t *hd) {
  tg__h1_t *h = hd->data;
  h->pending--;
  h1_maybe_free(h);
}

void tg__h1_close(tg__h1_t *h) {
  host_t *host;

  h->closing = 1;
  while (h->xfers)
    tg__h1_cancel((tg_xfer_t *)h->xfers);
  while (h->conns)
    conn_close(h->conns);
  while ((host = h->hosts) != NULL) {
    h->hosts = host->next;
    if (host->gai != NULL) {
      host->gai->host = NULL;
      uv_cancel((uv_req_t *)&host->gai->req);
    }
    free(host);
  }
  memset(h->hbuckets, 0, sizeof(h->hbuckets));
  uv_close((uv_handle_t *)&h->defer, on_h1_handle_closed);
  uv_close((uv_handle_t *)&h->sweep, on_h1_handle_closed);
}

int tg__h1_start(tg__h1_t *h, const tg_xfer_opts_t *opts, const tg_xfer_cbs_t *cbs,
                 void *arg, tg_xfer_t **out) {
  const char *auth, *path;
  size_t auth_len, need;
  h1x_t *x;
  int r;

  if (h->closing)
    return TG_ECANCELED;
  if ((r = url_split(opts->url, &auth, &auth_len, &path)) < 0)
    return r;
  if ((r = head_build(NULL, HEAD_MAX, &need, opts, auth, auth_len, path)) < 0)
    return r;
  /* the inline head buffer is written, not cleared */
  x = tg_recycle_alloc(&h->xfer_mem);
  if (x == NULL)
    return TG_ENOMEM;
  memset(x, 0, offsetof(h1x_t, req_inline));
  x->head.native = 1;
  x->h = h;
  x->req = need <= sizeof(x->req_inline) ? x->req_inline : malloc(need);
  x->host = host_get(h, auth, auth_len);
  if (x->req == NULL || x->host == NULL) {
    r = x->req == NULL ? TG_ENOMEM : TG_EINVAL;
    if (x->req != x->req_inline)
      free(x->req);
    tg_recycle_free(&h->xfer_mem, x);
    return r;
  }
  head_build(x->req, need, &x->req_len, opts, auth, auth_len, path);
  x->cbs = *cbs;
  x->arg = arg;
  x->body = opts->body;
  x->body_len = opts->body ? opts->body_len : 0;
  x->connect_timeout_ms = opts->connect_timeout_ms;
  x->next = h->xfers;
  if (h->xfers)
    h->xfers->prev = x;
  h->xfers = x;
  *out = (tg_xfer_t *)x;

  x->starting = 1;
  if (x->host->resolved) {
    xfer_dispatch(x);
  } else {
    x->state = X_RESOLVING;
    x->qnext = x->host->waiting;
    x->host->waiting = x;
    if (x->host->gai == NULL && host_resolve_start(h, x->host) < 0) {
      x->host->waiting = x->qnext;
      xfer_finish(x, TG_XFER_CONNECT, "could not resolve the upstream host", 1);
    }
  }
  /* x may sit in the done queue now; it is still alive until the timer. */
  x->starting = 0;
  return 0;
}

void tg__h1_cancel(tg_xfer_t *xt) {
  h1x_t *x = (h1x_t *)xt;
  h1x_t **pp;

  if (x->in_cb) {
    /* From inside its own callback: finished when the callback returns. */
    x->canceled = 1;
    return;
  }
  switch (x->state) {
  case X_RESOLVING:
    for (pp = &x->host->waiting; *pp != NULL; pp = &(*pp)->qnext)
      if (*pp == x) {
        *pp = x->qnext;
        break;
      }
    break;
  case X_DONE_PENDING:
    for (pp = &x->h->done_q; *pp != NULL; pp = &(*pp)->qnext)
      if (*pp == x) {
        *pp = x->qnext;
        break;
      }
    break;
  default:
    if (x->conn != NULL) {
      x->conn->x = NULL;
      conn_close(x->conn); /* an unfinished answer cannot be reused */
    }
    break;
  }
  xfer_free(x);
}

void tg__h1_resume(tg_xfer_t *xt) {
  h1x_t *x = (h1x_t *)xt;
  conn_t *c = x->conn;
  int r;

  if (!x->paused || c == NULL)
    return;
  x->paused = 0;
  x->starting = 1; /* completions from here are deferred */
  if (x->pend_body_len > 0) {
    x->in_cb = 1;
    r = x->cbs.on_data(xt, x->pend_body, x->pend_body_len, x->arg);
    x->in_cb = 0;
    if (x->canceled) {
      c->x = NULL;
      conn_close(c);
      xfer_free(x);
      return;
    }
    if (r == TG_XFER_PAUSE) {
      x->paused = 1;
      x->starting = 0;
      return;
    }
    if (r < 0) {
      c->x = NULL;
      conn_close(c);
      xfer_finish(x, TG_XFER_ABORTED, "a callback refused the answer", 1);
      return;
    }
    x->pend_body_len = 0;
  }
  llhttp_resume(&c->parser);
  {
    /* Fed even with no bytes held: a pause on the last bytes of a
     * Content-Length body left the parser before on_message_complete, which
     * no further byte from the upstream would ever bring. */
    const char *raw = x->pend_raw_len > 0 ? x->pend_raw : "";
    size_t n = x->pend_raw_len;
    x->pend_raw_len = 0;
    if (conn_feed(c, raw, n)) {
      /* x is freed or waits in the done queue; c, if closed, is freed by
       * its close callbacks, so its hold can go now. */
      drop_hold(c);
      return;
    }
    if (x->paused) {
      x->starting = 0;
      return; /* the rest moved to a new hold */
    }
  }
  drop_hold(c);
  x->starting = 0;
  conn_read(c, 1);
}

int tg__h1_paused(const tg_xfer_t *xt) {
  return ((const h1x_t *)xt)->paused;
}

void tg__h1_counts(const tg__h1_t *h, size_t *open, size_t *idle) {
  *open = h->n_conns;
  *idle = h->n_idle;
}

void tg__h1_host_stats(const tg__h1_t *h, size_t *hosts, uint64_t *compares) {
  *hosts = h->n_hosts;
  *compares = h->host_compares;
}
