/* The gateway's own threads: names, so `top -H`, `ps -L` and perf tell a
 * loop from the ledger's writer, and a thread that does one thing every
 * so often until it is stopped. */
#ifndef TG_CORE_THREAD_H
#define TG_CORE_THREAD_H

#include <pthread.h>

/* Names the calling thread (at most 15 bytes are kept; longer is cut). */
void tg_thread_name(const char *name);

/* A thread that calls tick(arg) every every_ms, the first time every_ms
 * after it starts, until stopped. Zeroed, it is not running. */
typedef struct {
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cond;      /* CLOCK_MONOTONIC */
  int running, stop;
  unsigned every_ms;
  void (*tick)(void *arg);
  void *arg;
  char name[16];
} tg_every_t;

/* Starts it. Returns 0 or TG_ENOMEM. */
int tg_every_start(tg_every_t *e, const char *name, unsigned every_ms,
                   void (*tick)(void *arg), void *arg);

/* Stops it and waits for the thread: a wait under way ends at once, a tick
 * under way finishes first. What tick used is the caller's again. Does
 * nothing to one not running. */
void tg_every_stop(tg_every_t *e);

#endif
