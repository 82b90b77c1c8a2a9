/* Failure injection for tests; see fault.h. */
#include "core/fault.h"

#ifdef TG_FAULTS

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_SITES 8
#define SITE_NAME 48

static struct {
  char name[SITE_NAME];
  unsigned long nth;   /* the pass that fails, from 1 */
  atomic_ulong passes;
} sites[MAX_SITES];
static int n_sites;
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* Reads "site:N" entries separated by commas into sites. An entry that
 * does not parse is reported and ignored. */
static void parse_spec(const char *p) {
  n_sites = 0;
  while (p != NULL && *p != '\0') {
    size_t len = strcspn(p, ",");
    const char *colon = memchr(p, ':', len);
    char *end;
    unsigned long nth = 0;

    if (colon != NULL) {
      nth = strtoul(colon + 1, &end, 10);
      if (end != p + len)
        nth = 0;
    }
    if (colon == NULL || colon == p || (size_t)(colon - p) >= SITE_NAME ||
        nth == 0 || n_sites == MAX_SITES) {
      fprintf(stderr, "tollgate: TG_FAULTS: ignored '%.*s' (want site:N, N >= 1,"
              " at most %d sites)\n", (int)len, p, MAX_SITES);
    } else {
      memcpy(sites[n_sites].name, p, (size_t)(colon - p));
      sites[n_sites].name[colon - p] = '\0';
      sites[n_sites].nth = nth;
      atomic_init(&sites[n_sites].passes, 0);
      fprintf(stderr, "tollgate: fault injection: %s fails on pass %lu\n",
              sites[n_sites].name, nth);
      n_sites++;
    }
    p += len;
    if (*p == ',')
      p++;
  }
}

/* $TG_FAULTS, read once. */
static void parse(void) {
  parse_spec(getenv("TG_FAULTS"));
}

void tg_fault_set(const char *spec) {
  pthread_once(&once, parse);
  parse_spec(spec);
}

int tg_fault(const char *site) {
  pthread_once(&once, parse);
  for (int i = 0; i < n_sites; i++)
    if (strcmp(sites[i].name, site) == 0)
      return atomic_fetch_add(&sites[i].passes, 1) + 1 == sites[i].nth;
  return 0;
}

void tg_fault_stall(const char *site) {
  struct timespec left = {TG_FAULT_STALL_MS / 1000, (TG_FAULT_STALL_MS % 1000) * 1000000L};

  if (!tg_fault(site))
    return;
  while (nanosleep(&left, &left) != 0 && errno == EINTR)
    ; /* a signal cut the sleep short: sleep the rest */
}

#else

/* ISO C wants a declaration in every translation unit. */
typedef int tg_fault_off;

#endif
