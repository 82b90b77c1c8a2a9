-- wrk script for bench/proxy.sh: every request is a small non-streaming
-- chat completion. The key comes from $TG_BENCH_KEY (sent to every target;
-- the simulator and nginx ignore it), or one of $TG_BENCH_KEYS in turn.
-- At the end one machine-readable line is printed:
--   TGBENCH <requests> <duration_us> <p50_us> <p99_us> <non2xx> <socket_errors>

local key = os.getenv("TG_BENCH_KEY") or ""
local model = os.getenv("TG_BENCH_MODEL") or "llama-3.1-8b"
local max_tokens = os.getenv("TG_BENCH_MAX_TOKENS") or "16"

wrk.method = "POST"
wrk.body = '{"model":"' .. model .. '","max_tokens":' .. max_tokens ..
  ',"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
wrk.headers["Content-Type"] = "application/json"
if key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

-- $TG_BENCH_KEYS (space-separated), when set, is a key per tenant: each
-- request goes with the next key in turn (requests built once, up front).
local keys = os.getenv("TG_BENCH_KEYS") or ""
if keys ~= "" then
  local reqs, i = {}, 0
  for k in keys:gmatch("%S+") do
    wrk.headers["Authorization"] = "Bearer " .. k
    reqs[#reqs + 1] = wrk.format()
  end
  function request()
    i = i % #reqs + 1
    return reqs[i]
  end
end

-- $TG_BENCH_DELAY_MS, when set, paces each connection: before each request
-- it waits a random pause (exponential, that mean, in whole milliseconds as
-- wrk counts them), so the load is an offered rate, about connections /
-- (pause + latency), arriving at random rather than in step, and every
-- target is measured at the same rate.
local delay_ms = tonumber(os.getenv("TG_BENCH_DELAY_MS") or "")
if delay_ms and delay_ms > 0 then
  math.randomseed(os.time())
  function delay()
    return math.floor(-delay_ms * math.log(1 - math.random()) + 0.5)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("TGBENCH %d %d %d %d %d %d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
