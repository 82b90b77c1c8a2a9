/* Virtual keys: their text format, the SHA-256 of their secret, the check of
 * one presented key against one stored record, and the keyset — the
 * immutable, refcounted in-memory snapshot of every stored key that the
 * gateway consults on each request.
 *
 * A key reads `tg-<id>-<secret>`: id is 12 lowercase hex characters (6 random
 * bytes) and names the key in logs, the CLI and the ledger; secret is 48
 * lowercase hex characters (24 random bytes). Only SHA-256(secret) is ever
 * stored. Nothing here touches a database: the store (keystore.h) fills
 * keysets, whatever its backend. */
#ifndef TG_AUTH_KEY_H
#define TG_AUTH_KEY_H

#include <stddef.h>
#include <stdint.h>

#define TG_KEY_PREFIX "tg-"
/* The tenant of admin keys (`tollgate keys create --admin`): '@' is not
 * allowed in tenant names, so no tenant can hold one. */
#define TG_ADMIN_TENANT "@admin"
#define TG_KEY_PREFIX_LEN 3
#define TG_KEY_ID_LEN 12      /* hex characters */
#define TG_KEY_SECRET_LEN 48  /* hex characters */
#define TG_KEY_HASH_LEN 32    /* SHA-256 */
/* "tg-" + id + "-" + secret: every valid key has exactly this length. */
#define TG_KEY_LEN (TG_KEY_PREFIX_LEN + TG_KEY_ID_LEN + 1 + TG_KEY_SECRET_LEN)

/* Bounds a keyset (and so a store's load) can hold; a bound is a defence
 * against a runaway table filling memory on every reload. */
#define TG_KEYSET_MAX_KEYS (1u << 20)
#define TG_KEY_MAX_MODELS 64       /* scoped models per key */
#define TG_KEY_MAX_FIELD 256       /* bytes of a tenant, name or model name */

/* Why a presented key was accepted or refused. The gateway answers 401 for
 * every refusal alike and logs the reason. */
typedef enum {
  TG_KEY_OK = 0,
  TG_KEY_MALFORMED,   /* not tg-<12 hex>-<48 hex> */
  TG_KEY_UNKNOWN,     /* well formed, but no key has that id */
  TG_KEY_BAD_SECRET,  /* the id exists, the secret does not match */
  TG_KEY_REVOKED,     /* right secret, key revoked */
  TG_KEY_EXPIRED      /* right secret, now >= expires_at */
} tg_key_verdict_t;

/* A presented key split into its parts; views into the caller's text, so it
 * lives no longer than that text. */
typedef struct {
  const char *id;      /* TG_KEY_ID_LEN characters, not NUL-terminated */
  const char *secret;  /* TG_KEY_SECRET_LEN characters, not NUL-terminated */
  uint64_t id_num;     /* the id's 48-bit value, for hashing and comparing */
} tg_key_parts_t;

/* One stored key as the gateway needs it. Strings are owned by the keyset
 * (or whoever built the record); never any secret, only its hash. */
typedef struct {
  char id[TG_KEY_ID_LEN + 1];
  uint64_t id_num;
  char *tenant;
  char *name;                 /* "" when none was given */
  char **models;              /* scope; n_models == 0 means every model the
                                 tenant may use */
  size_t n_models;
  uint8_t secret_sha256[TG_KEY_HASH_LEN];
  int64_t created_at;         /* unix seconds */
  int64_t expires_at;         /* unix seconds; 0 = never */
  int64_t revoked_at;         /* unix seconds; 0 = not revoked */
} tg_key_rec_t;

/* Returns a static lower-case word for a verdict ("ok", "malformed",
 * "unknown_key", "bad_secret", "revoked", "expired") for logs. */
const char *tg_key_verdict_str(tg_key_verdict_t v);

/* Makes a new random key. Writes the NUL-terminated key text into
 * key[TG_KEY_LEN + 1], its id into id[TG_KEY_ID_LEN + 1] and
 * SHA-256(secret) into hash. Randomness from OpenSSL's RAND_bytes. Returns 0,
 * or TG_EUNAVAIL when the random generator fails. The caller should wipe key
 * once it has handed it out (OPENSSL_cleanse). */
int tg_key_generate(char key[TG_KEY_LEN + 1], char id[TG_KEY_ID_LEN + 1],
                    uint8_t hash[TG_KEY_HASH_LEN]);

