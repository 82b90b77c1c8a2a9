/* The upstream client interface and its libcurl implementation.
 *
 * Each tg_upstream_t holds a libcurl multi handle and, once
 * tg_upstream_set_mode() asks for it, the native HTTP/1.1 client
 * (h1client.c); tg_xfer_start() sends http:// URLs to the native client in
 * that mode and everything else to libcurl. The other tg_xfer_* calls
 * follow the transfer's own kind (its tg__xfer_head_t).
 *
 * libcurl multi on a libuv loop: curl tells us which sockets to watch and
 * when to time out (socket and timer callbacks), libuv tells curl when they
 * are ready (socket_action). Finished transfers are collected with
 * curl_multi_info_read after every action and reported through on_done.
 *
 * A socket's uv_poll_t lives in a small context freed from its close
 * callback; curl may reuse the descriptor number at once, so a context is
 * detached from curl (curl_multi_assign NULL) the moment curl removes it.
 *
 * A pooled connection is not trusted blindly (libcurl 7.88 trusts it):
 * bytes waiting on it before the request goes out (an answer longer than
 * its framing, the body of a 204, a close) would be read as the next
 * request's answer, perhaps another tenant's, so the pre-request callback
 * refuses such a connection; and a request that failed on a reused
 * connection before any answer line arrived is not yet lost. Either way
 * the transfer starts again, once, on a fresh connection, inside this file:
 * the caller sees one transfer and one on_done. */
#include "upstream/client.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/err.h"
#include "upstream/h1client.h"

#define EASY_FREE_MAX 64
#define PORTS 65536

typedef struct sock_ctx_s sock_ctx_t;

struct tg_upstream_s {
  uv_loop_t *loop;
  CURLM *multi;
  uv_timer_t timer;
  /* Idle easy handles, each still set up for the URL it last fetched: a
   * handle reused for the same URL needs only the per-request options. */
  CURL *free_easy[EASY_FREE_MAX];
  char *free_url[EASY_FREE_MAX];
  int n_free;
  int closing;
  tg_xfer_t *xfers;          /* live transfers */
  sock_ctx_t **socks;        /* watchers by descriptor */
  size_t n_socks;
  tg__h1_t *h1;              /* the native client, NULL in curl mode */
  /* Descriptor + 1 of the connection a transfer last ended on, by local
   * port (PORTS entries, made at the first such end): libcurl names a
   * reused connection's addresses to the pre-request callback but not its
   * descriptor (CURLINFO_ACTIVESOCKET is unset until the transfer ends). */
  int *port_fd;
};

struct tg_xfer_s {
  tg__xfer_head_t head;      /* native = 0 */
  tg_upstream_t *up;
  CURL *easy;
  struct curl_slist *headers;
  char *url;                 /* the URL the easy handle is set up for */
  tg_xfer_cbs_t cbs;
  void *arg;
  tg_xfer_t *prev, *next;
  int status_seen;
  int paused;
  int failed;                /* a callback asked to abort */
  int sent;                  /* request bytes went out */
  int local_fail;            /* socket() failed for the gateway's own shortage */
  int opened;                /* this attempt opened a socket: a fresh connection */
  int stale;                 /* the pre-request check refused the connection */
  int restarted;             /* started again on a fresh connection (once) */
  int head_body;             /* this header block declares a body */
  int no_reuse;              /* a 204/304 declared a body libcurl will not read */
};

struct sock_ctx_s {
  uv_poll_t poll;
  curl_socket_t fd;
  tg_upstream_t *up;
  int events;               /* what the uv_poll_t watches now */
};

static void check_done(tg_upstream_t *up);

static void xfer_unlink(tg_xfer_t *x) {
  tg_upstream_t *up = x->up;
  if (x->prev) x->prev->next = x->next;
  else up->xfers = x->next;
  if (x->next) x->next->prev = x->prev;
}

static void xfer_free(tg_xfer_t *x) {
  tg_upstream_t *up = x->up;
  curl_multi_remove_handle(up->multi, x->easy);
  xfer_unlink(x);
  if (up->n_free < EASY_FREE_MAX && !up->closing && !x->failed) {
    up->free_url[up->n_free] = x->url;
    up->free_easy[up->n_free++] = x->easy;
    x->url = NULL;
  } else {
    curl_easy_cleanup(x->easy);
  }
  free(x->url);
  curl_slist_free_all(x->headers);
  free(x);
}

