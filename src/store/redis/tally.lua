-- Reads shards of a window as a run settles it: their size, what the run
-- delivered to them by their sentinel's count (fewer in Redis than the run sent
-- means they lost ids), and every run that delivered to them. Renews the keys: a
-- key Redis lost and a later round wrote again has its time to live back.
--
-- A shard's sets are named from its key and the number of sets the sentinel
-- keeps (`<shard>:<sets>/<k>`, or the shard's key itself for one set), so that
-- sets a round wrote under another number, which the sentinel refused to count,
-- are never counted.
--
-- KEYS[1..n-2] the shards' keys (one on a cluster, where each shard has its own
-- sentinel; all of the window's on one server);
-- KEYS[n-1] their sentinel's deliveries; KEYS[n] its rounds (and 'sets')
-- ARGV[1] the run; ARGV[2] the keys' time to live (s)
--
-- Returns {size of the shards together, delivered by the run, runs that delivered}.

local sets = redis.call('HGET', KEYS[#KEYS], 'sets') or '1'
local size = 0
local function tally(set)
  redis.call('EXPIRE', set, ARGV[2])
  size = size + redis.call('SCARD', set)
end
for i = 1, #KEYS - 2 do
  if sets == '1' then
    tally(KEYS[i])
  else
    for k = 0, tonumber(sets) - 1 do
      tally(KEYS[i] .. ':' .. sets .. '/' .. k)
    end
  end
end
redis.call('EXPIRE', KEYS[#KEYS - 1], ARGV[2])
redis.call('EXPIRE', KEYS[#KEYS], ARGV[2])
return {
  size,
  tonumber(redis.call('HGET', KEYS[#KEYS - 1], ARGV[1]) or '0'),
  redis.call('HKEYS', KEYS[#KEYS - 1]),
}
