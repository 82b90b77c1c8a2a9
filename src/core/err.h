/* Error codes of the project: 0 or a negative code, one table, one string
 * function. libuv codes (also negative) pass through unchanged and are told
 * apart by range: ours sit below TG__ERR_BASE. */
#ifndef TG_CORE_ERR_H
#define TG_CORE_ERR_H

#define TG__ERR_BASE (-20000)

#define TG_ERR_MAP(XX)                                                        \
  XX(NOMEM,     "out of memory")                                              \
  XX(INVAL,     "invalid argument")                                           \
  XX(TOOBIG,    "value exceeds its bound")                                    \
  XX(PARSE,     "parse error")                                                \
  XX(NOTFOUND,  "not found")                                                  \
  XX(EXISTS,    "already exists")                                             \
  XX(IO,        "input/output error")                                         \
  XX(DB,        "database error")                                             \
  XX(CONFIG,    "configuration error")                                        \
  XX(AUTH,      "authentication failed")                                      \
  XX(FORBIDDEN, "forbidden")                                                  \
  XX(UPSTREAM,  "upstream error")                                             \
  XX(TIMEDOUT,  "timed out")                                                  \
  XX(CANCELED,  "canceled")                                                   \
  XX(UNAVAIL,   "unavailable")                                                \
  XX(REJECTED,  "refused by the database's rules")                            \
  XX(BUSY,      "in use by another process")

typedef enum {
  TG_OK = 0,
  TG__ERR_FIRST = TG__ERR_BASE,
#define XX(name, _) TG_E##name,
  TG_ERR_MAP(XX)
#undef XX
  TG__ERR_LAST
} tg_err_t;

/* Returns a static string for a project or libuv error code. */
const char *tg_strerror(int err);

#endif
