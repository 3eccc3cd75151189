-- Counts a round of ids as a run's deliveries to a window, once: a round sent again
-- (its answer lost) or executed late carries the same number and counts nothing.
-- Runs inside the round's MULTI, so that the count and the ids go in together.
--
-- KEYS[1] the window's deliveries (run -> ids); KEYS[2] its rounds (run -> last round)
-- ARGV[1] the run; ARGV[2] the round's number; ARGV[3] its ids
-- ARGV[4] 'set' to start the count again (a replay's first round), else 'add'
-- ARGV[5] the keys' time to live (s), 0 to leave it as it is (set by the run's first round)

local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[2]) > last then
  if ARGV[4] == 'set' then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[3])
  end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
if ARGV[5] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 0
