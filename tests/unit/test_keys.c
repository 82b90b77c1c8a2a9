/* Virtual keys: format, strict parsing, verification against an injected
 * clock, the keyset table, the SQLite store (what is and is not at rest,
 * migrations) and the watcher that brings a change to a running gateway. */
#define _GNU_SOURCE /* memmem, nftw */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <fcntl.h>
#include <jansson.h>
#include <sqlite3.h>

#include "auth/key.h"
#include "auth/keystore.h"
#include "config/config.h"
#include "core/err.h"
#include "meter/db_sqlite.h"

/* ---- helpers ---- */

static int rm_entry(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw) {
  (void)sb; (void)flag; (void)ftw;
  return remove(path);
}

static void rm_tree(const char *dir) {
  nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

typedef struct {
  char dir[64];
} tmp_t;

static int tmp_setup(void **state) {
  tmp_t *t = calloc(1, sizeof(*t));
  if (t == NULL)
    return -1;
  memcpy(t->dir, "/tmp/tg-keys-XXXXXX", sizeof("/tmp/tg-keys-XXXXXX"));
  if (mkdtemp(t->dir) == NULL) {
    free(t);
    return -1;
  }
  *state = t;
  return 0;
}

static int tmp_teardown(void **state) {
  tmp_t *t = *state;
  rm_tree(t->dir);
  free(t);
  return 0;
}

static double mono_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static int is_lower_hex(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
      return 0;
  return 1;
}

/* A record for a generated key, as a store would load it. */
static void make_rec(tg_key_rec_t *rec, char key[TG_KEY_LEN + 1]) {
  char id[TG_KEY_ID_LEN + 1];
  memset(rec, 0, sizeof(*rec));
  assert_int_equal(tg_key_generate(key, id, rec->secret_sha256), 0);
  memcpy(rec->id, id, sizeof(id));
  assert_int_equal(tg_key_id_parse(id, TG_KEY_ID_LEN, &rec->id_num), 0);
}

/* ---- format ---- */

static void test_generate_parse_roundtrip(void **state) {
  char key[TG_KEY_LEN + 1], key2[TG_KEY_LEN + 1];
  char id[TG_KEY_ID_LEN + 1], id2[TG_KEY_ID_LEN + 1];
  uint8_t hash[TG_KEY_HASH_LEN], hash2[TG_KEY_HASH_LEN], h[TG_KEY_HASH_LEN];
  tg_key_parts_t parts;
  (void)state;

  assert_int_equal(tg_key_generate(key, id, hash), 0);
  assert_int_equal(strlen(key), 64);
  assert_int_equal(TG_KEY_LEN, 64);
  assert_memory_equal(key, "tg-", 3);
  assert_int_equal(key[15], '-');
  assert_true(is_lower_hex(key + 3, 12));
  assert_true(is_lower_hex(key + 16, 48));
  assert_int_equal(strlen(id), 12);
  assert_memory_equal(id, key + 3, 12);

  assert_int_equal(tg_key_parse(key, strlen(key), &parts), 0);
  assert_ptr_equal(parts.id, key + 3);
  assert_ptr_equal(parts.secret, key + 16);
  /* The id's number is its hex value. */
  assert_int_equal(parts.id_num, strtoull(id, NULL, 16));

  /* The stored hash is SHA-256 of the secret text, nothing else. */
  assert_int_equal(tg_key_hash_secret(key + 16, 48, h), 0);
  assert_memory_equal(h, hash, TG_KEY_HASH_LEN);
  /* Known answer: SHA-256("abc"). */
  assert_int_equal(tg_key_hash_secret("abc", 3, h), 0);
  assert_memory_equal(h,
      "\xba\x78\x16\xbf\x8f\x01\xcf\xea\x41\x41\x40\xde\x5d\xae\x22\x23"
      "\xb0\x03\x61\xa3\x96\x17\x7a\x9c\xb4\x10\xff\x61\xf2\x00\x15\xad", 32);

  /* Two keys never share an id or a secret. */
  assert_int_equal(tg_key_generate(key2, id2, hash2), 0);
  assert_string_not_equal(id, id2);
  assert_memory_not_equal(key + 16, key2 + 16, 48);
  assert_memory_not_equal(hash, hash2, TG_KEY_HASH_LEN);
}

static void test_parse_rejects_malformed(void **state) {
  char good[TG_KEY_LEN + 1], id[TG_KEY_ID_LEN + 1], bad[TG_KEY_LEN + 8];
  uint8_t hash[TG_KEY_HASH_LEN];
  tg_key_parts_t parts;
  (void)state;

  assert_int_equal(tg_key_generate(good, id, hash), 0);

  static const char *const cases[] = {
    "",
    "tg-",
    "tg--",
    /* wrong prefix */
    "tk-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdef",
    "TG-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdef",
    "sk-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdef",
    /* short id (and so a separator in the wrong place) */
    "tg-0123456789a-0123456789abcdef0123456789abcdef0123456789abcdef0",
    /* non-hex in the id, in the secret, upper-case hex */
    "tg-0123456789ag-0123456789abcdef0123456789abcdef0123456789abcdef",
    "tg-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdeg",
    "tg-0123456789AB-0123456789abcdef0123456789abcdef0123456789abcdef",
    "tg-0123456789ab-0123456789ABCDEF0123456789abcdef0123456789abcdef",
    "tg-0123456789ab-0123456789abcdef 123456789abcdef0123456789abcdef",
    /* separator missing or replaced */
    "tg-0123456789ab_0123456789abcdef0123456789abcdef0123456789abcdef",
    "tg-0123456789ab00123456789abcdef0123456789abcdef0123456789abcdef",
    /* too short, too long */
    "tg-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcde",
    "tg-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdef0",
    "Bearer tg-0123456789ab-0123456789abcdef0123456789abcdef0123456789",
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    if (tg_key_parse(cases[i], strlen(cases[i]), &parts) != TG_EPARSE)
      fail_msg("accepted malformed key #%zu: \"%s\"", i, cases[i]);
  }
  /* The same shape with valid characters is accepted: the cases above fail
   * for the reason they show. */
  assert_int_equal(tg_key_parse(
      "tg-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdef", 64,
      &parts), 0);
  assert_int_equal(parts.id_num, UINT64_C(0x0123456789ab));

  assert_int_equal(tg_key_parse(NULL, 0, &parts), TG_EPARSE);
  /* Bounded: a length one short of a valid key is refused even though the
   * bytes after it would complete the key ... */
  assert_int_equal(tg_key_parse(good, TG_KEY_LEN - 1, &parts), TG_EPARSE);
  /* ... and a valid key followed by more bytes in the buffer is read only up
   * to the length given (a header value is not NUL-terminated). */
  memcpy(bad, good, TG_KEY_LEN);
  memcpy(bad + TG_KEY_LEN, "\r\nXYZ!!", 8);
  assert_int_equal(tg_key_parse(bad, TG_KEY_LEN, &parts), 0);
  assert_int_equal(tg_key_parse(bad, TG_KEY_LEN + 2, &parts), TG_EPARSE);
  /* A NUL inside the key is a non-hex byte. */
  memcpy(bad, good, TG_KEY_LEN + 1);
  bad[40] = '\0';
  assert_int_equal(tg_key_parse(bad, TG_KEY_LEN, &parts), TG_EPARSE);

  assert_int_equal(tg_key_id_parse("0123456789ab", 12, &parts.id_num), 0);
  assert_int_equal(tg_key_id_parse("0123456789a", 11, &parts.id_num),
                   TG_EPARSE);
  assert_int_equal(tg_key_id_parse("0123456789aB", 12, &parts.id_num),
                   TG_EPARSE);
}

/* ---- verification with an injected clock ---- */

static void test_verify_injected_clock(void **state) {
  char key[TG_KEY_LEN + 1], wrong[TG_KEY_LEN + 1];
  tg_key_rec_t rec;
  tg_key_parts_t parts, wparts;
  (void)state;

  make_rec(&rec, key);
  assert_int_equal(tg_key_parse(key, TG_KEY_LEN, &parts), 0);

  /* Good key, no expiry: accepted at any time. */
  assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_OK);
  assert_int_equal(tg_key_verify(&rec, &parts, INT64_MAX), TG_KEY_OK);

  /* Wrong secret: the last hex digit changed. */
  memcpy(wrong, key, sizeof(wrong));
  wrong[TG_KEY_LEN - 1] = wrong[TG_KEY_LEN - 1] == '0' ? '1' : '0';
  assert_int_equal(tg_key_parse(wrong, TG_KEY_LEN, &wparts), 0);
  assert_int_equal(tg_key_verify(&rec, &wparts, 1000), TG_KEY_BAD_SECRET);

  /* Expiry: valid up to the second before expires_at, refused from it on. */
  rec.expires_at = 2000;
  assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_OK);
  assert_int_equal(tg_key_verify(&rec, &parts, 1999), TG_KEY_OK);
  assert_int_equal(tg_key_verify(&rec, &parts, 2000), TG_KEY_EXPIRED);
  assert_int_equal(tg_key_verify(&rec, &parts, 2001), TG_KEY_EXPIRED);
  /* A wrong secret learns nothing about the key's state. */
  assert_int_equal(tg_key_verify(&rec, &wparts, 2001), TG_KEY_BAD_SECRET);

  /* Revoked: refused whatever the clock says; revocation outranks expiry. */
  rec.expires_at = 0;
  rec.revoked_at = 1500;
  assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_REVOKED);
  assert_int_equal(tg_key_verify(&rec, &parts, 1600), TG_KEY_REVOKED);
  rec.expires_at = 1200;
  assert_int_equal(tg_key_verify(&rec, &parts, 1600), TG_KEY_REVOKED);
  assert_int_equal(tg_key_verify(&rec, &wparts, 1600), TG_KEY_BAD_SECRET);

  assert_string_equal(tg_key_verdict_str(TG_KEY_EXPIRED), "expired");
  assert_string_equal(tg_key_verdict_str(TG_KEY_UNKNOWN), "unknown_key");
}

