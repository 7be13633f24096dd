#!lua
-- commit_results: the store's commit of one camera's batch of results, all or nothing.
--
-- If every result id is still pending to the group and the camera's alarm state is still at the
-- version the store read: acknowledge the results, store the new debounce window (version + 1), update
-- the camera's latest state unless a newer result already did (its `seq` decides), and append, publish
-- and count each alarm (the latest hash's `last_alarm_seq` follows). Otherwise nothing is done, so a
-- retried call whose first reply was lost, or results another store took, change nothing.
-- `#!lua` (no flags): a server out of memory refuses the whole script before it runs. The keys are one
-- camera's (one slot); the channel is no key.
--
-- KEYS[1]  the camera's results stream
-- KEYS[2]  the camera's alarm state hash (version, window)
-- KEYS[3]  the camera's latest hash
-- KEYS[4]  the camera's alarms stream
-- KEYS[5]  the camera's stats hash (field alarms)
-- ARGV[1]  consumer group
-- ARGV[2]  the alarm state version read (a missing version reads as '0')
-- ARGV[3]  the new window (JSON)
-- ARGV[4]  the alarms stream's MAXLEN (approximate)
-- ARGV[5]  the alarms channel (PUBLISH)
-- ARGV[6]  n: the number of result ids, then ARGV[7 .. 6+n] the ids
-- ARGV[7+n] m: the number of latest-state values (2 per field), then m values: field, value, ...,
--          the first pair being `seq` (0 values: the latest state is left alone)
-- ARGV[8+n+m ..] the alarms: seq, packed Alarm message, seq, packed Alarm message, ...
--
-- Returns 1 committed; 0 some result is no longer pending (nothing done); -1 the state changed since it
-- was read (nothing done).

-- a counter of the camera's stats hash that is no integer HINCRBY can add to (the camera role may write that hash)
-- starts again at 0, so a forged value cannot make the increment, and the whole call, fail
local function counter(hash, field)
  local value = redis.call('HGET', hash, field)
  if value and not (string.match(value, '^-?%d+$') and #value <= 18) then redis.call('HSET', hash, field, 0) end
end
local ids = tonumber(ARGV[6])
for i = 7, 6 + ids do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1) == 0 then return 0 end
end
if (redis.call('HGET', KEYS[2], 'version') or '0') ~= ARGV[2] then return -1 end
for i = 7, 6 + ids do redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) end
redis.call('HSET', KEYS[2], 'version', tonumber(ARGV[2]) + 1, 'window', ARGV[3])
local at = 7 + ids
local latest = tonumber(ARGV[at])
local current = redis.call('HGET', KEYS[3], 'seq')
if latest > 0 and (not current or tonumber(current) < tonumber(ARGV[at + 2])) then
  redis.call('HSET', KEYS[3], unpack(ARGV, at + 1, at + latest))
end
for i = at + latest + 1, #ARGV, 2 do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'm', ARGV[i + 1])
  redis.call('PUBLISH', ARGV[5], ARGV[i + 1])
  counter(KEYS[5], 'alarms')
  redis.call('HINCRBY', KEYS[5], 'alarms', 1)
  redis.call('HSET', KEYS[3], 'last_alarm_seq', ARGV[i])
end
return 1
