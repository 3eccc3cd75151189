-- Takes an instance out of the fleet (shutdown).
--
-- KEYS[1] the live instances; KEYS[2] their first windows; KEYS[3] their processes
-- ARGV[1] the instance
--
-- Returns the instances still live.

redis.replicate_commands()
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
