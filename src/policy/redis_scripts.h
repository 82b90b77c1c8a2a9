/* The Lua scripts of the Redis policy backend (state_redis.c), kept as C
 * string constants so they read as Lua. The scripts are the Redis side of
 * the decisions in src/policy/limits.c and follow them step for step; a
 * change to the rules there needs the same change here
 * (docs/state-redis.md lists the keys and arguments).
 *
 * One script call carries a batch: every admission and settlement a loop
 * thread made for one tenant in one loop iteration, in the order made
 * (TG_REDIS_LUA_BATCH), or every global-limit check of the iteration
 * (TG_REDIS_LUA_GLOBAL). The script reads each structure once, applies
 * the operations one after the other in memory with exactly the rules of
 * one call at a time, and writes the result once. Redis runs a script
 * atomically, so a batch is the same as its operations sent one by one
 * with nothing in between: the verdicts are those of that sequence.
 *
 * Why the helpers look the way they do:
 *   - Redis' Lua numbers are doubles. Every number handed to redis.call()
 *     goes through fmt(), because Redis turns a bare Lua number into text
 *     with "%.14g", which writes 10^14 and above in exponent form that
 *     HINCRBY/ZADD then refuse.
 *   - Money arrives as decimal strings. Comparisons read it into doubles,
 *     exact while a window's spent + reserved + cost stays below 2^53
 *     nano-USD (about 9 million USD). A window is written with HSET only
 *     while every figure stayed below 2^53 (so the double is exact);
 *     otherwise its changes are replayed with HINCRBY, exact 64-bit.
 *   - Integer division: math.floor(a / b) is exact for |a| < 2^53, b >= 1
 *     (a correctly rounded quotient cannot cross an integer there).
 *   - Nothing reads the Redis clock (TIME): "now" is the gateway's, passed
 *     in ARGV, so both backends share the same injected-clock meaning.
 *   - Lua's unpack() is bounded by its stack: long argument lists go in
 *     chunks (call_chunked).
 *
 * Sliding logs (requests per minute, global per second) are run-length
 * encoded like tg_slog_t: a list of "<ms> <count>" entries, oldest first,
 * with distinct increasing times, plus a separate key holding the total
 * count. A window of W ms holds at most W entries whatever the limit. A
 * batch reads only the head entries it expires or needs for a wait, and
 * the tail it appends to. */
#ifndef TG_POLICY_REDIS_SCRIPTS_H
#define TG_POLICY_REDIS_SCRIPTS_H

/* Codes an admission returns in its first element. */
#define TG_REDIS_OK          0
#define TG_REDIS_CONCURRENCY 1
#define TG_REDIS_REQUESTS    2
#define TG_REDIS_TOKENS      3
#define TG_REDIS_DAILY       4
#define TG_REDIS_MONTHLY     5

/* Fields of a limits record ("L") in a batch's ARGV, after its kind. */
#define TG_REDIS_LIMIT_FIELDS 7

/* ---- shared helpers (prepended to both scripts) ------------------------ */

