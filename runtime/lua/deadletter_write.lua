#!lua
-- deadletter_write: acknowledge a pending frame and record it as a dead letter, atomically.
--
-- Only if this call acknowledged the frame (it was still pending to the group): keep its payload when
-- one is given (appended to the payload stream, which keeps at most ARGV[4] entries and none older than
-- ARGV[5]) with the payload's id in the dead letter's `payload` field, append the dead letter, delete
-- the frame from its stream and count it as `deadlettered`. A frame another consumer finished meanwhile
-- (XACK = 0) gets no dead letter; a retry of the call finds it acknowledged and writes nothing twice.
-- `#!lua` (no flags): a server out of memory refuses the whole script before it runs; without it the
-- XACK would stand and the XADD fail, and the frame would be lost from the pending list unrecorded.
-- All keys lie in the camera's slot.
--
-- KEYS[1]  the frame's stream
-- KEYS[2]  the camera's dead-letter stream
-- KEYS[3]  the camera's stats hash
-- KEYS[4]  the camera's dead-letter payload stream
-- ARGV[1]  consumer group
-- ARGV[2]  the frame's entry id
-- ARGV[3]  the dead-letter stream's MAXLEN (approximate)
-- ARGV[4]  payloads kept (exact MAXLEN of the payload stream)
-- ARGV[5]  the oldest payload id kept (XTRIM MINID)
-- ARGV[6]  the payload to keep, or '' for none
-- ARGV[7..] the dead letter's field, value, field, value, ... (at least one pair)
--
-- Returns 1 recorded; 0 nothing done (the frame was not pending any more).

-- a counter of the camera's stats hash that is no integer HINCRBY can add to (the camera role may write that hash)
-- starts again at 0, so a forged value cannot make the increment, and the whole call, fail
local function counter(hash, field)
  local value = redis.call('HGET', hash, field)
  if value and not (string.match(value, '^-?%d+$') and #value <= 18) then redis.call('HSET', hash, field, 0) end
end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
if ARGV[6] ~= '' then
  fields[#fields + 1] = 'payload'
  fields[#fields + 1] = redis.call('XADD', KEYS[4], 'MAXLEN', ARGV[4], '*', 'm', ARGV[6])
  redis.call('XTRIM', KEYS[4], 'MINID', ARGV[5])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[2])
counter(KEYS[3], 'deadlettered')
redis.call('HINCRBY', KEYS[3], 'deadlettered', 1)
return 1
