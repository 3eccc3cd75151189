-- wrk / wrk2 script for verve: GET /api/verve/accept with random ids.
--
--   wrk -s loadtest/accept.lua http://127.0.0.1:8080 -- [ids] [endpoint_share] [pipeline]
--
-- ids             ids are drawn uniformly from 1..ids (default 1000000); a smaller
--                 range means more repeats
-- endpoint_share  share of requests (0..1) that carry an endpoint (default 0)
-- pipeline        requests per write (default 1: no pipelining)

local ids = 1000000
local endpoint_share = 0
local pipeline = 1
local endpoint = "&endpoint=http%3A%2F%2F127.0.0.1%3A9%2Fcallback"

function init(args)
   ids = tonumber(args[1]) or ids
   endpoint_share = tonumber(args[2]) or endpoint_share
   pipeline = tonumber(args[3]) or pipeline
   -- Distinct streams per thread; wrk gives each thread its own Lua state.
   math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
end

local function one()
   local path = "/api/verve/accept?id=" .. math.random(ids)
   if endpoint_share > 0 and math.random() < endpoint_share then
      path = path .. endpoint
   end
   return wrk.format("GET", path)
end

function request()
   if pipeline == 1 then
      return one()
   end
   local batch = {}
   for i = 1, pipeline do
      batch[i] = one()
   end
   return table.concat(batch)
end
