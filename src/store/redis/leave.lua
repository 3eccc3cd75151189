-- Takes a run out of the fleet (shutdown), noting when it left, and leaves the
-- windows it has not seen finished to the fleet: whoever settles them takes them
-- off the list, and whoever is live after their wait settles what is left.
--
-- KEYS[1] the live runs; KEYS[2] their first windows; KEYS[3] runs that left
-- KEYS[4] windows left to the fleet
-- ARGV[1] the run; ARGV[2] the registry keys' time to live (s)
-- ARGV[3..] its unfinished windows (unix seconds)
--
-- Returns nothing.

redis.replicate_commands()
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], now)
for i = 3, #ARGV do
  redis.call('SADD', KEYS[4], ARGV[i])
end
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 0
