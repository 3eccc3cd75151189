-- Marks a run done with a window and publishes the window's count once the fleet
-- is done with it, or when told to (the fleet's wait is over, or the last run is
-- leaving). One script, so that the count and the revision are taken together:
-- revisions increase with the count, and one caller publishes each. A run is one
-- process of an instance: a restarted instance is a new member of the fleet.
--
-- KEYS[1] the window's set of ids (its first shard's, if it has several)
-- KEYS[2] the window's marks: run -> sending | full | partial
-- KEYS[3] the window's deliveries: run -> ids it delivered (its sentinel)
-- KEYS[4] the window's published record (a hash)
-- KEYS[5] the live runs: sorted set scored by heartbeat expiry (ms)
-- KEYS[6] each live run's first window (unix seconds)
-- KEYS[7] runs that left, and when (ms)
-- KEYS[8] the fleet's epoch
-- KEYS[9] windows left to the fleet by runs that stopped
-- KEYS[10..] the window's other shards, if it has several (disjoint sets)
-- ARGV[1] this run
-- ARGV[2] its mark: full | partial, or '' to settle a window it took no part in
-- ARGV[3] how many ids it delivered to the window: fewer in Redis means Redis lost some
-- ARGV[4] '0'; '1' to publish even if some run is not done; 'alone' to do so only
--         if no other live run may still publish the window (leaving)
-- ARGV[5] the window's start (unix seconds); ARGV[6] the keys' time to live (s)
-- ARGV[7] the epoch this run knows
-- ARGV[8..15] the latest record this run knows (revision, unique_requests,
--         complete, partial, instances, published_at, acked, by; revision 0 for none)
-- ARGV[16..] more runs to wait for, besides the live ones: any this run saw take
--         part in the window, or saw live shortly before Redis lost its data (in
--         case their marks or heartbeats went with it)
--
-- Returns {{outcome, revision, unique_requests, complete, partial, instances,
-- published_at}, {by, count, done, members, acked, publisher_live, publisher_left}}:
-- the latest record (revision 0 for none), the run that published it, the set's
-- size, the runs done now, every run that took part, the highest revision the
-- shared sinks acknowledged, whether the publisher is live, and when it left (ms;
-- 0 if unknown). outcome is 'epoch' (Redis lost its data since this run's last
-- heartbeat: beat, then call again), 'lost' (Redis lost ids of this run: send them
-- again, then call again), 'published' (by this call), 'known' or 'pending'.

redis.replicate_commands()
local me, mark, ttl = ARGV[1], ARGV[2], ARGV[6]
local window = tonumber(ARGV[5])
local function answer(outcome)
  return {{outcome, 0, 0, 0, 0, 0, 0}, {'', 0, 0, {}, 0, 0, 0}}
end
if redis.call('GET', KEYS[8]) ~= ARGV[7] then
  return answer('epoch')
end
if tonumber(redis.call('HGET', KEYS[3], me) or '0') < tonumber(ARGV[3]) then
  return answer('lost')
end
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)

local FIELDS = {'revision', 'unique_requests', 'complete', 'partial', 'instances', 'published_at', 'acked'}
local function stored()
  local values = redis.call('HMGET', KEYS[4], unpack(FIELDS))
  local record = {}
  for i = 1, #FIELDS do
    record[i] = tonumber(values[i]) or 0
  end
  record.by = redis.call('HGET', KEYS[4], 'by') or ''
  return record
end
local function store(record)
  redis.call('HSET', KEYS[4], 'revision', record[1], 'unique_requests', record[2],
    'complete', record[3], 'partial', record[4], 'instances', record[5],
    'published_at', record[6], 'acked', record[7], 'by', record.by)
end

local record = stored()
if mark == '' and record[1] == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  -- Left to the fleet, and gone with its keys since: nothing to publish.
  redis.call('SREM', KEYS[9], ARGV[5])
  return answer('known')
end
if mark ~= '' then
  redis.call('HSET', KEYS[2], me, mark)
end

if tonumber(ARGV[8]) > record[1] then
  -- The record went with Redis's data: put back the latest this run knows, so
  -- that the next revision is higher than any a consumer has seen from it.
  record = {tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]),
    tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14]), by = ARGV[15]}
  store(record)
end

local state = {}
local marks = redis.call('HGETALL', KEYS[2])
for i = 1, #marks, 2 do
  state[marks[i]] = marks[i + 1]
end
for _, run in ipairs(redis.call('HKEYS', KEYS[3])) do
  state[run] = state[run] or 'sending'
end
local done, full, waiting, members = 0, false, false, {}
for run, state_of in pairs(state) do
  members[#members + 1] = run
  if state_of == 'sending' then
    waiting = true
  else
    done = done + 1
    if state_of == 'full' then
      full = true
    end
  end
end

-- Live runs that started before the window ended could have ids for it.
local others_pending, live = false, {}
for _, run in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], now, '+inf')) do
  live[run] = true
  local joined = tonumber(redis.call('HGET', KEYS[6], run) or '0')
  local state_of = state[run]
  if joined <= window and (state_of == nil or state_of == 'sending') then
    waiting = true
    if run ~= me then
      others_pending = true
    end
  end
end
for i = 16, #ARGV do
  local state_of = state[ARGV[i]]
  if state_of == nil or state_of == 'sending' then
    waiting = true
  end
end

local count = redis.call('SCARD', KEYS[1])
for i = 10, #KEYS do
  count = count + redis.call('SCARD', KEYS[i])
end
local complete = 0
if not waiting then
  complete = 1
end
local force = ARGV[4] == '1' or (ARGV[4] == 'alone' and not others_pending)
-- A count lower than published means Redis lost ids that their senders have not
-- sent again yet: never publish it, whatever else changed.
local grown = count >= record[2]
  and (record[1] == 0 or count > record[2] or complete > record[3])
local outcome = 'known'
if grown and (complete == 1 or force) then
  local partial = 1
  if full then
    partial = 0
  end
  record = {record[1] + 1, count, complete, partial, done, now, record[7], by = me}
  store(record)
  outcome = 'published'
elseif record[1] == 0 then
  outcome = 'pending'
end
if record[3] == 1 or (mark == '' and record[1] > 0) then
  -- Finished, or settled by whoever took it over: no longer left to the fleet.
  redis.call('SREM', KEYS[9], ARGV[5])
end
-- Every settle renews the window's keys, its other shards included: a key that
-- Redis lost and a later round wrote again has its time to live back.
for i = 1, 4 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
for i = 10, #KEYS do
  redis.call('EXPIRE', KEYS[i], ttl)
end

local publisher_live = 0
if live[record.by] then
  publisher_live = 1
end
local publisher_left = tonumber(redis.call('HGET', KEYS[7], record.by) or '0')
return {{outcome, record[1], record[2], record[3], record[4], record[5], record[6]},
  {record.by, count, done, members, record[7], publisher_live, publisher_left}}
