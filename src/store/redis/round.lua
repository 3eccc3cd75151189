-- Adds a round of a run's ids to one shard of a window, and counts them as the
-- run's deliveries to that shard, once: a round sent again (its answer lost) or
-- executed late carries the same number and does nothing. The ids and their count
-- sit on one slot, so that a failover rolls both back together, and the count
-- stays the sentinel of the ids beside it. On a cluster only (one server runs
-- count.lua instead).
--
-- The shard's ids are split over sets, as many as the first round to reach the
-- shard (since Redis last lost it) said; that number is kept beside the
-- sentinel, and a round split another way adds nothing: it gets the number
-- back, and its run sends it again split that way.
--
-- KEYS[1] the shard's key, which its sets' names start with; KEYS[2] its
-- deliveries (run -> ids); KEYS[3] its rounds (run -> last round, and 'sets')
-- ARGV[1] the run; ARGV[2] the round's number
-- ARGV[3] 'set' to start the count again (a replay's first round), else 'add'
-- ARGV[4] the keys' time to live (s), given again by every round (Redis may have
--         lost the keys since the last one)
-- ARGV[5] how many sets the round splits the shard into, S
-- ARGV[6] how many of them the round writes to, G; then G pairs: a set's number,
--         and how many of the ids that follow go to it
-- ARGV[7+2G..] the ids, set by set
--
-- Returns 0 once the round is in, or the shard's number of sets if it is not S.

local sets = redis.call('HGET', KEYS[3], 'sets')
if sets and sets ~= ARGV[5] then
  return tonumber(sets)
end
local ttl = ARGV[4]
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if tonumber(ARGV[2]) > last then
  local groups = tonumber(ARGV[6])
  local at = 7 + 2 * groups
  for g = 0, groups - 1 do
    local set = KEYS[1]
    if ARGV[5] ~= '1' then
      set = set .. ':' .. ARGV[5] .. '/' .. ARGV[7 + 2 * g]
    end
    local to = at + tonumber(ARGV[8 + 2 * g]) - 1
    -- unpack() puts its results on Lua's stack, which holds about 8000.
    for first = at, to, 4000 do
      redis.call('SADD', set, unpack(ARGV, first, math.min(first + 3999, to)))
    end
    redis.call('EXPIRE', set, ttl)
    at = to + 1
  end
  local ids = #ARGV - 6 - 2 * groups
  if ARGV[3] == 'set' then
    redis.call('HSET', KEYS[2], ARGV[1], ids)
  else
    redis.call('HINCRBY', KEYS[2], ARGV[1], ids)
  end
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2], 'sets', ARGV[5])
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return 0