/* Takes an idle handle set up for url, or any idle handle (reset), or a new
 * one. *fresh tells whether the URL-level options must be set. */
static CURL *easy_take(tg_upstream_t *up, const char *url, char **url_out, int *fresh) {
  int i;
  CURL *e;

  for (i = up->n_free - 1; i >= 0; i--)
    if (strcmp(up->free_url[i], url) == 0)
      break;
  if (i >= 0) {
    e = up->free_easy[i];
    *url_out = up->free_url[i];
    up->free_easy[i] = up->free_easy[up->n_free - 1];
    up->free_url[i] = up->free_url[up->n_free - 1];
    up->n_free--;
    *fresh = 0;
    return e;
  }
  *fresh = 1;
  *url_out = strdup(url);
  if (*url_out == NULL)
    return NULL;
  if (up->n_free > 0) {
    up->n_free--;
    e = up->free_easy[up->n_free];
    free(up->free_url[up->n_free]);
    curl_easy_reset(e);
    return e;
  }
  e = curl_easy_init();
  if (e == NULL) {
    free(*url_out);
    *url_out = NULL;
  }
  return e;
}

/* ---- sockets ------------------------------------------------------------
 * A watcher lives from curl's first CURL_POLL_IN/OUT for a socket to its
 * CURL_POLL_REMOVE. It is closed there, while the descriptor is still open
 * (uv_poll_stop deregisters it at once): libcurl does not always close a
 * socket through CURLOPT_CLOSESOCKETFUNCTION (7.88 closes a connect attempt
 * that timed out or was cancelled with a plain close()), so a watcher kept
 * past REMOVE could stand on a closed or reused descriptor, and libuv aborts
 * on the epoll_ctl that follows. The close-socket callback still closes a
 * watcher curl did not remove first. A pooled connection's next transfer
 * costs one epoll_ctl to watch it again. */

static sock_ctx_t *sock_get(tg_upstream_t *up, curl_socket_t fd) {
  if (fd < 0 || (size_t)fd >= up->n_socks)
    return NULL;
  return up->socks[fd];
}

static int sock_put(tg_upstream_t *up, curl_socket_t fd, sock_ctx_t *ctx) {
  if ((size_t)fd >= up->n_socks) {
    size_t n = up->n_socks ? up->n_socks : 256;
    sock_ctx_t **ns;
    while (n <= (size_t)fd)
      n *= 2;
    ns = realloc(up->socks, n * sizeof(*ns));
    if (ns == NULL)
      return TG_ENOMEM;
    memset(ns + up->n_socks, 0, (n - up->n_socks) * sizeof(*ns));
    up->socks = ns;
    up->n_socks = n;
  }
  up->socks[fd] = ctx;
  return 0;
}

static void on_poll_closed(uv_handle_t *h) {
  free(h->data);
}

static void on_poll(uv_poll_t *p, int status, int events) {
  sock_ctx_t *ctx = p->data;
  tg_upstream_t *up = ctx->up;
  int flags = 0, running;

  if (status < 0) {
    /* An error on the socket (a reset): libuv has stopped the watcher and
     * says nothing of the bytes the kernel still holds. curl fails a bare
     * CURL_CSELECT_ERR unread, so an answer followed at once by a reset was
     * lost; told the socket is ready, curl reads what is there and then
     * meets the error itself. The next socket_cb starts the watcher again. */
    ctx->events = 0;
    flags = CURL_CSELECT_IN | CURL_CSELECT_OUT;
  }
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  curl_multi_socket_action(up->multi, ctx->fd, flags, &running);
  check_done(up);
}

static void sock_watch(sock_ctx_t *ctx, int events) {
  if (events == ctx->events)
    return;
  ctx->events = events;
  if (events == 0)
    uv_poll_stop(&ctx->poll);
  else
    uv_poll_start(&ctx->poll, events, on_poll);
}

static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
  tg_upstream_t *up = userp;
  sock_ctx_t *ctx = sock_get(up, s);
  int events = 0;

  (void)easy;
  (void)socketp;
  if (what == CURL_POLL_REMOVE) {
    if (ctx) {
      up->socks[s] = NULL;
      uv_close((uv_handle_t *)&ctx->poll, on_poll_closed);
    }
    return 0;
  }
  if (ctx == NULL) {
    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
      return -1;
    ctx->fd = s;
    ctx->up = up;
    if (uv_poll_init_socket(up->loop, &ctx->poll, s) < 0 || sock_put(up, s, ctx) < 0) {
      free(ctx);
      return -1;
    }
    ctx->poll.data = ctx;
  }
  if (what & CURL_POLL_IN) events |= UV_READABLE;
  if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
  sock_watch(ctx, events);
  return 0;
}

