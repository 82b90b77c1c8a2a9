/* Policy state: where tenants' limits are counted. One interface, two
 * backends with the same meaning (src/policy/limits.h):
 *
 *   memory (state_mem.c)   exact within one process; tenants' states in a
 *                          table striped over mutexes; budget spend is
 *                          saved to the SQLite store so a restart keeps it
 *   redis  (state_redis.c) admissions and settlements run in Lua scripts,
 *                          batched per tenant and loop iteration, so any
 *                          number of gateways share exact limits; keys
 *                          are hash-tagged by tenant
 *                          ({tenant}) for Redis Cluster; concurrency leases
 *                          expire unless renewed, so a dead gateway's slots
 *                          come back
 *
 * When Redis cannot answer, state_failure decides: "closed" refuses with
 * TG_LIMIT_UNAVAILABLE (503), "open" decides with the memory backend (limits
 * then hold per gateway). Recovery is automatic. A Redis that lost its data
 * gets its budget windows back from the ledger (state.c, re-seeding).
 *
 * Threads: tg_policy_t is shared; each loop thread has its own
 * tg_policy_loop_t (the Redis connection lives there) and calls admit and
 * settle only from that loop. */
#ifndef TG_POLICY_STATE_H
#define TG_POLICY_STATE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config/config.h"
#include "policy/limits.h"

typedef struct tg_policy_s tg_policy_t;
typedef struct tg_policy_loop_s tg_policy_loop_t;

enum { TG_BACKEND_MEMORY = 0, TG_BACKEND_REDIS = 1 };

typedef struct {
  const char *tenant;
  tg_limits_t limits;
  int64_t global_rps;       /* 0 = no global limit */
  tg_reserve_t reserve;
} tg_admit_req_t;

typedef struct {
  tg_verdict_t v;           /* v.refused == TG_LIMIT_NONE: admitted */
  int backend;              /* who admitted it: settle goes to the same one */
  char lease[40];           /* backend's lease id ("" for memory) */
} tg_admission_t;

/* Called exactly once per tg_policy_admit() that returned 0, on the loop
 * thread, possibly before tg_policy_admit() returns (memory backend). */
typedef void (*tg_admit_cb)(void *arg, const tg_admission_t *a);

/* Creates the policy for cfg->state, cfg->state_failure and, for the memory
 * backend's saved spend, cfg->data_dir. Returns 0 or a negative error
 * (printed). The caller frees with tg_policy_free() after every loop's
 * tg_policy_loop_t is closed. */
int tg_policy_new(const tg_config_t *cfg, tg_policy_t **out);
void tg_policy_free(tg_policy_t *p);

/* A reloaded config: with Redis, its tenants' spend is read from now on and
 * a re-seed judges the alert events raised by its thresholds. Any thread. */
void tg_policy_reconfig(tg_policy_t *p, const tg_config_t *cfg);

/* Per loop thread. Close from the loop thread; its handles close with the
 * loop (run the loop after). */
int tg_policy_loop_new(tg_policy_t *p, uv_loop_t *loop, tg_policy_loop_t **out);
void tg_policy_loop_close(tg_policy_loop_t *pl);

/* Asks for an admission. Returns 0 (cb follows) or a negative error (no
 * callback). The caller keeps arg alive until cb. */
int tg_policy_admit(tg_policy_loop_t *pl, const tg_admit_req_t *r, tg_admit_cb cb, void *arg);

/* Settles an admitted request with what it really used (0 and 0 when it
 * never reached an upstream). Gives back its concurrency lease. */
void tg_policy_settle(tg_policy_loop_t *pl, const tg_admit_req_t *r, const tg_admission_t *a,
                      int64_t actual_tokens, tg_nano_t actual_cost);

