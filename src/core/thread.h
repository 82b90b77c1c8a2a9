/* Names for the gateway's threads, so `top -H`, `ps -L` and perf tell a
 * loop from the ledger's writer. */
#ifndef TG_CORE_THREAD_H
#define TG_CORE_THREAD_H

/* Names the calling thread (at most 15 bytes are kept; longer is cut). */
void tg_thread_name(const char *name);

#endif
