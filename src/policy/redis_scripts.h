/* The Lua scripts of the Redis policy backend (state_redis.c), kept as C
 * string constants so they read as Lua. Each script is the Redis side of
 * one decision in src/policy/limits.c and follows it step for step; a
 * change to the rules there needs the same change here
 * (docs/state-redis.md lists the keys and arguments).
 *
 * Why the helpers look the way they do:
 *   - Redis' Lua numbers are doubles. Every number handed to redis.call()
 *     goes through fmt(), because Redis turns a bare Lua number into text
 *     with "%.14g", which writes 10^14 and above in exponent form that
 *     HINCRBY/ZADD then refuse.
 *   - Money never takes that path: costs arrive as decimal strings and are
 *     added with HINCRBY (exact 64-bit). Only comparisons read money into
 *     doubles, exact while a window's spent + reserved + cost stays below
 *     2^53 nano-USD (about 9 million USD).
 *   - Integer division: math.floor(a / b) is exact for |a| < 2^53, b >= 1
 *     (a correctly rounded quotient cannot cross an integer there).
 *   - Nothing reads the Redis clock (TIME): "now" is the gateway's, passed
 *     in ARGV, so both backends share the same injected-clock meaning.
 *
 * Sliding logs (requests per minute, global per second) are run-length
 * encoded like tg_slog_t: a list of "<ms> <count>" entries, oldest first,
 * with distinct increasing times, plus a separate key holding the total
 * count. A window of W ms holds at most W entries whatever the limit. */
#ifndef TG_POLICY_REDIS_SCRIPTS_H
#define TG_POLICY_REDIS_SCRIPTS_H

/* Codes the admission script returns in its first element. */
#define TG_REDIS_OK          0
#define TG_REDIS_CONCURRENCY 1
#define TG_REDIS_REQUESTS    2
#define TG_REDIS_TOKENS      3
#define TG_REDIS_DAILY       4
#define TG_REDIS_MONTHLY     5

/* ---- shared helpers (prepended to every script) ------------------------ */

