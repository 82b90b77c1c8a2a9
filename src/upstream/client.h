/* Upstream HTTP client: libcurl's multi interface driven by one libuv loop,
 * or (`upstream_client: native`) a native HTTP/1.1 client on the same loop
 * for http:// upstreams; both behind this one interface.
 *
 * One tg_upstream_t per loop thread; it owns the curl multi handle (and so
 * the connection cache to the upstreams), a free list of easy handles and,
 * in native mode, the native client's connection pools.
 * A transfer reports the response status, its body bytes as they arrive and
 * its end through callbacks, all on the loop thread. The body callback may
 * ask to pause (the bytes are then offered again after tg_xfer_resume()). */
#ifndef TG_UPSTREAM_CLIENT_H
#define TG_UPSTREAM_CLIENT_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "upstream/retry_after.h"

typedef struct tg_upstream_s tg_upstream_t;
typedef struct tg_xfer_s tg_xfer_t;

enum {
  TG_XFER_OK = 0,         /* the whole response arrived */
  TG_XFER_CONNECT = 1,    /* could not connect (nothing sent) */
  TG_XFER_TIMEOUT = 2,    /* connect timed out */
  TG_XFER_BROKEN = 3,     /* connection failed after the request was sent */
  TG_XFER_ABORTED = 4,    /* our callback refused the data */
  TG_XFER_LOCAL = 5,      /* the gateway could not open a connection: out of
                           * descriptors, memory or local ports (nothing sent;
                           * says nothing of the upstream) */
};

/* Whether errno value err is the gateway's own shortage rather than the
 * upstream's answer: no descriptor, no memory, no local port. */
static inline int tg_xfer_errno_local(int err) {
  return err == EMFILE || err == ENFILE || err == ENOMEM || err == ENOBUFS ||
         err == EADDRNOTAVAIL;
}

/* socket(2) for libcurl's CURLOPT_OPENSOCKETFUNCTION (libcurl reports a
 * socket it could not make and an upstream that refused alike, as
 * CURLE_COULDNT_CONNECT): sets *local to 1 when the socket could not be
 * made for tg_xfer_errno_local's reasons. Returns the descriptor or -1. */
int tg_curl_socket(int family, int socktype, int protocol, int *local);

#define TG_XFER_PAUSE (-2)  /* returned by on_data: offer the bytes again later */

typedef struct {
  /* First status line seen; return non-zero to abort. */
  int (*on_status)(tg_xfer_t *x, int status, void *arg);
  /* Body bytes: return 0 to accept, TG_XFER_PAUSE to pause, -1 to abort. */
  int (*on_data)(tg_xfer_t *x, const char *data, size_t len, void *arg);
  /* Always called exactly once, unless tg_xfer_cancel() came first.
   * result is a TG_XFER_* code; detail is curl's message. The transfer is
   * already freed, so a new one (a retry) may start from here. */
  void (*on_done)(int result, const char *detail, void *arg);
} tg_xfer_cbs_t;

typedef struct {
  const char *url;
  const char *body;         /* must stay valid until on_done or cancel */
  size_t body_len;
  const char *const *headers; /* NULL-terminated "Name: value" lines, copied */
  uint64_t connect_timeout_ms;
} tg_xfer_opts_t;

enum {
  TG_UPSTREAM_CURL = 0,   /* libcurl for every URL: a new client's mode (`auto` sets NATIVE) */
  TG_UPSTREAM_NATIVE = 1, /* the native client for http://, libcurl for the rest */
};

/* Creates the client of one loop, in TG_UPSTREAM_CURL mode. */
int tg_upstream_init(tg_upstream_t **out, uv_loop_t *loop);
/* Chooses the client for transfers started from now on. Meant to be called
 * once, before any transfer starts: switching from native back to curl
 * cancels the native client's running transfers without callbacks and
 * closes its connections. Returns 0 or TG_ENOMEM. */
int tg_upstream_set_mode(tg_upstream_t *up, int mode);
/* Cancels every transfer (without callbacks), closes handles; the object is
 * freed once its handles are closed (run the loop afterwards). */
void tg_upstream_close(tg_upstream_t *up);

/* Starts a POST (or GET when body is NULL). Returns 0 and *out, or a
 * negative error (no callback is then made). */
int tg_xfer_start(tg_upstream_t *up, const tg_xfer_opts_t *opts,
                  const tg_xfer_cbs_t *cbs, void *arg, tg_xfer_t **out);

/* Stops a transfer at once; no callback follows. Not from inside one of the
 * transfer's own callbacks (return -1 from on_data instead). */
void tg_xfer_cancel(tg_xfer_t *x);

/* Resumes a paused transfer; may call on_data synchronously. */
void tg_xfer_resume(tg_xfer_t *x);

int tg_xfer_paused(const tg_xfer_t *x);

/* The Retry-After of the transfer's answer (the final one, not a 1xx's)
 * when it is one to relay: one field, delta-seconds or an IMF-fixdate, at
 * most TG_RETRY_AFTER_MAX bytes (upstream/retry_after.h); else NULL. Read
 * it from on_status on: it lives in x, which on_done no longer has. */
const char *tg_xfer_retry_after(const tg_xfer_t *x);

#endif
