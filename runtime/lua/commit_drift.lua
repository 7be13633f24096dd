#!lua
-- commit_drift: a camera's drift events (store.alarms.drift), each written exactly once, with the state that says
-- so; and, when given, the camera's new alarm state (an operator's acknowledgement), all or nothing.
--
-- If the camera's alarm state is still at the version read: set the new window when one is given (version + 1),
-- then append to the drift stream, publish and count each event whose number follows the last one written
-- (`drift_announced` of the state hash, which follows), in order; an event already written is skipped, so a
-- retried call, or a store relaying events another store (or a crash) left in the state's outbox, writes
-- nothing twice. `#!lua` (no flags): a server out of memory refuses the whole script before it runs. The keys
-- are one camera's (one slot); the channel is no key.
--
-- KEYS[1]  the camera's alarm state hash (version, window, drift_announced)
-- KEYS[2]  the camera's drift stream
-- KEYS[3]  the camera's stats hash (field drift_events)
-- ARGV[1]  the alarm state version read (a missing version reads as '0')
-- ARGV[2]  the new window (JSON), or '' to leave the state as it is
-- ARGV[3]  the drift stream's MAXLEN (approximate)
-- ARGV[4]  the drift channel (PUBLISH)
-- ARGV[5 ..] the events, oldest first: number, packed DriftEvent message, number, ...
--
-- Returns the number of events written (0 or more); -1 the state changed since it was read (nothing done).
-- a counter of the camera's stats hash that is no integer HINCRBY can add to (the camera role may write that hash)
-- starts again at 0, so a forged value cannot make the increment, and the whole call, fail
local function counter(hash, field)
  local value = redis.call('HGET', hash, field)
  if value and not (string.match(value, '^-?%d+$') and #value <= 18) then redis.call('HSET', hash, field, 0) end
end
if (redis.call('HGET', KEYS[1], 'version') or '0') ~= ARGV[1] then return -1 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'version', tonumber(ARGV[1]) + 1, 'window', ARGV[2])
end
local announced = tonumber(redis.call('HGET', KEYS[1], 'drift_announced') or '0')
local written = 0
for i = 5, #ARGV, 2 do
  if tonumber(ARGV[i]) == announced + 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'n', ARGV[i], 'm', ARGV[i + 1])
    redis.call('PUBLISH', ARGV[4], ARGV[i + 1])
    counter(KEYS[3], 'drift_events')
    redis.call('HINCRBY', KEYS[3], 'drift_events', 1)
    announced = announced + 1
    written = written + 1
  end
end
if written > 0 then redis.call('HSET', KEYS[1], 'drift_announced', announced) end
return written
