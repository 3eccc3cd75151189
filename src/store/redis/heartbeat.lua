-- Tells the fleet a process is alive, by Redis's clock (so that hosts' clocks need
-- not agree to the second for liveness). A process is a member of the fleet by
-- its run: a restart is a new one. A run whose heartbeat expired stays in the
-- registry, lapsed, for as long as a window it was live in may be settled (it
-- may have ids for those windows: their records must not say complete without
-- it), then is forgotten. Every registry key gets its time to live again.
--
-- KEYS[1] the runs: sorted set scored by heartbeat expiry (ms)
-- KEYS[2] each run's first window (unix seconds)
-- KEYS[3] runs that left, and when (ms)
-- KEYS[4] the fleet's epoch
-- KEYS[5] unfinished windows: noted by every run's first round to one, and by
--         runs that stopped
-- KEYS[6] the number of shards the fleet splits windows over
-- KEYS[7] the fleet's window length (s)
-- ARGV[1] this run; ARGV[2] the heartbeat's lifetime (ms); ARGV[3] its first window
-- ARGV[4] the epoch this run knows ('' for none); ARGV[5] how long to remember a run that left (ms)
-- ARGV[6] this run's number of shards, if the fleet has none yet (with `+sets`:
--         each shard split into sets counted per window; an earlier version
--         registered the number alone)
-- ARGV[7] how long a lapsed run stays in the registry (ms)
-- ARGV[8] the registry keys' time to live (s)
-- ARGV[9] this run's window length (s), if the fleet has none yet
-- ARGV[10] the epoch to set if there is none, or if this run knows a later one
--          than Redis holds: numbered one past the one it knows (0 for none);
--          Redis's clock (ms) is appended, `<number>:<tag>:<began>`, for the
--          windows that began too soon after it to be called complete
--
-- Returns {epoch, live runs, unfinished windows, the fleet's number of shards,
-- the fleet's window length, Redis's clock (us)}; a run whose number of shards
-- or window length is not the fleet's is not registered (it must not be waited
-- for, and its ids would land in the fleet's sets under another layout), and
-- gets only the fleet's values and the clock back.

redis.replicate_commands()
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local micros = clock[1] * 1000000 + clock[2]
redis.call('SET', KEYS[6], ARGV[6], 'NX')
redis.call('SET', KEYS[7], ARGV[9], 'NX')
local shards = redis.call('GET', KEYS[6])
local window_secs = redis.call('GET', KEYS[7])
if shards ~= ARGV[6] or window_secs ~= ARGV[9] then
  return {'', {}, {}, shards, window_secs, micros}
end
local forget = now - tonumber(ARGV[7])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', forget)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', forget)
local left = redis.call('HGETALL', KEYS[3])
for i = 1, #left, 2 do
  if tonumber(left[i + 1]) < now - tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[3], left[i])
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
-- An epoch is `<number>:<tag>:<began>`. Redis lost its data if the key is gone, or holds
-- another epoch than this run knows, numbered no higher (a run that knew none set
-- it since): the next is numbered past every one this run saw, so revisions
-- published from now on (numbered from the epoch) are above all earlier ones.
local function number(epoch)
  return tonumber(string.match(epoch, '^(%d+):')) or 0
end
local epoch = redis.call('GET', KEYS[4])
if not epoch
  or (ARGV[4] ~= '' and epoch ~= ARGV[4] and number(epoch) <= number(ARGV[4])) then
  redis.call('SET', KEYS[4], ARGV[10] .. ':' .. now)
end
for i = 1, 7 do
  redis.call('EXPIRE', KEYS[i], ARGV[8])
end
return {
  redis.call('GET', KEYS[4]),
  redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf'),
  redis.call('SMEMBERS', KEYS[5]),
  shards,
  window_secs,
  micros,
}