#define TG_REDIS_LUA_LIB                                                      \
  "local LEVEL_MIN = -4611686018427387904\n" /* -(2^62), as limits.c */       \
  "local function fmt(x) return string.format('%d', x) end\n"                 \
  "local function idiv(a, b) return math.floor(a / b) end\n"                  \
  "local function ceildiv(a, b) return math.floor((a + b - 1) / b) end\n"     \
  "\n"                                                                        \
  "-- sliding log: list L of '<ms> <n>' (oldest first), total in key T\n"     \
  "local function log_entry(e)\n"                                             \
  "  local ts, n = string.match(e, '^(%-?%d+) (%d+)$')\n"                     \
  "  return tonumber(ts), tonumber(n)\n"                                      \
  "end\n"                                                                     \
  "local function log_total(L, T)\n"                                          \
  "  if redis.call('LLEN', L) == 0 then\n"                                    \
  "    redis.call('DEL', T)\n"                                                \
  "    return 0\n"                                                            \
  "  end\n"                                                                   \
  "  return tonumber(redis.call('GET', T) or '0')\n"                          \
  "end\n"                                                                     \
  "-- drops the entries that left the window (now - t >= window); returns\n"  \
  "-- the admissions left\n"                                                  \
  "local function log_expire(L, T, now, window)\n"                            \
  "  local total = log_total(L, T)\n"                                         \
  "  local before = total\n"                                                  \
  "  while total > 0 do\n"                                                    \
  "    local e = redis.call('LINDEX', L, 0)\n"                                \
  "    if not e then total = 0 break end\n"                                   \
  "    local ts, n = log_entry(e)\n"                                          \
  "    if now - ts < window then break end\n"                                 \
  "    redis.call('LPOP', L)\n"                                               \
  "    total = total - n\n"                                                   \
  "  end\n"                                                                   \
  "  if total <= 0 then\n"                                                    \
  "    redis.call('DEL', L, T)\n"                                             \
  "    return 0\n"                                                            \
  "  end\n"                                                                   \
  "  if total ~= before then redis.call('SET', T, fmt(total), 'KEEPTTL') end\n" \
  "  return total\n"                                                          \
  "end\n"                                                                     \
  "-- ms until the count under limit next goes down: until the k-th oldest\n" \
  "-- admission leaves, k = total - limit + 1 (the oldest unless a lowered\n" \
  "-- limit left more in the log); 0 when empty. Walks only in that case.\n"  \
  "local function log_wait(L, total, limit, now, window)\n"                   \
  "  local k = total - limit + 1\n"                                           \
  "  local seen, i, size, last = 0, 0, 1, nil\n"                              \
  "  while true do\n"                                                         \
  "    local chunk = redis.call('LRANGE', L, i, i + size - 1)\n"              \
  "    if #chunk == 0 then break end\n"                                       \
  "    for j = 1, #chunk do\n"                                                \
  "      local ts, n = log_entry(chunk[j])\n"                                 \
  "      seen = seen + n\n"                                                   \
  "      last = ts\n"                                                         \
  "      if seen >= k then return ts + window - now end\n"                    \
  "    end\n"                                                                 \
  "    i = i + #chunk\n"                                                      \
  "    size = 256\n"                                                          \
  "  end\n"                                                                   \
  "  if last == nil then return 0 end\n"                                      \
  "  return last + window - now\n"                                            \
  "end\n"                                                                     \
  "-- one admission at now; a clock behind the newest entry counts it\n"      \
  "-- there (errs toward refusing); keys live a window past a minute of skew\n" \
  "local function log_append(L, T, now, window)\n"                            \
  "  local e = redis.call('LINDEX', L, -1)\n"                                 \
  "  local merged = false\n"                                                  \
  "  if e then\n"                                                             \
  "    local ts, n = log_entry(e)\n"                                          \
  "    if ts >= now then\n"                                                   \
  "      redis.call('LSET', L, -1, fmt(ts) .. ' ' .. fmt(n + 1))\n"           \
  "      merged = true\n"                                                     \
  "    end\n"                                                                 \
  "  end\n"                                                                   \
  "  if not merged then redis.call('RPUSH', L, fmt(now) .. ' 1') end\n"       \
  "  local total = redis.call('INCR', T)\n"                                   \
  "  redis.call('PEXPIRE', L, fmt(window + 60000))\n"                         \
  "  redis.call('PEXPIRE', T, fmt(window + 60000))\n"                         \
  "  return total\n"                                                          \
  "end\n"                                                                     \
  "\n"                                                                        \
  "-- token bucket: hash B {level_mt, updated_ms}; absent = never used\n"     \
  "local function tb_load(B)\n"                                               \
  "  local v = redis.call('HMGET', B, 'level_mt', 'updated_ms')\n"            \
  "  if not v[1] or not v[2] then return nil end\n"                           \
  "  return {level = tonumber(v[1]), updated = tonumber(v[2])}\n"             \
  "end\n"                                                                     \
  "-- tg_tbucket_refill: a never-used bucket starts full; else it gains\n"    \
  "-- floor(e * cap / 60000) = q * cap + floor(r * tpm / 60) (e = q minutes\n" \
  "-- and r ms), which keeps every product below 2^53 for tpm < 1.5e11\n"     \
  "local function tb_refill(b, tpm, now)\n"                                   \
  "  local cap = tpm * 1000\n"                                                \
  "  if b == nil then return {level = cap, updated = now} end\n"              \
  "  local r = {level = b.level, updated = b.updated}\n"                      \
  "  if now > b.updated then\n"                                               \
  "    local e = now - b.updated\n"                                           \
  "    local deficit = cap - r.level\n"                                       \
  "    local q = idiv(e, 60000)\n"                                            \
  "    if deficit <= 0 or q > idiv(deficit, cap) then\n"                      \
  "      r.level = cap -- whole minutes alone fill it\n"                      \
  "    else\n"                                                                \
  "      local gain = q * cap + idiv((e - q * 60000) * tpm, 60)\n"            \
  "      r.level = math.min(cap, r.level + gain)\n"                           \
  "    end\n"                                                                 \
  "    r.updated = now\n"                                                     \
  "  elseif r.level > cap then\n"                                             \
  "    r.level = cap\n"                                                       \
  "  end\n"                                                                   \
  "  return r\n"                                                              \
  "end\n"                                                                     \
  "-- ms until stored bucket b holds target (limits.c tbucket_wait):\n"      \
  "-- ceil(d * 60000 / cap) written as ceil(d * 60 / tpm)\n"                  \
  "local function tb_wait(b, tpm, target, now)\n"                             \
  "  if b == nil or tpm <= 0 then return 0 end\n"                             \
  "  local lv = math.min(b.level, tpm * 1000)\n"                              \
  "  if lv >= target then return 0 end\n"                                     \
  "  local w = ceildiv((target - lv) * 60, tpm) - (now - b.updated)\n"        \
  "  if w > 0 then return w end\n"                                            \
  "  return 0\n"                                                              \
  "end\n"                                                                     \
  "-- stores b; the key lives until the bucket would be full again\n"        \
  "local function tb_store(B, b, tpm, now)\n"                                 \
  "  redis.call('HSET', B, 'level_mt', fmt(b.level), 'updated_ms', fmt(b.updated))\n" \
  "  redis.call('PEXPIRE', B, fmt(tb_wait(b, tpm, tpm * 1000, now) + 60000))\n" \
  "end\n"                                                                     \
  "\n"                                                                        \
  "-- budget window: hash K {spent, reserved, alerted}\n"                     \
  "local function unreserve(K, c)\n"                                          \
  "  if c == '0' or redis.call('EXISTS', K) == 0 then return end\n"           \
  "  if redis.call('HINCRBY', K, 'reserved', '-' .. c) < 0 then\n"            \
  "    redis.call('HSET', K, 'reserved', '0')\n"                              \
  "  end\n"                                                                   \
  "end\n"

