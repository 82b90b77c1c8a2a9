/* The usage ledger's writer: ports, the group-commit thread, the spool and
 * its replay, and the query API over the backend (ledger_backend.h).
 *
 * Threads. Loop threads append through their port; one writer thread takes
 * the shared queue in batches and is the only user of the writer's database
 * connection and of the spool file. Completions go back to each record's
 * port (a locked list and an async handle), so callbacks run on the loop
 * that appended.
 *
 * Invariants.
 * - pending (queued + being written) never exceeds max_backlog; an append
 *   over it is refused, never queued.
 * - A record's callback says 0 only once the record is committed by the
 *   backend or written to the spool (or the rejected file) and
 *   fdatasync'ed.
 * - Order: once a batch has gone to the spool, every later batch goes to the
 *   spool too, until the spool has been replayed from its start to its end
 *   (in file order) into the database; only then do batches go straight to
 *   the database again. A record replayed twice (crash during replay) is
 *   stored once: its key (tenant, time, request id) is unique.
 * - Only a database that is away sends batches to the spool. A record its
 *   rules refuse for good (TG_EREJECTED) is isolated, appended to the
 *   rejected file and synced; the others of its batch are stored in order,
 *   and a replay goes on past it.
 * - The spool only grows by whole lines; a write that fails half-way is cut
 *   back. A torn last line left by a crash was never reported durable and is
 *   dropped at open.
 * - A port's in-flight count lets tg_ledger_port_close wait until every
 *   record it appended has been delivered, so no callback is lost and none
 *   runs after the port is gone. */
#define _GNU_SOURCE /* memrchr */
#include "meter/ledger.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/err.h"
#include "core/fault.h"
#include "core/strbuf.h"
#include "core/recycle.h"
#include "core/thread.h"
#include "meter/ledger_backend.h"
#include "policy/limits.h"

#define DEF_MAX_BACKLOG 100000
#define DEF_BATCH_MAX 512
#define DEF_LINGER_US 500
#define DEF_BUSY_MS 1000
#define DEF_RETRY_MS 1000
/* Bounds the writer's preallocated batch arrays. */
#define MAX_BATCH 16384
/* A replay step takes up to this many batches' worth of the spool. While
 * the spool is replayed, every new batch is spooled behind it: a step of
 * one batch against a full batch spooled per step kept the spool's size as
 * long as the load lasted. */
#define REPLAY_BATCHES 4
/* Longest spool line the encoder can produce is about 2 KiB (every text
 * byte percent-encoded); anything longer in a spool is damage. */
#define SPOOL_LINE_MAX TG_LEDGER_LINE_MAX
/* The writer's I/O buffer for the spool, for writing and for replaying. */
#define SPOOL_BUF (64 * 1024)
#define SPOOL_FIELDS 14
/* "L1 " + 8 hex digits of CRC-32 + " " */
#define SPOOL_HEAD 12

/* A file of records in the spool's line format, appended by the writer. */
typedef struct {
  int fd;                   /* -1: not open (no file yet) */
  int64_t size;             /* bytes of whole lines */
  int dir_synced;           /* the file's directory entry was synced since
                             * it was opened: 0 until an append has done it */
  char path[PATH_MAX];
} lines_t;

typedef struct node_s {
  struct node_s *next;
  tg_ledger_port_t *port;
  tg_ledger_cb cb;
  void *arg;
  int status;
  int64_t enq_us;           /* monotonic, for the linger deadline */
  tg_ledger_rec_t rec;
} node_t;

struct tg_ledger_port_s {
  tg_ledger_t *l;
  uv_async_t async;
  pthread_mutex_t mu;
  pthread_cond_t cond;      /* signalled when inflight reaches 0 while closing */
  node_t *done, *done_tail; /* delivered, callbacks not yet run */
  atomic_size_t inflight;   /* appended, not yet delivered */
  tg_recycle_t nodes;       /* the loop's: a batch's nodes for the next records */
  int closing;
};

/* Lines on stderr about what keeps failing, at most SAYS_LINES a minute:
 * a full disk or a constraint refusing a whole tenant fails every batch,
 * and a line for each would flood the log (and the disk it is on). The
 * rest are counted, and their count said when the minute is over. */
#define SAYS_LINES 10
#define SAYS_WINDOW_US INT64_C(60000000)
typedef struct {
  unsigned told;          /* lines said this minute */
  uint64_t quiet;         /* and those only counted */
  int64_t window_end;     /* monotonic us */
} says_t;

struct tg_ledger_s {
  const tg__ledger_backend_t *be;
  tg__ledger_conn_t *conn;  /* the writer's; the writer thread's alone once started */
  size_t max_backlog, batch_max;
  int64_t linger_us, retry_us;
  char dir[PATH_MAX];

  pthread_mutex_t mu;
  pthread_cond_t cond;      /* CLOCK_MONOTONIC */
  node_t *head, *tail;
  size_t queued;
  int stopping;
  int started;
  pthread_t thread;

  atomic_size_t pending;
  atomic_int db_up;
  _Atomic int64_t spool_bytes;
  _Atomic int64_t lost_at_us; /* when records were last lost (mono), or 0 */
  struct {
    atomic_uint_fast64_t transactions, committed, spooled, replayed,
        spool_skipped, spool_damaged, db_failures, lost, refused, rejected;
  } st;

  /* The writer thread's own (and tg_ledger_open's before it starts). */
  lines_t spool;            /* records waiting for the database */
  lines_t rejected;         /* records the database refuses for good */
  int64_t replay_off;       /* the spool's first line not yet replayed */
  int spooling;
  int replaying;            /* the last replay step went through */
  int64_t next_try_us;
  size_t replay_max;              /* batch_max * REPLAY_BATCHES */
  const tg_ledger_rec_t **ptrs;   /* replay_max: the batch being written */
  unsigned char *mark;            /* replay_max: what became of each (REC_*) */
  const tg_ledger_rec_t **sel;    /* replay_max: some of ptrs, to append */
  says_t refused_says;            /* refused records named on stderr */
  says_t fail_says;               /* write failures said on stderr */
  tg_ledger_rec_t *rrecs;         /* replay_max, records read back for replay */
  char *buf;                      /* SPOOL_BUF */
};

struct tg_ledger_db_s {
  const tg__ledger_backend_t *be;
  tg__ledger_conn_t *conn;
};

/* ---- small helpers ---- */

static int64_t mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Once the minute is over (at once when force), says how many refusals
 * were not named and how many failure lines were not said, and starts a
 * new minute. */
static void says_summary(tg_ledger_t *l, int64_t now, int force) {
  if (force || now >= l->refused_says.window_end) {
    if (l->refused_says.quiet > 0)
      fprintf(stderr, "tollgate: ledger: the database refused %" PRIu64
              " more records, not named one by one; every refused record is "
              "in %s\n", l->refused_says.quiet, l->rejected.path);
    l->refused_says = (says_t){.window_end = now + SAYS_WINDOW_US};
  }
  if (force || now >= l->fail_says.window_end) {
    if (l->fail_says.quiet > 0)
      fprintf(stderr, "tollgate: ledger: %" PRIu64 " more lines like the "
              "above not said this minute (llm_ledger_records_total counts "
              "every record lost)\n", l->fail_says.quiet);
    l->fail_says = (says_t){.window_end = now + SAYS_WINDOW_US};
  }
}