static int closesocket_cb(void *clientp, curl_socket_t fd) {
  tg_upstream_t *up = clientp;
  sock_ctx_t *ctx = sock_get(up, fd);
  if (ctx != NULL) {
    up->socks[fd] = NULL;
    uv_close((uv_handle_t *)&ctx->poll, on_poll_closed);
  }
  return close(fd);
}

static void on_timeout(uv_timer_t *t) {
  tg_upstream_t *up = t->data;
  int running;
  curl_multi_socket_action(up->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  check_done(up);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
  tg_upstream_t *up = userp;
  (void)multi;
  if (timeout_ms < 0)
    uv_timer_stop(&up->timer);
  else
    uv_timer_start(&up->timer, on_timeout, (uint64_t)timeout_ms, 0);
  return 0;
}

int tg_curl_socket(int family, int socktype, int protocol, int *local) {
  int fd = socket(family, socktype | SOCK_CLOEXEC, protocol);
  if (fd < 0 && tg_xfer_errno_local(errno))
    *local = 1;
  return fd;
}

/* Makes the transfers' sockets, to tell "no descriptor left" from an
 * upstream that refused. */
static curl_socket_t opensocket_cb(void *clientp, curlsocktype purpose,
                                   struct curl_sockaddr *a) {
  tg_xfer_t *x = clientp;
  (void)purpose;
  /* libcurl picks a cached connection or opens sockets for a new one,
   * never both in one attempt. */
  x->opened = 1;
  return tg_curl_socket(a->family, a->socktype, a->protocol, &x->local_fail);
}

/* Whether a connection has something to read before a request was sent
 * on it: bytes, an end of stream or an error. Anything but "nothing yet"
 * means it is not fit to carry a request. */
static int sock_has_input(curl_socket_t s) {
  char c;
  ssize_t n = recv(s, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
}

/* Notes the descriptor of the connection a finished transfer leaves in
 * libcurl's cache (none when libcurl closed it). */
static void conn_note(tg_upstream_t *up, CURL *easy) {
  curl_socket_t s = CURL_SOCKET_BAD;
  long port = 0;

  if (curl_easy_getinfo(easy, CURLINFO_ACTIVESOCKET, &s) != CURLE_OK ||
      s == CURL_SOCKET_BAD ||
      curl_easy_getinfo(easy, CURLINFO_LOCAL_PORT, &port) != CURLE_OK ||
      port <= 0 || port >= PORTS)
    return;
  if (up->port_fd == NULL && (up->port_fd = calloc(PORTS, sizeof(int))) == NULL)
    return;
  up->port_fd[port] = (int)s + 1;
}

/* Leaves a finished transfer's connection unnoted, so that its next use
 * is refused: libcurl leaves a 204's or 304's declared body unread, and it
 * may still be on its way. */
static void conn_forget(tg_upstream_t *up, CURL *easy) {
  long port = 0;

  if (up->port_fd != NULL &&
      curl_easy_getinfo(easy, CURLINFO_LOCAL_PORT, &port) == CURLE_OK &&
      port > 0 && port < PORTS)
    up->port_fd[port] = 0;
}

/* Whether address a is ip:port. */
static int addr_is(const struct sockaddr_storage *a, const char *ip, int port) {
  char txt[INET6_ADDRSTRLEN];
  const void *raw;
  int p;

  if (a->ss_family == AF_INET) {
    const struct sockaddr_in *v4 = (const struct sockaddr_in *)(const void *)a;
    raw = &v4->sin_addr;
    p = ntohs(v4->sin_port);
  } else if (a->ss_family == AF_INET6) {
    const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)(const void *)a;
    raw = &v6->sin6_addr;
    p = ntohs(v6->sin6_port);
  } else {
    return 0;
  }
  return p == port && inet_ntop(a->ss_family, raw, txt, sizeof(txt)) != NULL &&
         strcmp(txt, ip) == 0;
}

/* The descriptor of the cached connection from local_ip:local_port to
 * peer_ip:peer_port, or CURL_SOCKET_BAD when conn_note did not see it (or
 * saw another connection on that port since). */
static curl_socket_t conn_find(tg_upstream_t *up, const char *local_ip, int local_port,
                               const char *peer_ip, int peer_port) {
  struct sockaddr_storage a;
  socklen_t len;
  int fd;

  if (up->port_fd == NULL || local_port <= 0 || local_port >= PORTS)
    return CURL_SOCKET_BAD;
  fd = up->port_fd[local_port] - 1;
  if (fd < 0)
    return CURL_SOCKET_BAD;
  len = sizeof(a);
  if (getsockname(fd, (struct sockaddr *)&a, &len) != 0 || !addr_is(&a, local_ip, local_port))
    return CURL_SOCKET_BAD;
  len = sizeof(a);
  if (getpeername(fd, (struct sockaddr *)&a, &len) != 0 || !addr_is(&a, peer_ip, peer_port))
    return CURL_SOCKET_BAD;
  return fd;
}

/* Runs once the connection is ready, before the request is sent. A
 * connection this attempt opened is left alone (a fresh TLS 1.3 connection
 * may have a session ticket waiting); a reused one with input waiting, or
 * one whose descriptor cannot be found to look, is refused: libcurl then
 * closes it (an abort from a callback counts as a premature end) and
 * check_done starts the transfer again. */
static int prereq_cb(void *clientp, char *primary_ip, char *local_ip,
                     int primary_port, int local_port) {
  tg_xfer_t *x = clientp;
  curl_socket_t s;

  if (x->opened)
    return CURL_PREREQFUNC_OK;
  s = conn_find(x->up, local_ip, local_port, primary_ip, primary_port);
  if (s != CURL_SOCKET_BAD && !sock_has_input(s))
    return CURL_PREREQFUNC_OK;
  x->stale = 1;
  return CURL_PREREQFUNC_ABORT;
}

static int map_result(tg_xfer_t *x, CURLcode rc) {
  if (rc != CURLE_OK && x->local_fail && !x->sent)
    return TG_XFER_LOCAL;
  switch (rc) {
  case CURLE_OK:
    /* libcurl ends well an exchange that never had a final status: a head
     * cut by the upstream's close, a 101 (it reads what follows as the
     * body). The request went out and nothing answered it. */
    return x->status_seen ? TG_XFER_OK : TG_XFER_BROKEN;
  case CURLE_COULDNT_CONNECT:
  case CURLE_COULDNT_RESOLVE_HOST:
  case CURLE_COULDNT_RESOLVE_PROXY:
    return TG_XFER_CONNECT;
  case CURLE_OPERATION_TIMEDOUT:
    return x->sent ? TG_XFER_BROKEN : TG_XFER_TIMEOUT;
  case CURLE_WRITE_ERROR:
  case CURLE_ABORTED_BY_CALLBACK:
    return TG_XFER_ABORTED;
  default:
    return x->failed ? TG_XFER_ABORTED : TG_XFER_BROKEN;
  }
}

/* Whether a finished attempt is started again on a fresh connection: its
 * reused connection was refused before the request went out, or failed
 * before any answer line came back (the upstream closed or reset an idle
 * connection just as it was reused). Never after an answer line, after a
 * callback's refusal, or twice. */
static int should_restart(const tg_xfer_t *x, CURLcode rc) {
  if (x->restarted || x->up->closing)
    return 0;
  if (x->stale)
    return 1;
  if (x->opened || x->sent || x->failed)
    return 0;
  return rc == CURLE_SEND_ERROR || rc == CURLE_RECV_ERROR || rc == CURLE_GOT_NOTHING;
}

/* Starts x again on a new connection. Returns 0, or -1 when the handle
 * could not be added (the attempt's own result then stands). */
static int restart(tg_xfer_t *x) {
  tg_upstream_t *up = x->up;

  curl_multi_remove_handle(up->multi, x->easy);
  x->restarted = 1;
  x->stale = 0;
  x->opened = 0;
  x->local_fail = 0;
  curl_easy_setopt(x->easy, CURLOPT_FRESH_CONNECT, 1L);
  /* on failure xfer_free's removal is a no-op for a handle out of the multi */
  return curl_multi_add_handle(up->multi, x->easy) == CURLM_OK ? 0 : -1;
}

static void check_done(tg_upstream_t *up) {
  CURLMsg *msg;
  int left;

  while ((msg = curl_multi_info_read(up->multi, &left)) != NULL) {
    tg_xfer_t *x = NULL;
    CURLcode rc;
    int result;
    char detail[128];

    if (msg->msg != CURLMSG_DONE)
      continue;
    rc = msg->data.result; /* msg is the handle's: read it before a removal */
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
    if (x == NULL)
      continue;
    if (should_restart(x, rc) && restart(x) == 0)
      continue;
    if (x->no_reuse)
      conn_forget(up, msg->easy_handle);
    else
      conn_note(up, msg->easy_handle);
    result = map_result(x, rc);
    if (result != TG_XFER_OK)
      x->failed = 1;
    snprintf(detail, sizeof(detail), "%s", curl_easy_strerror(rc));
    {
      tg_xfer_cbs_t cbs = x->cbs;
      void *arg = x->arg;
      /* Free first: on_done may start a new transfer (a retry). */
      xfer_free(x);
      cbs.on_done(result, detail, arg);
    }
  }
}

static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
  tg_xfer_t *x = userdata;
  size_t len = size * nmemb;
  int r;

  r = x->cbs.on_data(x, ptr, len, x->arg);
  if (r == TG_XFER_PAUSE) {
    x->paused = 1;
    return CURL_WRITEFUNC_PAUSE;
  }
  if (r < 0) {
    x->failed = 1;
    return 0;
  }
  return len;
}

