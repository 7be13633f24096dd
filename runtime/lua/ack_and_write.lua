#!lua
-- ack_and_write: acknowledge a delivered entry and record its one outcome, atomically.
--
-- Only if this call acknowledged the entry (it was still pending to the group) and the entry is still
-- in its stream: append the outcome to the target stream, delete the entry from its stream and count
-- it in the stats hash. A slow worker whose frame was meanwhile reclaimed and finished by another finds
-- XACK = 0 and writes nothing, so each frame has exactly one outcome; a frame trimmed while pending was
-- counted as dropped by the writer that trimmed it and gets no second outcome; a client retry that sends
-- the call again finds it acknowledged: nothing is written twice.
-- `#!lua` (no flags): a server out of memory refuses the whole script before it runs (a Lua error
-- would not undo the XACK made before it); all keys lie in the entry's camera slot.
--
-- KEYS[1]  source stream (the entry's)
-- KEYS[2]  target stream (results, or dead letters)
-- KEYS[3]  stats hash
-- ARGV[1]  consumer group
-- ARGV[2]  entry id
-- ARGV[3]  target stream's MAXLEN (approximate)
-- ARGV[4]  stats field incremented by 1
-- ARGV[5..] the outcome's field, value, field, value, ... (at least one pair)
--
-- Returns 1 written; 0 not written: the entry was not pending any more (nothing done), or was trimmed
-- from its stream while pending (then only acknowledged).

-- a counter of the camera's stats hash that is no integer HINCRBY can add to (the camera role may write that hash)
-- starts again at 0, so a forged value cannot make the increment, and the whole call, fail
local function counter(hash, field)
  local value = redis.call('HGET', hash, field)
  if value and not (string.match(value, '^-?%d+$') and #value <= 18) then redis.call('HSET', hash, field, 0) end
end
local present = #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) > 0
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 or not present then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[2])
counter(KEYS[3], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
return 1