/* 1 when a line may be said now on s (counted as said), 0 when it is only
 * counted. */
static int says_may(tg_ledger_t *l, says_t *s) {
  says_summary(l, mono_us(), 0);
  if (s->told >= SAYS_LINES) {
    s->quiet++;
    return 0;
  }
  s->told++;
  return 1;
}

static int64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void wait_until(pthread_cond_t *c, pthread_mutex_t *m, int64_t us) {
  struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
  pthread_cond_timedwait(c, m, &ts);
}

static void bump(atomic_uint_fast64_t *c, size_t n) {
  atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

/* The backend a database setting names: "sqlite" (the default) or a
 * postgres:// URL. */
static int find_backend(const char *database, const tg__ledger_backend_t **be) {
  if (database == NULL || *database == '\0' || strcmp(database, "sqlite") == 0) {
    *be = &tg__ledger_backend_sqlite;
    return 0;
  }
  if (strncmp(database, "postgres://", 11) == 0 ||
      strncmp(database, "postgresql://", 13) == 0) {
    *be = &tg__ledger_backend_pg;
    return 0;
  }
  fprintf(stderr, "tollgate: ledger: unknown database \"%s\"\n", database);
  return TG_EINVAL;
}

/* ---- spool line format ----
 *
 * One record per line: "L1 <crc32 hex> <payload>\n". The payload is the 14
 * fields in tg_ledger_rec_t order, separated by one space; numbers in
 * decimal; text with every byte outside '!'..'~', and '%' and '~'
 * themselves, written %XX, and an empty text written "~". So a line holds
 * no space or newline but its separators, and an operator can read it. The
 * CRC-32 covers the payload: a line damaged on disk is skipped, not
 * replayed wrong. */

static uint32_t crc32_buf(const char *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    c ^= (uint8_t)p[i];
    for (int k = 0; k < 8; k++)
      c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

static const char hexd[] = "0123456789ABCDEF";

/* Appends text s (at most cap bytes, NUL-terminated within) then a space. */
static int put_text(char *out, size_t size, size_t *len, const char *s,
                    size_t cap) {
  size_t n = strnlen(s, cap), o = *len;
  if (n == 0) {
    if (o + 2 > size)
      return TG_ETOOBIG;
    out[o++] = '~';
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char b = (unsigned char)s[i];
    if (o + 4 > size)
      return TG_ETOOBIG;
    if (b > 0x20 && b < 0x7f && b != '%' && b != '~') {
      out[o++] = (char)b;
    } else {
      out[o++] = '%';
      out[o++] = hexd[b >> 4];
      out[o++] = hexd[b & 15];
    }
  }
  out[o++] = ' ';
  *len = o;
  return 0;
}

static int put_num(char *out, size_t size, size_t *len, int64_t v) {
  int w = snprintf(out + *len, size - *len, "%" PRId64 " ", v);
  if (w < 0 || (size_t)w >= size - *len)
    return TG_ETOOBIG;
  *len += (size_t)w;
  return 0;
}

/* Writes rec's line (with its newline) at out; returns its length or a
 * negative error when size is too small. */
static int encode_line(const tg_ledger_rec_t *r, char *out, size_t size) {
  size_t len = SPOOL_HEAD;
  uint32_t crc;
  int rc = 0;

  if (size < SPOOL_HEAD + 2)
    return TG_ETOOBIG;
  rc |= put_text(out, size, &len, r->request_id, sizeof(r->request_id));
  rc |= put_num(out, size, &len, r->ts_ms);
  rc |= put_text(out, size, &len, r->tenant, sizeof(r->tenant));
  rc |= put_text(out, size, &len, r->key_id, sizeof(r->key_id));
  rc |= put_text(out, size, &len, r->model, sizeof(r->model));
  rc |= put_text(out, size, &len, r->endpoint, sizeof(r->endpoint));
  rc |= put_num(out, size, &len, r->prompt_tokens);
  rc |= put_num(out, size, &len, r->completion_tokens);
  rc |= put_num(out, size, &len, r->cost_nano);
  rc |= put_num(out, size, &len, r->status);
  rc |= put_num(out, size, &len, r->usage_counted ? 1 : 0);
  rc |= put_num(out, size, &len, r->queue_us);
  rc |= put_num(out, size, &len, r->ttft_us);
  rc |= put_num(out, size, &len, r->total_us);
  if (rc != 0)
    return TG_ETOOBIG;
  out[len - 1] = '\n';      /* the last field's space becomes the newline */
  crc = crc32_buf(out + SPOOL_HEAD, len - 1 - SPOOL_HEAD);
  memcpy(out, "L1 ", 3);
  for (int i = 0; i < 8; i++)
    out[3 + i] = hexd[(crc >> (28 - 4 * i)) & 15];
  out[11] = ' ';
  return (int)len;
}

static int get_text(const char *t, size_t n, char *dst, size_t cap) {
  size_t o = 0;
  if (n == 1 && t[0] == '~') {
    dst[0] = '\0';
    return 0;
  }
  for (size_t i = 0; i < n; i++) {
    int b = (unsigned char)t[i];
    if (b == '%') {
      int h, lo;
      if (i + 2 >= n)
        return TG_EPARSE;
      h = tg_hex_val(t[i + 1]);
      lo = tg_hex_val(t[i + 2]);
      if (h < 0 || lo < 0 || (h == 0 && lo == 0))
        return TG_EPARSE;
      b = h * 16 + lo;
      i += 2;
    } else if (b <= 0x20 || b >= 0x7f || b == '~') {
      return TG_EPARSE;
    }
    if (o + 1 >= cap)
      return TG_EPARSE;
    dst[o++] = (char)b;
  }
  dst[o] = '\0';
  return 0;
}

static int get_num(const char *t, size_t n, int64_t lo, int64_t hi,
                   int64_t *v) {
  char tmp[24];
  char *end;
  long long x;
  if (n == 0 || n >= sizeof(tmp))
    return TG_EPARSE;
  memcpy(tmp, t, n);
  tmp[n] = '\0';
  errno = 0;
  x = strtoll(tmp, &end, 10);
  if (errno != 0 || *end != '\0' || x < lo || x > hi)
    return TG_EPARSE;
  *v = (int64_t)x;
  return 0;
}

/* Decodes one line (without its newline). Returns 0 or TG_EPARSE. */
static int decode_line(const char *line, size_t len, tg_ledger_rec_t *r) {
  const char *tok[SPOOL_FIELDS];
  size_t tl[SPOOL_FIELDS], nt = 0;
  const char *p, *end = line + len;
  uint32_t want = 0;
  int64_t v[9];
  int rc = 0;

  if (len <= SPOOL_HEAD || len > SPOOL_LINE_MAX ||
      memcmp(line, "L1 ", 3) != 0 || line[11] != ' ')
    return TG_EPARSE;
  for (int i = 0; i < 8; i++) {
    int h = tg_hex_val(line[3 + i]);
    if (h < 0)
      return TG_EPARSE;
    want = (want << 4) | (uint32_t)h;
  }
  if (crc32_buf(line + SPOOL_HEAD, len - SPOOL_HEAD) != want)
    return TG_EPARSE;
  p = line + SPOOL_HEAD;
  while (p <= end) {
    const char *sp = memchr(p, ' ', (size_t)(end - p));
    if (sp == NULL)
      sp = end;
    if (nt == SPOOL_FIELDS)
      return TG_EPARSE;
    tok[nt] = p;
    tl[nt++] = (size_t)(sp - p);
    p = sp + 1;
  }
  if (nt != SPOOL_FIELDS)
    return TG_EPARSE;
  memset(r, 0, sizeof(*r));
  rc |= get_text(tok[0], tl[0], r->request_id, sizeof(r->request_id));
  rc |= get_num(tok[1], tl[1], INT64_MIN, INT64_MAX, &r->ts_ms);
  rc |= get_text(tok[2], tl[2], r->tenant, sizeof(r->tenant));
  rc |= get_text(tok[3], tl[3], r->key_id, sizeof(r->key_id));
  rc |= get_text(tok[4], tl[4], r->model, sizeof(r->model));
  rc |= get_text(tok[5], tl[5], r->endpoint, sizeof(r->endpoint));
  for (int i = 0; i < 8 && rc == 0; i++) {
    int64_t lo = i < 3 ? 0 : i == 3 ? INT_MIN : i == 4 ? 0 : INT64_MIN;
    int64_t hi = i == 3 ? INT_MAX : i == 4 ? 1 : INT64_MAX;
    rc |= get_num(tok[6 + i], tl[6 + i], lo, hi, &v[i]);
  }
  if (rc != 0 || r->request_id[0] == '\0')
    return TG_EPARSE;
  r->prompt_tokens = v[0];
  r->completion_tokens = v[1];
  r->cost_nano = v[2];
  r->status = (int)v[3];
  r->usage_counted = (int)v[4];
  r->queue_us = v[5];
  r->ttft_us = v[6];
  r->total_us = v[7];
  return 0;
}

int tg__ledger_line_encode(const tg_ledger_rec_t *r, char *out, size_t size) {
  return encode_line(r, out, size);
}

int tg__ledger_line_decode(const char *line, size_t len, tg_ledger_rec_t *r) {
  return decode_line(line, len, r);
}

/* ---- the spool file (writer thread only) ---- */

static void set_spool_bytes(tg_ledger_t *l) {
  atomic_store(&l->spool_bytes, l->spool.size - l->replay_off);
}

static int pwrite_all(int fd, const char *p, size_t n, int64_t off) {
  while (n > 0) {
    ssize_t w = pwrite(fd, p, n, (off_t)off);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return TG_EIO;
    p += w;
    n -= (size_t)w;
    off += w;
  }
  return 0;
}

static ssize_t pread_full(int fd, char *p, size_t n, int64_t off) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = pread(fd, p + got, n - got, (off_t)(off + (int64_t)got));
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      return -1;
    if (r == 0)
      break;
    got += (size_t)r;
  }
  return (ssize_t)got;
}

