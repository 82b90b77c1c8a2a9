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

static void test_named_pass_fails_once(void **state) {
  (void)state;
#ifdef TG_FAULTS
  /* b: the second pass; a: the first; the rest does not parse. */
  setenv("TG_FAULTS", "b:2,a:1,:3,c,d:x,e:0,f:2x", 1);
  assert_int_equal(tg_fault("a"), 1);
  assert_int_equal(tg_fault("a"), 0);
  assert_int_equal(tg_fault("a"), 0);
  assert_int_equal(tg_fault("b"), 0);
  assert_int_equal(tg_fault("b"), 1);
  assert_int_equal(tg_fault("b"), 0);
  for (int i = 0; i < 5; i++) {
    assert_int_equal(tg_fault("c"), 0);
    assert_int_equal(tg_fault("d"), 0);
    assert_int_equal(tg_fault("e"), 0);
    assert_int_equal(tg_fault("f"), 0);
    assert_int_equal(tg_fault("upstream_hold"), 0);
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