/* ---- global requests per second ---------------------------------------
 * KEYS: 1 log list, 2 log total          ({global} tag)
 * ARGV: 1 now_ms, 2 rps (> 0)
 * Returns {1, 0} admitted (recorded) or {0, retry_after_ms}. */
#define TG_REDIS_LUA_GLOBAL                                                   \
  TG_REDIS_LUA_LIB                                                            \
  "local now = tonumber(ARGV[1])\n"                                           \
  "local rps = tonumber(ARGV[2])\n"                                           \
  "local total = log_expire(KEYS[1], KEYS[2], now, 1000)\n"                  \
  "if total >= rps then\n"                                                    \
  "  return {0, log_wait(KEYS[1], total, rps, now, 1000)}\n"                  \
  "end\n"                                                                     \
  "log_append(KEYS[1], KEYS[2], now, 1000)\n"                                 \
  "return {1, 0}\n"

/* ---- admission ---------------------------------------------------------
 * KEYS: 1 rpm log, 2 rpm total, 3 tpm bucket, 4 leases, 5 reservations,
 *       6 day window, 7 month window            (all tagged {tenant})
 * ARGV: 1 now_ms, 2 rpm, 3 tpm, 4 concurrency, 5 day limit (nano),
 *       6 month limit (nano), 7 reserved milli-tokens, 8 reserved cost
 *       (nano, decimal string), 9 lease id, 10 lease expiry ms, 11 day
 *       period, 12 month period, 13 day key ttl ms, 14 month key ttl ms,
 *       15 ms to the end of the day, 16 ms to the end of the month
 * Returns {code, retry_after_ms, limit_requests, remaining_requests,
 *          reset_requests_ms, limit_tokens, remaining_tokens,
 *          reset_tokens_ms}; -1 = unlimited. A refusal changes nothing but
 *          what nobody can observe (expired log entries, dead leases). */
