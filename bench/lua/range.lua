-- Random aligned ranges: each request asks for Range: bytes=a-(a+span-1), a a multiple of span.
-- Arguments (after --): object size, span. The -H headers (e.g. Authorization) are kept.
-- Every thread draws from its own generator with a fixed seed, so every target gets the same
-- sequence of ranges.
local span, slots
local headers = {}

function init(args)
   local size = tonumber(args[1])
   span = tonumber(args[2])
   slots = math.floor(size / span)
   math.randomseed(1000 + (bench_tid or 0))
   for name, value in pairs(wrk.headers) do
      headers[name] = value
   end
end

function request()
   local first = (math.random(slots) - 1) * span
   headers["Range"] = string.format("bytes=%.0f-%.0f", first, first + span - 1)
   return wrk.format(nil, nil, headers)
end
