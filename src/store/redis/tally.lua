-- Reads shards of a window as a run settles it: their size, what the run
-- delivered to them by their sentinel's count (fewer in Redis than the run sent
-- means they lost ids), and every run that delivered to them. Renews the keys: a
-- key Redis lost and a later round wrote again has its time to live back.
--
-- KEYS[1..n-2] the shards' sets of ids (one on a cluster, where each shard has
-- its own sentinel; all of the window's on one server);
-- KEYS[n-1] their sentinel's deliveries; KEYS[n] its rounds
-- ARGV[1] the run; ARGV[2] the keys' time to live (s)
--
-- Returns {size of the shards together, delivered by the run, runs that delivered}.

local size = 0
for i = 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
  if i <= #KEYS - 2 then
    size = size + redis.call('SCARD', KEYS[i])
  end
end
return {
  size,
  tonumber(redis.call('HGET', KEYS[#KEYS - 1], ARGV[1]) or '0'),
  redis.call('HKEYS', KEYS[#KEYS - 1]),
}
