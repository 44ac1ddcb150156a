-- wrk script: POST the JSON body in BENCH_BODY with the API key in BENCH_KEY (if any).
-- BENCH_DELAY_MS > 0 paces each connection: a random delay of 0..2x that many ms before
-- every request (mean BENCH_DELAY_MS), for a fixed offered load below the maximum.
-- `done` prints one JSON line (prefixed BENCH_RESULT) that bench/wrk.py reads.
wrk.method = "POST"
wrk.path = "/v1/generate"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY") or ""
if key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if pace > 0 then
  function delay()
    return math.random(0, 2 * pace)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f, "non2xx": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.status, e.connect, e.read,
    e.write, e.timeout))
end