/* A tenant's settled spend in the current UTC day and month. Memory: this
 * gateway's figures. Redis: the figures last read from Redis, shared by
 * every gateway, at most a few seconds old (tg__redis_spend). Never blocks.
 * Returns 0, or TG_ENOTFOUND (both 0) when the tenant has no state yet, or
 * TG_ETOOBIG (both 0) when Redis's figures of the tenant are not followed:
 * the config has more tenants than that (tg_policy_spend_untracked). */
int tg_policy_spend(tg_policy_t *p, const char *tenant, tg_nano_t *day, tg_nano_t *month);

/* Configured tenants whose spend figures are not followed (Redis: past
 * 4,096); 0 with the memory backend. Any thread. */
size_t tg_policy_spend_untracked(tg_policy_t *p);

/* 0 while requests would be refused for want of the state backend: with
 * Redis and state_failure "closed", until every loop's connection is up
 * (after a start or an outage); 1 otherwise. Any thread. */
int tg_policy_ready(tg_policy_t *p);

/* Called for every budget-threshold event (for metrics); may stay NULL. */
extern void (*tg_policy_alert_hook)(const char *tenant, int month);

/* Writes the structured budget-threshold event (one JSON line on stderr). */
void tg_policy_alert(const char *tenant, const char *window, int64_t period,
                     tg_nano_t spent, tg_nano_t limit, int pct);

/* Writes a structured line about the state backend (failure, recovery). */
void tg_policy_log(const char *event, const char *detail);

/* ---- backends (internal) ---------------------------------------------- */

typedef struct tg__mem_s tg__mem_t;
int tg__mem_new(const char *data_dir, tg__mem_t **out);
void tg__mem_free(tg__mem_t *m);
/* Sets a tenant's spend of a period (day, or month when month != 0) to at
 * least spent: the ledger's sums at start. alerted = 1 marks the period's
 * threshold event as raised already. */
void tg__mem_restore(tg__mem_t *m, const char *tenant, int month, int64_t period,
                     tg_nano_t spent, int alerted);
/* Rebuilds the day and month windows from the ledger of cfg (database,
 * data_dir) as an admission at now_ms charges them: each window gets its
 * own period's records and no others (state.c, from_ledger). Blocking: at
 * start, before the loops. Returns 0 or a negative error (logged). */
int tg__mem_from_ledger(tg__mem_t *m, const tg_config_t *cfg, int64_t now_ms);
/* Admits on two clocks (tg_limits_admit_at): the wall clock for budgets,
 * the steady one for the per-minute limits and the global per-second one;
 * tg__mem_settle's now_ms is the steady clock. */
void tg__mem_admit(tg__mem_t *m, const tg_admit_req_t *r, int64_t wall_ms, int64_t steady_ms,
                   tg_admission_t *a);
int tg__mem_spend(tg__mem_t *m, const char *tenant, int64_t now_ms, tg_nano_t *day,
                  tg_nano_t *month);
void tg__mem_settle(tg__mem_t *m, const tg_admit_req_t *r, const tg_admission_t *a,
                    int64_t actual_tokens, tg_nano_t actual_cost, int64_t now_ms);

typedef struct tg__redis_s tg__redis_t;          /* shared: URL, scripts */
typedef struct tg__redis_loop_s tg__redis_loop_t; /* per loop: connection */
int tg__redis_new(const char *url, tg__redis_t **out);
void tg__redis_free(tg__redis_t *r);
int tg__redis_loop_new(tg__redis_t *r, uv_loop_t *loop, tg__redis_loop_t **out);
void tg__redis_loop_close(tg__redis_loop_t *rl);
/* Sends the admission script. Returns 0 (cb follows, with a->backend =
 * TG_BACKEND_REDIS, or a->v.refused = TG_LIMIT_UNAVAILABLE when Redis did
 * not answer) or a negative error when not connected (no callback). */
int tg__redis_admit(tg__redis_loop_t *rl, const tg_admit_req_t *r, int64_t now_ms,
                    tg_admit_cb cb, void *arg);
/* Sends the settlement script (fire and forget; failures are logged, and the
 * lease then expires on its own). */
