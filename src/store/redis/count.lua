-- Counts a round of a run's ids as its deliveries to each shard the round wrote
-- to, once: a round sent again (its answer lost) or executed late carries the same
-- number and counts nothing. On a single server only: it runs inside the round's
-- MULTI, after the plain SADDs of the ids, so that the ids and their counts go in
-- together (cheaper than passing every id through round.lua, which a cluster
-- needs, its shards being on other nodes).
--
-- KEYS[2i-1], KEYS[2i] shard i's deliveries (run -> ids) and rounds (run -> last round)
-- ARGV[1] the run; ARGV[2] the round's number
-- ARGV[3] 'set' to start the counts again (a replay's first round), else 'add'
-- ARGV[2i+2], ARGV[2i+3] shard i's ids in the round, and its keys' time to live
--         (s; 0 to leave it as it is: set by the run's first round to the shard)

for i = 1, #KEYS / 2 do
  local delivered, rounds = KEYS[2 * i - 1], KEYS[2 * i]
  local last = tonumber(redis.call('HGET', rounds, ARGV[1]) or '0')
  if tonumber(ARGV[2]) > last then
    if ARGV[3] == 'set' then
      redis.call('HSET', delivered, ARGV[1], ARGV[2 * i + 2])
    else
      redis.call('HINCRBY', delivered, ARGV[1], ARGV[2 * i + 2])
    end
    redis.call('HSET', rounds, ARGV[1], ARGV[2])
  end
  if ARGV[2 * i + 3] ~= '0' then
    redis.call('EXPIRE', delivered, ARGV[2 * i + 3])
    redis.call('EXPIRE', rounds, ARGV[2 * i + 3])
  end
end
return 0
