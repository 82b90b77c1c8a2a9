/* The gateway's configuration: one YAML file, loaded into an immutable,
 * refcounted snapshot. Tenants use exactly the seed's quotas.yaml format,
 * inline (`tenants:`) or through `tenants_file:` (relative to the config
 * file's directory). Money is int64 nano-USD, parsed from decimal text.
 *
 * Loading never stops at the first problem: every error is collected with
 * file:line so `tollgate check-config` can print them all. */
#ifndef TG_CONFIG_CONFIG_H
#define TG_CONFIG_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "core/money.h"

/* upstream_client: which client carries requests to upstreams. */
enum {
  TG_UPSTREAM_CLIENT_CURL = 0,   /* libcurl's multi interface, every endpoint */
  TG_UPSTREAM_CLIENT_NATIVE = 1, /* the native HTTP/1.1 client; http:// endpoints only */
  TG_UPSTREAM_CLIENT_AUTO = 2    /* default: native for http://, libcurl for https:// */
};

typedef struct {
  char *url;          /* base URL, no trailing slash: http://127.0.0.1:8000 */
  int max_inflight;   /* default 256 */
} tg_endpoint_cfg_t;

/* The highest price a model may have: USD 1,000 per 1K tokens (10^9
 * nano-USD a token, over a thousand times any public model's). With usage
 * figures bounded by TG_USAGE_TOKENS_MAX (api/sse.h) a request's cost stays
 * below 2^63 nano-USD, so it is never saturated. */
#define TG_PRICE_NANO_PER_TOKEN_MAX INT64_C(1000000000)

typedef struct {
  char *name;
  tg_endpoint_cfg_t *endpoints;
  size_t n_endpoints;
  tg_nano_t prompt_nano_per_token;      /* from pricing.prompt_per_1k_usd */
  tg_nano_t completion_nano_per_token;  /* from pricing.completion_per_1k_usd */
  int64_t max_tokens;  /* completion cap when a request states none; default 4096 */
  int64_t media_tokens; /* prompt estimate of an image, audio or video part; default 2048 */
  int kind;            /* TG_MODEL_CHAT (default) or TG_MODEL_EMBEDDING */
  int cache_salt;      /* TG_CACHE_SALT_TENANT (default) or TG_CACHE_SALT_OFF */
} tg_model_cfg_t;

enum { TG_MODEL_CHAT = 0, TG_MODEL_EMBEDDING = 1 }; /* the order config.c reads them in */

/* cache_salt: what the gateway sets as a request's vLLM cache_salt. TENANT:
 * the tenant's own salt, whatever the client sent, so the upstream's
 * prefix cache is never shared between tenants; OFF: the body goes as the
 * client sent it (for upstreams that refuse unknown fields). */
enum { TG_CACHE_SALT_TENANT = 0, TG_CACHE_SALT_OFF = 1 };

/* 13 months: a whole billing year plus the month being billed. */
#define TG_DEFAULT_RETENTION_DAYS 400

/* The tenant, and the model, of the metrics' overflow series (requests past
 * a full table): reserved, no configured tenant or model has it. */
#define TG_METRICS_OTHER "_other"

typedef struct {
  char *name;
  char *tier;                 /* may be NULL */
  char **models_allowed;
  size_t n_models_allowed;
  int64_t requests_per_minute;   /* 0 = unlimited */
  int64_t tokens_per_minute;     /* 0 = unlimited */
  int64_t concurrent_requests;   /* 0 = unlimited */
  tg_nano_t daily_limit_nano;    /* 0 = unlimited */
  tg_nano_t monthly_limit_nano;  /* 0 = unlimited */
  int alert_threshold_percent;   /* default 80 */
  char *priority;                /* a key of priority_classes; default "medium" */
  int64_t priority_weight;       /* resolved from priority_classes */
  int retention_days;            /* ledger rows kept; default keeps a billing year */
} tg_tenant_cfg_t;

typedef struct {
  char *name;
  int64_t value;
} tg_priority_class_t;

