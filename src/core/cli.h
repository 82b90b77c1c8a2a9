/* The options of the one-word commands (serve, check-config, invoice,
 * usage, migrate), read alike: "--name VALUE" or "--name=VALUE" (and a
 * short alias such as "-c VALUE"), each at most once; "--help" or "-h"
 * asks for the command's usage. `keys`, with its flags and positional ids,
 * reads its own (src/auth/cmd_keys.c). */
#ifndef TG_CORE_CLI_H
#define TG_CORE_CLI_H

typedef struct {
  const char *name;   /* "--config" */
  const char *alias;  /* "-c", or NULL */
  const char **value; /* set to the value given; left as is when absent */
} tg_cli_opt_t;

#define TG_CLI_HELP 1

/* Reads argv[1..argc) (argv[0] is the command, cmd) against opts, which ends
 * with an entry whose name is NULL. Returns 0; TG_CLI_HELP when --help or -h
 * was given (the caller prints its usage on stdout and exits 0); or -1
 * after naming on stderr what is wrong ("tollgate CMD: unknown option
 * '--x'", "... --config given twice", "... --config needs a value",
 * "... unexpected argument 'x'"): the caller prints its usage on stderr
 * and exits 2. */
int tg_cli_parse(const char *cmd, int argc, char **argv, const tg_cli_opt_t *opts);

#endif