/* Makes a newly created file's directory entry durable: without it a crash
 * could lose the whole file although its records were fsynced. */
static int sync_dir(const char *dir) {
  int fd, rc = 0;
  if (tg_fault("ledger_dir_sync")) {
    errno = EIO;
    return TG_EIO;
  }
  fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return TG_EIO;
  if (fsync(fd) != 0)
    rc = TG_EIO;
  close(fd);
  return rc;
}

/* Where the last whole line of fd (size bytes) ends: size, or less when a
 * crash cut the last line short (a record never reported durable). Returns
 * 0 and *end, or TG_EIO. */
static int whole_lines_end(tg_ledger_t *l, int fd, int64_t size, int64_t *end) {
  *end = size;
  /* Back to the last newline, one buffer at a time. */
  while (*end > 0) {
    size_t want = *end > SPOOL_BUF ? SPOOL_BUF : (size_t)*end;
    ssize_t got = pread_full(fd, l->buf, want, *end - (int64_t)want);
    char *nl;
    if (got != (ssize_t)want)
      return TG_EIO;
    nl = memrchr(l->buf, '\n', want);
    if (nl != NULL) {
      *end = *end - (int64_t)want + (nl - l->buf) + 1;
      return 0;
    }
    *end -= (int64_t)want;
  }
  return 0;
}

/* Opens f to append to it, creating it when missing; a torn last line left
 * by a crash is cut. Returns 0 or TG_EIO (said on stderr). */
