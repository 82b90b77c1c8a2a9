/* Access log lines; see accesslog.h. Strings that may come from a client
 * (path) are JSON-escaped; names from the config are escaped too, cheaply. */
#include "obs/accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "core/err.h"

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
    if (tg_json_quote(q, sizeof(q), v) < 0)
      memcpy(q, "\"?\"", 4);
    r = snprintf(buf + n, size - n, ",\"%s\":%s", key, q);
  }
  return r < 0 ? n : n + (size_t)r;
}

void tg_access_log(tg_app_t *app, const tg_access_rec_t *r) {
  char line[4096], ts[40];
  struct timeval tv;
  struct tm tm;
  size_t n;
  int k;

  if (app->log_fd < 0)
    return;
  gettimeofday(&tv, NULL);
  gmtime_r(&tv.tv_sec, &tm);
  strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
  k = snprintf(line, sizeof(line), "{\"ts\":\"%s.%03dZ\"", ts, (int)(tv.tv_usec / 1000));
  n = k < 0 ? 0 : (size_t)k;
  n = put_str(line, sizeof(line), n, "request_id", r->request_id);
  n = put_str(line, sizeof(line), n, "tenant", r->tenant);
  n = put_str(line, sizeof(line), n, "key_id", r->key_id);
  n = put_str(line, sizeof(line), n, "model", r->model);
  n = put_str(line, sizeof(line), n, "path", r->path);
  n = put_str(line, sizeof(line), n, "endpoint", r->endpoint);
  if (n < sizeof(line)) {
    k = snprintf(line + n, sizeof(line) - n,
                 ",\"status\":%d,\"stream\":%s,\"attempts\":%d,\"prompt_tokens\":%" PRId64
                 ",\"completion_tokens\":%" PRId64 ",\"usage_reported\":%s"
                 ",\"duration_ms\":%.3f,\"ttfb_ms\":",
                 r->status, r->stream ? "true" : "false", r->attempts, r->prompt_tokens,
                 r->completion_tokens, r->usage_reported ? "true" : "false", r->duration_ms);
    n = k < 0 ? n : n + (size_t)k;
  }
  if (n < sizeof(line)) {
    k = r->ttfb_ms < 0 ? snprintf(line + n, sizeof(line) - n, "null")
                       : snprintf(line + n, sizeof(line) - n, "%.3f", r->ttfb_ms);
    n = k < 0 ? n : n + (size_t)k;
  }
  n = put_str(line, sizeof(line), n, "error", r->error);
  if (n + 2 >= sizeof(line))
    n = sizeof(line) - 3; /* truncated: still one line */
  line[n++] = '}';
  line[n++] = '\n';
  while (write(app->log_fd, line, n) < 0 && errno == EINTR)
    ;
}