/* A verified secret is remembered per thread so it is not hashed again;
 * what is remembered must never accept what hashing would refuse. */
static void test_verify_memory_never_widens(void **state) {
  char key[TG_KEY_LEN + 1], other[TG_KEY_LEN + 1], wrong[TG_KEY_LEN + 1];
  tg_key_rec_t rec, rec2, recreated;
  tg_key_parts_t parts, parts2, wparts;
  (void)state;

  make_rec(&rec, key);
  assert_int_equal(tg_key_parse(key, TG_KEY_LEN, &parts), 0);
  /* a wrong secret first: refused, and not remembered */
  memcpy(wrong, key, sizeof(wrong));
  wrong[TG_KEY_LEN - 1] = wrong[TG_KEY_LEN - 1] == '0' ? '1' : '0';
  assert_int_equal(tg_key_parse(wrong, TG_KEY_LEN, &wparts), 0);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(tg_key_verify(&rec, &wparts, 1000), TG_KEY_BAD_SECRET);
    assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_OK);
  }
  /* the same id with another hash (the key re-created): the remembered
   * secret no longer matches the record */
  recreated = rec;
  recreated.secret_sha256[0] ^= 1;
  assert_int_equal(tg_key_verify(&recreated, &parts, 1000), TG_KEY_BAD_SECRET);
  assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_OK);
  /* revocation and expiry are read from the record every time */
  rec.revoked_at = 1;
  assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_REVOKED);
  rec.revoked_at = 0;
  rec.expires_at = 1000;
  assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_EXPIRED);
  rec.expires_at = 0;

  /* two keys sharing a slot (ids 64 apart) take turns: each still verifies,
   * and neither's secret passes for the other */
  make_rec(&rec2, other);
  assert_int_equal(tg_key_parse(other, TG_KEY_LEN, &parts2), 0);
  parts2.id_num = rec2.id_num = rec.id_num + 64;
  for (int i = 0; i < 3; i++) {
    assert_int_equal(tg_key_verify(&rec, &parts, 1000), TG_KEY_OK);
    assert_int_equal(tg_key_verify(&rec2, &parts2, 1000), TG_KEY_OK);
  }
  parts2.secret = parts.secret;
  assert_int_equal(tg_key_verify(&rec2, &parts2, 1000), TG_KEY_BAD_SECRET);
  assert_int_equal(tg_key_verify(&rec2, &parts2, 1000), TG_KEY_BAD_SECRET);
}

/* ---- keyset ---- */