typedef struct tg_config_s {
  int refs;                /* atomic; see tg_config_ref/unref */
  char *path;              /* the file it was loaded from */
  char *tenants_file;      /* tenants_file: as opened (relative to the working
                              directory when the config's path is), or NULL */

  char *listen_host;  int listen_port;          /* listen: 127.0.0.1:8080 */
  char *admin_host;   int admin_port;           /* admin_listen: 127.0.0.1:8081 */
  int workers;             /* 0 in the file means the CPU count */
  char *data_dir;          /* default ./data, relative to the config file */
  char *state;             /* "memory" or redis://... */
  char *state_failure;     /* "closed" (default) or "open" */
  char *database;          /* "sqlite" or postgres://... */
  int ledger_off;
  int metrics_off;         /* `metrics: off`: no counting, no /metrics (benchmarks) */          /* `ledger: off`: no usage records (benchmarks) */

  size_t max_body_bytes;   /* default 1 MiB */
  size_t max_header_bytes; /* default 16 KiB */

  /* timeouts in milliseconds */
  uint64_t client_request_timeout_ms;   /* default 30000 */
  uint64_t client_keepalive_timeout_ms; /* default 60000 */
  uint64_t client_send_timeout_ms;      /* default 60000 */
  uint64_t upstream_connect_timeout_ms; /* default 2000 */
  uint64_t upstream_first_byte_timeout_ms; /* default 60000 */
  uint64_t upstream_idle_timeout_ms;    /* default 30000 */
  uint64_t drain_timeout_ms;            /* default 30000 */
  uint64_t queue_timeout_ms;            /* default 30000: longest wait for a pool slot */
  uint64_t worker_stall_timeout_ms;     /* default 5000: a loop not turning for longer
                                         * makes /healthz 503 */
  size_t queue_max;                     /* default 1024: waiting requests per model
                                           (the workers share it); 0: shed at once */
  uint64_t health_check_interval_ms;    /* default 2000; 0 disables probes */

  int upstream_native;     /* `upstream_client`: TG_UPSTREAM_CLIENT_*; read when the
                              workers start, a reload keeps it */
  char *access_log;        /* "stdout" (default), "off", or a file path */
  char **forward_headers;  /* client headers passed to upstreams, lower-case */
  size_t n_forward_headers;

  int64_t global_requests_per_second;  /* global_rate_limit; 0 = none */

  tg_priority_class_t *priority_classes;
  size_t n_priority_classes;

  tg_model_cfg_t *models;
  size_t n_models;
  tg_tenant_cfg_t *tenants;
  size_t n_tenants;

  /* Private to config.c: hash tables behind tg_config_model() and
   * tg_config_tenant(), so per-request lookups are O(1). */
  struct tg_config_index_s *index;
} tg_config_t;

typedef struct {
  char **msgs;   /* "file:line: message" */
  size_t n;
  char *tenants_file; /* the tenants_file the refused config names, as opened;
                         NULL when none or when it was not read that far */
} tg_config_errors_t;

/* Loads and validates path. On success returns 0 and *out holds a snapshot
 * with one reference. On failure returns TG_ECONFIG (or another negative
 * error) and errs, if not NULL, holds every problem found and the
 * tenants_file named; free it with tg_config_errors_free(). */
int tg_config_load(const char *path, tg_config_t **out, tg_config_errors_t *errs);
void tg_config_errors_free(tg_config_errors_t *errs);

/* Reference counting; safe across threads. The last unref frees. */
tg_config_t *tg_config_ref(tg_config_t *cfg);
void tg_config_unref(tg_config_t *cfg);

/* Lookups by name; NULL when absent. */
const tg_model_cfg_t *tg_config_model(const tg_config_t *cfg, const char *name);
const tg_tenant_cfg_t *tg_config_tenant(const tg_config_t *cfg, const char *name);

/* 1 when name is spelled as a tenant name may be (letters, digits, '.',
 * '_', '-'; bounded), configured or not. */
int tg_config_tenant_name_ok(const char *name);
int tg_tenant_allows(const tg_tenant_cfg_t *t, const char *model);

/* `tollgate check-config --config FILE`: prints every error, exits 0/1. */
int tg_cmd_check_config(int argc, char **argv);

/* A Redis URL: redis://[[user]:password@]host[:port][/db], host may be
 * [v6]; port 6379 and db 0 by default. */
typedef struct {
  char host[256];
  int port;
  int db;
  char user[128];
  char pass[256];
  int has_pass;
} tg_redis_url_t;

/* Reads url into *out. Returns 0, TG_EINVAL (not such a URL) or TG_ETOOBIG
 * (a part past its field). */
int tg_config_redis_url(const char *url, tg_redis_url_t *out);

/* Copies url into buf[size] with any password replaced by "***" (in the
 * user-info part, up to its last '@' before the query or libpq's first '@'
 * before a '/', whichever is further, all of it when it has no ':'; and in
 * a password= query parameter), for messages.
 * Returns buf (cut to size, always NUL-terminated when size > 0). */
const char *tg_config_url_redact(const char *url, char *buf, size_t size);

/* Copies text (a message about url, such as libpq's, which may quote a
 * token of the URL or all of it) into buf[size] with every occurrence of
 * a password tg_config_url_redact hides replaced by "***". Returns buf. */
const char *tg_config_url_scrub(const char *url, const char *text, char *buf,
                                size_t size);

/* Longest endpoint URL the config takes (bytes). */
#define TG_CONFIG_URL_MAX 2048

#endif