/* Splits text[0..len) — a key as presented by a client, not necessarily
 * NUL-terminated — into parts. Strict: exactly TG_KEY_LEN bytes, the "tg-"
 * prefix, lowercase hex id, '-', lowercase hex secret. Reads at most len
 * bytes and never more than TG_KEY_LEN. Returns 0 or TG_EPARSE. */
int tg_key_parse(const char *text, size_t len, tg_key_parts_t *out);

/* Parses a bare id (12 lowercase hex characters) into its number. Returns 0
 * or TG_EPARSE. */
int tg_key_id_parse(const char *id, size_t len, uint64_t *out);

/* SHA-256 of a secret's text (the hex characters as presented). Returns 0 or
 * TG_EUNAVAIL if the digest fails. Does not allocate in this code; OpenSSL
 * keeps a transient digest context of its own. */
int tg_key_hash_secret(const char *secret, size_t len,
                       uint8_t out[TG_KEY_HASH_LEN]);

/* Checks parts (already parsed, and matched to rec by id) against rec at
 * the given time: the secret's hash is compared in constant time first, so
 * the revoked and expired answers are only given to a holder of the secret.
 * A key expires at the second expires_at itself (now >= expires_at). Returns
 * TG_KEY_OK, TG_KEY_BAD_SECRET, TG_KEY_REVOKED or TG_KEY_EXPIRED. */
tg_key_verdict_t tg_key_verify(const tg_key_rec_t *rec,
                               const tg_key_parts_t *parts, int64_t now);

/* 1 when rec's scope lets it call model (an empty scope allows all that the
 * tenant may use; the tenant's own list is checked elsewhere), else 0. */
int tg_key_allows_model(const tg_key_rec_t *rec, const char *model);

/* ---- keyset: an immutable snapshot with O(1) lookup by id ---- */

typedef struct tg_keyset_s tg_keyset_t;

/* Finds the record with this id (12 hex characters, not necessarily
 * NUL-terminated). Returns a pointer valid while the caller holds a reference
 * to ks, or NULL. Allocation-free. */
const tg_key_rec_t *tg_keyset_find(const tg_keyset_t *ks, const char *id,
                                   size_t id_len);

/* The per-request check: parses the presented key text[0..len), looks its id
 * up and verifies it at now. *rec_out (if not NULL) is set to the matching
 * record whenever the id was found (also for refusals, so the log can name
 * the key), else NULL. Allocation-free in this code. */
tg_key_verdict_t tg_keyset_verify(const tg_keyset_t *ks, const char *text,
                                  size_t len, int64_t now,
                                  const tg_key_rec_t **rec_out);

/* Number of keys in the set. */
size_t tg_keyset_count(const tg_keyset_t *ks);

/* Takes one more reference; returns ks. Safe across threads. */
tg_keyset_t *tg_keyset_ref(tg_keyset_t *ks);

/* Drops one reference; the last one frees the set and every record in it.
 * NULL is ignored. Safe across threads. */
void tg_keyset_release(tg_keyset_t *ks);

/* ---- building a keyset (for store backends and tests) ---- */

/* Makes an empty set able to hold up to capacity keys, with one reference.
 * Returns 0, TG_ETOOBIG (capacity > TG_KEYSET_MAX_KEYS) or TG_ENOMEM. */
int tg__keyset_new(size_t capacity, tg_keyset_t **out);

/* Adds a record to a set under construction (not yet shared). The set takes
 * ownership of rec's strings (tenant, name, models and each model) even when
 * it fails, and the caller's rec is cleared. Returns 0, TG_EEXISTS for a
 * duplicate id, or TG_ETOOBIG when the set is full. */
int tg__keyset_add(tg_keyset_t *ks, tg_key_rec_t *rec);

/* Frees the strings a record owns and clears it. */
void tg__key_rec_clear(tg_key_rec_t *rec);

/* Splits a comma list of model names ("" = none) into a new array of new
 * strings. Rejects empty elements, names longer than TG_KEY_MAX_FIELD and more
 * than TG_KEY_MAX_MODELS names; duplicates are kept once. On success the
 * caller owns *models (free each, then the array; NULL when *n == 0).
 * Returns 0, TG_EPARSE, TG_ETOOBIG or TG_ENOMEM. */
int tg__key_models_split(const char *csv, char ***models, size_t *n);

#endif