static void test_keyset_lookup_and_bounds(void **state) {
  enum { N = 3000 };
  char (*keys)[TG_KEY_LEN + 1] = calloc(N, sizeof(*keys));
  tg_keyset_t *ks = NULL, *tiny = NULL;
  const tg_key_rec_t *found;
  tg_key_rec_t rec, dup;
  char **models;
  size_t n;
  (void)state;

  assert_non_null(keys);
  assert_int_equal(tg__keyset_new(N, &ks), 0);
  for (int i = 0; i < N; i++) {
    make_rec(&rec, keys[i]);
    rec.tenant = strdup(i % 2 ? "acme-corp" : "startup-xyz");
    rec.name = strdup("");
    assert_int_equal(tg__key_models_split(i % 3 ? "" : "llama-3.1-8b",
                                          &rec.models, &rec.n_models), 0);
    rec.expires_at = i % 5 == 0 ? 5000 : 0;
    assert_int_equal(tg__keyset_add(ks, &rec), 0);
    assert_null(rec.tenant);  /* ownership moved */
  }
  assert_int_equal(tg_keyset_count(ks), N);

  /* Every key is found and verified by its own text, with its own tenant. */
  for (int i = 0; i < N; i++) {
    assert_int_equal(tg_keyset_verify(ks, keys[i], TG_KEY_LEN, 4000, &found),
                     TG_KEY_OK);
    assert_non_null(found);
    assert_memory_equal(found->id, keys[i] + 3, 12);
    assert_string_equal(found->tenant, i % 2 ? "acme-corp" : "startup-xyz");
    assert_int_equal(tg_key_allows_model(found, "llama-3.1-70b"), i % 3 != 0);
    assert_true(tg_key_allows_model(found, "llama-3.1-8b"));
    assert_int_equal(tg_keyset_verify(ks, keys[i], TG_KEY_LEN, 5000, NULL),
                     i % 5 == 0 ? TG_KEY_EXPIRED : TG_KEY_OK);
  }
  /* Unknown id, malformed text. */
  assert_int_equal(tg_keyset_verify(ks,
      "tg-000000000000-0123456789abcdef0123456789abcdef0123456789abcdef", 64,
      4000, &found), TG_KEY_UNKNOWN);
  assert_null(found);
  assert_int_equal(tg_keyset_verify(ks, "tg-nope", 7, 4000, &found),
                   TG_KEY_MALFORMED);
  assert_null(found);
  assert_null(tg_keyset_find(ks, "000000000000", 12));
  assert_non_null(tg_keyset_find(ks, keys[7] + 3, 12));
  assert_int_equal(tg_keyset_verify(NULL, keys[0], TG_KEY_LEN, 0, NULL),
                   TG_KEY_UNKNOWN);

  /* Duplicate ids and a full set are refused; bounds hold. */
  assert_int_equal(tg__keyset_new(1, &tiny), 0);
  make_rec(&rec, keys[0]);
  dup = rec;
  rec.tenant = strdup("a");
  assert_int_equal(tg__keyset_add(tiny, &rec), 0);
  dup.tenant = strdup("b");
  assert_int_equal(tg__keyset_add(tiny, &dup), TG_ETOOBIG);
  assert_null(dup.tenant);
  tg_keyset_release(tiny);
  assert_int_equal(tg__keyset_new(2, &tiny), 0);
  make_rec(&rec, keys[0]);
  dup = rec;
  assert_int_equal(tg__keyset_add(tiny, &rec), 0);
  assert_int_equal(tg__keyset_add(tiny, &dup), TG_EEXISTS);
  tg_keyset_release(tiny);
  assert_int_equal(tg__keyset_new(TG_KEYSET_MAX_KEYS + 1, &tiny), TG_ETOOBIG);

  /* References: the set lives until the last holder lets go. */
  assert_ptr_equal(tg_keyset_ref(ks), ks);
  tg_keyset_release(ks);
  assert_int_equal(tg_keyset_count(ks), N);
  tg_keyset_release(ks);
  tg_keyset_release(NULL);

  /* Model lists. */
  assert_int_equal(tg__key_models_split("a,b,a", &models, &n), 0);
  assert_int_equal(n, 2);
  assert_string_equal(models[0], "a");
  assert_string_equal(models[1], "b");
  free(models[0]);
  free(models[1]);
  free(models);
  assert_int_equal(tg__key_models_split("", &models, &n), 0);
  assert_int_equal(n, 0);
  assert_null(models);
  assert_int_equal(tg__key_models_split("a,,b", &models, &n), TG_EPARSE);
  assert_int_equal(tg__key_models_split("a,", &models, &n), TG_EPARSE);
  {
    char many[65 * 4 + 1];
    size_t off = 0;
    for (int i = 0; i < 65; i++)
      off += (size_t)snprintf(many + off, sizeof(many) - off, "%s%03d",
                              i ? "," : "", i);
    assert_int_equal(tg__key_models_split(many, &models, &n), TG_ETOOBIG);
  }
  free(keys);
}

/* ---- store ---- */

static const char *const SCOPE_8B[] = {"llama-3.1-8b", "nomic-embed-text"};