void tg__redis_settle(tg__redis_loop_t *rl, const tg_admit_req_t *r, const tg_admission_t *a,
                      int64_t actual_tokens, tg_nano_t actual_cost, int64_t now_ms);
/* Holdings (docs/state-redis.md) are on unless turned off here, before the
 * loops start: then every admission is decided by Redis one by one, as the
 * tests that compare verdicts with limits.c need. */
void tg__redis_holding(tg__redis_t *r, int on);
/* 1 while the loop's connection is up, or its first connection is under
 * way and has not failed (admissions then wait for it). */
int tg__redis_connected(const tg__redis_loop_t *rl);
/* 1 while every loop made (and not closed) has its connection up; any
 * thread. */
int tg__redis_ready(tg__redis_t *r);
/* Tenant's spend in the UTC day and month of now_ms, from the figures the
 * backend last heard from Redis (admission and settlement replies, and a
 * refresh every 2 s of every tenant kept, tg__redis_keep). Never blocks;
 * callable from any thread. Figures of an earlier period read as 0.
 * Returns 0, TG_ENOTFOUND (both 0) before anything was heard about a
 * tenant kept, or TG_ETOOBIG (both 0) for a tenant not kept while the last
 * tg__redis_keep() had no room for some. */
int tg__redis_spend(tg__redis_t *r, const char *tenant, int64_t now_ms, tg_nano_t *day,
                    tg_nano_t *month);
/* Makes the tenants whose spend is followed exactly tenants[0..n) (the
 * config's): those it already followed keep their figures, others are
 * dropped, and at most 4,096 are kept, in the order given. Returns how many
 * it had no room for. Any thread. */
size_t tg__redis_keep(tg__redis_t *r, const char *const *tenants, size_t n);
/* Redis lost its data (the re-seeding thread saw tg:epoch gone or changed):
 * every loop renews its leases at its next tick, adding back with their
 * reservations those Redis no longer has, and syncs its holdings. Any
 * thread. */
void tg__redis_lost(tg__redis_t *r);

/* Re-seeding (docs/state-redis.md, Losing Redis's data): a blocking
 * connection for a thread of its own (or the start, before the loops), never
 * a loop thread. Calls return 0 or a negative error; after TG_EUNAVAIL the
 * connection is no use: close it and open another. */
typedef struct tg__redis_sync_s tg__redis_sync_t;
int tg__redis_sync_open(tg__redis_t *r, int timeout_ms, tg__redis_sync_t **out);
void tg__redis_sync_close(tg__redis_sync_t *s);
/* The marker Redis holds (tg:epoch) into epoch; TG_ENOTFOUND when it has
 * none: it lost its data, or was never seeded. */
int tg__redis_epoch_get(tg__redis_sync_t *s, char *epoch, size_t size);
/* Sets the marker to a new random value unless another gateway set one
 * first, and reads back the one that stands into epoch. */
int tg__redis_epoch_mark(tg__redis_sync_t *s, char *epoch, size_t size);
/* Raises a tenant's window of period (day, or month when month != 0) to at
 * least spent, never lowers it; alerted = 1 marks its threshold event as
 * raised. The key gets the TTL the scripts give it. */
int tg__redis_raise(tg__redis_sync_t *s, const char *tenant, int month, int64_t period,
                    tg_nano_t spent, int alerted, int64_t now_ms);
/* Adds amount (> 0) to a tenant's window of period: what requests the
 * memory backend admitted while Redis could not answer spent there. */
int tg__redis_add_spent(tg__redis_sync_t *s, const char *tenant, int month, int64_t period,
                        tg_nano_t amount, int64_t now_ms);

/* Wall clock in unix milliseconds. */
int64_t tg_now_ms(void);
/* CLOCK_MONOTONIC in milliseconds: elapsed time only, never stepped by a
 * change of the wall clock. The memory backend's per-minute limits run on
 * it; it means nothing across processes. */
int64_t tg_steady_ms(void);

#endif
