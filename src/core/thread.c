/* See thread.h. */
#define _GNU_SOURCE /* pthread_setname_np */
#include "core/thread.h"

#include <string.h>
#include <time.h>

#include "core/err.h"

void tg_thread_name(const char *name) {
  char buf[16];
  size_t n = strnlen(name, sizeof(buf) - 1);
  memcpy(buf, name, n);
  buf[n] = '\0';
  (void)pthread_setname_np(pthread_self(), buf);
}

static void *every_main(void *arg) {
  tg_every_t *e = arg;
  struct timespec until;

  tg_thread_name(e->name);
  pthread_mutex_lock(&e->mu);
  while (!e->stop) {
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_nsec += (long)(e->every_ms % 1000) * 1000000L;
    until.tv_sec += e->every_ms / 1000 + until.tv_nsec / 1000000000L;
    until.tv_nsec %= 1000000000L;
    while (!e->stop && pthread_cond_timedwait(&e->cond, &e->mu, &until) == 0) {
    }
    if (e->stop)
      break;
    pthread_mutex_unlock(&e->mu);
    e->tick(e->arg);
    pthread_mutex_lock(&e->mu);
  }
  pthread_mutex_unlock(&e->mu);
  return NULL;
}

int tg_every_start(tg_every_t *e, const char *name, unsigned every_ms,
                   void (*tick)(void *arg), void *arg) {
  pthread_condattr_t ca;

  memset(e, 0, sizeof(*e));
  e->every_ms = every_ms;
  e->tick = tick;
  e->arg = arg;
  strncpy(e->name, name, sizeof(e->name) - 1);
  if (pthread_mutex_init(&e->mu, NULL) != 0)
    return TG_ENOMEM;
  if (pthread_condattr_init(&ca) != 0)
    goto fail_mu;
  if (pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) != 0 ||
      pthread_cond_init(&e->cond, &ca) != 0) {
    pthread_condattr_destroy(&ca);
    goto fail_mu;
  }
  pthread_condattr_destroy(&ca);
  if (pthread_create(&e->thread, NULL, every_main, e) != 0) {
    pthread_cond_destroy(&e->cond);
    goto fail_mu;
  }
  e->running = 1;
  return 0;
fail_mu:
  pthread_mutex_destroy(&e->mu);
  return TG_ENOMEM;
}

void tg_every_stop(tg_every_t *e) {
  if (!e->running)
    return;
  pthread_mutex_lock(&e->mu);
  e->stop = 1;
  pthread_cond_signal(&e->cond);
  pthread_mutex_unlock(&e->mu);
  pthread_join(e->thread, NULL);
  pthread_cond_destroy(&e->cond);
  pthread_mutex_destroy(&e->mu);
  e->running = 0;
}