#define TG_REDIS_LUA_ADMIT                                                    \
  TG_REDIS_LUA_LIB                                                            \
  "local now = tonumber(ARGV[1])\n"                                           \
  "local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])\n" \
  "local dlim, mlim = tonumber(ARGV[5]), tonumber(ARGV[6])\n"                 \
  "local res_mt, cost_s = tonumber(ARGV[7]), ARGV[8]\n"                       \
  "local cost = tonumber(cost_s)\n"                                           \
  "local lease, lease_exp = ARGV[9], ARGV[10]\n"                              \
  "local day_s, month_s = ARGV[11], ARGV[12]\n"                               \
  "local rpmL, rpmT, tpmK, leasesK, resvK, dayK, monthK =\n"                  \
  "  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]\n"         \
  "\n"                                                                        \
  "-- leases nobody renewed: a gateway that died gives back its slots and\n"  \
  "-- the money it reserved in the current windows\n"                         \
  "local dead = redis.call('ZRANGEBYSCORE', leasesK, '-inf', fmt(now), 'LIMIT', 0, 256)\n" \
  "for _, id in ipairs(dead) do\n"                                            \
  "  local rec = redis.call('HGET', resvK, id)\n"                             \
  "  if rec then\n"                                                           \
  "    local d, m, c = string.match(rec, '^(%-?%d+) (%-?%d+) (%d+)$')\n"      \
  "    if d == day_s then unreserve(dayK, c) end\n"                           \
  "    if m == month_s then unreserve(monthK, c) end\n"                       \
  "    redis.call('HDEL', resvK, id)\n"                                       \
  "  end\n"                                                                   \
  "  redis.call('ZREM', leasesK, id)\n"                                       \
  "end\n"                                                                     \
  "local inflight = redis.call('ZCOUNT', leasesK, '(' .. fmt(now), '+inf')\n" \
  "\n"                                                                        \
  "-- a log above a lowered limit is not trimmed: counting all of it\n"      \
  "-- refuses exactly as trimming would, and a refusal changes nothing\n"    \
  "local total = 0\n"                                                         \
  "if rpm > 0 then total = log_expire(rpmL, rpmT, now, 60000) end\n"          \
  "local cap = tpm * 1000\n"                                                  \
  "local stored, bucket = nil, nil\n"                                         \
  "if tpm > 0 then\n"                                                         \
  "  stored = tb_load(tpmK)\n"                                                \
  "  bucket = tb_refill(stored, tpm, now) -- a copy: stored only if admitted\n" \
  "end\n"                                                                     \
  "local w = redis.call('HMGET', dayK, 'spent', 'reserved')\n"                \
  "local dspent, dres = tonumber(w[1] or '0'), tonumber(w[2] or '0')\n"       \
  "w = redis.call('HMGET', monthK, 'spent', 'reserved')\n"                    \
  "local mspent, mres = tonumber(w[1] or '0'), tonumber(w[2] or '0')\n"       \
  "\n"                                                                        \
  "local code, retry = 0, 0\n"                                                \
  "local function refuse(k, r)\n"                                             \
  "  if code == 0 then code = k retry = r end\n"                              \
  "end\n"                                                                     \
  "if conc > 0 and inflight >= conc then refuse(1, 1000) end\n"               \
  "if rpm > 0 and total >= rpm then\n"                                        \
  "  refuse(2, log_wait(rpmL, total, rpm, now, 60000))\n"                     \
  "end\n"                                                                     \
  "if tpm > 0 then\n"                                                         \
  "  local need = math.min(res_mt, cap)\n"                                    \
  "  if bucket.level < need then refuse(3, tb_wait(stored, tpm, need, now)) end\n" \
  "end\n"                                                                     \
  "if dlim > 0 and dspent + dres + cost > dlim then refuse(4, tonumber(ARGV[15])) end\n" \
  "if mlim > 0 and mspent + mres + cost > mlim then refuse(5, tonumber(ARGV[16])) end\n" \
  "\n"                                                                        \
  "if code == 0 then\n"                                                       \
  "  redis.call('ZADD', leasesK, lease_exp, lease)\n"                         \
  "  redis.call('HSET', resvK, lease, day_s .. ' ' .. month_s .. ' ' .. cost_s)\n" \
  "  if rpm > 0 then\n"                                                       \
  "    total = log_append(rpmL, rpmT, now, 60000)\n"                          \
  "  else\n"                                                                  \
  "    redis.call('DEL', rpmL, rpmT) -- unlimited records nothing\n"         \
  "  end\n"                                                                   \
  "  if tpm > 0 then\n"                                                       \
  "    bucket.level = math.max(bucket.level - res_mt, LEVEL_MIN)\n"           \
  "    tb_store(tpmK, bucket, tpm, now)\n"                                    \
  "    stored = bucket\n"                                                     \
  "  end\n"                                                                   \
  "  redis.call('HINCRBY', dayK, 'reserved', cost_s)\n"                       \
  "  redis.call('PEXPIRE', dayK, ARGV[13])\n"                                 \
  "  redis.call('HINCRBY', monthK, 'reserved', cost_s)\n"                     \
  "  redis.call('PEXPIRE', monthK, ARGV[14])\n"                               \
  "end\n"                                                                     \
  "\n"                                                                        \
  "local lr, rr, sr, lt, rt, st = -1, -1, -1, -1, -1, -1\n"                   \
  "if rpm > 0 then\n"                                                         \
  "  lr = rpm\n"                                                              \
  "  rr = math.max(rpm - total, 0)\n"                                         \
  "  sr = log_wait(rpmL, total, rpm, now, 60000)\n"                          \
  "end\n"                                                                     \
  "if tpm > 0 then\n"                                                         \
  "  lt = tpm\n"                                                              \
  "  rt = 0\n"                                                                \
  "  if bucket.level > 0 then rt = idiv(bucket.level, 1000) end\n"            \
  "  st = tb_wait(stored, tpm, cap, now)\n"                                   \
  "end\n"                                                                     \
  "return {code, retry, lr, rr, sr, lt, rt, st}\n"

