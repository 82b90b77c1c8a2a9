/* Invoices and daily spend built from the ledger (the seed's shapes). */
#ifndef TG_METER_INVOICE_H
#define TG_METER_INVOICE_H

#include <stdint.h>

#include "meter/ledger.h"

/* "YYYY-MM" / "YYYY-MM-DD" to [from_ms, to_ms) in UTC. 0 or TG_EPARSE. */
int tg_month_range(const char *month, int64_t *from_ms, int64_t *to_ms);
int tg_day_range(const char *day, int64_t *from_ms, int64_t *to_ms);

/* The same for a period asked for at now_ms (Unix ms): a month (month != 0)
 * or a day. TG_EPARSE when period is not one; TG_EINVAL when it begins
 * after now (past a stepped clock's allowance, TG_CLOCK_STEP_BACK_MAX_MS):
 * no record can be in it yet, and an empty invoice for 2062-01 typed for
 * 2026-01 would pass for a true one. */
int tg_period_range(const char *period, int month, int64_t now_ms, int64_t *from_ms,
                    int64_t *to_ms);

/* The tenant's invoice for month ("YYYY-MM"), as JSON (csv = 0) or CSV.
 * *out is malloc'd text the caller frees. Returns 0 or a negative error. */
int tg_invoice_build(tg_ledger_db_t *db, const char *tenant, const char *month, int csv,
                     char **out);

/* The tenant's spend on day ("YYYY-MM-DD") as one JSON object. */
int tg_usage_build(tg_ledger_db_t *db, const char *tenant, const char *day, char **out);

/* `tollgate invoice ...` and `tollgate usage ...`. */
int tg_cmd_invoice(int argc, char **argv);
int tg_cmd_usage(int argc, char **argv);

#endif
