/* Virtual keys: generation, strict parsing, hashing, constant-time
 * verification, and the keyset hash table the gateway looks keys up in.
 *
 * The keyset is built once per reload by a store backend and then only read,
 * by any number of threads, so lookups need no lock; its lifetime is a plain
 * atomic reference count. The table is open addressing with linear probing
 * over a power-of-two slot array at most half full, keyed by the id's 48-bit
 * value: ids are random, but they are still mixed so that a hand-made id in
 * the database cannot cluster the table. */
#include "auth/key.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "core/err.h"
#include "core/strbuf.h"

struct tg_keyset_s {
  atomic_int refs;
  size_t n;          /* records used */
  size_t cap;        /* records allocated */
  tg_key_rec_t *recs;
  uint32_t *slots;   /* 0 = empty, else index into recs + 1 */
  size_t mask;       /* slot count - 1 */
};

const char *tg_key_verdict_str(tg_key_verdict_t v) {
  switch (v) {
  case TG_KEY_OK: return "ok";
  case TG_KEY_MALFORMED: return "malformed";
  case TG_KEY_UNKNOWN: return "unknown_key";
  case TG_KEY_BAD_SECRET: return "bad_secret";
  case TG_KEY_REVOKED: return "revoked";
  case TG_KEY_EXPIRED: return "expired";
  }
  return "unknown";
}

/* Lowercase hex only: a key is compared as text, so "AB" and "ab" would be
 * two different secrets; refusing upper case keeps one spelling per key. */
static int hexval(unsigned char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}


int tg_key_id_parse(const char *id, size_t len, uint64_t *out) {
  uint64_t v = 0;
  if (id == NULL || len != TG_KEY_ID_LEN)
    return TG_EPARSE;
  for (size_t i = 0; i < TG_KEY_ID_LEN; i++) {
    int d = hexval((unsigned char)id[i]);
    if (d < 0)
      return TG_EPARSE;
    v = (v << 4) | (uint64_t)d;
  }
  *out = v;
  return 0;
}

int tg_key_parse(const char *text, size_t len, tg_key_parts_t *out) {
  const char *id, *secret;
  if (text == NULL || out == NULL || len != TG_KEY_LEN)
    return TG_EPARSE;
  if (memcmp(text, TG_KEY_PREFIX, TG_KEY_PREFIX_LEN) != 0)
    return TG_EPARSE;
  id = text + TG_KEY_PREFIX_LEN;
  if (id[TG_KEY_ID_LEN] != '-')
    return TG_EPARSE;
  secret = id + TG_KEY_ID_LEN + 1;
  for (size_t i = 0; i < TG_KEY_SECRET_LEN; i++)
    if (hexval((unsigned char)secret[i]) < 0)
      return TG_EPARSE;
  if (tg_key_id_parse(id, TG_KEY_ID_LEN, &out->id_num) != 0)
    return TG_EPARSE;
  out->id = id;
  out->secret = secret;
  return 0;
}

/* The digest is fetched from the provider once: passing EVP_sha256() to
 * each EVP_Digest makes OpenSSL 3 look it up by name on every call, which
 * tripled the cost of a verification. The fetched object is shared by all
 * threads (it is immutable) and lives until the process ends.
 *
 * Each thread keeps one digest context and re-initialises it per hash:
 * EVP_Digest() allocates, sets up and frees a context on every call, which
 * cost as much as the hash of a 32-byte secret. The context is freed when
 * its thread ends (the key's destructor). */
static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;
static pthread_key_t sha256_ctx_key;
static int sha256_ctx_key_ok;

static void ctx_free(void *ctx) {
  EVP_MD_CTX_free(ctx);
}

static void sha256_fetch(void) {
  sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
  sha256_ctx_key_ok = pthread_key_create(&sha256_ctx_key, ctx_free) == 0;
}

