/* The data_dir's owner lock. A data_dir's ledger spool has one writer: the
 * gateway that holds an exclusive flock on <data_dir>/tollgate.lock for
 * its whole life (docs/ledger.md, "One gateway per data_dir"). The file
 * names the holder: "PID\n" while it serves, "PID draining\n" once it has
 * been told to stop, so a successor can tell a rolling restart (wait) from
 * a second gateway pointed at the same directory (refuse).
 *
 * The lock is the kernel's: it goes with the process, however the process
 * ends (kill -9 included). The descriptor is O_CLOEXEC and the gateway
 * forks nothing, so no child holds it. The file is never removed: removing
 * a lock file lets two processes lock two different files of one name. */
#ifndef TG_METER_DATALOCK_H
#define TG_METER_DATALOCK_H

/* File name of the lock inside data_dir. */
#define TG_DATALOCK_FILE "tollgate.lock"

/* What the lock's file says about the process that holds it. */
typedef struct tg_datalock_holder_s {
  long pid;     /* 0: the file does not say (yet) */
  int draining; /* 1: the holder is stopping */
} tg_datalock_holder_t;

/* Tries once, without waiting, to lock <data_dir>/tollgate.lock (created
 * with mode 0600; data_dir and its parents with 0700 when missing).
 * Returns 0 and *fd, the locked descriptor, whose file now names this
 * process as serving: the caller keeps it open for as long as it owns the
 * data_dir, and closes it (tg_datalock_release) to let go. Returns
 * TG_EBUSY when another process holds the lock, with *holder read from the
 * file; TG_EIO (errno set) or TG_EINVAL otherwise. *fd is -1 on failure. */
int tg_datalock_try(const char *data_dir, int *fd, tg_datalock_holder_t *holder);

/* Marks the file of a lock fd holds: this process is draining. A failure
 * to write only makes a successor refuse instead of wait, so none is
 * reported. */
void tg_datalock_draining(int fd);

/* Releases the lock (closes fd); -1 is ignored. */
void tg_datalock_release(int fd);

#endif