static void test_store_create_list_revoke(void **state) {
  tmp_t *t = *state;
  char data[PATH_MAX], ida[TG_KEY_ID_LEN + 1], idb[TG_KEY_ID_LEN + 1];
  char *ka = NULL, *kb = NULL;
  tg_keystore_t *st = NULL;
  tg_key_info_t *list = NULL;
  tg_keyset_t *set = NULL;
  const tg_key_rec_t *rec;
  struct stat sb;
  size_t n, skipped = 99;
  const int64_t now = 1700000000;

  /* data_dir is created, parents too, private to its owner. */
  snprintf(data, sizeof(data), "%s/var/data", t->dir);
  assert_int_equal(tg_keystore_open(data, &st), 0);
  assert_int_equal(stat(data, &sb), 0);
  assert_int_equal(sb.st_mode & 0777, 0700);

  tg_key_spec_t a = {.tenant = "acme-corp", .name = "ci", .models = SCOPE_8B,
                     .n_models = 2, .expires_at = 0};
  tg_key_spec_t b = {.tenant = "startup-xyz", .expires_at = now + 3600};
  assert_int_equal(tg_keystore_create(st, &a, now, &ka, ida), 0);
  assert_int_equal(tg_keystore_create(st, &b, now + 1, &kb, idb), 0);
  assert_memory_equal(ka + 3, ida, 12);
  assert_memory_equal(kb + 3, idb, 12);

  /* Invalid specs store nothing. */
  {
    char *k = NULL, id[TG_KEY_ID_LEN + 1];
    const char *const comma[] = {"a,b"};
    tg_key_spec_t e1 = {.tenant = ""};
    tg_key_spec_t e2 = {.tenant = "acme-corp", .models = comma, .n_models = 1};
    tg_key_spec_t e3 = {.tenant = "acme-corp", .expires_at = -5};
    assert_int_equal(tg_keystore_create(st, &e1, now, &k, id), TG_EINVAL);
    assert_int_equal(tg_keystore_create(st, &e2, now, &k, id), TG_EINVAL);
    assert_int_equal(tg_keystore_create(st, &e3, now, &k, id), TG_EINVAL);
    assert_null(k);
  }

  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, 2);
  assert_string_equal(list[0].id, ida);
  assert_string_equal(list[0].tenant, "acme-corp");
  assert_string_equal(list[0].name, "ci");
  assert_string_equal(list[0].models, "llama-3.1-8b,nomic-embed-text");
  assert_int_equal(list[0].created_at, now);
  assert_int_equal(list[0].expires_at, 0);
  assert_int_equal(list[0].revoked_at, 0);
  assert_string_equal(list[1].id, idb);
  assert_string_equal(list[1].tenant, "startup-xyz");
  assert_string_equal(list[1].name, "");
  assert_string_equal(list[1].models, "");
  assert_int_equal(list[1].created_at, now + 1);
  assert_int_equal(list[1].expires_at, now + 3600);
  tg_keystore_list_free(list, n);

  /* Revoke: once, twice (first time kept), unknown. */
  assert_int_equal(tg_keystore_revoke(st, ida, now + 10), 0);
  assert_int_equal(tg_keystore_revoke(st, ida, now + 20), 0);
  assert_int_equal(tg_keystore_revoke(st, "000000000000", now),
                   TG_ENOTFOUND);
  assert_int_equal(tg_keystore_revoke(st, "", now), TG_ENOTFOUND);
  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, 2);
  assert_int_equal(list[0].revoked_at, now + 10);
  assert_int_equal(list[1].revoked_at, 0);
  tg_keystore_list_free(list, n);

  /* The loaded snapshot answers as the gateway would. */
  assert_int_equal(tg_keystore_load(st, &set, &skipped), 0);
  assert_int_equal(skipped, 0);
  assert_int_equal(tg_keyset_count(set), 2);
  assert_int_equal(tg_keyset_verify(set, ka, strlen(ka), now + 30, &rec),
                   TG_KEY_REVOKED);
  assert_int_equal(tg_keyset_verify(set, kb, strlen(kb), now + 30, &rec),
                   TG_KEY_OK);
  assert_string_equal(rec->tenant, "startup-xyz");
  assert_int_equal(rec->n_models, 0);
  assert_int_equal(tg_keyset_verify(set, kb, strlen(kb), now + 3600, &rec),
                   TG_KEY_EXPIRED);
  rec = tg_keyset_find(set, ida, 12);
  assert_non_null(rec);
  assert_int_equal(rec->n_models, 2);
  assert_string_equal(rec->models[1], "nomic-embed-text");
  assert_string_equal(rec->name, "ci");
  tg_keyset_release(set);

  tg_keystore_key_free(ka);
  tg_keystore_key_free(kb);
  tg_keystore_close(st);
}

/* Rows written by other SQL than ours, with a time that is not a positive
 * whole number of seconds or a text holding a NUL byte, cannot be honoured
 * as written: such a key is left out of the keyset (refused), never read
 * as one with no revocation, no expiry, a scope of every model or another
 * tenant. */
static void test_load_refuses_rows_it_cannot_read_whole(void **state) {
  enum { N = 7 };
  static const char *const set_sql[N] = {
    "revoked_at = 'yes'",
    "revoked_at = 0",
    "revoked_at = 0.5",
    "expires_at = 'next year'",
    "expires_at = -1",
    "models = CAST(X'006c6c616d612d332e312d373062' AS TEXT)",
    "tenant = CAST(X'61636d652d636f7270006f74686572' AS TEXT)",
  };
  tmp_t *t = *state;
  char *keys[N + 1] = {0}, ids[N + 1][TG_KEY_ID_LEN + 1], sql[200];
  const char *const scope[] = {"llama-3.1-70b"};
  tg_keystore_t *st = NULL;
  tg_keyset_t *set = NULL;
  tg_key_info_t *list = NULL;
  const tg_key_rec_t *rec;
  sqlite3 *db = NULL;
  size_t skipped = 0, n = 0;
  const int64_t now = 1700000000;

  assert_int_equal(tg_keystore_open(t->dir, &st), 0);
  for (int i = 0; i <= N; i++) {
    tg_key_spec_t spec = {.tenant = "acme-corp", .models = scope, .n_models = 1};
    assert_int_equal(tg_keystore_create(st, &spec, now, &keys[i], ids[i]), 0);
  }
  assert_int_equal(tg_db_sqlite_open(&db, t->dir), 0);
  for (int i = 0; i < N; i++) {
    snprintf(sql, sizeof(sql), "UPDATE api_keys SET %s WHERE id = '%s'",
             set_sql[i], ids[i]);
    assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
  }
  sqlite3_close(db);

  assert_int_equal(tg_keystore_load(st, &set, &skipped), 0);
  assert_int_equal(skipped, N);
  assert_int_equal(tg_keyset_count(set), 1);
  for (int i = 0; i < N; i++) {
    assert_int_equal(tg_keyset_verify(set, keys[i], TG_KEY_LEN, now + 1, &rec),
                     TG_KEY_UNKNOWN);
  }
  /* the row left alone still verifies, with its scope */
  assert_int_equal(tg_keyset_verify(set, keys[N], TG_KEY_LEN, now + 1, &rec),
                   TG_KEY_OK);
  assert_int_equal(rec->n_models, 1);
  tg_keyset_release(set);

  /* `keys list` shows the unreadable times as revoked or expired, as the
   * gateway treats them */
  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, N + 1);
  for (size_t i = 0; i < n; i++) {
    for (int j = 0; j < 3; j++)
      if (strcmp(list[i].id, ids[j]) == 0)
        assert_true(list[i].revoked_at != 0);
    for (int j = 3; j < 5; j++)
      if (strcmp(list[i].id, ids[j]) == 0)
        assert_true(list[i].expires_at != 0 && list[i].expires_at < now);
  }
  tg_keystore_list_free(list, n);

  for (int i = 0; i <= N; i++)
    tg_keystore_key_free(keys[i]);
  tg_keystore_close(st);
}