/* This thread's context, created on first use; NULL when out of memory. */
static EVP_MD_CTX *thread_ctx(void) {
  EVP_MD_CTX *ctx;
  if (!sha256_ctx_key_ok)
    return NULL;
  ctx = pthread_getspecific(sha256_ctx_key);
  if (ctx == NULL) {
    ctx = EVP_MD_CTX_new();
    if (ctx != NULL && pthread_setspecific(sha256_ctx_key, ctx) != 0) {
      EVP_MD_CTX_free(ctx);
      ctx = NULL;
    }
  }
  return ctx;
}

int tg_key_hash_secret(const char *secret, size_t len,
                       uint8_t out[TG_KEY_HASH_LEN]) {
  unsigned int n = 0;
  const EVP_MD *md;
  EVP_MD_CTX *ctx;

  pthread_once(&sha256_once, sha256_fetch);
  md = sha256_md != NULL ? sha256_md : EVP_sha256();
  ctx = thread_ctx();
  if (ctx != NULL) {
    if (EVP_DigestInit_ex2(ctx, md, NULL) != 1 || EVP_DigestUpdate(ctx, secret, len) != 1 ||
        EVP_DigestFinal_ex(ctx, out, &n) != 1 || n != TG_KEY_HASH_LEN)
      return TG_EUNAVAIL;
    return 0;
  }
  if (EVP_Digest(secret, len, out, &n, md, NULL) != 1 ||
      n != TG_KEY_HASH_LEN)
    return TG_EUNAVAIL;
  return 0;
}

int tg_key_generate(char key[TG_KEY_LEN + 1], char id[TG_KEY_ID_LEN + 1],
                    uint8_t hash[TG_KEY_HASH_LEN]) {
  uint8_t raw[TG_KEY_ID_LEN / 2 + TG_KEY_SECRET_LEN / 2];
  char *p = key;
  int rc = 0;

  if (RAND_bytes(raw, (int)sizeof(raw)) != 1) {
    rc = TG_EUNAVAIL;
    goto out;
  }
  memcpy(p, TG_KEY_PREFIX, TG_KEY_PREFIX_LEN);
  p += TG_KEY_PREFIX_LEN;
  tg_hex_encode(raw, TG_KEY_ID_LEN / 2, p);
  p += TG_KEY_ID_LEN;
  *p++ = '-';
  tg_hex_encode(raw + TG_KEY_ID_LEN / 2, TG_KEY_SECRET_LEN / 2, p);
  p += TG_KEY_SECRET_LEN;
  *p = '\0';

  memcpy(id, key + TG_KEY_PREFIX_LEN, TG_KEY_ID_LEN);
  id[TG_KEY_ID_LEN] = '\0';
  rc = tg_key_hash_secret(key + TG_KEY_LEN - TG_KEY_SECRET_LEN,
                          TG_KEY_SECRET_LEN, hash);
out:
  OPENSSL_cleanse(raw, sizeof(raw));
  if (rc != 0)
    OPENSSL_cleanse(key, TG_KEY_LEN + 1);
  return rc;
}

/* Secrets this thread verified lately, so a client that sends the same key
 * on every request is not hashed every time. Direct-mapped by key id; an
 * entry holds a secret and its SHA-256. A presented secret equal to the
 * entry's (compared in constant time) has the entry's hash, so comparing
 * that hash with the record's settles it without hashing. Revocation,
 * expiry and a re-created key (another hash) are checked on every request
 * as before. Only secrets that matched a record are kept: a wrong secret is
 * always hashed. The entries live in the thread's memory, as the requests
 * that carried them did. */
#define VERIFIED_SLOTS 64
typedef struct {
  uint64_t id_num;
  int used;
  char secret[TG_KEY_SECRET_LEN];
  uint8_t sha256[TG_KEY_HASH_LEN];
} verified_t;
static _Thread_local verified_t verified[VERIFIED_SLOTS];

