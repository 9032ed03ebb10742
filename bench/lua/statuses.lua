-- Counts every response's status (per thread; summed in done()). Defining response() makes wrk
-- hand each body to Lua, so this piece is used only where bodies are empty or tiny.
bench_statuses = {}

function response(status, headers, body)
   bench_statuses[status] = (bench_statuses[status] or 0) + 1
end