/* Appends the bytes of every file in dir to buf. */
static size_t slurp_dir(const char *dir, unsigned char *buf, size_t cap) {
  DIR *d = opendir(dir);
  struct dirent *e;
  size_t off = 0;
  assert_non_null(d);
  while ((e = readdir(d)) != NULL) {
    char p[PATH_MAX];
    FILE *f;
    if (e->d_name[0] == '.')
      continue;
    snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
    f = fopen(p, "rb");
    if (f == NULL)
      continue;
    off += fread(buf + off, 1, cap - off, f);
    fclose(f);
  }
  closedir(d);
  return off;
}

static void test_store_holds_only_hash(void **state) {
  tmp_t *t = *state;
  enum { N = 5, CAP = 8 << 20 };
  char *keys[N], id[TG_KEY_ID_LEN + 1];
  uint8_t hash[TG_KEY_HASH_LEN];
  unsigned char *bytes = malloc(CAP);
  tg_keystore_t *st = NULL;
  tg_key_info_t *list;
  size_t n, len;
  tg_key_spec_t spec = {.tenant = "acme-corp", .name = "secret-check"};

  assert_non_null(bytes);
  assert_int_equal(tg_keystore_open(t->dir, &st), 0);
  for (int i = 0; i < N; i++)
    assert_int_equal(tg_keystore_create(st, &spec, 1000 + i, &keys[i], id), 0);
  /* The listing carries nothing of the secret either. */
  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, N);
  tg_keystore_list_free(list, n);
  tg_keystore_close(st);

  /* Read the database and any WAL/SHM beside it, as an attacker with the
   * disk would. */
  len = slurp_dir(t->dir, bytes, CAP);
  assert_true(len > 0);
  for (int i = 0; i < N; i++) {
    const char *secret = keys[i] + 16;
    /* The id is there (it is not secret) ... */
    assert_non_null(memmem(bytes, len, keys[i] + 3, 12));
    /* ... the secret's text is not, nor any 16-character piece of it ... */
    for (int off = 0; off + 16 <= 48; off += 16)
      if (memmem(bytes, len, secret + off, 16) != NULL)
        fail_msg("key %d: secret text found in the database files", i);
    /* ... and its SHA-256 is: the test reads the real rows. */
    assert_int_equal(tg_key_hash_secret(secret, 48, hash), 0);
    assert_non_null(memmem(bytes, len, hash, sizeof(hash)));
    tg_keystore_key_free(keys[i]);
  }
  free(bytes);
}

static int count_rows(sqlite3 *db, const char *sql) {
  sqlite3_stmt *s = NULL;
  int v = -1;
  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK);
  if (sqlite3_step(s) == SQLITE_ROW)
    v = sqlite3_column_int(s, 0);
  sqlite3_finalize(s);
  return v;
}

static void test_migrations_idempotent(void **state) {
  tmp_t *t = *state;
  sqlite3 *db = NULL;
  tg_keystore_t *st = NULL;
  tg_key_info_t *list;
  size_t n;
  char *key, id[TG_KEY_ID_LEN + 1];
  tg_key_spec_t spec = {.tenant = "internal-dev"};
  int latest = tg_db_sqlite_schema_version();

  assert_true(latest >= 1);
  assert_int_equal(tg_keystore_open(t->dir, &st), 0);
  assert_int_equal(tg_keystore_create(st, &spec, 42, &key, id), 0);
  tg_keystore_key_free(key);
  tg_keystore_close(st);

  /* Reopen twice: nothing applied again, nothing lost. */
  for (int round = 0; round < 2; round++) {
    assert_int_equal(tg_db_sqlite_open(&db, t->dir), 0);
    assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM schema_migrations"),
                     latest);
    assert_int_equal(count_rows(db, "SELECT MAX(version) FROM "
                                    "schema_migrations"), latest);
    assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM schema_migrations "
                                    "WHERE applied_at > 0"), latest);
    assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM api_keys"), 1);
    {
      sqlite3_stmt *s = NULL;
      assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &s,
                                          NULL), SQLITE_OK);
      assert_int_equal(sqlite3_step(s), SQLITE_ROW);
      assert_string_equal((const char *)sqlite3_column_text(s, 0), "wal");
      sqlite3_finalize(s);
    }
    /* SQLite does not count its memory (a global mutex every allocation
     * would take): the count stays 0 with a database open and used. */
    assert_int_equal(sqlite3_memory_used(), 0);
    sqlite3_close(db);
  }
  assert_int_equal(tg_keystore_open(t->dir, &st), 0);
  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, 1);
  assert_string_equal(list[0].id, id);
  assert_int_equal(list[0].created_at, 42);
  tg_keystore_list_free(list, n);
  tg_keystore_close(st);

  /* A database written by a newer binary is refused, not half-used. */
  assert_int_equal(tg_db_sqlite_open(&db, t->dir), 0);
  assert_int_equal(sqlite3_exec(db, "INSERT INTO schema_migrations VALUES "
                                    "(100000, 1)", NULL, NULL, NULL),
                   SQLITE_OK);
  sqlite3_close(db);
  assert_int_equal(tg_keystore_open(t->dir, &st), TG_EDB);
  assert_null(st);
}

/* ---- watcher ---- */

typedef struct {
  tg_keywatch_t *w;
  tg_keyset_t *set;
  uint64_t gen;
} worker_t;

/* What a gateway worker does per request: re-acquire only on a new
 * generation, read before acquiring. */
static tg_key_verdict_t worker_check(worker_t *wk, const char *key) {
  uint64_t g = tg_keywatch_generation(wk->w);
  if (g != wk->gen || wk->set == NULL) {
    tg_keyset_release(wk->set);
    wk->set = tg_keywatch_acquire(wk->w);
    wk->gen = g;
  }
  return tg_keyset_verify(wk->set, key, strlen(key), (int64_t)time(NULL),
                          NULL);
}

/* Polls until the worker sees want for key; returns the seconds it took, or
 * a negative number after 2 s. */
static double wait_for(worker_t *wk, const char *key, tg_key_verdict_t want) {
  double t0 = mono_now();
  while (mono_now() - t0 < 2.0) {
    if (worker_check(wk, key) == want)
      return mono_now() - t0;
    sleep_ms(10);
  }
  return -1.0;
}