#define TG_REDIS_LUA_LIB                                                                                     \
  "-- globals read once: a script's global table is protected, so each\n"                                    \
  "-- global access goes through a metatable\n"                                                              \
  "local tonumber, unpack, rcall = tonumber, unpack, redis.call\n"                                           \
  "local mfloor, mmin, mmax, mabs = math.floor, math.min, math.max, math.abs\n"                              \
  "local smatch, sformat, sbyte, pairs = string.match, string.format, string.byte, pairs\n"                  \
  "local LEVEL_MIN = -4611686018427387904 -- -(2^62), as limits.c\n"                                         \
  "local EXACT = 9007199254740992 -- 2^53: doubles hold every integer below\n"                               \
  "local function fmt(x) return sformat('%d', x) end\n"                                                      \
  "local function idiv(a, b) return mfloor(a / b) end\n"                                                     \
  "local function ceildiv(a, b) return mfloor((a + b - 1) / b) end\n"                                        \
  "-- a command whose arguments may exceed Lua's stack: sent in chunks\n"                                    \
  "local function call_chunked(cmd, key, list)\n"                                                            \
  "  local i = 1\n"                                                                                          \
  "  while i <= #list do\n"                                                                                  \
  "    local j = mmin(i + 999, #list)\n"                                                                     \
  "    rcall(cmd, key, unpack(list, i, j))\n"                                                                \
  "    i = j + 1\n"                                                                                          \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "-- sliding log: list L of '<ms> <n>' (oldest first, distinct increasing\n"                                \
  "-- times), total in key T. Read lazily from the head (and the tail),\n"                                   \
  "-- changed in memory, written once by log_commit.\n"                                                      \
  "local function log_open(L, T) return {L = L, T = T, loaded = false} end\n"                                \
  "local function log_parse(e)\n"                                                                            \
  "  local ts, n = smatch(e, '^(%-?%d+) (%d+)$')\n"                                                          \
  "  return {tonumber(ts), tonumber(n)}\n"                                                                   \
  "end\n"                                                                                                    \
  "local function log_load(g)\n"                                                                             \
  "  if g.loaded then return end\n"                                                                          \
  "  g.loaded = true\n"                                                                                      \
  "  g.len = rcall('LLEN', g.L)\n"                                                                           \
  "  g.total = 0\n"                                                                                          \
  "  if g.len > 0 then g.total = tonumber(rcall('GET', g.T) or '0') end\n"                                   \
  "  g.total0, g.popped, g.cache, g.chunk = g.total, 0, {}, 1\n"                                             \
  "  g.app, g.app_first, g.last_n, g.appended = {}, 1, nil, false\n"                                         \
  "end\n"                                                                                                    \
  "-- the stored entry at 0-based index oi (read in growing chunks)\n"                                       \
  "local function log_orig(g, oi)\n"                                                                         \
  "  local e = g.cache[oi]\n"                                                                                \
  "  if e == nil then\n"                                                                                     \
  "    local chunk = rcall('LRANGE', g.L, oi, oi + g.chunk - 1)\n"                                           \
  "    for j = 1, #chunk do\n"                                                                               \
  "      if g.cache[oi + j - 1] == nil then g.cache[oi + j - 1] = log_parse(chunk[j]) end\n"                 \
  "    end\n"                                                                                                \
  "    if g.chunk < 256 then g.chunk = g.chunk * 4 end\n"                                                    \
  "    e = g.cache[oi]\n"                                                                                    \
  "  end\n"                                                                                                  \
  "  return e\n"                                                                                             \
  "end\n"                                                                                                    \
  "-- the i-th live entry (1 = oldest): ts, n; nil when there is none\n"                                     \
  "local function log_get(g, i)\n"                                                                           \
  "  local oi = g.popped + i - 1\n"                                                                          \
  "  if oi < g.len then\n"                                                                                   \
  "    local e = log_orig(g, oi)\n"                                                                          \
  "    if e == nil then return nil end\n"                                                                    \
  "    if oi == g.len - 1 and g.last_n ~= nil then return e[1], g.last_n end\n"                              \
  "    if g.mod ~= nil and g.mod[oi] ~= nil then return e[1], g.mod[oi] end\n"                               \
  "    return e[1], e[2]\n"                                                                                  \
  "  end\n"                                                                                                  \
  "  local a = g.app[g.app_first + oi - g.len]\n"                                                            \
  "  if a == nil then return nil end\n"                                                                      \
  "  return a[1], a[2]\n"                                                                                    \
  "end\n"                                                                                                    \
  "local function log_clear(g)\n"                                                                            \
  "  if not g.loaded then\n"                                                                                 \
  "    g.loaded, g.len, g.total0, g.cache, g.chunk, g.appended = true, 0, 0, {}, 1, false\n"                 \
  "  end\n"                                                                                                  \
  "  g.popped, g.app, g.app_first, g.last_n, g.total = g.len, {}, 1, nil, 0\n"                               \
  "end\n"                                                                                                    \
  "-- drops the entries that left the window (now - t >= window); returns\n"                                 \
  "-- the admissions left\n"                                                                                 \
  "local function log_expire(g, now, window)\n"                                                              \
  "  log_load(g)\n"                                                                                          \
  "  while g.total > 0 do\n"                                                                                 \
  "    local ts, n = log_get(g, 1)\n"                                                                        \
  "    if ts == nil then g.total = 0 break end\n"                                                            \
  "    if now - ts < window then break end\n"                                                                \
  "    if g.popped < g.len then g.popped = g.popped + 1 else g.app_first = g.app_first + 1 end\n"            \
  "    g.total = g.total - n\n"                                                                              \
  "  end\n"                                                                                                  \
  "  if g.total <= 0 then log_clear(g) end\n"                                                                \
  "  return g.total\n"                                                                                       \
  "end\n"                                                                                                    \
  "-- ms until the count under limit next goes down: until the k-th oldest\n"                                \
  "-- admission leaves, k = total - limit + 1 (the oldest unless a lowered\n"                                \
  "-- limit left more in the log); 0 when empty. Walks only in that case.\n"                                 \
  "local function log_wait(g, limit, now, window)\n"                                                         \
  "  local k = g.total - limit + 1\n"                                                                        \
  "  local seen, i, last = 0, 1, nil\n"                                                                      \
  "  while true do\n"                                                                                        \
  "    local ts, n = log_get(g, i)\n"                                                                        \
  "    if ts == nil then break end\n"                                                                        \
  "    seen = seen + n\n"                                                                                    \
  "    last = ts\n"                                                                                          \
  "    if seen >= k then return ts + window - now end\n"                                                     \
  "    i = i + 1\n"                                                                                          \
  "  end\n"                                                                                                  \
  "  if last == nil then return 0 end\n"                                                                     \
  "  return last + window - now\n"                                                                           \
  "end\n"                                                                                                    \
  "-- n admissions at ts; a clock behind the newest entry counts them there\n"                               \
  "-- (errs toward refusing). Returns the time they were counted at.\n"                                      \
  "local function log_append(g, ts, n)\n"                                                                    \
  "  local at = nil\n"                                                                                       \
  "  if #g.app >= g.app_first then\n"                                                                        \
  "    local a = g.app[#g.app]\n"                                                                            \
  "    if a[1] >= ts then\n"                                                                                 \
  "      a[2] = a[2] + n\n"                                                                                  \
  "      at = a[1]\n"                                                                                        \
  "    end\n"                                                                                                \
  "  elseif g.popped < g.len then\n"                                                                         \
  "    local e = g.cache[g.len - 1]\n"                                                                       \
  "    if e == nil then\n"                                                                                   \
  "      e = log_parse(rcall('LINDEX', g.L, -1))\n"                                                          \
  "      g.cache[g.len - 1] = e\n"                                                                           \
  "    end\n"                                                                                                \
  "    if e[1] >= ts then\n"                                                                                 \
  "      g.last_n = (g.last_n or e[2]) + n\n"                                                                \
  "      at = e[1]\n"                                                                                        \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  if at == nil then\n"                                                                                    \
  "    g.app[#g.app + 1] = {ts, n}\n"                                                                        \
  "    at = ts\n"                                                                                            \
  "  end\n"                                                                                                  \
  "  g.total = g.total + n\n"                                                                                \
  "  g.appended = true\n"                                                                                    \
  "  return at\n"                                                                                            \
  "end\n"                                                                                                    \
  "-- takes back up to n admissions counted at ts (a holding's unused\n"                                     \
  "-- grant): found among the newest 16 entries, else left to expire (errs\n"                                \
  "-- toward refusing)\n"                                                                                    \
  "local function log_give_back(g, ts, n)\n"                                                                 \
  "  log_load(g)\n"                                                                                          \
  "  for i = #g.app, g.app_first, -1 do\n"                                                                   \
  "    local a = g.app[i]\n"                                                                                 \
  "    if a[1] == ts then\n"                                                                                 \
  "      local d = mmin(n, a[2])\n"                                                                          \
  "      a[2], g.total = a[2] - d, g.total - d\n"                                                            \
  "      return\n"                                                                                           \
  "    end\n"                                                                                                \
  "    if a[1] < ts then return end\n"                                                                       \
  "  end\n"                                                                                                  \
  "  local live = g.len - g.popped\n"                                                                        \
  "  for j = 1, mmin(live, 16) do\n"                                                                         \
  "    local oi = g.len - j\n"                                                                               \
  "    local e = g.cache[oi]\n"                                                                              \
  "    if e == nil then\n"                                                                                   \
  "      local chunk = rcall('LRANGE', g.L, mmax(oi - 15, g.popped), oi)\n"                                  \
  "      local first = oi - #chunk + 1\n"                                                                    \
  "      for x = 1, #chunk do\n"                                                                             \
  "        if g.cache[first + x - 1] == nil then g.cache[first + x - 1] = log_parse(chunk[x]) end\n"         \
  "      end\n"                                                                                              \
  "      e = g.cache[oi]\n"                                                                                  \
  "      if e == nil then return end\n"                                                                      \
  "    end\n"                                                                                                \
  "    if e[1] == ts then\n"                                                                                 \
  "      if oi == g.len - 1 then\n"                                                                          \
  "        local cur = g.last_n or e[2]\n"                                                                   \
  "        local d = mmin(n, cur)\n"                                                                         \
  "        g.last_n, g.total = cur - d, g.total - d\n"                                                       \
  "      else\n"                                                                                             \
  "        g.mod = g.mod or {}\n"                                                                            \
  "        local cur = g.mod[oi] or e[2]\n"                                                                  \
  "        local d = mmin(n, cur)\n"                                                                         \
  "        g.mod[oi], g.total = cur - d, g.total - d\n"                                                      \
  "      end\n"                                                                                              \
  "      return\n"                                                                                           \
  "    end\n"                                                                                                \
  "    if e[1] < ts then return end\n"                                                                       \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "-- writes what changed; the keys live a window past a minute of skew\n"                                   \
  "local function log_commit(g, window)\n"                                                                   \
  "  if not g.loaded then return end\n"                                                                      \
  "  local live_orig = g.len - g.popped\n"                                                                   \
  "  if g.total <= 0 or live_orig + #g.app - g.app_first + 1 <= 0 then\n"                                    \
  "    rcall('DEL', g.L, g.T)\n"                                                                             \
  "    return\n"                                                                                             \
  "  end\n"                                                                                                  \
  "  if g.popped > 0 then\n"                                                                                 \
  "    if live_orig > 0 then rcall('LTRIM', g.L, g.popped, -1) else rcall('DEL', g.L) end\n"                 \
  "  end\n"                                                                                                  \
  "  if g.mod ~= nil then\n"                                                                                 \
  "    for oi, n in pairs(g.mod) do\n"                                                                       \
  "      if oi >= g.popped and oi < g.len - 1 then\n"                                                        \
  "        rcall('LSET', g.L, oi - g.popped, fmt(g.cache[oi][1]) .. ' ' .. fmt(n))\n"                        \
  "      end\n"                                                                                              \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  if g.last_n ~= nil and live_orig > 0 then\n"                                                            \
  "    rcall('LSET', g.L, -1, fmt(g.cache[g.len - 1][1]) .. ' ' .. fmt(g.last_n))\n"                         \
  "  end\n"                                                                                                  \
  "  if #g.app >= g.app_first then\n"                                                                        \
  "    local items = {}\n"                                                                                   \
  "    for i = g.app_first, #g.app do items[#items + 1] = fmt(g.app[i][1]) .. ' ' .. fmt(g.app[i][2]) end\n" \
  "    call_chunked('RPUSH', g.L, items)\n"                                                                  \
  "  end\n"                                                                                                  \
  "  if g.appended then\n"                                                                                   \
  "    rcall('SET', g.T, fmt(g.total), 'PX', fmt(window + 60000))\n"                                         \
  "    rcall('PEXPIRE', g.L, fmt(window + 60000))\n"                                                         \
  "  elseif g.total ~= g.total0 then\n"                                                                      \
  "    rcall('SET', g.T, fmt(g.total), 'KEEPTTL')\n"                                                         \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "\n"                                                                                                       \
  "-- token bucket: hash B {level_mt, updated_ms}; absent = never used. t.has,\n"                            \
  "-- t.level, t.updated hold the stored bucket (read once, written once).\n"                                \
  "local function tb_get(t)\n"                                                                               \
  "  if not t.loaded then\n"                                                                                 \
  "    t.loaded = true\n"                                                                                    \
  "    local v = rcall('HMGET', t.B, 'level_mt', 'updated_ms')\n"                                            \
  "    if v[1] and v[2] then t.has, t.level, t.updated = true, tonumber(v[1]), tonumber(v[2]) end\n"         \
  "  end\n"                                                                                                  \
  "  return t\n"                                                                                             \
  "end\n"                                                                                                    \
  "-- tg_tbucket_refill of the stored bucket to now, returned (level,\n"                                     \
  "-- updated), not stored: a never-used bucket starts full; else it gains\n"                                \
  "-- floor(e * cap / 60000) = q * cap + floor(r * tpm / 60) (e = q minutes\n"                               \
  "-- and r ms), which keeps every product below 2^53 for tpm < 1.5e11\n"                                    \
  "local function tb_refill(t, tpm, now)\n"                                                                  \
  "  local cap = tpm * 1000\n"                                                                               \
  "  if not t.has then return cap, now end\n"                                                                \
  "  local level = t.level\n"                                                                                \
  "  if now > t.updated then\n"                                                                              \
  "    local e = now - t.updated\n"                                                                          \
  "    local deficit = cap - level\n"                                                                        \
  "    local q = idiv(e, 60000)\n"                                                                           \
  "    if deficit <= 0 or q > idiv(deficit, cap) then\n"                                                     \
  "      level = cap -- whole minutes alone fill it\n"                                                       \
  "    else\n"                                                                                               \
  "      level = mmin(cap, level + q * cap + idiv((e - q * 60000) * tpm, 60))\n"                             \
  "    end\n"                                                                                                \
  "    return level, now\n"                                                                                  \
  "  end\n"                                                                                                  \
  "  if level > cap then level = cap end\n"                                                                  \
  "  return level, t.updated\n"                                                                              \
  "end\n"                                                                                                    \
  "-- ms until a bucket (level, updated) holds target (limits.c\n"                                           \
  "-- tbucket_wait): ceil(d * 60000 / cap) written as ceil(d * 60 / tpm)\n"                                  \
  "local function tb_wait(has, level, updated, tpm, target, now)\n"                                          \
  "  if not has or tpm <= 0 then return 0 end\n"                                                             \
  "  local lv = mmin(level, tpm * 1000)\n"                                                                   \
  "  if lv >= target then return 0 end\n"                                                                    \
  "  local w = ceildiv((target - lv) * 60, tpm) - (now - updated)\n"                                         \
  "  if w > 0 then return w end\n"                                                                           \
  "  return 0\n"                                                                                             \
  "end\n"                                                                                                    \
  "local function tb_set(t, level, updated, tpm, now)\n"                                                     \
  "  t.has, t.level, t.updated, t.dirty, t.tpm, t.now = true, level, updated, true, tpm, now\n"              \
  "end\n"                                                                                                    \
  "-- the key lives until the bucket would be full again\n"                                                  \
  "local function tb_commit(t)\n"                                                                            \
  "  if not t.dirty then return end\n"                                                                       \
  "  rcall('HSET', t.B, 'level_mt', fmt(t.level), 'updated_ms', fmt(t.updated))\n"                           \
  "  rcall('PEXPIRE', t.B, fmt(tb_wait(true, t.level, t.updated, t.tpm, t.tpm * 1000, t.now) + 60000))\n"    \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "\n"                                                                                                       \
  "-- budget window: hash {spent, reserved, alerted}, read once, changed in\n"                               \
  "-- memory. Written with HSET while every figure stays below 2^53 (exact in\n"                             \
  "-- a double); otherwise the changes are replayed with HINCRBY, exact 64-bit.\n"                           \
  "local function win_open(K)\n"                                                                             \
  "  local v = rcall('HMGET', K, 'spent', 'reserved', 'alerted')\n"                                          \
  "  local w = {K = K, kind = {}, arg = {}, exact = true}\n"                                                 \
  "  w.exists = (v[1] or v[2] or v[3]) and true or false\n"                                                  \
  "  w.spent, w.reserved = tonumber(v[1] or '0'), tonumber(v[2] or '0')\n"                                   \
  "  w.alerted = v[3] and true or false\n"                                                                   \
  "  if mabs(w.spent) >= EXACT or mabs(w.reserved) >= EXACT then w.exact = false end\n"                      \
  "  return w\n"                                                                                             \
  "end\n"                                                                                                    \
  "local function win_num(w, x)\n"                                                                           \
  "  if x >= EXACT or x <= -EXACT then w.exact = false end\n"                                                \
  "  return x\n"                                                                                             \
  "end\n"                                                                                                    \
  "local function win_reserve(w, c, cn, ttl)\n"                                                              \
  "  w.exists = true\n"                                                                                      \
  "  w.reserved = win_num(w, w.reserved + win_num(w, cn))\n"                                                 \
  "  local n = #w.kind + 1\n"                                                                                \
  "  w.kind[n], w.arg[n] = 'r', c\n"                                                                         \
  "  w.ttl = ttl\n"                                                                                          \
  "end\n"                                                                                                    \
  "local function win_unreserve(w, c)\n"                                                                     \
  "  if c == '0' or not w.exists then return end\n"                                                          \
  "  w.reserved = mmax(0, w.reserved - win_num(w, tonumber(c)))\n"                                           \
  "  local n = #w.kind + 1\n"                                                                                \
  "  w.kind[n], w.arg[n] = 'u', c\n"                                                                         \
  "end\n"                                                                                                    \
  "-- res[at], res[at + 1] = 1 and spent (text) when this raised the alert. A\n"                             \
  "-- window Redis lost (restart, failover, eviction) is made again with its\n"                              \
  "-- ttl: a request admitted before the loss still counts.\n"                                               \
  "local function win_settle(w, held, rc, ac, thr, res, at, ttl)\n"                                          \
  "  if not w.exists then\n"                                                                                 \
  "    if ttl <= 0 then return end\n"                                                                        \
  "    w.exists, w.ttl = true, ttl\n"                                                                        \
  "  end\n"                                                                                                  \
  "  if held == 1 then win_unreserve(w, rc) end\n"                                                           \
  "  w.spent = win_num(w, w.spent + win_num(w, tonumber(ac)))\n"                                             \
  "  if thr > 0 and w.spent >= thr and not w.alerted then\n"                                                 \
  "    w.alerted, w.alert_new, res[at], res[at + 1] = true, true, 1, fmt(w.spent)\n"                         \
  "  end\n"                                                                                                  \
  "  local n = #w.kind + 1\n"                                                                                \
  "  w.kind[n], w.arg[n] = 's', {ac, thr, res, at}\n"                                                        \
  "end\n"                                                                                                    \
  "-- writes the window; returns its spent (text)\n"                                                         \
  "local function win_commit(w)\n"                                                                           \
  "  local n = #w.kind\n"                                                                                    \
  "  if n > 0 and w.exact then\n"                                                                            \
  "    local a, r, s = {}, false, false\n"                                                                   \
  "    for i = 1, n do\n"                                                                                    \
  "      if w.kind[i] == 's' then s = true else r = true end\n"                                              \
  "    end\n"                                                                                                \
  "    if r then a[#a + 1] = 'reserved' a[#a + 1] = fmt(w.reserved) end\n"                                   \
  "    if s then a[#a + 1] = 'spent' a[#a + 1] = fmt(w.spent) end\n"                                         \
  "    if w.alert_new then a[#a + 1] = 'alerted' a[#a + 1] = '1' end\n"                                      \
  "    rcall('HSET', w.K, unpack(a))\n"                                                                      \
  "  elseif n > 0 then\n"                                                                                    \
  "    for i = 1, n do\n"                                                                                    \
  "      local k, x = w.kind[i], w.arg[i]\n"                                                                 \
  "      if k == 'r' then\n"                                                                                 \
  "        rcall('HINCRBY', w.K, 'reserved', x)\n"                                                           \
  "      elseif k == 'u' then\n"                                                                             \
  "        if rcall('HINCRBY', w.K, 'reserved', '-' .. x) < 0 then\n"                                        \
  "          rcall('HSET', w.K, 'reserved', '0')\n"                                                          \
  "        end\n"                                                                                            \
  "      else\n"                                                                                             \
  "        local res, at = x[3], x[4]\n"                                                                     \
  "        local spent = rcall('HINCRBY', w.K, 'spent', x[1])\n"                                             \
  "        res[at], res[at + 1] = 0, ''\n"                                                                   \
  "        if x[2] > 0 and spent >= x[2] and rcall('HSETNX', w.K, 'alerted', '1') == 1 then\n"               \
  "          res[at], res[at + 1] = 1, rcall('HGET', w.K, 'spent')\n"                                        \
  "        end\n"                                                                                            \
  "      end\n"                                                                                              \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  if w.ttl then rcall('PEXPIRE', w.K, fmt(w.ttl)) end\n"                                                  \
  "  if not w.exists then return '0' end\n"                                                                  \
  "  if w.exact then return fmt(w.spent) end\n"                                                              \
  "  return rcall('HGET', w.K, 'spent') or '0'\n"                                                            \
  "end\n"

/* ---- global requests per second ---------------------------------------
 * KEYS: 1 log list, 2 log total          ({global} tag)
 * ARGV: 1 n, then n pairs: now_ms, rps (> 0)
 * Returns one {1, 0} (admitted, recorded) or {0, retry_after_ms} per
 * check, in order. */
#define TG_REDIS_LUA_GLOBAL                                                   \
  TG_REDIS_LUA_LIB                                                            \
  "local g = log_open(KEYS[1], KEYS[2])\n"                                    \
  "local n = tonumber(ARGV[1])\n"                                             \
  "local out = {}\n"                                                          \
  "for i = 1, n do\n"                                                         \
  "  local now, rps = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])\n"     \
  "  if log_expire(g, now, 1000) >= rps then\n"                               \
  "    out[i] = {0, log_wait(g, rps, now, 1000)}\n"                           \
  "  else\n"                                                                  \
  "    log_append(g, now, 1)\n"                                                \
  "    out[i] = {1, 0}\n"                                                     \
  "  end\n"                                                                   \
  "end\n"                                                                     \
  "log_commit(g, 1000)\n"                                                     \
  "return out\n"

/* ---- global give-back ----------------------------------------------------
 * KEYS: 1 log list, 2 log total          ({global} tag)
 * ARGV: 1 the times (ms, space-separated) of admissions the global script
 *       made and their tenants' limits then refused
 * Each takes one admission back from the entry stamped with its time, as
 * tg_global_unadmit() does: searched from the newest, it is a few entries
 * back at most. None: it left the window, or another gateway's later
 * clock stamped it later (it then stays counted: toward refusing). */
#define TG_REDIS_LUA_GLOBAL_UNDO                                              \
  "local total = tonumber(redis.call('GET', KEYS[2]) or '0')\n"               \
  "local len = redis.call('LLEN', KEYS[1])\n"                                 \
  "for t in string.gmatch(ARGV[1], '%-?%d+') do\n"                            \
  "  t = tonumber(t)\n"                                                       \
  "  local i = -1\n"                                                          \
  "  while total > 0 and -i <= len do\n"                                      \
  "    local e = redis.call('LINDEX', KEYS[1], i)\n"                          \
  "    local ts, c = string.match(e, '^(%-?%d+) (%d+)$')\n"                   \
  "    if tonumber(ts) < t then break end\n"                                  \
  "    if tonumber(ts) == t then\n"                                           \
  "      c = tonumber(c)\n"                                                   \
  "      if c > 1 then\n"                                                     \
  "        redis.call('LSET', KEYS[1], i, ts .. ' ' .. string.format('%d', c - 1))\n" \
  "      else\n"                                                              \
  "        redis.call('LREM', KEYS[1], -1, e)\n"                              \
  "        len = len - 1\n"                                                   \
  "      end\n"                                                               \
  "      total = total - 1\n"                                                 \
  "      break\n"                                                             \
  "    end\n"                                                                 \
  "    i = i - 1\n"                                                           \
  "  end\n"                                                                   \
  "end\n"                                                                     \
  "if total <= 0 or len == 0 then\n"                                          \
  "  redis.call('DEL', KEYS[1], KEYS[2])\n"                                   \
  "else\n"                                                                    \
  "  redis.call('SET', KEYS[2], string.format('%d', total), 'KEEPTTL')\n"     \
  "end\n"                                                                     \
  "return 0\n"

/* ---- tenant batch --------------------------------------------------------
 * KEYS: 1 rpm log, 2 rpm total, 3 tpm bucket, 4 leases, 5 holdings, then 5 + i:
 *       window i (tg:{T}:day:<d> or tg:{T}:month:<m>), the windows the
 *       operations name                        (all tagged {tenant})
 * ARGV: lease ttl ms, number of windows, then for each window its period,
 *       the ms its period ends and how long its key outlives that, then
 *       records in the order made:
 *   "L" and 7 more arguments: the limits of the operations that follow:
 *       rpm, tpm, concurrency, day limit, month limit (nano), day and
 *       month alert thresholds (nano; 0 = none). Sent before the first
 *       operation and whenever they change.
 *   an operation: one argument, its fields separated by single spaces
 *   "A <now_ms> <reserved milli-tokens> <reserved cost (nano)> <lease
 *       member: id day month cost> <day window> <month window>" (window
 *       indexes), an admission
 *   "S <now_ms> <1 when the admission charged the bucket, else 0> <lease
 *       member> <reserved milli-tokens> <actual milli-tokens> <reserved
 *       cost> <actual cost> <day window> <month window>" (of the admitted
 *       periods), a settlement
 *   "H <now_ms> <holding id> <old day window> <old month window> <day
 *       window> <month window> <unused requests> <the time they were
 *       counted at> <token refund (milli-tokens, signed)> <spent (nano)>
 *       <slots kept> <cost kept> <requests wanted> <milli-tokens each>
 *       <cost each> <slots wanted> <until>", a holding's sync
 *       (docs/state-redis.md, Holdings)
 * Returns one flat array (fewer objects to build and to parse): for each
 * admission or settlement in order its figures, then each window's spent:
 *   admission  code, retry_after_ms, limit_requests, remaining_requests,
 *              reset_requests_ms, limit_tokens, remaining_tokens,
 *              reset_tokens_ms; -1 = unlimited. A refusal changes nothing
 *              but what nobody can observe (expired log entries, dead
 *              leases).
 *   sync       held, requests granted, milli-tokens, cost, slots, the time
 *              the grant's requests are counted at, the six x-ratelimit
 *              figures as an admission's, then day_alert, day_spent,
 *              month_alert, month_spent as a settlement's
 *   settlement held, day_alert, day_spent, month_alert, month_spent:
 *              held = 1 when the lease (and so its reservation) was still
 *              there; *_alert = 1 when it raised the window's alert, and
 *              then *_spent is the window's spent (decimal text), else ""
 *   windows    spent of window 1, 2, ...: decimal text after the batch
 *              ("0" when the window does not exist). */
#define TG_REDIS_LUA_BATCH                                                                                   \
  TG_REDIS_LUA_LIB                                                                                           \
  "local LOG = log_open(KEYS[1], KEYS[2])\n"                                                                 \
  "local TB = {B = KEYS[3], loaded = false}\n"                                                               \
  "local leasesK, holdsK = KEYS[4], KEYS[5]\n"                                                               \
  "\n"                                                                                                       \
  "-- ARGV: lease ttl, the number of windows, each window's period, end and\n"                               \
  "-- keep ms, then the operations in the order the gateway made them. An 'L'\n"                             \
  "-- record sets the limits of the operations that follow it.\n"                                            \
  "local lease_ttl, nw = tonumber(ARGV[1]), tonumber(ARGV[2])\n"                                             \
  "local WIN = {}\n"                                                                                         \
  "for i = 1, nw do\n"                                                                                       \
  "  local q = 3 * i\n"                                                                                      \
  "  WIN[i] = {period = ARGV[q], e = tonumber(ARGV[q + 1]), keep = tonumber(ARGV[q + 2])}\n"                 \
  "end\n"                                                                                                    \
  "-- each operation is one argument, its fields separated by spaces: the\n"                                 \
  "-- argument, its kind ('A' 65, 'S' 83, 'H' 72), now and limits\n"                                         \
  "local recs, kinds, nows, lims = {}, {}, {}, {}\n"                                                         \
  "local nA, min_now, max_now, last_admit = 0, nil, nil, 0\n"                                                \
  "do\n"                                                                                                     \
  "  local p, L, nargs = 3 + 3 * nw, nil, #ARGV\n"                                                           \
  "  while p <= nargs do\n"                                                                                  \
  "    if ARGV[p] == 'L' then\n"                                                                             \
  "      L = {rpm = tonumber(ARGV[p + 1]), tpm = tonumber(ARGV[p + 2]), conc = tonumber(ARGV[p + 3]),\n"     \
  "           dlim = tonumber(ARGV[p + 4]), mlim = tonumber(ARGV[p + 5]),\n"                                 \
  "           dthr = tonumber(ARGV[p + 6]), mthr = tonumber(ARGV[p + 7])}\n"                                 \
  "      p = p + 8\n"                                                                                        \
  "    else\n"                                                                                               \
  "      local rec = ARGV[p]\n"                                                                              \
  "      local i, kind, now = #recs + 1, sbyte(rec, 1), tonumber(smatch(rec, '^%a (%-?%d+)'))\n"             \
  "      recs[i], kinds[i], nows[i], lims[i] = rec, kind, now, L\n"                                          \
  "      if kind == 65 or kind == 72 then\n"                                                                 \
  "        nA, last_admit = nA + 1, i\n"                                                                     \
  "        if min_now == nil or now < min_now then min_now = now end\n"                                      \
  "        if max_now == nil or now > max_now then max_now = now end\n"                                      \
  "      end\n"                                                                                              \
  "      p = p + 1\n"                                                                                        \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "local W = {}\n"                                                                                           \
  "local function win(i)\n"                                                                                  \
  "  if W[i] == nil then W[i] = win_open(KEYS[5 + i]) end\n"                                                 \
  "  return W[i]\n"                                                                                          \
  "end\n"                                                                                                    \
  "-- the ms window i's key lives from now, as every write sets it\n"                                        \
  "local function wttl(i, now) return WIN[i].e + WIN[i].keep - now end\n"                                    \
  "\n"                                                                                                       \
  "-- leases: members '<id> <day> <month> <cost>' (the lease and the money it\n"                             \
  "-- reserved in that day and month), scored by expiry. Live ones are\n"                                    \
  "-- counted as ZCOUNT (now, +inf) would count them before each admission:\n"                               \
  "-- those expiring after the batch's latest now (C), plus those expiring\n"                                \
  "-- within its span (few), plus this batch's own, less what the batch\n"                                   \
  "-- removed. Changes are written at the end.\n"                                                            \
  "local C, dead, dp, span = 0, {}, 1, {}\n"                                                                 \
  "local added, added_live, added_min = {}, 0, nil\n"                                                        \
  "local gone, zrem = {}, {}\n"                                                                              \
  "local near, truncated = {}, false\n"                                                                      \
  "if nA > 0 then\n"                                                                                         \
  "  local lim = 256 * nA\n"                                                                                 \
  "  local d = rcall('ZRANGEBYSCORE', leasesK, '-inf', fmt(max_now), 'WITHSCORES', 'LIMIT', 0, lim)\n"       \
  "  for j = 1, #d, 2 do\n"                                                                                  \
  "    local e = {d[j], tonumber(d[j + 1])}\n"                                                               \
  "    dead[#dead + 1] = e\n"                                                                                \
  "    near[e[1]] = e\n"                                                                                     \
  "    if e[2] > min_now then span[#span + 1] = e end\n"                                                     \
  "  end\n"                                                                                                  \
  "  truncated = #dead == lim\n"                                                                             \
  "  if truncated and min_now < max_now then\n"                                                              \
  "    d = rcall('ZRANGEBYSCORE', leasesK, '(' .. fmt(min_now), fmt(max_now), 'WITHSCORES')\n"               \
  "    for j = 1, #d, 2 do\n"                                                                                \
  "      if near[d[j]] == nil then\n"                                                                        \
  "        local e = {d[j], tonumber(d[j + 1])}\n"                                                           \
  "        near[e[1]] = e\n"                                                                                 \
  "        span[#span + 1] = e\n"                                                                            \
  "      end\n"                                                                                              \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  C = rcall('ZCOUNT', leasesK, '(' .. fmt(max_now), '+inf')\n"                                            \
  "end\n"                                                                                                    \
  "local function inflight(now)\n"                                                                           \
  "  local c = C\n"                                                                                          \
  "  for i = 1, #span do\n"                                                                                  \
  "    local e = span[i]\n"                                                                                  \
  "    if not gone[e[1]] and e[2] > now then c = c + 1 end\n"                                                \
  "  end\n"                                                                                                  \
  "  if added_live > 0 then\n"                                                                               \
  "    if added_min > now then\n"                                                                            \
  "      c = c + added_live\n"                                                                               \
  "    else\n"                                                                                               \
  "      for i = 1, #added do\n"                                                                             \
  "        local e = added[i]\n"                                                                             \
  "        if not gone[e[1]] and e[2] > now then c = c + 1 end\n"                                            \
  "      end\n"                                                                                              \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  return c\n"                                                                                             \
  "end\n"                                                                                                    \
  "-- the settled leases' expiries (false: gone already), in one call where\n"                               \
  "-- Redis has ZMSCORE (6.2)\n"                                                                             \
  "local score0 = {}\n"                                                                                      \
  "do\n"                                                                                                     \
  "  local ids = {}\n"                                                                                       \
  "  for i = 1, #recs do\n"                                                                                  \
  "    if kinds[i] == 83 then ids[#ids + 1] = smatch(recs[i], '^S %-?%d+ %d (%S+ %-?%d+ %-?%d+ %d+)') end\n" \
  "  end\n"                                                                                                  \
  "  if #ids > 0 then\n"                                                                                     \
  "    local v = redis.pcall('ZMSCORE', leasesK, unpack(ids))\n"                                             \
  "    if type(v) ~= 'table' or v.err ~= nil then\n"                                                         \
  "      v = {}\n"                                                                                           \
  "      for j = 1, #ids do v[j] = rcall('ZSCORE', leasesK, ids[j]) end\n"                                   \
  "    end\n"                                                                                                \
  "    for j = 1, #ids do score0[ids[j]] = v[j] and tonumber(v[j]) or false end\n"                           \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "-- a lease nobody renewed: its slot and the money it reserved in the\n"                                   \
  "-- admitting request's current windows come back\n"                                                       \
  "local function release(m, dw, mw)\n"                                                                      \
  "  gone[m] = true\n"                                                                                       \
  "  local d, mo, c = smatch(m, ' (%-?%d+) (%-?%d+) (%d+)$')\n"                                              \
  "  if d then\n"                                                                                            \
  "    if d == WIN[dw].period then win_unreserve(win(dw), c) end\n"                                          \
  "    if mo == WIN[mw].period then win_unreserve(win(mw), c) end\n"                                         \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "local function sweep(now, dw, mw)\n"                                                                      \
  "  local swept = 0\n"                                                                                      \
  "  while dp <= #dead and swept < 256 do\n"                                                                 \
  "    local e = dead[dp]\n"                                                                                 \
  "    if e[2] > now then break end\n"                                                                       \
  "    dp = dp + 1\n"                                                                                        \
  "    if not gone[e[1]] then\n"                                                                             \
  "      zrem[#zrem + 1] = e[1]\n"                                                                           \
  "      release(e[1], dw, mw)\n"                                                                            \
  "      swept = swept + 1\n"                                                                                \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  if added_live > 0 and added_min <= now then\n"                                                          \
  "    for _, e in ipairs(added) do\n"                                                                       \
  "      if not gone[e[1]] and e[2] <= now then\n"                                                           \
  "        added_live = added_live - 1\n"                                                                    \
  "        release(e[1], dw, mw)\n"                                                                          \
  "      end\n"                                                                                              \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "-- holdings: members '<hid> <slots> <day> <month> <cost>' of tg:{T}:holds,\n"                             \
  "-- scored by expiry, one per gateway loop thread that holds a grant or\n"                                 \
  "-- requests admitted from one (docs/state-redis.md, Holdings): its slots\n"                               \
  "-- count as leases, its cost is reserved in that day and month. Few, so\n"                                \
  "-- read whole once per batch that admits or syncs.\n"                                                     \
  "local HOLD, hlist, hzrem, hloaded = {}, {}, {}, false\n"                                                  \
  "local function holds_load()\n"                                                                            \
  "  if hloaded then return end\n"                                                                           \
  "  hloaded = true\n"                                                                                       \
  "  local d = rcall('ZRANGE', holdsK, 0, -1, 'WITHSCORES')\n"                                               \
  "  for j = 1, #d, 2 do\n"                                                                                  \
  "    local hid, sl, dd, mo, c = smatch(d[j], '^(%S+) (%d+) (%-?%d+) (%-?%d+) (%d+)$')\n"                   \
  "    if hid then\n"                                                                                        \
  "      local h = {m = d[j], exp = tonumber(d[j + 1]), slots = tonumber(sl), day = dd, month = mo, cost = c}\n" \
  "      HOLD[hid] = h\n"                                                                                    \
  "      hlist[#hlist + 1] = h\n"                                                                            \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "-- a holding goes: its money comes back from whichever of the batch's\n"                                  \
  "-- windows dw, dw2 (day), mw, mw2 (month) is its period\n"                                                \
  "local function hold_drop(h, dw, mw, dw2, mw2)\n"                                                          \
  "  h.gone = true\n"                                                                                        \
  "  if not h.new then hzrem[#hzrem + 1] = h.m end\n"                                                        \
  "  for _, i in ipairs({dw, dw2}) do\n"                                                                     \
  "    if i and WIN[i].period == h.day then win_unreserve(win(i), h.cost) break end\n"                       \
  "  end\n"                                                                                                  \
  "  for _, i in ipairs({mw, mw2}) do\n"                                                                     \
  "    if i and WIN[i].period == h.month then win_unreserve(win(i), h.cost) break end\n"                     \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "-- live holdings' slots at now; expired ones are dropped on the way\n"                                    \
  "local function hold_slots(now, dw, mw)\n"                                                                 \
  "  holds_load()\n"                                                                                         \
  "  local n = 0\n"                                                                                          \
  "  for _, h in ipairs(hlist) do\n"                                                                         \
  "    if not h.gone then\n"                                                                                 \
  "      if h.exp > now then n = n + h.slots else hold_drop(h, dw, mw) end\n"                                \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  return n\n"                                                                                             \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "-- one flat reply: 8 figures per admission, 5 per settlement, 16 per\n"                                   \
  "-- holding sync, then the windows' spent\n"                                                               \
  "local out = {}\n"                                                                                         \
  "-- A <now> <reserved mt> <cost> <lease member (4 fields)> <day win> <month win>\n"                        \
  "local function admit(rec, now, lim)\n"                                                                    \
  "  local res_mt, cost_s, m, dwi, mwi =\n"                                                                  \
  "    smatch(rec, '^A %-?%d+ (%d+) (%d+) (%S+ %-?%d+ %-?%d+ %d+) (%d+) (%d+)$')\n"                          \
  "  res_mt, dwi, mwi = tonumber(res_mt), tonumber(dwi), tonumber(mwi)\n"                                    \
  "  sweep(now, dwi, mwi)\n"                                                                                 \
  "  local inf = inflight(now) + hold_slots(now, dwi, mwi)\n"                                                \
  "  local rpm, tpm, cap = lim.rpm, lim.tpm, lim.tpm * 1000\n"                                               \
  "  -- a log above a lowered limit is not trimmed: counting all of it\n"                                    \
  "  -- refuses exactly as trimming would, and a refusal changes nothing\n"                                  \
  "  local total = 0\n"                                                                                      \
  "  if rpm > 0 then total = log_expire(LOG, now, 60000) end\n"                                              \
  "  local has, level, updated = false, 0, 0\n"                                                              \
  "  if tpm > 0 then\n"                                                                                      \
  "    tb_get(TB)\n"                                                                                         \
  "    has = TB.has\n"                                                                                       \
  "    level, updated = tb_refill(TB, tpm, now) -- a copy: stored only if admitted\n"                        \
  "  end\n"                                                                                                  \
  "  local dw, mw = win(dwi), win(mwi)\n"                                                                    \
  "  local cost = tonumber(cost_s)\n"                                                                        \
  "  -- the first refusal names the limit; the wait is the longest of them all\n"                            \
  "  local code, retry = 0, 0\n"                                                                             \
  "  local function refuse(c, r)\n"                                                                          \
  "    if code == 0 then code = c end\n"                                                                     \
  "    if r > retry then retry = r end\n"                                                                    \
  "  end\n"                                                                                                  \
  "  if lim.conc > 0 and inf >= lim.conc then refuse(1, 1000) end\n"                                         \
  "  if rpm > 0 and total >= rpm then refuse(2, log_wait(LOG, rpm, now, 60000)) end\n"                       \
  "  if tpm > 0 and level < mmin(res_mt, cap) then\n"                                                        \
  "    refuse(3, tb_wait(has, TB.level, TB.updated, tpm, mmin(res_mt, cap), now))\n"                         \
  "  end\n"                                                                                                  \
  "  if lim.dlim > 0 and dw.spent + dw.reserved + cost > lim.dlim then refuse(4, WIN[dwi].e - now) end\n"    \
  "  if lim.mlim > 0 and mw.spent + mw.reserved + cost > lim.mlim then refuse(5, WIN[mwi].e - now) end\n"    \
  "  if code == 0 then\n"                                                                                    \
  "    local exp = now + lease_ttl\n"                                                                        \
  "    added[#added + 1] = {m, exp}\n"                                                                       \
  "    added_live = added_live + 1\n"                                                                        \
  "    if added_min == nil or exp < added_min then added_min = exp end\n"                                    \
  "    if rpm > 0 then\n"                                                                                    \
  "      log_append(LOG, now, 1)\n"                                                                          \
  "      total = LOG.total\n"                                                                                \
  "    else\n"                                                                                               \
  "      log_clear(LOG) -- unlimited records nothing\n"                                                      \
  "    end\n"                                                                                                \
  "    if tpm > 0 then\n"                                                                                    \
  "      level = mmax(level - res_mt, LEVEL_MIN)\n"                                                          \
  "      tb_set(TB, level, updated, tpm, now)\n"                                                             \
  "    end\n"                                                                                                \
  "    win_reserve(dw, cost_s, cost, wttl(dwi, now))\n"                                                      \
  "    win_reserve(mw, cost_s, cost, wttl(mwi, now))\n"                                                      \
  "  end\n"                                                                                                  \
  "  local n = #out\n"                                                                                       \
  "  out[n + 1], out[n + 2] = code, retry\n"                                                                 \
  "  if rpm > 0 then\n"                                                                                      \
  "    out[n + 3], out[n + 4], out[n + 5] = rpm, mmax(rpm - total, 0), log_wait(LOG, rpm, now, 60000)\n"     \
  "  else\n"                                                                                                 \
  "    out[n + 3], out[n + 4], out[n + 5] = -1, -1, -1\n"                                                    \
  "  end\n"                                                                                                  \
  "  if tpm > 0 then\n"                                                                                      \
  "    local rt = 0\n"                                                                                       \
  "    if level > 0 then rt = idiv(level, 1000) end\n"                                                       \
  "    -- the reset comes from the stored bucket: this one when admitted\n"                                  \
  "    out[n + 6], out[n + 7], out[n + 8] = tpm, rt, tb_wait(TB.has, TB.level, TB.updated, tpm, cap, now)\n" \
  "  else\n"                                                                                                 \
  "    out[n + 6], out[n + 7], out[n + 8] = -1, -1, -1\n"                                                    \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "-- S <now> <charged 0/1> <lease member (4 fields)> <reserved mt> <actual mt>\n"                           \
  "--   <reserved cost> <actual cost> <day win> <month win>\n"                                               \
  "local function settle(rec, now, lim, counted)\n"                                                          \
  "  local charged, m, res_mt, act_mt, rc, ac, dwi, mwi = smatch(rec,\n"                                     \
  "    '^S %-?%d+ (%d) (%S+ %-?%d+ %-?%d+ %d+) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+)$')\n"                     \
  "  dwi, mwi = tonumber(dwi), tonumber(mwi)\n"                                                              \
  "  -- the lease goes, and with it the reservation it still held; while\n"                                  \
  "  -- admissions follow in this batch, C loses it if it counted it\n"                                      \
  "  local held = 0\n"                                                                                       \
  "  if not gone[m] then\n"                                                                                  \
  "    gone[m] = true\n"                                                                                     \
  "    local sc = score0[m]\n"                                                                               \
  "    if sc then\n"                                                                                         \
  "      held = 1\n"                                                                                         \
  "      zrem[#zrem + 1] = m\n"                                                                              \
  "      if counted and near[m] == nil and sc > max_now then C = C - 1 end\n"                                \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  local tpm = lim.tpm\n"                                                                                  \
  "  if charged == '1' and tpm > 0 then\n"                                                                   \
  "    tb_get(TB)\n"                                                                                         \
  "    local level, updated = tb_refill(TB, tpm, now)\n"                                                     \
  "    level = level + tonumber(res_mt) - tonumber(act_mt)\n"                                                \
  "    tb_set(TB, mmax(mmin(level, tpm * 1000), LEVEL_MIN), updated, tpm, now)\n"                            \
  "  end\n"                                                                                                  \
  "  local n = #out\n"                                                                                       \
  "  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = held, 0, '', 0, ''\n"                      \
  "  win_settle(win(dwi), held, rc, ac, lim.dthr, out, n + 2, wttl(dwi, now))\n"                             \
  "  win_settle(win(mwi), held, rc, ac, lim.mthr, out, n + 4, wttl(mwi, now))\n"                             \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "-- H <now> <hid> <old day win> <old month win> <day win> <month win>\n"                                   \
  "--   <unused requests> <their time> <token refund mt> <spent> <slots kept>\n"                             \
  "--   <cost kept> <requests wanted> <mt each> <cost each> <slots wanted>\n"                                \
  "--   <until>: a holding's sync. Its old grant and settled requests are\n"                                 \
  "-- accounted (unused requests, tokens and money back, spent added), then\n"                               \
  "-- a new grant is made of at most 1/HF of what every limit has left, or\n"                                \
  "-- none when that is below HMIN requests; what is kept (slots and money\n"                                \
  "-- of requests still running) is held whatever the limits say, as their\n"                                \
  "-- leases would be.\n"                                                                                    \
  "local HF, HMIN = 8, 8\n"                                                                                  \
  "local function hold(rec, now, lim)\n"                                                                     \
  "  local f = {}\n"                                                                                         \
  "  for x in string.gmatch(rec, '%S+') do f[#f + 1] = x end\n"                                              \
  "  local hid = f[3]\n"                                                                                     \
  "  local odw, omw, dwi, mwi = tonumber(f[4]), tonumber(f[5]), tonumber(f[6]), tonumber(f[7])\n"            \
  "  local ret_n, ret_ts, refund, spent = tonumber(f[8]), tonumber(f[9]), tonumber(f[10]), f[11]\n"          \
  "  local keep_s, keep_c = tonumber(f[12]), tonumber(f[13])\n"                                              \
  "  local k, per_mt, per_c, want_s, until_ts = tonumber(f[14]), tonumber(f[15]), tonumber(f[16]),\n"        \
  "    tonumber(f[17]), tonumber(f[18])\n"                                                                   \
  "  sweep(now, dwi, mwi)\n"                                                                                 \
  "  holds_load()\n"                                                                                         \
  "  local held, h = 0, HOLD[hid]\n"                                                                         \
  "  if h and not h.gone then\n"                                                                             \
  "    held = 1\n"                                                                                           \
  "    hold_drop(h, odw, omw, dwi, mwi)\n"                                                                   \
  "  end\n"                                                                                                  \
  "  local n = #out\n"                                                                                       \
  "  out[n + 13], out[n + 14], out[n + 15], out[n + 16] = 0, '', 0, ''\n"                                    \
  "  if spent ~= '0' then\n"                                                                                 \
  "    win_settle(win(odw), 0, '0', spent, lim.dthr, out, n + 13, wttl(odw, now))\n"                         \
  "    win_settle(win(omw), 0, '0', spent, lim.mthr, out, n + 15, wttl(omw, now))\n"                         \
  "  end\n"                                                                                                  \
  "  local rpm, tpm, cap = lim.rpm, lim.tpm, lim.tpm * 1000\n"                                               \
  "  if ret_n > 0 and rpm > 0 then log_give_back(LOG, ret_ts, ret_n) end\n"                                  \
  "  local level, updated = 0, 0\n"                                                                          \
  "  if tpm > 0 then\n"                                                                                      \
  "    tb_get(TB)\n"                                                                                         \
  "    level, updated = tb_refill(TB, tpm, now)\n"                                                           \
  "    if refund ~= 0 then\n"                                                                                \
  "      level = mmax(mmin(level + refund, cap), LEVEL_MIN)\n"                                               \
  "      tb_set(TB, level, updated, tpm, now)\n"                                                             \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  local total = 0\n"                                                                                      \
  "  if rpm > 0 then\n"                                                                                      \
  "    total = log_expire(LOG, now, 60000)\n"                                                                \
  "    k = mmin(k, idiv(rpm - total, HF))\n"                                                                 \
  "  end\n"                                                                                                  \
  "  if tpm > 0 and per_mt > 0 then k = mmin(k, idiv(level, HF * per_mt)) end\n"                             \
  "  local dw, mw = win(dwi), win(mwi)\n"                                                                    \
  "  for _, b in ipairs({{lim.dlim, dw}, {lim.mlim, mw}}) do\n"                                              \
  "    if b[1] > 0 then\n"                                                                                   \
  "      local free = b[1] - b[2].spent - b[2].reserved - keep_c\n"                                          \
  "      if per_c > 0 then k = mmin(k, idiv(free, HF * per_c)) elseif free < 0 then k = 0 end\n"             \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  local sl = want_s\n"                                                                                    \
  "  if lim.conc > 0 then\n"                                                                                 \
  "    local free = lim.conc - inflight(now) - hold_slots(now, dwi, mwi) - keep_s\n"                         \
  "    sl = mmax(0, mmin(sl, idiv(free, HF)))\n"                                                             \
  "    if sl < 1 then k = 0 end\n"                                                                           \
  "  end\n"                                                                                                  \
  "  local at = 0\n"                                                                                         \
  "  if k < HMIN then\n"                                                                                     \
  "    k, sl = 0, 0\n"                                                                                       \
  "  else\n"                                                                                                 \
  "    if rpm > 0 then at = log_append(LOG, until_ts, k) end\n"                                              \
  "    if tpm > 0 then\n"                                                                                    \
  "      level = mmax(level - k * per_mt, LEVEL_MIN)\n"                                                      \
  "      tb_set(TB, level, updated, tpm, now)\n"                                                             \
  "    end\n"                                                                                                \
  "  end\n"                                                                                                  \
  "  local slots, cost = keep_s + sl, keep_c + k * per_c\n"                                                  \
  "  if slots > 0 or cost > 0 then\n"                                                                        \
  "    local cs = fmt(cost)\n"                                                                               \
  "    win_reserve(dw, cs, cost, WIN[dwi].e + WIN[dwi].keep - now)\n"                                        \
  "    win_reserve(mw, cs, cost, WIN[mwi].e + WIN[mwi].keep - now)\n"                                        \
  "    local nh = {m = hid .. ' ' .. fmt(slots) .. ' ' .. WIN[dwi].period .. ' ' .. WIN[mwi].period .. ' ' .. cs,\n" \
  "                exp = now + lease_ttl, slots = slots, day = WIN[dwi].period, month = WIN[mwi].period,\n"  \
  "                cost = cs, new = true}\n"                                                                 \
  "    HOLD[hid] = nh\n"                                                                                     \
  "    hlist[#hlist + 1] = nh\n"                                                                             \
  "  end\n"                                                                                                  \
  "  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] =\n"                             \
  "    held, k, k * per_mt, k * per_c, sl, at\n"                                                             \
  "  if rpm > 0 then\n"                                                                                      \
  "    out[n + 7], out[n + 8], out[n + 9] = rpm, mmax(rpm - LOG.total, 0), log_wait(LOG, rpm, now, 60000)\n" \
  "  else\n"                                                                                                 \
  "    out[n + 7], out[n + 8], out[n + 9] = -1, -1, -1\n"                                                    \
  "  end\n"                                                                                                  \
  "  if tpm > 0 then\n"                                                                                      \
  "    local rt = 0\n"                                                                                       \
  "    if level > 0 then rt = idiv(level, 1000) end\n"                                                       \
  "    out[n + 10], out[n + 11], out[n + 12] = tpm, rt, tb_wait(true, level, updated, tpm, cap, now)\n"      \
  "  else\n"                                                                                                 \
  "    out[n + 10], out[n + 11], out[n + 12] = -1, -1, -1\n"                                                 \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "for i = 1, #recs do\n"                                                                                    \
  "  if kinds[i] == 72 then\n"                                                                               \
  "    hold(recs[i], nows[i], lims[i])\n"                                                                    \
  "  elseif kinds[i] == 65 then\n"                                                                           \
  "    admit(recs[i], nows[i], lims[i])\n"                                                                   \
  "  else\n"                                                                                                 \
  "    settle(recs[i], nows[i], lims[i], i < last_admit)\n"                                                  \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "\n"                                                                                                       \
  "-- write everything once\n"                                                                               \
  "if #zrem > 0 then call_chunked('ZREM', leasesK, zrem) end\n"                                              \
  "local za = {}\n"                                                                                          \
  "for _, e in ipairs(added) do\n"                                                                           \
  "  if not gone[e[1]] then\n"                                                                               \
  "    za[#za + 1] = fmt(e[2])\n"                                                                            \
  "    za[#za + 1] = e[1]\n"                                                                                 \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "if #za > 0 then call_chunked('ZADD', leasesK, za) end\n"                                                  \
  "if #hzrem > 0 then call_chunked('ZREM', holdsK, hzrem) end\n"                                             \
  "local hza = {}\n"                                                                                         \
  "for _, h in ipairs(hlist) do\n"                                                                           \
  "  if h.new and not h.gone then\n"                                                                         \
  "    hza[#hza + 1] = fmt(h.exp)\n"                                                                         \
  "    hza[#hza + 1] = h.m\n"                                                                                \
  "  end\n"                                                                                                  \
  "end\n"                                                                                                    \
  "if #hza > 0 then\n"                                                                                       \
  "  rcall('ZADD', holdsK, unpack(hza))\n"                                                                   \
  "  rcall('PEXPIRE', holdsK, fmt(lease_ttl + 60000))\n"                                                     \
  "end\n"                                                                                                    \
  "log_commit(LOG, 60000)\n"                                                                                 \
  "tb_commit(TB)\n"                                                                                          \
  "for i = 1, nw do\n"                                                                                       \
  "  if W[i] ~= nil then out[#out + 1] = win_commit(W[i]) else out[#out + 1] = '' end\n"                     \
  "end\n"                                                                                                    \
  "return out\n"

/* ---- re-seeding a budget window -------------------------------------------
 * KEYS: 1 the window (tg:{T}:day:<d> or tg:{T}:month:<m>)
 * ARGV: 1 the ledger's spend of the period (nano, decimal text), 2 the key's
 *       ttl ms (as the batch sets it), 3 "1" when that spend is past the
 *       alert threshold (its event was raised before), else "0"
 * Raises spent to at least ARGV[1], never lowers it, and sets alerted
 * (docs/state-redis.md, Losing Redis's data). Figures are compared as
 * decimal text (no leading zeros, not negative): exact at any size.
 * Returns 1 when the window changed, else 0. */
#define TG_REDIS_LUA_RESEED                                                   \
  "local function lt(a, b)\n"                                                 \
  "  if #a ~= #b then return #a < #b end\n"                                   \
  "  return a < b\n"                                                          \
  "end\n"                                                                     \
  "local cur = redis.call('HGET', KEYS[1], 'spent')\n"                        \
  "local changed = false\n"                                                   \
  "if ARGV[1] ~= '0' and (not cur or lt(cur, ARGV[1])) then\n"                \
  "  redis.call('HSET', KEYS[1], 'spent', ARGV[1])\n"                         \
  "  changed = true\n"                                                        \
  "end\n"                                                                     \
  "if ARGV[3] == '1' and redis.call('HSETNX', KEYS[1], 'alerted', '1') == 1 then\n" \
  "  changed = true\n"                                                        \
  "end\n"                                                                     \
  "if changed then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end\n"             \
  "return changed and 1 or 0\n"

/* ---- spend admitted while Redis could not answer -------------------------
 * KEYS: 1 the window (tg:{T}:day:<d> or tg:{T}:month:<m>)
 * ARGV: 1 what requests the memory backend admitted (state_failure: open)
 *       spent in that period (nano, decimal text, > 0), 2 the key's ttl ms
 * Adds it to spent: Redis's windows never saw those requests. Returns the
 * new spent. */
#define TG_REDIS_LUA_ADD_SPENT                                                \
  "local v = redis.call('HINCRBY', KEYS[1], 'spent', ARGV[1])\n"              \
  "redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"                                 \
  "return v\n"

/* A lease's renewal (state_redis.c, renew_leases). KEYS: tg:{T}:leases and
 * the day and month windows of the lease's member; ARGV: the new expiry,
 * the member, its cost (nano-USD, decimal text), the two windows' TTLs
 * (ms). A lease still there gets its new expiry. A lease Redis no longer
 * has (it lost its data, or another gateway swept it while this one could
 * not renew) belongs to a request still running: it is added again and its
 * cost reserved again in each window still kept, so the request holds its
 * slot and its money until it settles, and the settlement gives both back
 * as for any lease. Returns 1 when the lease was added again, else 0. */
#define TG_REDIS_LUA_RENEW                                                    \
  "if redis.call('ZSCORE', KEYS[1], ARGV[2]) then\n"                          \
  "  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])\n"                         \
  "  return 0\n"                                                              \
  "end\n"                                                                     \
  "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])\n"                           \
  "if ARGV[3] ~= '0' then\n"                                                  \
  "  for i = 2, 3 do\n"                                                       \
  "    if tonumber(ARGV[i + 2]) > 0 then\n"                                   \
  "      redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[3])\n"               \
  "      redis.call('PEXPIRE', KEYS[i], ARGV[i + 2])\n"                       \
  "    end\n"                                                                 \
  "  end\n"                                                                   \
  "end\n"                                                                     \
  "return 1\n"

#endif
