/* See thread.h. */
#define _GNU_SOURCE /* pthread_setname_np */
#include "core/thread.h"

#include <pthread.h>
#include <string.h>

void tg_thread_name(const char *name) {
  char buf[16];
  size_t n = strnlen(name, sizeof(buf) - 1);
  memcpy(buf, name, n);
  buf[n] = '\0';
  (void)pthread_setname_np(pthread_self(), buf);
}