static void test_watcher_sees_changes(void **state) {
  tmp_t *t = *state;
  tg_keystore_t *writer = NULL;
  worker_t wk = {0};
  char *key = NULL, *key2 = NULL, id[TG_KEY_ID_LEN + 1];
  tg_key_spec_t spec = {.tenant = "acme-corp", .name = "live"};
  tg_keyset_t *old;
  uint64_t g0, g1, g2;
  double took;

  /* A key that exists before the gateway starts is there at once. */
  assert_int_equal(tg_keystore_open(t->dir, &writer), 0);
  assert_int_equal(tg_keystore_create(writer, &spec, (int64_t)time(NULL),
                                      &key, id), 0);
  assert_int_equal(tg_keywatch_start(t->dir, 200, &wk.w), 0);
  g0 = tg_keywatch_generation(wk.w);
  assert_int_equal(g0, 1);
  assert_int_equal(worker_check(&wk, key), TG_KEY_OK);

  /* Nothing changed: the generation stays put across several polls. */
  sleep_ms(500);
  assert_int_equal(tg_keywatch_generation(wk.w), g0);

  /* A key created through another connection becomes valid within 1 s. */
  assert_int_equal(tg_keystore_create(writer, &spec, (int64_t)time(NULL),
                                      &key2, id), 0);
  took = wait_for(&wk, key2, TG_KEY_OK);
  assert_true(took >= 0.0);
  assert_true(took < 1.0);
  g1 = tg_keywatch_generation(wk.w);
  assert_true(g1 > g0);

  /* A revocation takes effect within 1 s; a worker holding the old set
   * still reads it safely until it lets go. */
  old = tg_keywatch_acquire(wk.w);
  assert_int_equal(tg_keystore_revoke(writer, id, (int64_t)time(NULL)), 0);
  took = wait_for(&wk, key2, TG_KEY_REVOKED);
  assert_true(took >= 0.0);
  assert_true(took < 1.0);
  g2 = tg_keywatch_generation(wk.w);
  assert_true(g2 > g1);
  assert_int_equal(tg_keyset_verify(old, key2, TG_KEY_LEN, 0, NULL),
                   TG_KEY_OK);
  assert_int_equal(worker_check(&wk, key), TG_KEY_OK);

  tg_keywatch_stop(wk.w);
  /* Sets acquired before stop outlive the watcher. */
  assert_int_equal(tg_keyset_count(old), 2);
  assert_int_equal(tg_keyset_verify(wk.set, key2, TG_KEY_LEN, 0, NULL),
                   TG_KEY_REVOKED);
  tg_keyset_release(old);
  tg_keyset_release(wk.set);
  tg_keystore_key_free(key);
  tg_keystore_key_free(key2);
  tg_keystore_close(writer);
}

/* Commits to the database's other tables (the ledger's, the budgets') do
 * not reload the keys; a write to api_keys from any connection, an
 * operator's own SQL included, does. */
static void test_watcher_reloads_only_on_key_changes(void **state) {
  tmp_t *t = *state;
  tg_keystore_t *writer = NULL;
  worker_t wk = {0};
  char *key = NULL, id[TG_KEY_ID_LEN + 1], sql[160];
  tg_key_spec_t spec = {.tenant = "acme-corp"};
  sqlite3 *db = NULL;
  uint64_t g0;
  double t0, took;

  assert_int_equal(tg_keystore_open(t->dir, &writer), 0);
  assert_int_equal(tg_keystore_create(writer, &spec, (int64_t)time(NULL),
                                      &key, id), 0);
  assert_int_equal(tg_keywatch_start(t->dir, 50, &wk.w), 0);
  g0 = tg_keywatch_generation(wk.w);
  assert_int_equal(worker_check(&wk, key), TG_KEY_OK);

  /* A ledger's worth of commits for 600 ms: no reload. */
  assert_int_equal(tg_db_sqlite_open(&db, t->dir), 0);
  t0 = mono_now();
  for (int i = 0; mono_now() - t0 < 0.6; i++) {
    snprintf(sql, sizeof(sql), "INSERT INTO tenant_spend VALUES "
             "('acme-corp', 'day:%d', 1, 0, 1)", i);
    assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sleep_ms(10);
  }
  assert_int_equal(tg_keywatch_generation(wk.w), g0);

  /* An operator's UPDATE of api_keys is seen within 1 s. */
  snprintf(sql, sizeof(sql),
           "UPDATE api_keys SET expires_at = 1 WHERE id = '%s'", id);
  assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
  took = wait_for(&wk, key, TG_KEY_EXPIRED);
  assert_true(took >= 0.0 && took < 1.0);
  assert_true(tg_keywatch_generation(wk.w) > g0);

  sqlite3_close(db);
  tg_keywatch_stop(wk.w);
  tg_keyset_release(wk.set);
  tg_keystore_key_free(key);
  tg_keystore_close(writer);
}

static void test_watcher_start_fails(void **state) {
  tmp_t *t = *state;
  tg_keywatch_t *w = (tg_keywatch_t *)1;
  char file[PATH_MAX], under[PATH_MAX + 8];
  FILE *f;

  /* data_dir below a regular file cannot be created. */
  snprintf(file, sizeof(file), "%s/plain", t->dir);
  f = fopen(file, "w");
  assert_non_null(f);
  fclose(f);
  snprintf(under, sizeof(under), "%s/data", file);
  assert_true(tg_keywatch_start(under, 200, &w) < 0);
  assert_null(w);
  assert_int_equal(tg_keywatch_start(t->dir, 0, &w), TG_EINVAL);
  assert_null(w);
  /* A file where the database should be is not a database. */
  snprintf(file, sizeof(file), "%s/tollgate.db", t->dir);
  f = fopen(file, "w");
  assert_non_null(f);
  fputs("this is not an SQLite database, just some text in its place.....",
        f);
  fclose(f);
  assert_true(tg_keywatch_start(t->dir, 200, &w) < 0);
  assert_null(w);
  tg_keywatch_stop(NULL);
}

/* ---- CLI ---- */

static const char CLI_CONFIG[] =
  "data_dir: ./data\n"
  "tenants:\n"
  "  acme-corp:\n"
  "    models_allowed: [llama-3.1-8b, nomic-embed-text]\n"
  "  internal-dev:\n"
  "    models_allowed: [llama-3.1-8b]\n"
  "models:\n"
  "  llama-3.1-8b:\n"
  "    endpoints: [{url: \"http://127.0.0.1:8000\"}]\n"
  "    pricing: {prompt_per_1k_usd: \"0.0005\", completion_per_1k_usd: \"0.0015\"}\n"
  "  nomic-embed-text:\n"
  "    kind: embedding\n"
  "    endpoints: [{url: \"http://127.0.0.1:8000\"}]\n"
  "    pricing: {prompt_per_1k_usd: \"0.0001\", completion_per_1k_usd: \"0\"}\n";

