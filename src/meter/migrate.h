/* `tollgate migrate`: brings the configured database's schema up to date
 * ahead of a gateway's start, without the time limit a start has. */
#ifndef TG_METER_MIGRATE_H
#define TG_METER_MIGRATE_H

/* `tollgate migrate --config FILE [--timeout SECONDS]`. Exit status: 0 up
 * to date (migrated now or before), 1 failed, 2 bad usage. */
int tg_cmd_migrate(int argc, char **argv);

#endif