tg_key_verdict_t tg_key_verify(const tg_key_rec_t *rec,
                               const tg_key_parts_t *parts, int64_t now) {
  verified_t *e = &verified[parts->id_num % VERIFIED_SLOTS];
  uint8_t h[TG_KEY_HASH_LEN];
  int known = e->used && e->id_num == parts->id_num &&
              CRYPTO_memcmp(e->secret, parts->secret, TG_KEY_SECRET_LEN) == 0;

  if (known)
    memcpy(h, e->sha256, TG_KEY_HASH_LEN);
  else if (tg_key_hash_secret(parts->secret, TG_KEY_SECRET_LEN, h) != 0)
    return TG_KEY_BAD_SECRET;  /* fail closed */
  if (CRYPTO_memcmp(h, rec->secret_sha256, TG_KEY_HASH_LEN) != 0)
    return TG_KEY_BAD_SECRET;
  if (!known) {
    e->used = 1;
    e->id_num = parts->id_num;
    memcpy(e->secret, parts->secret, TG_KEY_SECRET_LEN);
    memcpy(e->sha256, h, TG_KEY_HASH_LEN);
  }
  if (rec->revoked_at != 0)
    return TG_KEY_REVOKED;
  if (rec->expires_at != 0 && now >= rec->expires_at)
    return TG_KEY_EXPIRED;
  return TG_KEY_OK;
}

int tg_key_allows_model(const tg_key_rec_t *rec, const char *model) {
  if (rec->n_models == 0)
    return 1;
  for (size_t i = 0; i < rec->n_models; i++)
    if (strcmp(rec->models[i], model) == 0)
      return 1;
  return 0;
}

/* ---- keyset ---- */

static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= UINT64_C(0xbf58476d1ce4e5b9);
  x ^= x >> 27;
  x *= UINT64_C(0x94d049bb133111eb);
  x ^= x >> 31;
  return x;
}

int tg__keyset_new(size_t capacity, tg_keyset_t **out) {
  tg_keyset_t *ks;
  size_t nslots = 8;

  if (capacity > TG_KEYSET_MAX_KEYS)
    return TG_ETOOBIG;
  while (nslots < capacity * 2)
    nslots <<= 1;
  ks = calloc(1, sizeof(*ks));
  if (ks == NULL)
    return TG_ENOMEM;
  ks->slots = calloc(nslots, sizeof(*ks->slots));
  ks->recs = capacity ? calloc(capacity, sizeof(*ks->recs)) : NULL;
  if (ks->slots == NULL || (capacity && ks->recs == NULL)) {
    free(ks->slots);
    free(ks->recs);
    free(ks);
    return TG_ENOMEM;
  }
  ks->cap = capacity;
  ks->mask = nslots - 1;
  atomic_init(&ks->refs, 1);
  *out = ks;
  return 0;
}

void tg__key_rec_clear(tg_key_rec_t *rec) {
  free(rec->tenant);
  free(rec->name);
  for (size_t i = 0; i < rec->n_models; i++)
    free(rec->models[i]);
  free(rec->models);
  memset(rec, 0, sizeof(*rec));
}

int tg__keyset_add(tg_keyset_t *ks, tg_key_rec_t *rec) {
  size_t i;
  if (ks->n >= ks->cap) {
    tg__key_rec_clear(rec);
    return TG_ETOOBIG;
  }
  for (i = mix64(rec->id_num) & ks->mask; ks->slots[i] != 0;
       i = (i + 1) & ks->mask) {
    if (ks->recs[ks->slots[i] - 1].id_num == rec->id_num) {
      tg__key_rec_clear(rec);
      return TG_EEXISTS;
    }
  }
  ks->recs[ks->n] = *rec;
  ks->slots[i] = (uint32_t)(ks->n + 1);
  ks->n++;
  memset(rec, 0, sizeof(*rec));
  return 0;
}

