#!lua
-- sink_refuse: acknowledge an entry a sink cannot deliver for good and record it in the sink's dead letters,
-- atomically.
--
-- Only if this call acknowledged the entry (it was still pending to the sink's group): append the dead letter.
-- Unlike ack_and_write the entry stays in its stream: the store and the other sinks read it too. A client
-- retry that sends the call again finds it acknowledged and writes nothing twice. All keys lie in the entry's
-- camera slot.
--
-- KEYS[1]  source stream (the camera's results or alarms)
-- KEYS[2]  the sink's dead-letter stream of that camera
-- ARGV[1]  consumer group (the sink's)
-- ARGV[2]  entry id
-- ARGV[3]  dead-letter stream's MAXLEN (approximate)
-- ARGV[4..] the dead letter's field, value, field, value, ... (at least one pair)
--
-- Returns 1 recorded; 0 the entry was not pending any more (nothing done).
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
return 1
