/* The access log: one JSON object per line per API request.
 *
 * Each loop gathers its lines in its own buffer and writes them together
 * once per loop iteration (from a uv_prepare handle, before the loop waits
 * for I/O again), or sooner when the buffer fills: a request costs no
 * system call of its own. Writes hold whole lines, so lines from
 * several loops never interleave: a regular file (opened O_APPEND) takes the
 * whole buffer in one write(2); a pipe or socket gets writes of at most
 * PIPE_BUF bytes, which the kernel keeps whole. A pipe or socket that takes
 * nothing is waited for at most a second; then lines are dropped (stderr
 * says so) until it takes bytes again, so a reader that stopped never holds
 * a loop. A line is written before
 * the loop next waits, so microseconds after its response; a kill -9 can
 * lose only the lines of the iteration in progress (the usage ledger, not this log, is
 * the record of what was served). */
#ifndef TG_OBS_ACCESSLOG_H
#define TG_OBS_ACCESSLOG_H

#include <stdint.h>

#include <uv.h>

typedef struct {
  const char *request_id, *tenant, *key_id, *model, *endpoint, *path, *error;
  int status, stream, attempts, usage_reported;
  int64_t prompt_tokens, completion_tokens;
  double duration_ms, ttfb_ms;   /* ttfb < 0: no upstream byte */
} tg_access_rec_t;

/* Opens the configured destination ("stdout", "off", a path). A FIFO that
 * no process reads yet is waited for, once stderr said so. Returns a
 * descriptor, -1 for "off", or a negative error below -1. */
int tg_access_log_open(const char *dest);

/* A loop's access-log output to fd (not owned). Returns 0 and *out, or
 * TG_ENOMEM. */
typedef struct tg_access_out_s tg_access_out_t;
int tg_access_out_new(uv_loop_t *loop, int fd, tg_access_out_t **out);

/* Writes what is gathered and closes the loop handle; lines logged after
 * this are written at once. Call from the loop's thread; free after the
 * loop has run its close callbacks. NULL is ignored. */
void tg_access_out_close(tg_access_out_t *o);
void tg_access_out_free(tg_access_out_t *o);

/* Adds r's line (o NULL: the log is off). From the loop's thread only. */
void tg_access_log(tg_access_out_t *o, const tg_access_rec_t *r);

#endif
