-- Tells the fleet an instance is alive, by Redis's clock (so that hosts' clocks
-- need not agree to the second for liveness), and forgets instances whose
-- heartbeat expired.
--
-- KEYS[1] the live instances: sorted set scored by heartbeat expiry (ms)
-- KEYS[2] each live instance's first window (unix seconds)
-- KEYS[3] each live instance's process (its run)
-- KEYS[4] the fleet's epoch
-- KEYS[5] windows left to the fleet by leaving instances
-- ARGV[1] this instance; ARGV[2] its process; ARGV[3] the heartbeat's lifetime (ms)
-- ARGV[4] its first window (unix seconds); ARGV[5] an epoch, if there is none yet
--
-- Returns {epoch, live instances, windows left to the fleet}.

redis.replicate_commands()
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
  redis.call('HDEL', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SET', KEYS[4], ARGV[5], 'NX')
return {
  redis.call('GET', KEYS[4]),
  redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf'),
  redis.call('SMEMBERS', KEYS[5]),
}
