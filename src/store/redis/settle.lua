-- Marks an instance done with a window and publishes the window's count once the
-- fleet is done with it, or when told to (the fleet's wait is over). One script, so
-- that the count and the revision are taken together: revisions increase with it.
--
-- KEYS[1] the window's set of ids
-- KEYS[2] the window's marks: instance -> sending | full | partial
-- KEYS[3] the window's published record (a hash)
-- KEYS[4] the live instances (a sorted set scored by heartbeat expiry)
-- ARGV[1] this instance; ARGV[2] this process (recorded as the publisher)
-- ARGV[3] its mark (full | partial)
-- ARGV[4] '1' if it sent ids to the window: its 'sending' mark, set with its first
--         ids, is then their sentinel, and a missing mark means Redis lost them
-- ARGV[5] '1' to publish even if some instance is not done
-- ARGV[6] now, in ms since the epoch; ARGV[7] the keys' time to live, in s
-- ARGV[8..13] the latest record this instance knows (revision, unique_requests,
--         complete, partial, instances, published_at; revision 0 for none)
-- ARGV[14..] more instances to wait for, besides the live ones: any this instance
--         saw take part in the window, or saw live shortly before Redis lost its
--         data (in case their marks or heartbeats went with it)
--
-- Returns {outcome, revision, unique_requests, complete, partial, instances,
-- published_at, by, count, done, members}: the latest record (revision 0 for none),
-- who published it, the set's size, the instances done now, and every instance
-- with a mark. outcome is 'lost' (send the ids again, then call again),
-- 'published' (by this call), 'known' or 'pending'.

local me, run, mark, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[7]
local marks = redis.call('HGETALL', KEYS[2])
local state = {}
for i = 1, #marks, 2 do
  state[marks[i]] = marks[i + 1]
end
if ARGV[4] == '1' and state[me] == nil then
  return {'lost', 0, 0, 0, 0, 0, 0, '', 0, 0, {}}
end
state[me] = mark
redis.call('HSET', KEYS[2], me, mark)
redis.call('EXPIRE', KEYS[2], ttl)

local FIELDS = {'revision', 'unique_requests', 'complete', 'partial', 'instances', 'published_at'}
local function stored()
  local values = redis.call('HMGET', KEYS[3], unpack(FIELDS))
  local record = {}
  for i = 1, #FIELDS do
    record[i] = tonumber(values[i]) or 0
  end
  record[7] = redis.call('HGET', KEYS[3], 'by') or ''
  return record
end
local function store(record)
  redis.call('HSET', KEYS[3], 'revision', record[1], 'unique_requests', record[2],
    'complete', record[3], 'partial', record[4], 'instances', record[5],
    'published_at', record[6], 'by', record[7])
  redis.call('EXPIRE', KEYS[3], ttl)
end

local record = stored()
if tonumber(ARGV[8]) > record[1] then
  -- The record went with Redis's data: put back the latest this instance knows,
  -- so that the next revision is higher than any a consumer has seen from it.
  record = {tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]),
    tonumber(ARGV[12]), tonumber(ARGV[13]), ''}
  store(record)
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
local awaited = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[6], '+inf')
for i = 14, #ARGV do
  awaited[#awaited + 1] = ARGV[i]
end
for _, name in ipairs(awaited) do
  local state_of = state[name]
  if state_of == nil or state_of == 'sending' then
    waiting = true
  end
end

local count = redis.call('SCARD', KEYS[1])
local complete = 0
if not waiting then
  complete = 1
end
local grown = record[1] == 0 or count > record[2] or complete > record[3]
if grown and (complete == 1 or ARGV[5] == '1') then
  local partial = 1
  if full then
    partial = 0
  end
  record = {record[1] + 1, count, complete, partial, done, tonumber(ARGV[6]), run}
  store(record)
  return {'published', record[1], record[2], record[3], record[4], record[5], record[6], run, count, done, members}
end
local outcome = 'known'
if record[1] == 0 then
  outcome = 'pending'
end
return {outcome, record[1], record[2], record[3], record[4], record[5], record[6], record[7], count, done, members}
