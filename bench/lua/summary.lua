-- Appended to every benchmark script: done() prints one machine-readable line, BENCH_JSON {...}.
-- Threads are numbered in setup() (bench_tid) so scripts can seed per-thread generators. A script
-- may keep named per-thread counters in a global table bench_counts (name -> number); they are
-- summed over the threads into "counts".
local bench_threads = {}

function setup(thread)
   bench_threads[#bench_threads + 1] = thread
   thread:set("bench_tid", #bench_threads)
end

function done(summary, latency, requests)
   local totals, sums = {}, {}
   for _, thread in ipairs(bench_threads) do
      local counted = thread:get("bench_statuses")
      if type(counted) == "table" then
         for status, n in pairs(counted) do
            totals[status] = (totals[status] or 0) + n
         end
      end
      local named = thread:get("bench_counts")
      if type(named) == "table" then
         for name, n in pairs(named) do
            sums[name] = (sums[name] or 0) + n
         end
      end
   end
   local statuses, counts = {}, {}
   for status, n in pairs(totals) do
      statuses[#statuses + 1] = string.format('"%d":%.0f', status, n)
   end
   for name, n in pairs(sums) do
      counts[#counts + 1] = string.format('"%s":%.0f', name, n)
   end
   local p50, p90, p99, p999, mean, max = 0, 0, 0, 0, 0, 0
   if summary.requests > 0 then
      p50, p90, p99 = latency:percentile(50), latency:percentile(90), latency:percentile(99)
      p999 = latency:percentile(99.9)
      mean, max = latency.mean, latency.max
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,' ..
      '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
      '"latency_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f,"mean":%.1f,"max":%.0f},"statuses":{%s},' ..
      '"counts":{%s}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      p50, p90, p99, p999, mean, max, table.concat(statuses, ","), table.concat(counts, ",")))
end