/* Whether a header line declares a body: a Content-Length other than 0, or
 * a Transfer-Encoding. */
static int line_declares_body(const char *buf, size_t len) {
  size_t i;

  if (len >= 18 && strncasecmp(buf, "Transfer-Encoding:", 18) == 0)
    return 1;
  if (len < 15 || strncasecmp(buf, "Content-Length:", 15) != 0)
    return 0;
  for (i = 15; i < len; i++)
    if (buf[i] == '\0' || strchr(" \t0\r\n", buf[i]) == NULL)
      return 1;
  return 0;
}

static size_t header_cb(char *buf, size_t size, size_t nitems, void *userdata) {
  tg_xfer_t *x = userdata;
  size_t len = size * nitems;
  long code = 0;

  x->sent = 1;
  if (len > 5 && strncmp(buf, "HTTP/", 5) == 0) {
    x->head_body = 0;
    tg_retry_after_reset(&x->head.ra); /* a 1xx's fields are not the answer's */
  } else {
    if (line_declares_body(buf, len))
      x->head_body = 1;
    if (!x->status_seen)
      tg_retry_after_line(&x->head.ra, buf, len);
  }
  /* The blank line ends a header block; skip interim 1xx blocks. */
  if (len <= 2 && !x->status_seen) {
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
    if ((code == 204 || code == 304) && x->head_body)
      x->no_reuse = 1;
    if (code >= 200) {
      x->status_seen = 1;
      if (x->cbs.on_status && x->cbs.on_status(x, (int)code, x->arg) != 0) {
        x->failed = 1;
        return 0;
      }
    }
  }
  return len;
}

