-- Adds a round of a run's ids to one shard of a window, and counts them as the
-- run's deliveries to that shard, once: a round sent again (its answer lost) or
-- executed late carries the same number and does nothing. The ids and their count
-- sit on one slot, so that a failover rolls both back together, and the count
-- stays the sentinel of the ids beside it.
--
-- KEYS[1] the shard's set of ids; KEYS[2] its deliveries (run -> ids);
-- KEYS[3] its rounds (run -> last round)
-- ARGV[1] the run; ARGV[2] the round's number
-- ARGV[3] 'set' to start the count again (a replay's first round), else 'add'
-- ARGV[4] the keys' time to live (s), given again by every round (Redis may have
--         lost the keys since the last one)
-- ARGV[5..] the ids

local last = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if tonumber(ARGV[2]) > last then
  -- unpack() puts its results on Lua's stack, which holds about 8000.
  for first = 5, #ARGV, 4000 do
    redis.call('SADD', KEYS[1], unpack(ARGV, first, math.min(first + 3999, #ARGV)))
  end
  local ids = #ARGV - 4
  if ARGV[3] == 'set' then
    redis.call('HSET', KEYS[2], ARGV[1], ids)
  else
    redis.call('HINCRBY', KEYS[2], ARGV[1], ids)
  end
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
end
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ARGV[4])
end
return 0
