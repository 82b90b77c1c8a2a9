/* The data_dir's owner lock (datalock.h): one flock'ed file a data_dir,
 * naming the process that holds it and whether it is draining. */
#define _GNU_SOURCE
#include "meter/datalock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "core/err.h"
#include "meter/db_sqlite.h"

/* Reads "PID[ draining]\n". A file being rewritten may read empty or
 * short: the pid is then 0, and the holder counts as serving. */
static void read_holder(int fd, tg_datalock_holder_t *h) {
  char buf[64], *end;
  ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
  long pid;

  h->pid = 0;
  h->draining = 0;
  if (n <= 0)
    return;
  buf[n] = '\0';
  errno = 0;
  pid = strtol(buf, &end, 10);
  if (errno != 0 || end == buf || pid <= 0)
    return;
  h->pid = pid;
  h->draining = strncmp(end, " draining\n", 10) == 0;
}

/* Writes text over the whole file. Best effort: a holder the file does not
 * name is only named "unknown" to a successor. */
static void say(int fd, const char *text) {
  if (ftruncate(fd, 0) != 0)
    return;
  if (pwrite(fd, text, strlen(text), 0) < 0)
    return;
}

int tg_datalock_try(const char *data_dir, int *fd, tg_datalock_holder_t *holder) {
  char path[PATH_MAX], text[32];
  int n, rc;

  *fd = -1;
  holder->pid = 0;
  holder->draining = 0;
  if (data_dir == NULL || *data_dir == '\0')
    return TG_EINVAL;
  n = snprintf(path, sizeof(path), "%s/%s", data_dir, TG_DATALOCK_FILE);
  if (n < 0 || (size_t)n >= sizeof(path))
    return TG_EINVAL;
  if ((rc = tg_db_make_data_dir(data_dir)) != 0)
    return rc;
  /* not O_TRUNC: the file names the holder until this process holds it */
  n = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (n < 0)
    return TG_EIO;
  if (flock(n, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    rc = e == EWOULDBLOCK ? TG_EBUSY : TG_EIO;
    if (rc == TG_EBUSY)
      read_holder(n, holder);
    close(n);
    errno = e;
    return rc;
  }
  snprintf(text, sizeof(text), "%ld\n", (long)getpid());
  say(n, text);
  *fd = n;
  return 0;
}

void tg_datalock_draining(int fd) {
  char text[32];
  if (fd < 0)
    return;
  /* longer than "PID\n" and over it, so a reader sees one or the other */
  snprintf(text, sizeof(text), "%ld draining\n", (long)getpid());
  if (pwrite(fd, text, strlen(text), 0) < 0)
    return;
}

void tg_datalock_release(int fd) {
  if (fd >= 0)
    close(fd);
}