typedef struct {
  int status;
  char out[16384];
  char err[16384];
} cli_result_t;

static void read_file(const char *path, char *buf, size_t cap) {
  FILE *f = fopen(path, "rb");
  size_t n = 0;
  if (f != NULL) {
    n = fread(buf, 1, cap - 1, f);
    fclose(f);
  }
  buf[n] = '\0';
}

/* Runs `tollgate keys ...` in-process (argument list ends with NULL),
 * capturing stdout and stderr. */
static void run_cli(const tmp_t *t, cli_result_t *r, ...) {
  char *argv[16];
  char outp[PATH_MAX], errp[PATH_MAX];
  int argc = 0, fo, fe, so, se;
  va_list ap;

  va_start(ap, r);
  argv[argc++] = (char *)"keys";
  for (char *a; (a = va_arg(ap, char *)) != NULL && argc < 15;)
    argv[argc++] = a;
  va_end(ap);
  argv[argc] = NULL;

  snprintf(outp, sizeof(outp), "%s/cli.out", t->dir);
  snprintf(errp, sizeof(errp), "%s/cli.err", t->dir);
  fflush(stdout);
  fflush(stderr);
  fo = open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  fe = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  assert_true(fo >= 0 && fe >= 0);
  so = dup(1);
  se = dup(2);
  dup2(fo, 1);
  dup2(fe, 2);
  r->status = tg_cmd_keys(argc, argv);
  fflush(stdout);
  fflush(stderr);
  dup2(so, 1);
  dup2(se, 2);
  close(so);
  close(se);
  close(fo);
  close(fe);
  read_file(outp, r->out, sizeof(r->out));
  read_file(errp, r->err, sizeof(r->err));
}

