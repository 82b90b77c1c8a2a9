/* The process-wide capacity of concurrent sequences, as an inference server
 * with continuous batching has: up to max run at once, the rest wait in
 * order of (priority, arrival) and are admitted as slots free.
 *
 * One mutex guards the counters, the waiting queue and every worker's
 * handoff list. A slot freed on any thread goes straight to the first
 * waiter, which moves to its own worker's handoff list; that worker is woken
 * with uv_async_send, sent while the mutex is held so a worker that has
 * marked itself closed (under the same mutex) is never signalled. */
#include "sim.h"

int tg__sim_pool_init(tg__sim_pool_t *p, uint32_t max) {
  p->max = max;
  p->running = 0;
  p->n_waiting = 0;
  p->wait_head = NULL;
  p->wait_tail = NULL;
  return uv_mutex_init(&p->mu);
}

void tg__sim_pool_destroy(tg__sim_pool_t *p) {
  uv_mutex_destroy(&p->mu);
}

static void unlink_seq(tg__sim_seq_t **head, tg__sim_seq_t **tail, tg__sim_seq_t *s) {
  if (s->prev != NULL)
    s->prev->next = s->next;
  else
    *head = s->next;
  if (s->next != NULL)
    s->next->prev = s->prev;
  else if (tail != NULL)
    *tail = s->prev;
  s->next = NULL;
  s->prev = NULL;
}

/* Inserts behind every waiter of the same or a better (lower) priority. */
static void enqueue(tg__sim_pool_t *p, tg__sim_seq_t *s) {
  tg__sim_seq_t *at = p->wait_tail;

  while (at != NULL && at->call.priority > s->call.priority)
    at = at->prev;
  s->prev = at;
  s->next = at != NULL ? at->next : p->wait_head;
  if (s->next != NULL)
    s->next->prev = s;
  else
    p->wait_tail = s;
  if (at != NULL)
    at->next = s;
  else
    p->wait_head = s;
  p->n_waiting++;
}

/* A slot is free: give it to the first waiter or drop the count. Mutex held. */
static void release_locked(tg__sim_pool_t *p) {
  tg__sim_seq_t *s = p->wait_head;
  tg__sim_worker_t *w;

  if (s == NULL) {
    if (p->running > 0)
      p->running--;
    return;
  }
  unlink_seq(&p->wait_head, &p->wait_tail, s);
  p->n_waiting--;
  w = s->w;
  s->state = TG__SIM_SEQ_HANDOFF;
  s->next = w->handoff;
  if (w->handoff != NULL)
    w->handoff->prev = s;
  w->handoff = s;
  if (!w->closed)
    uv_async_send(&w->wake);
}

int tg__sim_pool_try_instant(tg__sim_pool_t *p) {
  int ok;

  uv_mutex_lock(&p->mu);
  ok = p->running < p->max && p->n_waiting == 0;
  uv_mutex_unlock(&p->mu);
  return ok;
}

int tg__sim_pool_admit(tg__sim_pool_t *p, tg__sim_seq_t *seq) {
  int now;

  uv_mutex_lock(&p->mu);
  now = p->running < p->max && p->n_waiting == 0;
  if (now) {
    p->running++;
    seq->state = TG__SIM_SEQ_RUNNING;
  } else {
    seq->state = TG__SIM_SEQ_WAITING;
    enqueue(p, seq);
  }
  uv_mutex_unlock(&p->mu);
  return now;
}

void tg__sim_pool_leave(tg__sim_pool_t *p, tg__sim_seq_t *seq) {
  uv_mutex_lock(&p->mu);
  switch (seq->state) {
  case TG__SIM_SEQ_WAITING:
    unlink_seq(&p->wait_head, &p->wait_tail, seq);
    p->n_waiting--;
    break;
  case TG__SIM_SEQ_HANDOFF:
    unlink_seq(&seq->w->handoff, NULL, seq);
    release_locked(p);
    break;
  case TG__SIM_SEQ_RUNNING:
    release_locked(p);
    break;
  case TG__SIM_SEQ_NEW:
  case TG__SIM_SEQ_DONE:
    break;
  }
  seq->state = TG__SIM_SEQ_DONE;
  uv_mutex_unlock(&p->mu);
}

tg__sim_seq_t *tg__sim_pool_take_handoff(tg__sim_pool_t *p, tg__sim_worker_t *w) {
  tg__sim_seq_t *s, *next, *list = NULL;

  uv_mutex_lock(&p->mu);
  /* handoff is newest first; reverse so sequences start in admission order */
  for (s = w->handoff; s != NULL; s = next) {
    next = s->next;
    s->state = TG__SIM_SEQ_RUNNING;
    s->prev = NULL;
    s->next = list;
    list = s;
  }
  w->handoff = NULL;
  uv_mutex_unlock(&p->mu);
  return list;
}

void tg__sim_pool_worker_closed(tg__sim_pool_t *p, tg__sim_worker_t *w) {
  uv_mutex_lock(&p->mu);
  w->closed = 1;
  uv_mutex_unlock(&p->mu);
}

void tg__sim_pool_counts(tg__sim_pool_t *p, uint32_t *running, uint32_t *waiting) {
  uv_mutex_lock(&p->mu);
  *running = p->running;
  *waiting = p->n_waiting;
  uv_mutex_unlock(&p->mu);
}
