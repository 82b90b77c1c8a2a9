/* Access log lines; see accesslog.h. Strings that may come from a client
 * (path) are JSON-escaped; names from the config are escaped too, cheaply. */
#include "obs/accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "core/err.h"

#define LINE_MAX_BYTES 4096 /* a line, newline included: at most PIPE_BUF */
#define OUT_BYTES 65536     /* gathered before a write is forced */

struct tg_access_out_s {
  uv_prepare_t prep;
  int fd;
  int chunked; /* a pipe or socket: writes of whole lines, at most PIPE_BUF */
  int closed;  /* the prepare handle is closed: every line is written at once */
  size_t len;
  time_t ts_sec;  /* the second ts holds, formatted once a second */
  char ts[24];    /* "YYYY-MM-DDTHH:MM:SS" */
  char buf[OUT_BYTES];
};

/* The length of the longest run of whole lines from p that fits in max
 * (a line is never longer than max). */
static size_t whole_lines(const char *p, size_t n, size_t max) {
  size_t k;
  if (n <= max)
    return n;
  for (k = max; k > 0; k--)
    if (p[k - 1] == '\n')
      return k;
  return max;
}

static void out_flush(tg_access_out_t *o) {
  size_t off = 0;
  while (off < o->len) {
    size_t n = o->len - off;
    ssize_t w;
    if (o->chunked)
      n = whole_lines(o->buf + off, n, PIPE_BUF);
    w = write(o->fd, o->buf + off, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      break; /* the destination fails: these lines are lost, the requests are not */
    }
    off += (size_t)w;
  }
  o->len = 0;
}

/* Before the loop waits for I/O: what its callbacks logged since. */
static void on_prepare(uv_prepare_t *h) {
  tg_access_out_t *o = h->data;
  out_flush(o);
  uv_prepare_stop(h);
}

int tg_access_out_new(uv_loop_t *loop, int fd, tg_access_out_t **out) {
  tg_access_out_t *o = malloc(sizeof(*o));
  struct stat st;

  *out = NULL;
  if (o == NULL)
    return TG_ENOMEM;
  o->fd = fd;
  o->chunked = !(fstat(fd, &st) == 0 && S_ISREG(st.st_mode));
  o->closed = 0;
  o->len = 0;
  o->ts_sec = (time_t)-1;
  uv_prepare_init(loop, &o->prep);
  o->prep.data = o;
  uv_unref((uv_handle_t *)&o->prep); /* pending lines never keep a loop up */
  *out = o;
  return 0;
}

void tg_access_out_close(tg_access_out_t *o) {
  if (o == NULL || o->closed)
    return;
  out_flush(o);
  o->closed = 1;
  uv_close((uv_handle_t *)&o->prep, NULL);
}

void tg_access_out_free(tg_access_out_t *o) {
  if (o == NULL)
    return;
  out_flush(o);
  free(o);
}

int tg_access_log_open(const char *dest) {
  int fd;
  if (dest == NULL || strcmp(dest, "stdout") == 0)
    return STDOUT_FILENO;
  if (strcmp(dest, "off") == 0)
    return -1;
  fd = open(dest, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  return fd < 0 ? -errno - 1 : fd;
}

static size_t put_str(char *buf, size_t size, size_t n, const char *key, const char *v) {
  char q[600];
  int r;
  if (n >= size)
    return n;
  if (v == NULL) {
    r = snprintf(buf + n, size - n, ",\"%s\":null", key);
  } else {
    /* a long value keeps its beginning: a probe's path says what it tried */
    if (tg_json_quote_cut(q, sizeof(q), v) < 0)
      memcpy(q, "\"?\"", 4);
    r = snprintf(buf + n, size - n, ",\"%s\":%s", key, q);
  }
  return r < 0 ? n : n + (size_t)r;
}

void tg_access_log(tg_access_out_t *o, const tg_access_rec_t *r) {
  const size_t size = LINE_MAX_BYTES;
  struct timeval tv;
  char *line;
  size_t n;
  int k;

  if (o == NULL)
    return;
  /* the line is formatted in place, at the end of what is gathered */
  if (sizeof(o->buf) - o->len < size)
    out_flush(o);
  line = o->buf + o->len;
  gettimeofday(&tv, NULL);
  if (tv.tv_sec != o->ts_sec) {
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    strftime(o->ts, sizeof(o->ts), "%Y-%m-%dT%H:%M:%S", &tm);
    o->ts_sec = tv.tv_sec;
  }
  k = snprintf(line, size, "{\"ts\":\"%s.%03dZ\"", o->ts, (int)(tv.tv_usec / 1000));
  n = k < 0 ? 0 : (size_t)k;
  n = put_str(line, size, n, "request_id", r->request_id);
  n = put_str(line, size, n, "tenant", r->tenant);
  n = put_str(line, size, n, "key_id", r->key_id);
  n = put_str(line, size, n, "model", r->model);
  n = put_str(line, size, n, "path", r->path);
  n = put_str(line, size, n, "endpoint", r->endpoint);
  if (n < size) {
    k = snprintf(line + n, size - n,
                 ",\"status\":%d,\"stream\":%s,\"attempts\":%d,\"prompt_tokens\":%" PRId64
                 ",\"completion_tokens\":%" PRId64 ",\"usage_reported\":%s"
                 ",\"duration_ms\":%.3f,\"ttfb_ms\":",
                 r->status, r->stream ? "true" : "false", r->attempts, r->prompt_tokens,
                 r->completion_tokens, r->usage_reported ? "true" : "false", r->duration_ms);
    n = k < 0 ? n : n + (size_t)k;
  }
  if (n < size) {
    k = r->ttfb_ms < 0 ? snprintf(line + n, size - n, "null")
                       : snprintf(line + n, size - n, "%.3f", r->ttfb_ms);
    n = k < 0 ? n : n + (size_t)k;
  }
  n = put_str(line, size, n, "error", r->error);
  if (n + 2 >= size)
    n = size - 3; /* truncated: still one line */
  line[n++] = '}';
  line[n++] = '\n';
  o->len += n;
  if (o->closed)
    out_flush(o);
  else if (!uv_is_active((uv_handle_t *)&o->prep))
    uv_prepare_start(&o->prep, on_prepare);
}
