/* Failure injection (src/core/fault.c): $TG_FAULTS names the pass of each
 * site that fails; every other pass and every other site goes through, and
 * entries that do not parse are ignored. The variable is read at the first
 * call, so this process sets it first. Without TG_FAULTS (a build other
 * than the sanitizer one) tg_fault() is the constant 0. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "core/fault.h"

/* Passes in order and what each one answers. */
static const struct {
  const char *site;
  int fails;
} passes[] = {
  {"a", 1}, {"a", 0}, {"a", 0},            /* a: the first pass only */
  {"b", 0}, {"b", 1}, {"b", 0},            /* b: the second pass only */
  {"c", 0}, {"d", 0}, {"e", 0}, {"f", 0},  /* entries that do not parse */
  {"c", 0}, {"d", 0}, {"e", 0}, {"f", 0},
  {"upstream_hold", 0},                    /* a site not named */
};

static void test_named_pass_fails_once(void **state) {
  (void)state;
#ifdef TG_FAULTS
  setenv("TG_FAULTS", "b:2,a:1,:3,c,d:x,e:0,f:2x", 1);
  for (size_t i = 0; i < sizeof(passes) / sizeof(passes[0]); i++) {
    if (tg_fault(passes[i].site) != passes[i].fails)
      fail_msg("pass %zu of site %s: expected %d", i, passes[i].site,
               passes[i].fails);
  }
#else
  assert_int_equal(tg_fault("a"), 0);
#endif
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_named_pass_fails_once),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
