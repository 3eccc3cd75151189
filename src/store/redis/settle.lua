-- Marks an instance done with a window and publishes the window's count once the
-- fleet is done with it, or when told to (the fleet's wait is over, or the last
-- instance is leaving). One script, so that the count and the revision are taken
-- together: revisions increase with the count, and one caller publishes each.
--
-- KEYS[1] the window's set of ids
-- KEYS[2] the window's marks: instance -> sending | full | partial
-- KEYS[3] the window's deliveries: instance -> ids it delivered (its sentinel)
-- KEYS[4] the window's published record (a hash)
-- KEYS[5] the live instances: sorted set scored by heartbeat expiry (ms)
-- KEYS[6] each live instance's first window (unix seconds)
-- KEYS[7] each live instance's process (its run)
-- KEYS[8] the fleet's epoch
-- KEYS[9] windows left to the fleet by leaving instances
-- ARGV[1] this instance; ARGV[2] this process (recorded as the publisher)
-- ARGV[3] its mark: full | partial, or '' to settle a window it took no part in
-- ARGV[4] how many ids it delivered to the window: fewer in Redis means Redis lost some
-- ARGV[5] '0'; '1' to publish even if some instance is not done; 'alone' to do so
--         only if no other live instance may still publish the window (leaving)
-- ARGV[6] the window's start (unix seconds); ARGV[7] the keys' time to live (s)
-- ARGV[8] the epoch this instance knows
-- ARGV[9..14] the latest record this instance knows (revision, unique_requests,
--         complete, partial, instances, published_at; revision 0 for none)
-- ARGV[15..] more instances to wait for, besides the live ones: any this instance
--         saw take part in the window, or saw live shortly before Redis lost its
--         data (in case their marks or heartbeats went with it)
--
-- Returns {{outcome, revision, unique_requests, complete, partial, instances,
-- published_at}, {by, count, done, members, acked, publisher_live}}: the latest
-- record (revision 0 for none), the process that published it, the set's size,
-- the instances done now, every instance that took part, the highest revision the
-- shared sinks acknowledged, and whether the publisher still runs. outcome is
-- 'epoch' (Redis lost its data since this instance's last heartbeat: beat, then
-- call again), 'lost' (Redis lost ids of this instance: send them again, then call
-- again), 'published' (by this call), 'known' or 'pending'.

redis.replicate_commands()
local me, run, mark, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[7]
local window = tonumber(ARGV[6])
local function answer(outcome)
  return {{outcome, 0, 0, 0, 0, 0, 0}, {'', 0, 0, {}, 0, 0}}
end
if redis.call('GET', KEYS[8]) ~= ARGV[8] then
  return answer('epoch')
end
if tonumber(redis.call('HGET', KEYS[3], me) or '0') < tonumber(ARGV[4]) then
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
    'published_at', record[6], 'by', record.by)
end

local record = stored()
if mark == '' and record[1] == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  -- Left to the fleet, and gone with its keys since: nothing to publish.
  redis.call('SREM', KEYS[9], ARGV[6])
  return answer('known')
end
if mark ~= '' then
  redis.call('HSET', KEYS[2], me, mark)
end

if tonumber(ARGV[9]) > record[1] then
  -- The record went with Redis's data: put back the latest this instance knows,
  -- so that the next revision is higher than any a consumer has seen from it.
  record = {tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]),
    tonumber(ARGV[13]), tonumber(ARGV[14]), 0, by = ''}
  store(record)
end

local state = {}
local marks = redis.call('HGETALL', KEYS[2])
for i = 1, #marks, 2 do
  state[marks[i]] = marks[i + 1]
end
local delivering = redis.call('HKEYS', KEYS[3])
for _, name in ipairs(delivering) do
  state[name] = state[name] or 'sending'
end
local done, full, waiting, members = 0, false, false, {}
for name, state_of in pairs(state) do
  members[#members + 1] = name
  if state_of == 'sending' then
    waiting = true
  else
    done = done + 1
    if state_of == 'full' then
      full = true
    end
  end
end

-- Live instances that started before the window ended could have ids for it.
local others_pending = false
local live = redis.call('ZRANGEBYSCORE', KEYS[5], now, '+inf')
local runs = {}
for _, name in ipairs(live) do
  runs[name] = redis.call('HGET', KEYS[7], name)
  local joined = tonumber(redis.call('HGET', KEYS[6], name) or '0')
  local state_of = state[name]
  if joined <= window and (state_of == nil or state_of == 'sending') then
    waiting = true
    if name ~= me then
      others_pending = true
    end
  end
end
for i = 15, #ARGV do
  local state_of = state[ARGV[i]]
  if state_of == nil or state_of == 'sending' then
    waiting = true
  end
end

local count = redis.call('SCARD', KEYS[1])
local complete = 0
if not waiting then
  complete = 1
end
local force = ARGV[5] == '1' or (ARGV[5] == 'alone' and not others_pending)
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
  record = {record[1] + 1, count, complete, partial, done, now, record[7], by = run}
  store(record)
  outcome = 'published'
elseif record[1] == 0 then
  outcome = 'pending'
end
if mark == '' and record[1] > 0 then
  redis.call('SREM', KEYS[9], ARGV[6])
elseif ARGV[5] == 'alone' and outcome ~= 'published' and complete == 0 then
  -- Leaving with the window unfinished: whoever is live past its wait settles it.
  redis.call('SADD', KEYS[9], ARGV[6])
end

for i = 1, 4 do
  redis.call('EXPIRE', KEYS[i], ttl)
end

local publisher_live = 0
local name = string.match(record.by, '^(.*)/[^/]*$')
if name and runs[name] == record.by then
  publisher_live = 1
end
return {{outcome, record[1], record[2], record[3], record[4], record[5], record[6]},
  {record.by, count, done, members, record[7], publisher_live}}
