/* Failure injection for tests (curl's and SQLite's habit): a branch that
 * only runs when the system refuses (malloc() returning NULL) is driven by
 * a test instead of left untested.
 *
 * In a build with TG_FAULTS defined (the sanitizer build, which `make test`
 * uses), tg_fault(site) tells the code at that site to act as if its
 * resource were refused, on the pass $TG_FAULTS asks for:
 *
 *   TG_FAULTS=upstream_hold:1             the site's first pass fails
 *   TG_FAULTS=upstream_hold:3,other:1     several sites, each once
 *
 * Passes are counted per site across threads; every other pass, and every
 * site not named, goes through. In any other build tg_fault() is the
 * constant 0: the site compiles to its plain code.
 *
 * tg_fault_stall(site) blocks the calling thread for TG_FAULT_STALL_MS on
 * the pass $TG_FAULTS asks for: a loop stuck in a callback.
 *
 * Sites: upstream_hold (src/upstream/h1client.c, the copy of a paused
 * answer's unread bytes); worker_stall (src/api/proxy.c, an API request's
 * arrival: its worker's loop blocks, which /healthz reports);
 * ledger_file_sync and ledger_dir_sync (src/meter/ledger.c, the fsync of an
 * appended spool or rejected file and of its directory). */
#ifndef TG_CORE_FAULT_H
#define TG_CORE_FAULT_H

#define TG_FAULT_STALL_MS 3000

#ifdef TG_FAULTS
int tg_fault(const char *site);
void tg_fault_stall(const char *site);
/* Replaces the sites $TG_FAULTS named with those of spec (the same form;
 * NULL: none), each counting its passes from 0 again: for a test process
 * whose cases each want their own. Call while no other thread can be in
 * tg_fault(). */
void tg_fault_set(const char *spec);
#else
#define tg_fault(site) ((void)(site), 0)
#define tg_fault_stall(site) ((void)(site))
#define tg_fault_set(spec) ((void)(spec))
#endif

#endif
