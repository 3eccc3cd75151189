-- wrk / wrk2 script for verve: GET /api/verve/accept with random ids.
--
--   wrk -s loadtest/accept.lua http://127.0.0.1:8080 -- [ids] [endpoint_share] [pipeline] [base] [send_secs]
--
-- ids             each thread draws ids uniformly from its own range of this many
--                 (default 1000000); a smaller range means more repeats; 0 makes
--                 every id new (each thread counts up from its own start), with
--                 no table of ids seen, for runs of hundreds of millions
-- endpoint_share  share of requests (0..1) that carry an endpoint (default 0); the
--                 endpoint is on loopback, so start verve with
--                 VERVE_CALLBACK_DENY_PRIVATE=false or those requests get 400
-- pipeline        requests per write (default 1: no pipelining)
-- base            first id of thread 0's range (default 0); threads' ranges do not
--                 overlap, so runs with different bases send disjoint ids
-- send_secs       stop sending new requests after this many seconds (default: never),
--                 so that nothing is left half-written when wrk stops: wrk counts
--                 an id as sent when it builds the request, and a pipelined batch
--                 cut off mid-write at the end would never reach the server
--
-- At the end it prints `distinct_ids=N` (ids sent, each counted once, over all
-- threads) and `latency_us p50=… p99=… p99.9=…`, which loadtest/run.py reads.

local ids = 1000000
local endpoint_share = 0
local pipeline = 1
local first_id = 0
local stop_at = nil
-- wrk calls request() once on the first thread before the run, only to count the
-- requests it returns (the pipeline depth); that call must not count as sent.
local probe = false
local seen = {}
local endpoint = "&endpoint=http%3A%2F%2F127.0.0.1%3A9%2Fcallback"
local threads = {}

distinct = 0

function setup(thread)
   thread:set("index", #threads)
   table.insert(threads, thread)
end

function init(args)
   ids = tonumber(args[1]) or ids
   endpoint_share = tonumber(args[2]) or endpoint_share
   pipeline = tonumber(args[3]) or pipeline
   -- With every id new, threads start 10^12 apart.
   first_id = (tonumber(args[4]) or 0) + index * (ids > 0 and ids or 1000000000000)
   probe = index == 0
   if args[5] then
      stop_at = os.time() + tonumber(args[5])
   end
   math.randomseed(os.time() * 1000 + index)
end

local sequence = 0

local function one()
   local id
   if ids == 0 then
      id = first_id + sequence
      sequence = sequence + 1
   else
      id = first_id + math.random(ids) - 1
   end
   if probe then
      id = -1
   elseif ids == 0 then
      distinct = distinct + 1
   elseif not seen[id] then
      seen[id] = true
      distinct = distinct + 1
   end
   local path = "/api/verve/accept?id=" .. id
   if endpoint_share > 0 and math.random() < endpoint_share then
      path = path .. endpoint
   end
   return wrk.format("GET", path)
end

function request()
   if stop_at and os.time() >= stop_at then
      return ""
   end
   local batch = {}
   for i = 1, pipeline do
      batch[i] = one()
   end
   probe = false
   return table.concat(batch)
end

function done(summary, latency, requests)
   local total = 0
   for _, thread in ipairs(threads) do
      total = total + thread:get("distinct")
   end
   io.write(string.format("distinct_ids=%d\n", total))
   io.write(string.format("latency_us p50=%d p99=%d p99.9=%d\n",
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
