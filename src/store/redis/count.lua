-- Counts a round of a run's ids as its deliveries to a window, once: a round sent
-- again (its answer lost) or executed late carries the same number and counts
-- nothing. On a single server only: it runs inside the round's MULTI, after the
-- plain SADDs of the ids to the window's sets, so that the ids and their count
-- go in together (cheaper than passing every id through round.lua, which a
-- cluster needs, its shards being on other nodes). One sentinel serves all the
-- window's shards: one server loses or keeps them together.
--
-- The window's shards are split over sets, as many as the first round to reach
-- the window (since Redis last lost it) said; that number is kept beside the
-- sentinel. A round split another way counts nothing and gets the number back:
-- its SADDs went to sets of that other count, which no survey counts (a set's
-- name carries its count), and its run sends it again split the window's way.
--
-- KEYS[1] the window's deliveries (run -> ids); KEYS[2] its rounds (run -> last
-- round, and 'sets')
-- ARGV[1] the run; ARGV[2] the round's number
-- ARGV[3] 'set' to start the count again (a replay's first round), else 'add'
-- ARGV[4] the round's ids; ARGV[5] the keys' time to live (s), given again by
--         every round (Redis may have lost the keys since the last one)
-- ARGV[6] how many sets per shard the round split its ids into
--
-- Returns 0 once the round is counted, or the window's sets per shard if they
-- are not ARGV[6].

local sets = redis.call('HGET', KEYS[2], 'sets')
if sets and sets ~= ARGV[6] then
  return tonumber(sets)
end
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[2]) > last then
  if ARGV[3] == 'set' then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[4])
  end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2], 'sets', ARGV[6])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 0