static int curl_xfer_start(tg_upstream_t *up, const tg_xfer_opts_t *opts,
                           const tg_xfer_cbs_t *cbs, void *arg, tg_xfer_t **out);

int tg_upstream_init(tg_upstream_t **out, uv_loop_t *loop) {
  tg_upstream_t *up = calloc(1, sizeof(*up));
  if (up == NULL)
    return TG_ENOMEM;
  up->loop = loop;
  up->multi = curl_multi_init();
  if (up->multi == NULL) {
    free(up);
    return TG_ENOMEM;
  }
  uv_timer_init(loop, &up->timer);
  up->timer.data = up;
  curl_multi_setopt(up->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(up->multi, CURLMOPT_SOCKETDATA, up);
  curl_multi_setopt(up->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
  curl_multi_setopt(up->multi, CURLMOPT_TIMERDATA, up);
  curl_multi_setopt(up->multi, CURLMOPT_MAXCONNECTS, 4096L);
  *out = up;
  return 0;
}

static void on_up_timer_closed(uv_handle_t *h) {
  free(h->data);
}

int tg_upstream_set_mode(tg_upstream_t *up, int mode) {
  if (mode == TG_UPSTREAM_NATIVE && up->h1 == NULL)
    return tg__h1_init(&up->h1, up->loop);
  if (mode == TG_UPSTREAM_CURL && up->h1 != NULL) {
    tg__h1_close(up->h1);
    up->h1 = NULL;
  }
  return 0;
}

void tg_upstream_close(tg_upstream_t *up) {
  int i;
  up->closing = 1;
  if (up->h1 != NULL) {
    tg__h1_close(up->h1);
    up->h1 = NULL;
  }
  while (up->xfers)
    xfer_free(up->xfers);
  for (i = 0; i < up->n_free; i++) {
    curl_easy_cleanup(up->free_easy[i]);
    free(up->free_url[i]);
  }
  up->n_free = 0;
  /* Cleaning the multi closes cached connections through socket_cb. */
  curl_multi_cleanup(up->multi);
  up->multi = NULL;
  free(up->socks);
  up->socks = NULL;
  up->n_socks = 0;
  free(up->port_fd);
  up->port_fd = NULL;
  uv_close((uv_handle_t *)&up->timer, on_up_timer_closed);
}

int tg_xfer_start(tg_upstream_t *up, const tg_xfer_opts_t *opts,
                  const tg_xfer_cbs_t *cbs, void *arg, tg_xfer_t **out) {
  if (up->closing)
    return TG_ECANCELED;
  if (up->h1 != NULL && tg__h1_accepts(opts->url))
    return tg__h1_start(up->h1, opts, cbs, arg, out);
  return curl_xfer_start(up, opts, cbs, arg, out);
}

static int is_native(const tg_xfer_t *x) {
  return ((const tg__xfer_head_t *)(const void *)x)->native;
}

static int curl_xfer_start(tg_upstream_t *up, const tg_xfer_opts_t *opts,
                           const tg_xfer_cbs_t *cbs, void *arg, tg_xfer_t **out) {
  tg_xfer_t *x;
  CURL *e;
  size_t i;
  int fresh = 1;

  if (up->closing)
    return TG_ECANCELED;
  x = calloc(1, sizeof(*x));
  if (x == NULL)
    return TG_ENOMEM;
  e = easy_take(up, opts->url, &x->url, &fresh);
  if (e == NULL) {
    free(x);
    return TG_ENOMEM;
  }
  x->up = up;
  x->easy = e;
  x->cbs = *cbs;
  x->arg = arg;
  for (i = 0; opts->headers && opts->headers[i]; i++) {
    struct curl_slist *n = curl_slist_append(x->headers, opts->headers[i]);
    if (n == NULL)
      goto fail;
    x->headers = n;
  }
  if (fresh) {
    curl_easy_setopt(e, CURLOPT_URL, opts->url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, closesocket_cb);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, up);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, opensocket_cb);
    curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, prereq_cb);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
  }
  /* per request: everything that points at this transfer or its body */
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)opts->connect_timeout_ms);
  curl_easy_setopt(e, CURLOPT_PRIVATE, x);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, x);
  curl_easy_setopt(e, CURLOPT_PREREQDATA, x);
  curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 0L);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
  if (opts->body != NULL) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, opts->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)opts->body_len);
  } else {
    curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  }
  curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->headers);
  x->next = up->xfers;
  if (up->xfers)
    up->xfers->prev = x;
  up->xfers = x;
  if (curl_multi_add_handle(up->multi, e) != CURLM_OK) {
    xfer_unlink(x);
    goto fail;
  }
  *out = x;
  return 0;
fail:
  curl_slist_free_all(x->headers);
  curl_easy_cleanup(e);
  free(x->url);
  free(x);
  return TG_ENOMEM;
}

void tg_xfer_cancel(tg_xfer_t *x) {
  if (is_native(x)) {
    tg__h1_cancel(x);
    return;
  }
  x->failed = 1; /* stopped mid-way: do not keep its handle */
  xfer_free(x);
}

void tg_xfer_resume(tg_xfer_t *x) {
  if (is_native(x)) {
    tg__h1_resume(x);
    return;
  }
  if (!x->paused)
    return;
  x->paused = 0;
  curl_easy_pause(x->easy, CURLPAUSE_CONT);
}

int tg_xfer_paused(const tg_xfer_t *x) {
  if (is_native(x))
    return tg__h1_paused(x);
  return x->paused;
}

const char *tg_xfer_retry_after(const tg_xfer_t *x) {
  return tg_retry_after_get(&((const tg__xfer_head_t *)(const void *)x)->ra);
}
