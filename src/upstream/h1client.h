/* The native HTTP/1.1 upstream client, internal to src/upstream/.
 *
 * client.c dispatches the public tg_xfer_* calls either to libcurl or to
 * this client (`upstream_client: native`). It serves http:// URLs only. Its
 * transfers are tg_xfer_t objects like curl's: both kinds start with a
 * tg__xfer_head_t, so client.c can tell them apart from the pointer alone. */
#ifndef TG_UPSTREAM_H1CLIENT_H
#define TG_UPSTREAM_H1CLIENT_H

#include "upstream/client.h"
#include "upstream/retry_after.h"

/* First member of every transfer object of either client. */
typedef struct {
  int native;            /* 1: a tg__h1 transfer, 0: a curl transfer */
  tg_retry_after_t ra;   /* the answer's Retry-After (tg_xfer_retry_after) */
} tg__xfer_head_t;

typedef struct tg__h1_s tg__h1_t;

/* Creates the client for one loop. Returns 0 and *out, or TG_ENOMEM. The
 * object is freed by tg__h1_close() (after the loop has run the close
 * callbacks of its handles). */
int tg__h1_init(tg__h1_t **out, uv_loop_t *loop);

/* Cancels every transfer without callbacks, closes every connection. */
void tg__h1_close(tg__h1_t *h);

/* Whether url is one this client serves (http://host[:port]/...). */
int tg__h1_accepts(const char *url);

/* Same contract as tg_xfer_start(): 0 and *out, or a negative error and no
 * callback. Failures found while starting (a refused socket) are reported
 * through on_done from the loop, never from inside this call. */
int tg__h1_start(tg__h1_t *h, const tg_xfer_opts_t *opts, const tg_xfer_cbs_t *cbs,
                 void *arg, tg_xfer_t **out);

/* Same contracts as tg_xfer_cancel(), tg_xfer_resume(), tg_xfer_paused(),
 * for a transfer made by tg__h1_start(). */
void tg__h1_cancel(tg_xfer_t *x);
void tg__h1_resume(tg_xfer_t *x);
int tg__h1_paused(const tg_xfer_t *x);

/* Connections of this loop's client: open ones and idle ones (tests and
 * diagnostics). */
void tg__h1_counts(const tg__h1_t *h, size_t *open, size_t *idle);

/* Hosts in this loop's table, and the keys its lookups have compared so
 * far (a lookup compares about one: the table is hashed). Tests and
 * diagnostics. */
void tg__h1_host_stats(const tg__h1_t *h, size_t *hosts, uint64_t *compares);

#endif
