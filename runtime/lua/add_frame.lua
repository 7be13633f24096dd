#!lua
-- add_frame: append a camera's frame once, within the operator's limits, counting what the bound trimmed.
--
-- The limits come from the camera's limits hash, which only an operator writes (`patchcore redis cameras`
-- registers a camera and writes it; the camera role may only read it), never from the caller: a frame over
-- `max_entry_bytes` is refused and counted as `refused_size`; the stream is bounded by the caller's MAXLEN ~
-- maxlen when that is within `max_stream_len`, else by exactly `max_stream_len` (counted as `capped`). A camera
-- without limits is not registered: refused, nothing written. A frame whose sequence number is not above the
-- camera's `last_seq` was already written (a client retry after a lost reply) and is skipped. Entries trimmed
-- to make room are counted as `dropped`, in the same atomic step.
-- `#!lua` (no flags): a server out of memory refuses the whole function before it runs. All keys lie in the
-- camera's slot.
--
-- KEYS[1]  the camera's frame stream
-- KEYS[2]  the camera's stats hash (fields last_seq, last_ingest_at, ingested, dropped, refused_size, capped)
-- KEYS[3]  the camera's limits hash (fields max_entry_bytes, max_stream_len; written by an operator)
-- ARGV[1]  the frame's sequence number
-- ARGV[2]  the stream's MAXLEN wanted by the caller (approximate; never above max_stream_len)
-- ARGV[3]  captured_at (unix seconds), stored as last_ingest_at
-- ARGV[4]  the packed Frame message (field `m`)
--
-- Returns -1 for a duplicate (nothing written), -2 for a frame over the size limit (refused, counted), -3 for a
-- camera without limits (not registered: nothing written), else the number of frames trimmed (0 or more).

-- a counter of the camera's stats hash that is no integer HINCRBY can add to (the camera role may write that hash)
-- starts again at 0, so a forged value cannot make the increment, and the whole call, fail
local function counter(hash, field)
  local value = redis.call('HGET', hash, field)
  if value and not (string.match(value, '^-?%d+$') and #value <= 18) then redis.call('HSET', hash, field, 0) end
end
local limits = redis.call('HMGET', KEYS[3], 'max_entry_bytes', 'max_stream_len')
local max_bytes, max_len = tonumber(limits[1]), tonumber(limits[2])
if not max_bytes or not max_len then return -3 end
local last = redis.call('HGET', KEYS[2], 'last_seq')
if last and tonumber(last) and tonumber(last) >= tonumber(ARGV[1]) then return -1 end
if #ARGV[4] > max_bytes then
  counter(KEYS[2], 'refused_size')
  redis.call('HINCRBY', KEYS[2], 'refused_size', 1)
  return -2
end
local before = redis.call('XLEN', KEYS[1])
if tonumber(ARGV[2]) <= max_len then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[4])
else
  redis.call('XADD', KEYS[1], 'MAXLEN', max_len, '*', 'm', ARGV[4])
  counter(KEYS[2], 'capped')
  redis.call('HINCRBY', KEYS[2], 'capped', 1)
end
local dropped = before + 1 - redis.call('XLEN', KEYS[1])
redis.call('HSET', KEYS[2], 'last_seq', ARGV[1], 'last_ingest_at', ARGV[3])
counter(KEYS[2], 'ingested')
redis.call('HINCRBY', KEYS[2], 'ingested', 1)
if dropped > 0 then
  counter(KEYS[2], 'dropped')
  redis.call('HINCRBY', KEYS[2], 'dropped', dropped)
end
return dropped
