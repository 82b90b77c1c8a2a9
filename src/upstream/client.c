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
 * detached from curl (curl_multi_assign NULL) the moment curl removes it. */
#include "upstream/client.h"

#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/err.h"
#include "upstream/h1client.h"

#define EASY_FREE_MAX 64

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

  if (status < 0)
    flags = CURL_CSELECT_ERR;
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
  return tg_curl_socket(a->family, a->socktype, a->protocol, &x->local_fail);
}

static int map_result(tg_xfer_t *x, CURLcode rc) {
  if (rc != CURLE_OK && x->local_fail && !x->sent)
    return TG_XFER_LOCAL;
  switch (rc) {
  case CURLE_OK:
    return TG_XFER_OK;
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

static void check_done(tg_upstream_t *up) {
  CURLMsg *msg;
  int left;

  while ((msg = curl_multi_info_read(up->multi, &left)) != NULL) {
    tg_xfer_t *x = NULL;
    int result;
    char detail[128];

    if (msg->msg != CURLMSG_DONE)
      continue;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
    if (x == NULL)
      continue;
    result = map_result(x, msg->data.result);
    if (result != TG_XFER_OK)
      x->failed = 1;
    snprintf(detail, sizeof(detail), "%s", curl_easy_strerror(msg->data.result));
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

static size_t header_cb(char *buf, size_t size, size_t nitems, void *userdata) {
  tg_xfer_t *x = userdata;
  size_t len = size * nitems;
  long code = 0;

  x->sent = 1;
  /* The blank line ends a header block; skip interim 1xx blocks. */
  if (len <= 2 && !x->status_seen) {
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
    if (code >= 200) {
      x->status_seen = 1;
      if (x->cbs.on_status && x->cbs.on_status(x, (int)code, x->arg) != 0) {
        x->failed = 1;
        return 0;
      }
    }
  }
  (void)buf;
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
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
  }
  /* per request: everything that points at this transfer or its body */
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)opts->connect_timeout_ms);
  curl_easy_setopt(e, CURLOPT_PRIVATE, x);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, x);
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
