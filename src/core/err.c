/* Strings for the error table in err.h; libuv's codes go to uv_strerror. */
#include "core/err.h"

#include <uv.h>

const char *tg_strerror(int err) {
  switch (err) {
  case TG_OK: return "success";
#define XX(name, s) case TG_E##name: return s;
  TG_ERR_MAP(XX)
#undef XX
  default: break;
  }
  if (err < 0 && err > TG__ERR_BASE)
    return uv_strerror(err);
  return "unknown error";
}