static int lines_open(tg_ledger_t *l, lines_t *f) {
  struct stat sb;

  f->dir_synced = 0;
  f->fd = open(f->path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (f->fd < 0) {
    int err = errno;
    if (says_may(l, &l->fail_says))
      fprintf(stderr, "tollgate: ledger: cannot open %s: %s\n", f->path, strerror(err));
    return TG_EIO;
  }
  if (fstat(f->fd, &sb) != 0 ||
      whole_lines_end(l, f->fd, (int64_t)sb.st_size, &f->size) != 0 ||
      (f->size < (int64_t)sb.st_size && ftruncate(f->fd, (off_t)f->size) != 0)) {
    fprintf(stderr, "tollgate: ledger: cannot read %s: %s\n", f->path,
            strerror(errno));
    close(f->fd);
    f->fd = -1;
    return TG_EIO;
  }
  return 0;
}

/* When f's file was removed from data_dir while open (an operator, a tmp
 * cleaner), what the writer appends would live only in a file no later
 * start can read: a new file takes its place at the path, with the old
 * one's lines from byte `from` on (the spool's lines not yet replayed; the
 * whole rejected file), synced. Returns 0 (f still linked, or relinked; the
 * lines before `from` are gone from f, *moved tells how many bytes) or
 * TG_EIO (said on stderr). */
static int lines_relink(tg_ledger_t *l, lines_t *f, int64_t from, int64_t *moved) {
  struct stat sb;
  int fd;
  int64_t off = from;

  *moved = 0;
  if (f->fd < 0 || fstat(f->fd, &sb) != 0 || sb.st_nlink > 0)
    return 0;
  fd = open(f->path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    goto fail;
  while (off < f->size) {
    size_t want = f->size - off > SPOOL_BUF ? SPOOL_BUF : (size_t)(f->size - off);
    ssize_t got = pread_full(f->fd, l->buf, want, off);
    if (got != (ssize_t)want || pwrite_all(fd, l->buf, want, off - from) != 0)
      goto fail;
    off += (int64_t)want;
  }
  if (fdatasync(fd) != 0 || sync_dir(l->dir) != 0)
    goto fail;
  fprintf(stderr, "tollgate: ledger: %s was removed while in use; made it "
          "again with the %" PRId64 " bytes it still had to keep\n", f->path,
          f->size - from);
  close(f->fd);
  f->fd = fd;
  f->dir_synced = 1;
  f->size -= from;
  *moved = from;
  return 0;
fail:
  if (says_may(l, &l->fail_says))
    fprintf(stderr, "tollgate: ledger: %s was removed while in use and cannot "
            "be made again: %s\n", f->path, strerror(errno));
  if (fd >= 0)
    close(fd);
  return TG_EIO;
}

/* Appends recs[0..k) to f (opened first when needed), whole lines only,
 * and syncs them. */
static int lines_append(tg_ledger_t *l, lines_t *f,
                        const tg_ledger_rec_t *const *recs, size_t k) {
  int64_t start, off;
  size_t used = 0;
  int rc = TG_EIO;

  if (f->fd < 0 && lines_open(l, f) != 0)
    return TG_EIO;
  start = off = f->size;
  for (size_t i = 0; i < k; i++) {
    int w = encode_line(recs[i], l->buf + used, SPOOL_BUF - used);
    if (w < 0) {
      if (pwrite_all(f->fd, l->buf, used, off) != 0)
        goto out;
      off += (int64_t)used;
      used = 0;
      w = encode_line(recs[i], l->buf, SPOOL_BUF);
      if (w < 0)
        goto out;
    }
    used += (size_t)w;
  }
  if (pwrite_all(f->fd, l->buf, used, off) != 0)
    goto out;
  off += (int64_t)used;
  if (tg_fault("ledger_file_sync")) {
    errno = EIO;
    goto out;
  }
  if (fdatasync(f->fd) != 0)
    goto out;
  /* Until its directory entry is durable a crash can lose the whole file,
   * so the first append that gets this far syncs it: also when an earlier
   * append, the one that created the file, failed before or at that. */
  if (!f->dir_synced && sync_dir(l->dir) != 0)
    goto out;
  f->dir_synced = 1;
  f->size = off;
  rc = 0;
out:
  if (rc != 0) {
    int err = errno;
    /* Whole lines only: what this call half-wrote must not be read back. */
    int cut = ftruncate(f->fd, (off_t)start) == 0 ? 0 : errno;
    if (says_may(l, &l->fail_says)) {
      fprintf(stderr, "tollgate: ledger: cannot write %s: %s\n", f->path, strerror(err));
      if (cut != 0)
        fprintf(stderr, "tollgate: ledger: cannot cut %s back: %s\n", f->path,
                strerror(cut));
    }
  }
  return rc;
}

/* Appends records to the spool and syncs them. */
static int spool_write(tg_ledger_t *l, const tg_ledger_rec_t *const *recs,
                       size_t k) {
  int64_t moved;
  int rc;
  if (l->spool.fd < 0)
    l->replay_off = 0;
  if (lines_relink(l, &l->spool, l->replay_off, &moved) != 0)
    return TG_EIO;
  l->replay_off -= moved;
  rc = lines_append(l, &l->spool, recs, k);
  set_spool_bytes(l);
  return rc;
}

/* A damaged spool line (or run of bytes without a line end) is skipped:
 * counted, said on stderr, and its bytes appended as they were to the
 * damaged file and synced, one line each, before the spool that holds them
 * can be removed. A copy that fails is said too; the replay goes on. */
static void skip_damaged(tg_ledger_t *l, const char *p, size_t len, int64_t at) {
  char path[PATH_MAX];
  int fd = -1, ok = 0;
  off_t end;

  bump(&l->st.spool_skipped, 1);
  bump(&l->st.spool_damaged, 1);
  if (snprintf(path, sizeof(path), "%s/%s", l->dir, TG_LEDGER_DAMAGED_FILE) <
      (int)sizeof(path)) {
    fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    end = fd >= 0 ? lseek(fd, 0, SEEK_END) : -1;
    ok = end >= 0 && pwrite_all(fd, p, len, end) == 0 &&
         pwrite_all(fd, "\n", 1, end + (off_t)len) == 0 && fdatasync(fd) == 0 &&
         sync_dir(l->dir) == 0;
  }
  fprintf(stderr, "tollgate: ledger: skipping %zu damaged bytes in %s at byte %" PRId64
          "; %s %s\n", len, l->spool.path, at, ok ? "kept in" : "could not keep them in",
          TG_LEDGER_DAMAGED_FILE);
  if (fd >= 0)
    close(fd);
}

/* Reads up to replay_max records from replay_off into rrecs; *next is the
 * offset after the last line consumed. Damaged lines are skipped. Returns
 * the count, or -1 on a read error. */
static ssize_t spool_read(tg_ledger_t *l, int64_t *next) {
  int64_t off = l->replay_off;
  size_t n = 0;

  while (n < l->replay_max && off < l->spool.size) {
    size_t want = (size_t)(l->spool.size - off), used = 0;
    ssize_t got;
    if (want > SPOOL_BUF)
      want = SPOOL_BUF;
    got = pread_full(l->spool.fd, l->buf, want, off);
    if (got < 0)
      return -1;
    if (got == 0)
      break;
    while (n < l->replay_max) {
      char *nl = memchr(l->buf + used, '\n', (size_t)got - used);
      size_t len;
      if (nl == NULL)
        break;
      len = (size_t)(nl - (l->buf + used));
      if (decode_line(l->buf + used, len, &l->rrecs[n]) == 0)
        n++;
      else
        skip_damaged(l, l->buf + used, len, off + (int64_t)used);
      used += len + 1;
    }
    if (used == 0) {
      /* No newline in a full buffer (longer than any line we write), or a
       * tail without one: damage either way, never a durable record. */
      skip_damaged(l, l->buf, (size_t)got, off);
      used = (size_t)got;
    }
    off += (int64_t)used;
  }
  *next = off;
  return (ssize_t)n;
}

/* The spool is fully in the database: remove it and write directly again.
 * Unsynced removal is fine: a spool that comes back replays as duplicates,
 * which are ignored. */
static void spool_done(tg_ledger_t *l) {
  if (l->spool.fd >= 0)
    close(l->spool.fd);
  l->spool.fd = -1;
  if (unlink(l->spool.path) != 0 && errno != ENOENT)
    fprintf(stderr, "tollgate: ledger: cannot remove %s: %s\n", l->spool.path,
            strerror(errno));
  l->spool.size = l->replay_off = 0;
  set_spool_bytes(l);
  if (l->spooling)
    fprintf(stderr, "tollgate: ledger: spool replayed; writing to the "
                    "database again\n");
  l->spooling = 0;
  l->replaying = 0;
  atomic_store(&l->db_up, 1);
}

/* ---- records the database refuses ----
 *
 * A constraint, a trigger or a column's range may refuse a record for good
 * (TG_EREJECTED from the backend): a retry is refused again, and spooling
 * the batch would hold every later record behind it for ever. The writer
 * finds the refused records by halving: each half is its own transaction,
 * a half that goes in is stored, a refused half is halved again, and a
 * refused single record is one of them. k refused records of a batch of n
 * cost at most 2k ceil(log2 n) + 1 transactions, and the others are stored
 * in their order. The refused ones are appended to the rejected file (the
 * spool's line format) and synced before their callbacks say 0. */

enum { REC_PENDING, REC_STORED, REC_REFUSED };

/* Per minute at most this many refused records are named on stderr; the
 * others are counted in one line. */

static void refused_note(tg_ledger_t *l, const tg_ledger_rec_t *r) {
  if (!says_may(l, &l->refused_says))
    return;
  fprintf(stderr, "tollgate: ledger: the database refuses the record of "
          "request %s, tenant %s (%s); it goes to %s\n", r->request_id,
          r->tenant, l->be->errmsg(l->conn), l->rejected.path);
}

/* Stores l->ptrs[off, off + n), halving what the database refuses, and
 * marks each record stored or refused. Returns 0 once every record is
 * either, or the backend's error when the database fails otherwise (the
 * records not reached stay REC_PENDING). */
static int store(tg_ledger_t *l, size_t off, size_t n) {
  int rc = l->be->insert_batch(l->conn, l->ptrs + off, n);

  if (rc == 0) {
    memset(l->mark + off, REC_STORED, n);
    bump(&l->st.transactions, 1);
    return 0;
  }
  if (rc != TG_EREJECTED)
    return rc;
  if (n == 1) {
    l->mark[off] = REC_REFUSED;
    refused_note(l, l->ptrs[off]);
    return 0;
  }
  rc = store(l, off, n / 2);
  return rc != 0 ? rc : store(l, off + n / 2, n - n / 2);
}

/* The records of ptrs[0..n) marked m, in order, into sel (when not NULL).
 * Returns how many. */
static size_t gather(tg_ledger_t *l, size_t n, int m,
                     const tg_ledger_rec_t **sel) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    if (l->mark[i] == m) {
      if (sel != NULL)
        sel[k] = l->ptrs[i];
      k++;
    }
  return k;
}

/* Appends the records of ptrs[0..n) marked refused to the rejected file.
 * Returns 0 or TG_EIO (said on stderr). */
static int keep_refused(tg_ledger_t *l, size_t n) {
  size_t k = gather(l, n, REC_REFUSED, l->sel);
  int64_t moved;

  if (k == 0)
    return 0;
  if (lines_relink(l, &l->rejected, 0, &moved) != 0 ||
      lines_append(l, &l->rejected, l->sel, k) != 0)
    return TG_EIO;
  bump(&l->st.rejected, k);
  return 0;
}

/* Replays one batch of the spool. Returns 0 (progress, or finished) or an
 * error (the database still refuses; the next try is scheduled). */
static int replay_step(tg_ledger_t *l) {
  int64_t next;
  ssize_t n = spool_read(l, &next);
  int rc;

  if (n < 0) {
    fprintf(stderr, "tollgate: ledger: cannot read %s: %s\n", l->spool.path,
            strerror(errno));
    l->next_try_us = mono_us() + l->retry_us;
    return TG_EIO;
  }
  if (n > 0) {
    for (ssize_t i = 0; i < n; i++)
      l->ptrs[i] = &l->rrecs[i];
    memset(l->mark, REC_PENDING, (size_t)n);
    rc = store(l, 0, (size_t)n);
    /* A refused record leaves the spool only once it is in the rejected
     * file; TG_EIO (said) leaves the step to be tried again. */
    if (rc == 0)
      rc = keep_refused(l, (size_t)n);
    if (rc != 0) {
      if (rc != TG_EIO)
        bump(&l->st.db_failures, 1);
      if (l->replaying && rc != TG_EIO)
        fprintf(stderr, "tollgate: ledger: spool replay stopped (%s); "
                "retrying\n", l->be->errmsg(l->conn));
      l->replaying = 0;
      l->next_try_us = mono_us() + l->retry_us;
      return rc;
    }
    l->replaying = 1;
    bump(&l->st.replayed, gather(l, (size_t)n, REC_STORED, NULL));
  }
  l->replay_off = next;
  set_spool_bytes(l);
  if (l->replay_off >= l->spool.size)
    spool_done(l);
  return 0;
}

/* At open: adopts a spool left by an earlier run, cutting a torn last line
 * (a crash in the middle of a write: never reported durable). */
static int spool_recover(tg_ledger_t *l) {
  struct stat sb;
  int64_t size, end;
  int fd = open(l->spool.path, O_RDWR | O_CLOEXEC);

  if (fd < 0) {
    if (errno == ENOENT)
      return 0;
    fprintf(stderr, "tollgate: ledger: cannot open %s: %s\n", l->spool.path,
            strerror(errno));
    return TG_EIO;
  }
  if (fstat(fd, &sb) != 0)
    goto fail;
  size = (int64_t)sb.st_size;
  if (whole_lines_end(l, fd, size, &end) != 0)
    goto fail;
  if (end < size) {
    bump(&l->st.spool_skipped, 1);
    fprintf(stderr, "tollgate: ledger: dropping a torn last record (%" PRId64
            " bytes) from %s\n", size - end, l->spool.path);
    if (ftruncate(fd, (off_t)end) != 0 || fsync(fd) != 0)
      goto fail;
  }
  l->spool.fd = fd;
  l->spool.dir_synced = 0; /* an earlier run's file: synced at the next append */
  l->spool.size = end;
  l->replay_off = 0;
  set_spool_bytes(l);
  if (end == 0) {
    spool_done(l);
    return 0;
  }
  l->spooling = 1;
  return 0;
fail:
  fprintf(stderr, "tollgate: ledger: cannot recover %s: %s\n", l->spool.path,
          strerror(errno));
  close(fd);
  return TG_EIO;
}

/* ---- the writer thread ---- */

/* Writes one batch: to the database while it is up and nothing waits in
 * the spool (what it refuses for good to the rejected file), else to the
 * spool. Sets each node's status for its callback. */
static void write_batch(tg_ledger_t *l, node_t *first, size_t k) {
  int spool_rc = 0, refused_rc = 0;
  size_t i = 0, n;
  node_t *x;

  for (x = first; i < k; x = x->next)
    l->ptrs[i++] = &x->rec;
  memset(l->mark, REC_PENDING, k);
  if (!l->spooling) {
    if (store(l, 0, k) != 0) {
      bump(&l->st.db_failures, 1);
      l->spooling = 1;
      atomic_store(&l->db_up, 0);
      l->next_try_us = mono_us() + l->retry_us;
      fprintf(stderr, "tollgate: ledger: the database refused a batch (%s); "
              "spooling to %s until it answers\n", l->be->errmsg(l->conn),
              l->spool.path);
    }
    bump(&l->st.committed, gather(l, k, REC_STORED, NULL));
    refused_rc = keep_refused(l, k);
    if (refused_rc != 0) {
      n = gather(l, k, REC_REFUSED, NULL);
      bump(&l->st.lost, n);
      atomic_store(&l->lost_at_us, mono_us());
      if (says_may(l, &l->fail_says))
        fprintf(stderr, "tollgate: ledger: %zu records could not be kept\n", n);
    }
  }
  n = gather(l, k, REC_PENDING, l->sel);
  if (n > 0 && spool_write(l, l->sel, n) == 0) {
    bump(&l->st.spooled, n);
  } else if (n > 0) {
    spool_rc = TG_EIO;
    bump(&l->st.lost, n);
    atomic_store(&l->lost_at_us, mono_us());
    if (says_may(l, &l->fail_says))
      fprintf(stderr, "tollgate: ledger: %zu records could not be kept\n", n);
  }
  i = 0;
  for (x = first; i < k; x = x->next, i++)
    x->status = l->mark[i] == REC_STORED    ? 0
                : l->mark[i] == REC_REFUSED ? refused_rc
                                            : spool_rc;
}

/* Hands a run of nodes (all of port p) to their port. */
static void port_post(tg_ledger_port_t *p, node_t *first, node_t *last,
                      size_t cnt) {
  last->next = NULL;
  pthread_mutex_lock(&p->mu);
  if (p->done_tail != NULL)
    p->done_tail->next = first;
  else
    p->done = first;
  p->done_tail = last;
  atomic_fetch_sub(&p->inflight, cnt);
  if (!p->closing)
    uv_async_send(&p->async);
  else if (atomic_load(&p->inflight) == 0)
    pthread_cond_signal(&p->cond);
  pthread_mutex_unlock(&p->mu);
}

/* Hands k nodes, their status set, to their ports. */
static void deliver(node_t *first, size_t k) {
  node_t *run = first, *n = first;
  size_t cnt = 0;

  while (k > 0) {
    node_t *next = n->next;
    cnt++;
    k--;
    if (k == 0 || next->port != run->port) {
      port_post(run->port, run, n, cnt);
      run = next;
      cnt = 0;
    }
    n = next;
  }
}

/* While spooling: one replay step when the database looks back. The probe
 * does not wait for locks, so a database that stays away costs queued
 * batches nothing; once a replay runs, it goes on without probing. */
static void try_replay(tg_ledger_t *l) {
  int64_t moved;
  /* A spool removed while waiting is made again first: a stop or a crash
   * before the replay ends would lose what it holds. */
  if (lines_relink(l, &l->spool, l->replay_off, &moved) == 0 && moved > 0) {
    l->replay_off -= moved;
    set_spool_bytes(l);
  }
  if (!l->replaying && l->be->probe != NULL && l->be->probe(l->conn) != 0) {
    l->next_try_us = mono_us() + l->retry_us;
    return;
  }
  replay_step(l);
}

/* The ledger's threads (writer, checkpointer) run SCHED_BATCH: when
 * one wakes it never preempts a running thread, a loop thread above all,
 * which would lose its caches and its turn mid-request. It runs when a core is
 * free or at the next tick, a millisecond or so later: its work is a batch
 * whose answers are already waiting, and the loops go on meanwhile. */
void tg__ledger_thread_background(void) {
  struct sched_param sp = {.sched_priority = 0};
  (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);
}

static void *writer_main(void *arg) {
  tg_ledger_t *l = arg;

  tg_thread_name("tg-ledger");
  tg__ledger_thread_background();

  for (;;) {
    node_t *first, *last = NULL;
    size_t k = 0;
    int done;

    pthread_mutex_lock(&l->mu);
    for (;;) {
      if (l->queued >= l->batch_max)
        break;
      if (l->queued > 0) {
        /* Group commit: the oldest record waits at most linger_us for
         * company; one that already waited during the last commit, none. */
        if (l->stopping || mono_us() >= l->head->enq_us + l->linger_us)
          break;
        wait_until(&l->cond, &l->mu, l->head->enq_us + l->linger_us);
        continue;
      }
      if (l->stopping)
        break;
      if (l->spooling) {
        if (mono_us() >= l->next_try_us)
          break;
        wait_until(&l->cond, &l->mu, l->next_try_us);
        continue;
      }
      pthread_cond_wait(&l->cond, &l->mu);
    }
    first = l->head;
    if (l->queued <= l->batch_max) {
      /* the whole queue, without walking it under the lock the loops
       * append with (each node is a cache miss) */
      last = l->tail;
      k = l->queued;
      l->head = l->tail = NULL;
    } else {
      while (k < l->batch_max && l->head != NULL) {
        last = l->head;
        l->head = l->head->next;
        k++;
      }
      if (l->head == NULL)
        l->tail = NULL;
    }
    l->queued -= k;
    done = l->stopping && l->queued == 0;
    pthread_mutex_unlock(&l->mu);

    if (k > 0) {
      last->next = NULL;
      write_batch(l, first, k);
      /* Durable now: make room before a callback can try to use it. */
      atomic_fetch_sub(&l->pending, k);
      deliver(first, k);
    }
    if (l->refused_says.quiet > 0 || l->fail_says.quiet > 0)
      says_summary(l, mono_us(), 0);
    if (done)
      break;
    if (l->spooling && mono_us() >= l->next_try_us)
      try_replay(l);
  }
  return NULL;
}

/* ---- ports ---- */

static void run_callbacks(tg_ledger_port_t *p, node_t *n) {
  while (n != NULL) {
    node_t *next = n->next;
    if (n->cb != NULL)
      n->cb(n->arg, n->status);
    tg_recycle_free(&p->nodes, n);
    n = next;
  }
}

static node_t *take_done(tg_ledger_port_t *p) {
  node_t *list;
  pthread_mutex_lock(&p->mu);
  list = p->done;
  p->done = p->done_tail = NULL;
  pthread_mutex_unlock(&p->mu);
  return list;
}

static void on_port_async(uv_async_t *h) {
  tg_ledger_port_t *p = h->data;
  run_callbacks(p, take_done(p));
}

static void on_port_closed(uv_handle_t *h) {
  tg_ledger_port_t *p = h->data;
  tg_recycle_clear(&p->nodes);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cond);
  free(p);
}