/* ---- settlement --------------------------------------------------------
 * KEYS: 1 tpm bucket, 2 leases, 3 reservations, 4 day window (admitted
 *       period), 5 month window (admitted period)   (all tagged {tenant})
 * ARGV: 1 now_ms, 2 tpm, 3 1 when the admission charged the bucket,
 *       4 lease id, 5 reserved milli-tokens, 6 actual milli-tokens,
 *       7 reserved cost, 8 actual cost (nano, decimal strings), 9 day
 *       alert threshold, 10 month alert threshold (nano; 0 = no alert)
 * Returns {held, day_alert, day_spent, month_alert, month_spent}: held = 1
 * when the lease's reservation was still counted (0: it had expired and
 * was given back already), *_alert = 1 when this settlement raised the
 * window's alert, *_spent as a decimal string. */
#define TG_REDIS_LUA_SETTLE                                                   \
  TG_REDIS_LUA_LIB                                                            \
  "local now, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])\n"                   \
  "redis.call('ZREM', KEYS[2], ARGV[4])\n"                                    \
  "local held = redis.call('HDEL', KEYS[3], ARGV[4])\n"                       \
  "if ARGV[3] == '1' and tpm > 0 then\n"                                      \
  "  local b = tb_refill(tb_load(KEYS[1]), tpm, now)\n"                       \
  "  local lv = b.level + tonumber(ARGV[5]) - tonumber(ARGV[6])\n"            \
  "  b.level = math.max(math.min(lv, tpm * 1000), LEVEL_MIN)\n"               \
  "  tb_store(KEYS[1], b, tpm, now)\n"                                        \
  "end\n"                                                                     \
  "local function settle(K, thr)\n"                                           \
  "  if redis.call('EXISTS', K) == 0 then return 0, '0' end\n"                \
  "  if held == 1 then unreserve(K, ARGV[7]) end\n"                           \
  "  local spent = redis.call('HINCRBY', K, 'spent', ARGV[8])\n"              \
  "  local alert = 0\n"                                                       \
  "  if thr > 0 and spent >= thr and redis.call('HSETNX', K, 'alerted', '1') == 1 then\n" \
  "    alert = 1\n"                                                           \
  "  end\n"                                                                   \
  "  return alert, redis.call('HGET', K, 'spent')\n"                          \
  "end\n"                                                                     \
  "local da, ds = settle(KEYS[4], tonumber(ARGV[9]))\n"                       \
  "local ma, ms = settle(KEYS[5], tonumber(ARGV[10]))\n"                      \
  "return {held, da, ds, ma, ms}\n"

#endif
