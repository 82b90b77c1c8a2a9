/* Access log lines; see accesslog.h. Strings that may come from a client
 * (path) are JSON-escaped; names from the config are escaped too, cheaply. */
#include "obs/accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "core/err.h"

#define LINE_MAX_BYTES 4096 /* a line, newline included: at most PIPE_BUF */
#define OUT_BYTES 65536     /* gathered before a write is forced */
/* How long a flush waits for a pipe or socket that takes nothing before it
 * gives up: its lines are dropped, and so are the next ones until the
 * destination takes bytes again (see out_flush). */
#define STALL_MS 1000

struct tg_access_out_s {
  uv_prepare_t prep;
  int fd;
  int chunked; /* a pipe or socket: writes of whole lines, at most PIPE_BUF */
  int sock;    /* a socket: written with MSG_DONTWAIT */
  int nbfd;    /* a pipe's own non-blocking description of it, or -1 */
  int closed;  /* the prepare handle is closed: every line is written at once */
  int stalled; /* the destination took nothing for STALL_MS: lines dropped */
  int partial; /* buf starts with the rest of a line a socket took in part */
  uint64_t dropped; /* lines dropped in the current stall */
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

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* One write that never blocks (but to a terminal or a pipe that could not
 * be opened anew, which are written as they are). */
static ssize_t out_write(tg_access_out_t *o, const char *p, size_t n) {
  if (o->sock)
    return send(o->fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
  return write(o->nbfd >= 0 ? o->nbfd : o->fd, p, n);
}

static uint64_t count_lines(const char *p, size_t n) {
  uint64_t k = 0;
  const char *e = p + n;
  while (p < e && (p = memchr(p, '\n', (size_t)(e - p))) != NULL) {
    k++;
    p++;
  }
  return k;
}

/* Writes what is gathered. A pipe or socket that takes nothing is waited
 * for, so a slow reader slows the loop and loses no line, but for at most
 * STALL_MS: a reader that stopped (a log shipper hung, a pipe nobody
 * drains) would otherwise hold the loop, and every request on it, for
 * ever. Past that the lines are dropped, and the next flushes do not wait
 * at all, dropping what the destination does not take at once, until it
 * takes a whole flush again; stderr says when that starts and how many
 * lines were lost when it ends. A line a socket took in part is finished
 * first: the lines written stay whole. */
static void out_flush(tg_access_out_t *o) {
  size_t off = 0;
  uint64_t deadline = 0;
  int gave_up = 0;

  while (off < o->len) {
    size_t n = o->len - off;
    ssize_t w;
    if (o->chunked)
      n = whole_lines(o->buf + off, n, PIPE_BUF);
    w = out_write(o, o->buf + off, n);
    if (w < 0) {
      struct pollfd pfd;
      uint64_t now;
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        break; /* the destination fails: these lines are lost, the requests are not */
      now = mono_ms();
      if (deadline == 0)
        deadline = now + (o->stalled ? 0 : STALL_MS);
      if (now >= deadline) {
        gave_up = 1;
        break;
      }
      pfd.fd = o->sock || o->nbfd < 0 ? o->fd : o->nbfd;
      pfd.events = POLLOUT;
      pfd.revents = 0;
      (void)poll(&pfd, 1, (int)(deadline - now));
      continue;
    }
    off += (size_t)w;
    deadline = 0; /* it moves: the wait starts again */
  }
  if (gave_up) {
    size_t keep = 0;
    if (off > 0 ? o->buf[off - 1] != '\n' : o->partial) {
      /* a socket took part of a line: its rest goes first next time */
      const char *eol = memchr(o->buf + off, '\n', o->len - off);
      keep = eol != NULL ? (size_t)(eol - (o->buf + off)) + 1 : o->len - off;
    }
    o->dropped += count_lines(o->buf + off + keep, o->len - off - keep);
    if (!o->stalled) {
      o->stalled = 1;
      fprintf(stderr, "tollgate: the access log takes no bytes (its reader stopped?): "
                      "lines are dropped until it does, requests go on\n");
    }
    memmove(o->buf, o->buf + off, keep);
    o->len = keep;
    o->partial = keep > 0;
    return;
  }
  if (o->stalled && off > 0 && off == o->len) {
    o->stalled = 0;
    fprintf(stderr, "tollgate: the access log takes bytes again; %" PRIu64
                    " lines were dropped meanwhile\n", o->dropped);
    o->dropped = 0;
  }
  o->len = 0;
  o->partial = 0;
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
  o->sock = o->chunked && S_ISSOCK(st.st_mode);
  o->nbfd = -1;
  if (o->chunked && S_ISFIFO(st.st_mode)) {
    /* O_NONBLOCK on a description of its own: the one of fd may be
     * shared with stderr or other processes (a shell's pipe), which must
     * not see their writes fail with EAGAIN */
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    o->nbfd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  }
  o->closed = 0;
  o->stalled = 0;
  o->partial = 0;
  o->dropped = 0;
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
  if (o->stalled)
    fprintf(stderr, "tollgate: the access log took no bytes at the stop; %" PRIu64
                    " lines were dropped\n", o->dropped + count_lines(o->buf, o->len));
  if (o->nbfd >= 0)
    close(o->nbfd);
  free(o);
}

int tg_access_log_open(const char *dest) {
  int fd;
  if (dest == NULL || strcmp(dest, "stdout") == 0)
    return STDOUT_FILENO;
  if (strcmp(dest, "off") == 0)
    return -1;
  /* A FIFO's open waits for a reader: said first, so a start that waits
   * for one does not look hung */
  fd = open(dest, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NONBLOCK, 0640);
  if (fd < 0 && errno == ENXIO) {
    fprintf(stderr, "tollgate: the access log %s is a FIFO that no process reads: "
                    "waiting for its reader\n", dest);
    fd = open(dest, O_WRONLY | O_APPEND | O_CLOEXEC);
  } else if (fd >= 0) {
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  }
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