int tg_ledger_port_new(tg_ledger_t *l, uv_loop_t *loop,
                       tg_ledger_port_t **out) {
  tg_ledger_port_t *p;
  int rc;

  *out = NULL;
  if (l == NULL || loop == NULL)
    return TG_EINVAL;
  p = calloc(1, sizeof(*p));
  if (p == NULL)
    return TG_ENOMEM;
  p->l = l;
  atomic_init(&p->inflight, 0);
  tg_recycle_init(&p->nodes, sizeof(node_t), TG_RECYCLE_MAX);
  if (pthread_mutex_init(&p->mu, NULL) != 0) {
    free(p);
    return TG_ENOMEM;
  }
  if (pthread_cond_init(&p->cond, NULL) != 0) {
    pthread_mutex_destroy(&p->mu);
    free(p);
    return TG_ENOMEM;
  }
  rc = uv_async_init(loop, &p->async, on_port_async);
  if (rc != 0) {
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->mu);
    free(p);
    return rc;
  }
  p->async.data = p;
  *out = p;
  return 0;
}

void tg_ledger_port_close(tg_ledger_port_t *p) {
  node_t *list;
  if (p == NULL)
    return;
  /* Waits (bounded by one batch write) for the writer to deliver what this
   * loop appended, so every accepted record's callback runs, here at the
   * latest. */
  pthread_mutex_lock(&p->mu);
  p->closing = 1;
  while (atomic_load(&p->inflight) > 0)
    pthread_cond_wait(&p->cond, &p->mu);
  list = p->done;
  p->done = p->done_tail = NULL;
  pthread_mutex_unlock(&p->mu);
  run_callbacks(p, list);
  uv_close((uv_handle_t *)&p->async, on_port_closed);
}

