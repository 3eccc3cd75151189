-- Reads one shard of a window as a run settles it: its size, what the run
-- delivered to it (fewer in Redis than the run sent means the shard lost ids), and
-- every run that delivered to it. Renews the shard's keys: a key Redis lost and a
-- later round wrote again has its time to live back.
--
-- KEYS[1] the shard's set of ids; KEYS[2] its deliveries; KEYS[3] its rounds
-- ARGV[1] the run; ARGV[2] the keys' time to live (s)
--
-- Returns {size, delivered by the run, runs that delivered}.

for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return {
  redis.call('SCARD', KEYS[1]),
  tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0'),
  redis.call('HKEYS', KEYS[2]),
}
