-- Label Studio webhooks: POSTs an ANNOTATION_CREATED payload with a new annotation id per request.
-- Arguments (after --): the payload template file, the run's id base (a multiple of 1e9).
-- The template is the JSON body with @A@ where the annotation id goes and @T@ where its task id
-- goes (bench/webhooks.py writes it). Thread t's n-th request carries annotation id
-- base + t * 1e9 + n and task id 1 + (n - 1) % 1000, so the ids of one run never collide, and the
-- harness gives every run its own base. The -H headers (the webhook secret) are kept.
-- response() counts statuses (bench_statuses, as statuses.lua does) and the answers that say
-- "recorded" with version 1, i.e. a new annotation (bench_counts.recorded); bench_counts.sent is
-- the number of requests this thread generated (answered or still in flight when wrk stopped).
local parts = {} -- literal, marker, literal, marker, ..., literal
local headers = {}
local offset
local n = 0
bench_statuses = {}
bench_counts = { sent = 0, recorded = 0 }

function init(args)
   local file = assert(io.open(args[1], "rb"))
   local text = file:read("*a")
   file:close()
   local position = 1
   while true do
      local first, last, marker = string.find(text, "@([AT])@", position)
      if first == nil then
         break
      end
      parts[#parts + 1] = string.sub(text, position, first - 1)
      parts[#parts + 1] = marker
      position = last + 1
   end
   parts[#parts + 1] = string.sub(text, position)
   offset = tonumber(args[2]) + (bench_tid or 0) * 1e9
   for name, value in pairs(wrk.headers) do
      headers[name] = value
   end
   headers["Content-Type"] = "application/json"
end

function request()
   n = n + 1
   bench_counts.sent = n
   local annotation = string.format("%.0f", offset + n)
   local task = string.format("%d", 1 + (n - 1) % 1000)
   local body = {}
   for index, piece in ipairs(parts) do
      if index % 2 == 1 then
         body[index] = piece
      elseif piece == "A" then
         body[index] = annotation
      else
         body[index] = task
      end
   end
   return wrk.format("POST", nil, headers, table.concat(body))
end

function response(status, _headers, body)
   bench_statuses[status] = (bench_statuses[status] or 0) + 1
   if status == 200 and string.find(body, '"status": "recorded"', 1, true)
      and string.find(body, '"versions": [1]', 1, true) then
      bench_counts.recorded = bench_counts.recorded + 1
   end
end