static int text_ok(const char *s, size_t cap) {
  return memchr(s, '\0', cap) != NULL;
}

int tg_ledger_append(tg_ledger_port_t *p, const tg_ledger_rec_t *rec,
                     tg_ledger_cb cb, void *arg) {
  tg_ledger_t *l;
  node_t *n;
  int wake;

  if (p == NULL || rec == NULL || rec->request_id[0] == '\0' ||
      !text_ok(rec->request_id, sizeof(rec->request_id)) ||
      !text_ok(rec->tenant, sizeof(rec->tenant)) ||
      !text_ok(rec->key_id, sizeof(rec->key_id)) ||
      !text_ok(rec->model, sizeof(rec->model)) ||
      !text_ok(rec->endpoint, sizeof(rec->endpoint)) ||
      rec->prompt_tokens < 0 || rec->completion_tokens < 0 ||
      rec->cost_nano < 0)
    return TG_EINVAL;
  /* A callback run by tg_ledger_port_close may not queue behind it: the
   * port would be gone before the record's delivery. Only this loop sets
   * closing, so reading it here needs no lock. */
  if (p->closing)
    return TG_EUNAVAIL;
  l = p->l;
  n = tg_recycle_alloc(&p->nodes);
  if (n == NULL)
    return TG_ENOMEM;
  n->next = NULL;
  n->port = p;
  n->cb = cb;
  n->arg = arg;
  n->status = 0;
  n->rec = *rec;
  /* Counted before the writer can see it, so delivery never runs ahead. */
  atomic_fetch_add(&p->inflight, 1);

  pthread_mutex_lock(&l->mu);
  if (l->stopping || atomic_load(&l->pending) >= l->max_backlog) {
    int stopping = l->stopping;
    pthread_mutex_unlock(&l->mu);
    atomic_fetch_sub(&p->inflight, 1);
    tg_recycle_free(&p->nodes, n);
    if (!stopping)
      bump(&l->st.refused, 1);
    return TG_EUNAVAIL;
  }
  atomic_fetch_add(&l->pending, 1);
  n->enq_us = mono_us();
  if (l->tail != NULL)
    l->tail->next = n;
  else
    l->head = n;
  l->tail = n;
  l->queued++;
  /* Wake an idle writer, or a lingering one once a batch is full. */
  wake = l->queued == 1 || l->queued == l->batch_max;
  if (wake)
    pthread_cond_signal(&l->cond);
  pthread_mutex_unlock(&l->mu);
  return 0;
}

