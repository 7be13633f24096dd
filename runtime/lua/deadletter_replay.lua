#!lua
-- deadletter_replay: put a dead letter's original bytes back on its camera's stream, once.
--
-- Appends the kept payload to the frame stream (field `m`), deletes the dead letter and its payload and
-- counts `replayed`. A second call (a retry, a second operator) finds no dead letter and adds nothing.
-- `#!lua` (no flags): a server out of memory refuses the whole script before it runs. All keys are one
-- camera's: one slot.
--
-- KEYS[1]  the camera's dead-letter stream
-- KEYS[2]  the camera's dead-letter payload stream
-- KEYS[3]  the camera's frame stream
-- KEYS[4]  the camera's stats hash
-- ARGV[1]  the dead letter's id
-- ARGV[2]  its payload's id
--
-- Returns 1 replayed; 0 no such dead letter; -1 its payload is gone (expired or never kept).

-- a counter of the camera's stats hash that is no integer HINCRBY can add to (the camera role may write that hash)
-- starts again at 0, so a forged value cannot make the increment, and the whole call, fail
local function counter(hash, field)
  local value = redis.call('HGET', hash, field)
  if value and not (string.match(value, '^-?%d+$') and #value <= 18) then redis.call('HSET', hash, field, 0) end
end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
local payload = redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2])
if #payload == 0 then return -1 end
redis.call('XADD', KEYS[3], '*', 'm', payload[1][2][2])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[2])
counter(KEYS[4], 'replayed')
redis.call('HINCRBY', KEYS[4], 'replayed', 1)
return 1
