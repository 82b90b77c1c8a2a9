/* The access log: one JSON object per line per API request, written with a
 * single write(2) so lines from several loop threads never interleave. */
#ifndef TG_OBS_ACCESSLOG_H
#define TG_OBS_ACCESSLOG_H

#include <stdint.h>

#include "core/app.h"

typedef struct {
  const char *request_id, *tenant, *key_id, *model, *endpoint, *path, *error;
  int status, stream, attempts, usage_reported;
  int64_t prompt_tokens, completion_tokens;
  double duration_ms, ttfb_ms;   /* ttfb < 0: no upstream byte */
} tg_access_rec_t;

/* Opens the configured destination ("stdout", "off", a path). Returns a
 * descriptor, -1 for "off", or a negative error below -1. */
int tg_access_log_open(const char *dest);

void tg_access_log(tg_app_t *app, const tg_access_rec_t *r);

#endif
