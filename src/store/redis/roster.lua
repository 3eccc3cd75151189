-- Reads the fleet as a run settles a window: the epoch (changed only by Redis
-- losing its data), and the live runs with their first windows, by Redis's clock.
--
-- KEYS[1] the live runs: sorted set scored by heartbeat expiry (ms)
-- KEYS[2] each live run's first window (unix seconds); KEYS[3] the fleet's epoch
--
-- Returns {epoch, {run, first window, run, first window, ...}}.

local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local live = {}
for _, run in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  live[#live + 1] = run
  live[#live + 1] = redis.call('HGET', KEYS[2], run) or '0'
end
return {redis.call('GET', KEYS[3]) or '', live}