/* ---- open / close ---- */

static void free_ledger(tg_ledger_t *l) {
  if (l->conn != NULL)
    l->be->close(l->conn);
  if (l->spool.fd >= 0)
    close(l->spool.fd);
  if (l->rejected.fd >= 0)
    close(l->rejected.fd);
  free(l->ptrs);
  free(l->mark);
  free(l->sel);
  free(l->rrecs);
  free(l->buf);
  pthread_cond_destroy(&l->cond);
  pthread_mutex_destroy(&l->mu);
  free(l);
}

int tg_ledger_open(const char *database, const char *data_dir,
                   const tg_ledger_opts_t *o, tg_ledger_t **out) {
  tg_ledger_opts_t def = {0};
  const tg__ledger_backend_t *be;
  tg__ledger_conn_opts_t co = {0};
  pthread_condattr_t ca;
  tg_ledger_t *l;
  int rc, n;

  *out = NULL;
  if (data_dir == NULL || *data_dir == '\0')
    return TG_EINVAL;
  if ((rc = find_backend(database, &be)) != 0)
    return rc;
  if (o == NULL)
    o = &def;
  l = calloc(1, sizeof(*l));
  if (l == NULL)
    return TG_ENOMEM;
  l->be = be;
  l->spool.fd = -1;
  l->rejected.fd = -1;
  l->max_backlog = o->max_backlog ? o->max_backlog : DEF_MAX_BACKLOG;
  l->batch_max = o->batch_max ? o->batch_max : DEF_BATCH_MAX;
  if (l->batch_max > MAX_BATCH)
    l->batch_max = MAX_BATCH;
  l->linger_us = o->linger_us ? o->linger_us : DEF_LINGER_US;
  l->retry_us = (int64_t)(o->retry_ms ? o->retry_ms : DEF_RETRY_MS) * 1000;
  co.busy_timeout_ms = o->busy_timeout_ms ? o->busy_timeout_ms : DEF_BUSY_MS;
  co.writer = 1;
  atomic_init(&l->pending, 0);
  atomic_init(&l->db_up, 0);
  atomic_init(&l->lost_at_us, 0);
  atomic_init(&l->spool_bytes, 0);

  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_mutex_init(&l->mu, NULL);
  pthread_cond_init(&l->cond, &ca);
  pthread_condattr_destroy(&ca);

  rc = TG_EINVAL;
  n = snprintf(l->dir, sizeof(l->dir), "%s", data_dir);
  if (n < 0 || (size_t)n >= sizeof(l->dir))
    goto out;
  n = snprintf(l->spool.path, sizeof(l->spool.path), "%s/%s", data_dir,
               TG_LEDGER_SPOOL_FILE);
  if (n < 0 || (size_t)n >= sizeof(l->spool.path))
    goto out;
  n = snprintf(l->rejected.path, sizeof(l->rejected.path), "%s/%s", data_dir,
               TG_LEDGER_REJECTED_FILE);
  if (n < 0 || (size_t)n >= sizeof(l->rejected.path))
    goto out;
  rc = TG_ENOMEM;
  l->replay_max = l->batch_max * REPLAY_BATCHES;
  l->ptrs = calloc(l->replay_max, sizeof(*l->ptrs));
  l->rrecs = calloc(l->replay_max, sizeof(*l->rrecs));
  l->mark = calloc(l->replay_max, sizeof(*l->mark));
  l->sel = calloc(l->replay_max, sizeof(*l->sel));
  l->buf = malloc(SPOOL_BUF);
  if (l->ptrs == NULL || l->rrecs == NULL || l->mark == NULL ||
      l->sel == NULL || l->buf == NULL)
    goto out;

  /* The backend creates data_dir and migrates the schema. */
  if ((rc = be->open(database, data_dir, &co, &l->conn)) != 0)
    goto out;
  if ((rc = spool_recover(l)) != 0)
    goto out;
  /* A leftover spool goes in now, before anyone rebuilds spend from the
   * ledger. A database that still refuses leaves it for the writer. */
  while (l->spooling && replay_step(l) == 0)
    ;
  if (l->spooling)
    fprintf(stderr, "tollgate: ledger: the database refuses writes (%s); %"
            PRId64 " bytes stay in %s until it answers\n",
            l->be->errmsg(l->conn), l->spool.size - l->replay_off,
            l->spool.path);
  atomic_store(&l->db_up, !l->spooling);

  rc = pthread_create(&l->thread, NULL, writer_main, l) == 0 ? 0 : TG_ENOMEM;
  if (rc != 0)
    goto out;
  l->started = 1;
out:
  if (rc != 0) {
    free_ledger(l);
    return rc;
  }
  *out = l;
  return 0;
}

int64_t tg_ledger_close(tg_ledger_t *l) {
  int64_t left;
  if (l == NULL)
    return 0;
  if (l->started) {
    pthread_mutex_lock(&l->mu);
    l->stopping = 1;
    pthread_cond_signal(&l->cond);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->thread, NULL);
  }
  says_summary(l, 0, 1);
  left = l->spool.size - l->replay_off;
  if (left > 0)
    fprintf(stderr, "tollgate: ledger: stopping with %" PRId64 " bytes of records in %s, "
            "not yet in the database; the next start replays them\n", left, l->spool.path);
  free_ledger(l);
  return left;
}

