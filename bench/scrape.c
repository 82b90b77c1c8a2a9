/* Scrape cost of the metric tables alone: tg_metrics_render() over WORKERS
 * tables holding TENANTS (tenant, model) pairs each, without the HTTP
 * server: the merge of the workers' tables and the text, nothing else.
 *
 *   bench-scrape WORKERS TENANTS [disjoint|shared] [RENDERS]
 *
 * disjoint (default): each worker sees its own tenants ("w<i>-t<j>"), the
 * worst case for the merge; shared: every worker sees the same tenants.
 * Past 8,191 pairs a worker's table is full and the rest count under
 * "_other". Prints, first for renders whose text is refused at once (a
 * 1-byte bound: the merge of the tables alone), then for whole renders, the
 * median ms and the virtual memory a render added at its peak (VmPeak after
 * the renders minus VmSize before them, from /proc/self/status), and the
 * text's size; and, first, the time one request's observation takes on
 * worker 0 (its tenants in turn, formatting of the name included). One
 * process per row: VmPeak is the process's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "obs/metrics.h"

static long vm_kb(const char *field) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long v = -1;
  size_t n = strlen(field);
  if (f == NULL)
    return -1;
  while (fgets(line, sizeof(line), f))
    if (strncmp(line, field, n) == 0 && line[n] == ':')
      v = strtol(line + n + 1, NULL, 10);
  fclose(f);
  return v;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  tg_metrics_t *m = NULL;
  tg_metrics_obs_t o;
  size_t workers, tenants, renders, w, i, bytes = 0;
  int shared;
  double *ms, *bare, observe_ns;
  long vm0, peak_bare, peak;
  char tenant[64];

  if (argc < 3) {
    fprintf(stderr, "usage: %s WORKERS TENANTS [disjoint|shared] [RENDERS]\n", argv[0]);
    return 2;
  }
  workers = strtoul(argv[1], NULL, 10);
  tenants = strtoul(argv[2], NULL, 10);
  shared = argc > 3 && strcmp(argv[3], "shared") == 0;
  renders = argc > 4 ? strtoul(argv[4], NULL, 10) : 5;
  if (workers == 0 || renders == 0 || tg_metrics_new(workers, &m) != 0)
    return 2;
  memset(&o, 0, sizeof(o));
  o.model = "m";
  o.status = 200;
  o.refused = TG_LIMIT_NONE;
  o.prompt_tokens = 10;
  o.completion_tokens = 20;
  o.duration_s = 0.2;
  o.ttft_s = 0.05;
  o.overhead_s = 0.0003;
  for (w = 0; w < workers; w++)
    for (i = 0; i < tenants; i++) {
      if (shared)
        snprintf(tenant, sizeof(tenant), "t%zu", i);
      else
        snprintf(tenant, sizeof(tenant), "w%zu-t%zu", w, i);
      o.tenant = tenant;
      tg_metrics_observe(m, w, &o);
    }
  /* The request path: worker 0 observes its tenants again, round and
   * round (past a full table's bound, a pair it lacks is looked up for
   * every request before it counts under "_other"). */
  {
    size_t n = 0;
    double t0 = now_ms();
    while (n < 200000)
      for (i = 0; i < tenants && n < 200000; i++, n++) {
        if (shared)
          snprintf(tenant, sizeof(tenant), "t%zu", i);
        else
          snprintf(tenant, sizeof(tenant), "w0-t%zu", i);
        o.tenant = tenant;
        tg_metrics_observe(m, 0, &o);
      }
    observe_ns = (now_ms() - t0) * 1e6 / (double)n;
  }
  ms = calloc(renders, sizeof(*ms));
  bare = calloc(renders, sizeof(*bare));
  if (ms == NULL || bare == NULL)
    return 2;
  vm0 = vm_kb("VmSize");
  for (i = 0; i < renders; i++) {
    tg_mbuf_t b = {NULL, 0, 0, 1, 0, 0};
    double t0 = now_ms();
    tg_metrics_render(m, &b);
    bare[i] = now_ms() - t0;
    free(b.s);
  }
  peak_bare = vm_kb("VmPeak");
  for (i = 0; i < renders; i++) {
    tg_mbuf_t b = {NULL, 0, 0, (size_t)4 << 30, 0, 0};
    double t0 = now_ms();
    tg_metrics_render(m, &b);
    ms[i] = now_ms() - t0;
    if (b.err) {
      fprintf(stderr, "render failed: %d\n", b.err);
      return 1;
    }
    bytes = b.len;
    free(b.s);
  }
  peak = vm_kb("VmPeak");
  qsort(ms, renders, sizeof(*ms), cmp_double);
  qsort(bare, renders, sizeof(*bare), cmp_double);
  printf("workers=%zu tenants=%zu %s: a request observed in %.0f ns; %zu renders: merge "
         "alone %.2f ms, +%.1f MB; whole render %.2f ms (max %.2f), +%.1f MB, %.1f MB of text\n",
         workers, tenants, shared ? "shared" : "disjoint", observe_ns, renders, bare[renders / 2],
         (peak_bare - vm0) / 1024.0, ms[renders / 2], ms[renders - 1], (peak - vm0) / 1024.0,
         bytes / 1e6);
  free(ms);
  free(bare);
  tg_metrics_free(m);
  return 0;
}
