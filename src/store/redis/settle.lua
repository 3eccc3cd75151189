-- Marks a run done with a window and publishes the window's count once the fleet
-- is done with it, or when told to (the fleet's wait is over, or the last run is
-- leaving). One script on the window's slot, so that the marks, the record and
-- the revision are taken together: revisions increase with the count, and one
-- caller publishes each. A run is one process of an instance: a restarted
-- instance is a new member of the fleet.
--
-- The count comes from the caller, summed over the window's shards (on other
-- slots, maybe other nodes), which it read after learning the window's
-- generation. Every mark that makes a run done sets a new generation, and a run
-- marks itself done only once its ids are in: so if the generation is still the
-- one the caller saw, every run done now had its ids in before the caller read
-- the shards, and the count holds them all. If it is not, the answer is 'again'.
-- A generation is Redis's clock in microseconds (one past the last if the clock
-- has not moved), not a count: after Redis lost its data a count would start
-- again and come back to a value some run learned before the loss, and that
-- run's survey, older than the loss, would pass for current.
--
-- KEYS[1] the window's marks: run -> sending | full | partial
-- KEYS[2] the window's published record (a hash), and its generation
-- ARGV[1] this run
-- ARGV[2] its mark: full | partial, or '' to settle a window it took no part in
-- ARGV[3] '0'; '1' to publish even if some run is not done; 'alone' to do so only
--         if no other live run may still publish the window (leaving)
-- ARGV[4] the keys' time to live (s)
-- ARGV[5] the record's time to live (s): longer than the window's other keys, so
--         that a run coming back after they expired finds the record and never
--         publishes a revision number already used, nor a lower count
-- ARGV[6] the generation the caller saw before reading the shards ('' for none)
-- ARGV[7] the window's count: the sum of its shards' sizes
-- ARGV[8..15] the latest record this run knows (revision, unique_requests,
--         complete, partial, instances, published_at, acked, by; revision 0 for none)
-- ARGV[16] the lowest revision this call may publish: the first of the fleet's
--         epoch, so that a revision published after Redis lost its data is above
--         every one published before, even one no run put back
-- ARGV[17] '1' if the window began within a fleet wait of the fleet's epoch: a run
--         whose heartbeat went with Redis's data may hold ids for it unseen, so
--         its record never says complete; else '0'
-- ARGV[18] how many live runs follow, L
-- ARGV[19..18+L] the live runs that started before the window ended (they could
--         have ids for it)
-- ARGV[19+L..] more runs to wait for: any that delivered to the window or that
--         this run saw take part, and any it saw live shortly before Redis lost its
--         data (in case their marks or heartbeats went with it)
--
-- Returns {{outcome, revision, unique_requests, complete, partial, instances,
-- published_at}, {by, generation, done, members, acked, release}}: the latest
-- record (revision 0 for none), the run that published it, the generation, the
-- runs done now, the runs marked, the highest revision the shared sinks
-- acknowledged, and 1 if the window is no longer left to the fleet (the caller
-- takes it off the list). outcome is 'again' (read the shards again, then call
-- again with the generation returned), 'published' (by this call), 'known',
-- 'pending' or 'gone' (left to the fleet, and its keys expired since).

redis.replicate_commands()
local me, mark, force, ttl, record_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function answer(outcome, generation, release)
  return {{outcome, 0, 0, 0, 0, 0, 0}, {'', generation, 0, {}, 0, release}}
end

local FIELDS = {'revision', 'unique_requests', 'complete', 'partial', 'instances', 'published_at', 'acked'}
local function stored()
  local values = redis.call('HMGET', KEYS[2], unpack(FIELDS))
  local record = {}
  for i = 1, #FIELDS do
    record[i] = tonumber(values[i]) or 0
  end
  record.by = redis.call('HGET', KEYS[2], 'by') or ''
  return record
end
local function store(record)
  redis.call('HSET', KEYS[2], 'revision', record[1], 'unique_requests', record[2],
    'complete', record[3], 'partial', record[4], 'instances', record[5],
    'published_at', record[6], 'acked', record[7], 'by', record.by)
  -- It may have just been created (a run adopting a window without a record).
  redis.call('EXPIRE', KEYS[2], record_ttl)
end

local record = stored()
if mark == '' and record[1] == 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  return answer('gone', 0, 1)
end
local generation = tonumber(redis.call('HGET', KEYS[2], 'generation') or '0')
if mark ~= '' and redis.call('HGET', KEYS[1], me) ~= mark then
  redis.call('HSET', KEYS[1], me, mark)
  local clock = redis.call('TIME')
  generation = math.max(clock[1] * 1000000 + clock[2], generation + 1)
  -- '%.0f': tostring() writes a number this large in exponent form.
  redis.call('HSET', KEYS[2], 'generation', string.format('%.0f', generation))
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], record_ttl)
if tonumber(ARGV[6]) ~= generation then
  return answer('again', generation, 0)
end

if tonumber(ARGV[8]) > record[1] then
  -- The record went with Redis's data: put back the latest this run knows, so
  -- that the next revision is higher than any a consumer has seen from it.
  record = {tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]),
    tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14]), by = ARGV[15]}
  store(record)
end

local state = {}
local marks = redis.call('HGETALL', KEYS[1])
local done, full, members = 0, false, {}
for i = 1, #marks, 2 do
  state[marks[i]] = marks[i + 1]
  members[#members + 1] = marks[i]
  if marks[i + 1] ~= 'sending' then
    done = done + 1
    if marks[i + 1] == 'full' then
      full = true
    end
  end
end
local function pending(run)
  return state[run] == nil or state[run] == 'sending'
end

local waiting, others_pending = false, false
local live = tonumber(ARGV[18])
for i = 19, 18 + live do
  if pending(ARGV[i]) then
    waiting = true
    if ARGV[i] ~= me then
      others_pending = true
    end
  end
end
for i = 19 + live, #ARGV do
  if pending(ARGV[i]) then
    waiting = true
  end
end
for _, state_of in pairs(state) do
  if state_of == 'sending' then
    waiting = true
  end
end

local count = tonumber(ARGV[7])
local complete = 0
if not waiting and ARGV[17] ~= '1' then
  complete = 1
end
local forced = force == '1' or (force == 'alone' and not others_pending)
-- A count lower than published (here, or as this run knows it: a run that came
-- back after a loss may have published since, under a later epoch) means Redis
-- lost ids that their senders have not sent again yet: never publish it,
-- whatever else changed.
local floor = math.max(record[2], tonumber(ARGV[9]))
local grown = count >= floor
  and (record[1] == 0 or count > record[2] or complete > record[3])
local outcome = 'known'
if grown and (complete == 1 or forced) then
  local partial = 1
  if full then
    partial = 0
  end
  local clock = redis.call('TIME')
  local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
  local revision = math.max(record[1] + 1, tonumber(ARGV[16]))
  record = {revision, count, complete, partial, done, now, record[7], by = me}
  store(record)
  outcome = 'published'
elseif record[1] == 0 then
  outcome = 'pending'
end
-- Finished, or settled by whoever took it over: no longer left to the fleet.
local release = 0
if record[3] == 1 or (mark == '' and record[1] > 0) then
  release = 1
end
return {{outcome, record[1], record[2], record[3], record[4], record[5], record[6]},
  {record.by, generation, done, members, record[7], release}}