static const tg_key_rec_t *find_num(const tg_keyset_t *ks, uint64_t id_num) {
  /* The table is at most half full, so a probe always meets an empty slot. */
  for (size_t i = mix64(id_num) & ks->mask; ks->slots[i] != 0;
       i = (i + 1) & ks->mask) {
    const tg_key_rec_t *r = &ks->recs[ks->slots[i] - 1];
    if (r->id_num == id_num)
      return r;
  }
  return NULL;
}

const tg_key_rec_t *tg_keyset_find(const tg_keyset_t *ks, const char *id,
                                   size_t id_len) {
  uint64_t num;
  if (ks == NULL || tg_key_id_parse(id, id_len, &num) != 0)
    return NULL;
  return find_num(ks, num);
}

tg_key_verdict_t tg_keyset_verify(const tg_keyset_t *ks, const char *text,
                                  size_t len, int64_t now,
                                  const tg_key_rec_t **rec_out) {
  tg_key_parts_t parts;
  const tg_key_rec_t *rec = NULL;
  tg_key_verdict_t v;

  if (tg_key_parse(text, len, &parts) != 0) {
    v = TG_KEY_MALFORMED;
    goto out;
  }
  rec = ks ? find_num(ks, parts.id_num) : NULL;
  if (rec == NULL) {
    v = TG_KEY_UNKNOWN;
    goto out;
  }
  v = tg_key_verify(rec, &parts, now);
out:
  if (rec_out != NULL)
    *rec_out = rec;
  return v;
}

size_t tg_keyset_count(const tg_keyset_t *ks) {
  return ks ? ks->n : 0;
}

tg_keyset_t *tg_keyset_ref(tg_keyset_t *ks) {
  if (ks != NULL)
    atomic_fetch_add_explicit(&ks->refs, 1, memory_order_relaxed);
  return ks;
}

void tg_keyset_release(tg_keyset_t *ks) {
  if (ks == NULL)
    return;
  /* acq_rel: the freeing thread must see every other holder's last reads
   * finished before the memory goes away. */
  if (atomic_fetch_sub_explicit(&ks->refs, 1, memory_order_acq_rel) != 1)
    return;
  for (size_t i = 0; i < ks->n; i++)
    tg__key_rec_clear(&ks->recs[i]);
  free(ks->recs);
  free(ks->slots);
  free(ks);
}

/* ---- model scope lists ---- */

static void free_models(char **models, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(models[i]);
  free(models);
}

int tg__key_models_split(const char *csv, char ***models, size_t *n) {
  char **arr = NULL;
  size_t cnt = 0;
  const char *p = csv;
  int rc = 0;

  *models = NULL;
  *n = 0;
  if (csv == NULL || *csv == '\0')
    return 0;
  arr = calloc(TG_KEY_MAX_MODELS, sizeof(*arr));
  if (arr == NULL)
    return TG_ENOMEM;
  for (;;) {
    const char *end = strchr(p, ',');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    int dup = 0;
    if (len == 0) {
      rc = TG_EPARSE;
      goto out;
    }
    if (len > TG_KEY_MAX_FIELD) {
      rc = TG_ETOOBIG;
      goto out;
    }
    for (size_t i = 0; i < cnt && !dup; i++)
      dup = strlen(arr[i]) == len && memcmp(arr[i], p, len) == 0;
    if (!dup) {
      if (cnt == TG_KEY_MAX_MODELS) {
        rc = TG_ETOOBIG;
        goto out;
      }
      arr[cnt] = malloc(len + 1);
      if (arr[cnt] == NULL) {
        rc = TG_ENOMEM;
        goto out;
      }
      memcpy(arr[cnt], p, len);
      arr[cnt][len] = '\0';
      cnt++;
    }
    if (end == NULL)
      break;
    p = end + 1;
  }
out:
  if (rc != 0) {
    free_models(arr, cnt);
    return rc;
  }
  *models = arr;
  *n = cnt;
  return 0;
}