static void test_cli(void **state) {
  tmp_t *t = *state;
  char cfg[PATH_MAX], data[PATH_MAX], key[TG_KEY_LEN + 1];
  cli_result_t *r = calloc(1, sizeof(*r));
  tg_keystore_t *st = NULL;
  tg_keyset_t *set = NULL;
  tg_key_info_t *list = NULL;
  const tg_key_rec_t *rec;
  size_t n;
  FILE *f;
  int lines = 0;

  assert_non_null(r);
  snprintf(cfg, sizeof(cfg), "%s/tollgate.yaml", t->dir);
  snprintf(data, sizeof(data), "%s/data", t->dir);
  f = fopen(cfg, "w");
  assert_non_null(f);
  fputs(CLI_CONFIG, f);
  fclose(f);

  /* create: the key alone on stdout, then a newline. */
  run_cli(t, r, "create", "--config", cfg, "--tenant", "acme-corp",
          "--models", "nomic-embed-text", "--name", "ci-bot", "--expires",
          "30d", NULL);
  assert_int_equal(r->status, 0);
  assert_int_equal(strlen(r->out), TG_KEY_LEN + 1);
  assert_int_equal(r->out[TG_KEY_LEN], '\n');
  memcpy(key, r->out, TG_KEY_LEN);
  key[TG_KEY_LEN] = '\0';
  {
    tg_key_parts_t parts;
    assert_int_equal(tg_key_parse(key, TG_KEY_LEN, &parts), 0);
  }
  /* The key works, for its tenant and scope, until its expiry; data_dir is
   * the config's, relative to the config file. */
  assert_int_equal(tg_keystore_open(data, &st), 0);
  assert_int_equal(tg_keystore_load(st, &set, NULL), 0);
  assert_int_equal(tg_keyset_verify(set, key, TG_KEY_LEN, (int64_t)time(NULL),
                                    &rec), TG_KEY_OK);
  assert_string_equal(rec->tenant, "acme-corp");
  assert_string_equal(rec->name, "ci-bot");
  assert_int_equal(rec->n_models, 1);
  assert_false(tg_key_allows_model(rec, "llama-3.1-8b"));
  assert_int_equal(rec->expires_at - rec->created_at, 30 * 86400);
  tg_keyset_release(set);

  /* Absolute expiry: UTC midnight of that day. */
  run_cli(t, r, "create", "--config", cfg, "--tenant", "internal-dev",
          "--expires", "2099-03-01", NULL);
  assert_int_equal(r->status, 0);
  assert_int_equal(strlen(r->out), TG_KEY_LEN + 1);
  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, 2);
  {
    /* Both were created in the same second: order is by id then. */
    const tg_key_info_t *dev =
        strcmp(list[0].tenant, "internal-dev") == 0 ? &list[0] : &list[1];
    assert_string_equal(dev->tenant, "internal-dev");
    assert_int_equal(dev->expires_at, INT64_C(4076006400));
    assert_string_equal(dev->models, "");
  }
  tg_keystore_list_free(list, n);

  /* Refusals: nothing on stdout, nothing stored. */
  run_cli(t, r, "create", "--config", cfg, "--tenant", "nobody", NULL);
  assert_int_equal(r->status, 1);
  assert_string_equal(r->out, "");
  assert_non_null(strstr(r->err, "nobody"));
  run_cli(t, r, "create", "--config", cfg, "--tenant", "internal-dev",
          "--models", "llama-3.1-8b,nomic-embed-text", NULL);
  assert_int_equal(r->status, 1);
  assert_string_equal(r->out, "");
  assert_non_null(strstr(r->err, "nomic-embed-text"));
  run_cli(t, r, "create", "--config", cfg, "--tenant", "internal-dev",
          "--expires", "2001-01-01", NULL);
  assert_int_equal(r->status, 1);
  /* 1970-01-01 is day 0, an expiry the store would read as "never". */
  run_cli(t, r, "create", "--config", cfg, "--tenant", "internal-dev",
          "--expires", "1970-01-01", NULL);
  assert_int_equal(r->status, 1);
  assert_string_equal(r->out, "");
  assert_non_null(strstr(r->err, "in the past"));
  run_cli(t, r, "create", "--config", cfg, "--tenant", "internal-dev",
          "--expires", "30w", NULL);
  assert_int_equal(r->status, 2);
  assert_non_null(strstr(r->err, "usage:"));
  run_cli(t, r, "create", "--config", cfg, "--tenant", "internal-dev",
          "--expires", "2023-02-29", NULL);
  assert_int_equal(r->status, 2);
  run_cli(t, r, "create", "--config", cfg, NULL);
  assert_int_equal(r->status, 2);
  run_cli(t, r, "create", "--tenant", "internal-dev", NULL);
  assert_int_equal(r->status, 2);
  run_cli(t, r, "create", "--config", cfg, "--tenant", "internal-dev",
          "--colour", "red", NULL);
  assert_int_equal(r->status, 2);
  run_cli(t, r, "frobnicate", NULL);
  assert_int_equal(r->status, 2);
  assert_int_equal(tg_keystore_list(st, &list, &n), 0);
  assert_int_equal(n, 2);
  tg_keystore_list_free(list, n);

  /* list --json: one object per key, in creation order, never a secret. */
  run_cli(t, r, "list", "--config", cfg, "--json", NULL);
  assert_int_equal(r->status, 0);
  assert_null(strstr(r->out, key + 16));
  assert_null(strstr(r->out, "sha256"));
  for (char *line = r->out, *nl; (nl = strchr(line, '\n')) != NULL;
       line = nl + 1) {
    json_error_t jerr;
    json_t *o = json_loadb(line, (size_t)(nl - line), 0, &jerr), *m;
    assert_non_null(o);
    assert_int_equal(json_object_size(o), 8);
    assert_string_equal(json_string_value(json_object_get(o, "status")),
                        "active");
    assert_true(json_is_null(json_object_get(o, "revoked")));
    m = json_object_get(o, "models");
    if (strcmp(json_string_value(json_object_get(o, "tenant")),
               "acme-corp") == 0) {
      assert_memory_equal(json_string_value(json_object_get(o, "id")),
                          key + 3, 12);
      assert_string_equal(json_string_value(json_object_get(o, "tenant")),
                          "acme-corp");
      assert_string_equal(json_string_value(json_object_get(o, "name")),
                          "ci-bot");
      assert_int_equal(json_array_size(m), 1);
      assert_string_equal(json_string_value(json_array_get(m, 0)),
                          "nomic-embed-text");
    } else {
      assert_string_equal(json_string_value(json_object_get(o, "tenant")),
                          "internal-dev");
      assert_true(json_is_null(json_object_get(o, "name")));
      assert_int_equal(json_array_size(m), 0);
      assert_string_equal(json_string_value(json_object_get(o, "expires")),
                          "2099-03-01T00:00:00Z");
    }
    json_decref(o);
    lines++;
  }
  assert_int_equal(lines, 2);

  /* The table, filtered by tenant. */
  run_cli(t, r, "list", "--config", cfg, "--tenant", "internal-dev", NULL);
  assert_int_equal(r->status, 0);
  assert_int_equal(strncmp(r->out, "ID ", 3), 0);
  assert_non_null(strstr(r->out, "TENANT"));
  assert_non_null(strstr(r->out, "STATUS"));
  assert_non_null(strstr(r->out, "2099-03-01T00:00:00Z"));
  assert_null(strstr(r->out, "acme-corp"));
  assert_null(strstr(r->out, key + 16));

  /* revoke: a key spoiled in the pasting (a trailing CR, a character more,
   * upper case) or a bare secret is no id: nothing is revoked and the
   * secret is not echoed. */
  {
    char spoiled[4][TG_KEY_LEN + 2];
    snprintf(spoiled[0], sizeof(spoiled[0]), "%s\r", key);
    snprintf(spoiled[1], sizeof(spoiled[1]), "%sx", key);
    for (size_t i = 0; i <= TG_KEY_LEN; i++)
      spoiled[2][i] = (char)toupper((unsigned char)key[i]);
    snprintf(spoiled[3], sizeof(spoiled[3]), "%s", key + 16);
    for (int i = 0; i < 4; i++) {
      char secret_up[TG_KEY_SECRET_LEN + 1];
      for (size_t j = 0; j <= TG_KEY_SECRET_LEN; j++)
        secret_up[j] = (char)toupper((unsigned char)key[16 + j]);
      run_cli(t, r, "revoke", "--config", cfg, spoiled[i], NULL);
      assert_int_equal(r->status, 1);
      assert_string_equal(r->out, "");
      assert_null(strstr(r->err, key + 16));
      assert_null(strstr(r->err, secret_up));
      assert_non_null(strstr(r->err, "nothing revoked"));
    }
    assert_int_equal(tg_keystore_load(st, &set, NULL), 0);
    assert_int_equal(tg_keyset_verify(set, key, TG_KEY_LEN,
                                      (int64_t)time(NULL), NULL), TG_KEY_OK);
    tg_keyset_release(set);
  }
  /* revoke: known id, unknown id, no id. */
  {
    char id[TG_KEY_ID_LEN + 1];
    memcpy(id, key + 3, TG_KEY_ID_LEN);
    id[TG_KEY_ID_LEN] = '\0';
    run_cli(t, r, "revoke", "--config", cfg, id, NULL);
    assert_int_equal(r->status, 0);
    run_cli(t, r, "revoke", "--config", cfg, "000000000000", NULL);
    assert_int_equal(r->status, 1);
    assert_non_null(strstr(r->err, "000000000000"));
    run_cli(t, r, "revoke", "--config", cfg, NULL);
    assert_int_equal(r->status, 2);
  }
  run_cli(t, r, "list", "--config", cfg, "--tenant", "acme-corp", "--json",
          NULL);
  assert_int_equal(r->status, 0);
  assert_non_null(strstr(r->out, "\"status\":\"revoked\""));
  assert_int_equal(tg_keystore_load(st, &set, NULL), 0);
  assert_int_equal(tg_keyset_verify(set, key, TG_KEY_LEN, (int64_t)time(NULL),
                                    NULL), TG_KEY_REVOKED);
  tg_keyset_release(set);

  tg_keystore_close(st);
  free(r);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_generate_parse_roundtrip),
    cmocka_unit_test(test_parse_rejects_malformed),
    cmocka_unit_test(test_verify_injected_clock),
    cmocka_unit_test(test_verify_memory_never_widens),
    cmocka_unit_test(test_keyset_lookup_and_bounds),
    cmocka_unit_test_setup_teardown(test_store_create_list_revoke, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_load_refuses_rows_it_cannot_read_whole,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_store_holds_only_hash, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_migrations_idempotent, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_watcher_sees_changes, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_watcher_reloads_only_on_key_changes,
                                    tmp_setup, tmp_teardown),
    cmocka_unit_test_setup_teardown(test_watcher_start_fails, tmp_setup,
                                    tmp_teardown),
    cmocka_unit_test_setup_teardown(test_cli, tmp_setup, tmp_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
