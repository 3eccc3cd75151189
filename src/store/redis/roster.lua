-- Reads the fleet as a run settles a window: the epoch (changed only by Redis
-- losing its data), every run in the registry with its first window and when its
-- heartbeat expires (or expired: a lapsed run stays a while, see heartbeat.lua),
-- and Redis's clock.
--
-- KEYS[1] the runs: sorted set scored by heartbeat expiry (ms)
-- KEYS[2] each run's first window (unix seconds); KEYS[3] the fleet's epoch
--
-- Returns {epoch, {{run, first window, expiry}, ...}, now (ms)}.

local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local runs = {}
local scored = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #scored, 2 do
  runs[#runs + 1] = {scored[i], redis.call('HGET', KEYS[2], scored[i]) or '0', scored[i + 1]}
end
return {redis.call('GET', KEYS[3]) or '', runs, now}
