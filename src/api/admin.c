/* The admin listener: liveness (/healthz), readiness (/readyz: the config is
 * loaded, the gateway is not draining, and every model has at least one
 * healthy endpoint). Metrics and admin routes join it in later stages. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <llhttp.h>

#include "api/api.h"

static void respond_json(tg_http_req_t *req, const char *rid, int status, json_t *root) {
  char *text = json_dumps(root, JSON_COMPACT);
  char hdr[64];
  json_decref(root);
  if (text == NULL) {
    tg_api_error(req, 500, "server_error", "internal_error", rid, NULL, "out of memory");
    return;
  }
  snprintf(hdr, sizeof(hdr), "x-request-id: %s\r\n", rid);
  tg_http_respond(req, status, "application/json", hdr, text, strlen(text));
  free(text);
}

static void readyz(tg_worker_t *w, tg_http_req_t *req, const char *rid) {
  tg_runtime_t *rt = tg_worker_runtime(w);
  json_t *root = json_object(), *down = json_array();
  size_t i;
  int draining = atomic_load(&w->app->cmd) != TG_CMD_NONE;

  for (i = 0; i < rt->cfg->n_models; i++)
    if (!tg_pool_ready(&rt->pools[i]))
      json_array_append_new(down, json_string(rt->cfg->models[i].name));
  if (draining || json_array_size(down) > 0) {
    json_object_set_new(root, "status", json_string(draining ? "draining" : "not_ready"));
    json_object_set_new(root, "models_without_healthy_endpoint", down);
    respond_json(req, rid, 503, root);
    return;
  }
  json_decref(down);
  json_object_set_new(root, "status", json_string("ready"));
  respond_json(req, rid, 200, root);
}

void tg_admin_handle(tg_http_req_t *req) {
  tg_worker_t *w = tg_http_server_data(req->server);
  char rid[32];

  tg_api_request_id(w, rid, sizeof(rid));
  if (req->method != HTTP_GET) {
    tg_api_error(req, 405, "invalid_request_error", "method_not_allowed", rid, NULL,
                 "use GET");
    return;
  }
  if (strcmp(req->path, "/healthz") == 0) {
    respond_json(req, rid, 200, json_pack("{s:s}", "status", "ok"));
    return;
  }
  if (strcmp(req->path, "/readyz") == 0) {
    readyz(w, req, rid);
    return;
  }
  tg_api_error(req, 404, "invalid_request_error", "not_found", rid, NULL,
               "unknown admin path '%.200s'", req->path);
}