size_t tg_ledger_backlog(const tg_ledger_t *l) {
  return atomic_load(&((tg_ledger_t *)l)->pending);
}

int64_t tg_ledger_spool_bytes(const tg_ledger_t *l) {
  return atomic_load(&((tg_ledger_t *)l)->spool_bytes);
}

int tg_ledger_db_up(const tg_ledger_t *l) {
  return atomic_load(&((tg_ledger_t *)l)->db_up);
}

int tg_ledger_losing(const tg_ledger_t *l) {
  int64_t at = atomic_load(&((tg_ledger_t *)l)->lost_at_us);
  return at != 0 && mono_us() - at < TG_LEDGER_LOSING_MS * 1000;
}

void tg_ledger_stats(const tg_ledger_t *l, tg_ledger_stats_t *out) {
  tg_ledger_t *m = (tg_ledger_t *)l;
  out->transactions = atomic_load(&m->st.transactions);
  out->committed = atomic_load(&m->st.committed);
  out->spooled = atomic_load(&m->st.spooled);
  out->replayed = atomic_load(&m->st.replayed);
  out->spool_skipped = atomic_load(&m->st.spool_skipped);
  out->spool_damaged = atomic_load(&m->st.spool_damaged);
  out->db_failures = atomic_load(&m->st.db_failures);
  out->lost = atomic_load(&m->st.lost);
  out->refused = atomic_load(&m->st.refused);
  out->rejected = atomic_load(&m->st.rejected);
}

/* ---- queries ---- */

int tg_ledger_db_open(const char *database, const char *data_dir,
                      tg_ledger_db_t **out) {
  return tg_ledger_db_open_wake(database, data_dir, -1, out);
}

int tg_ledger_db_open_wake(const char *database, const char *data_dir, int wake_fd,
                           tg_ledger_db_t **out) {
  const tg__ledger_backend_t *be;
  tg__ledger_conn_opts_t co = {.busy_timeout_ms = 5000, .writer = 0,
                               .wake_fd = wake_fd >= 0 ? &wake_fd : NULL};
  tg_ledger_db_t *d;
  int rc;

  *out = NULL;
  if (data_dir == NULL || *data_dir == '\0')
    return TG_EINVAL;
  if ((rc = find_backend(database, &be)) != 0)
    return rc;
  d = calloc(1, sizeof(*d));
  if (d == NULL)
    return TG_ENOMEM;
  d->be = be;
  if ((rc = be->open(database, data_dir, &co, &d->conn)) != 0) {
    free(d);
    return rc;
  }
  *out = d;
  return 0;
}

void tg_ledger_db_close(tg_ledger_db_t *d) {
  if (d == NULL)
    return;
  d->be->close(d->conn);
  free(d);
}

int tg_ledger_usage_by_model(tg_ledger_db_t *d, const char *tenant,
                             int64_t from_ms, int64_t to_ms,
                             tg_usage_row_t **rows, size_t *n) {
  *rows = NULL;
  *n = 0;
  if (d == NULL || tenant == NULL)
    return TG_EINVAL;
  return d->be->usage_by_model(d->conn, tenant, from_ms, to_ms, rows, n);
}

int tg_ledger_spend_by_tenant(tg_ledger_db_t *d, int64_t from_ms, int64_t to_ms,
                              tg_spend_row_t **rows, size_t *n) {
  *rows = NULL;
  *n = 0;
  if (d == NULL)
    return TG_EINVAL;
  return d->be->spend_by_tenant(d->conn, from_ms, to_ms, rows, n);
}

/* First millisecond of the month before now's: what a purge never reaches,
 * since the current and the previous month may still be invoiced. */
static int64_t purge_floor_ms(int64_t now_ms) {
  return tg_month_end_ms(tg_month_of(now_ms) - 2);
}

int64_t tg_ledger_retention_cutoff_ms(int64_t now_ms, int retention_days) {
  int64_t days = retention_days > 0 ? retention_days
                                    : TG_LEDGER_RETENTION_DAYS_DEFAULT;
  int64_t cut = now_ms - days * INT64_C(86400000);
  int64_t floor_ms = purge_floor_ms(now_ms);
  return cut < floor_ms ? cut : floor_ms;
}

int tg_ledger_purge(tg_ledger_db_t *d, const char *tenant, int64_t before_ms,
                    int64_t *deleted) {
  int64_t floor_ms = purge_floor_ms(wall_ms());
  if (deleted != NULL)
    *deleted = 0;
  if (d == NULL)
    return TG_EINVAL;
  if (before_ms > floor_ms)
    before_ms = floor_ms;
  if (tenant == NULL) {
    /* Tenant by tenant, through the (tenant, ts_ms) index. */
    tg_spend_row_t *t = NULL;
    size_t n = 0;
    int64_t total = 0, k = 0;
    int rc = d->be->tenants_before(d->conn, before_ms, &t, &n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
      rc = d->be->purge(d->conn, t[i].tenant, before_ms, &k);
      total += k;
    }
    free(t);
    if (deleted != NULL)
      *deleted = total;
    return rc;
  }
  return d->be->purge(d->conn, tenant, before_ms, deleted);
}

int tg_ledger_db_secret(tg_ledger_db_t *d, const char *name, char *out, size_t size) {
  unsigned char raw[32];
  char candidate[2 * sizeof(raw) + 1];

  if (d == NULL || size == 0)
    return TG_EINVAL;
  if (RAND_bytes(raw, (int)sizeof(raw)) != 1)
    return TG_EIO;
  tg_hex_encode(raw, sizeof(raw), candidate);
  candidate[2 * sizeof(raw)] = '\0';
  OPENSSL_cleanse(raw, sizeof(raw));
  return d->be->secret(d->conn, name, candidate, out, size);
}

int tg_ledger_count(tg_ledger_db_t *d, const char *tenant, int64_t *n) {
  *n = 0;
  if (d == NULL)
    return TG_EINVAL;
  return d->be->count(d->conn, tenant, n);
}

int tg_ledger_purge_expired(tg_ledger_db_t *d, int64_t now_ms,
                            tg_ledger_retention_fn days_of, void *arg,
                            int64_t *deleted) {
  tg_spend_row_t *t = NULL;
  size_t n = 0;
  int64_t total = 0;
  int rc;

  if (deleted != NULL)
    *deleted = 0;
  if (d == NULL)
    return TG_EINVAL;
  /* Only tenants with records older than the previous month can have
   * anything to purge. */
  rc = d->be->tenants_before(d->conn, purge_floor_ms(now_ms), &t, &n);
  for (size_t i = 0; rc == 0 && i < n; i++) {
    int days = days_of != NULL ? days_of(arg, t[i].tenant) : 0;
    int64_t k = 0;
    rc = tg_ledger_purge(d, t[i].tenant,
                         tg_ledger_retention_cutoff_ms(now_ms, days), &k);
    total += k;
  }
  free(t);
  if (deleted != NULL)
    *deleted = total;
  return rc;
}
