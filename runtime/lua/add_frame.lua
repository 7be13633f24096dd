#!lua
-- add_frame: append a camera's frame once, bounded, counting what the bound trimmed.
--
-- A frame whose sequence number is not above the camera's `last_seq` was already written (a client
-- retry after a lost reply) and is skipped. The stream is bounded by MAXLEN ~ maxlen; entries trimmed
-- to make room are counted as `dropped`, in the same atomic step. The camera is (re-)registered in the
-- camera set when KEYS[3] is given (on a Redis Cluster the set lies in another slot, and ingest
-- registers the camera apart), so a data loss cannot hide it.
-- `#!lua` (no flags): a server out of memory refuses the whole script before it runs.
--
-- KEYS[1]  the camera's frame stream
-- KEYS[2]  the camera's stats hash (fields last_seq, last_ingest_at, ingested, dropped)
-- KEYS[3]  optional: the camera set
-- ARGV[1]  the frame's sequence number
-- ARGV[2]  the stream's MAXLEN (approximate)
-- ARGV[3]  captured_at (unix seconds), stored as last_ingest_at
-- ARGV[4]  the packed Frame message (field `m`)
-- ARGV[5]  the camera's name (added to KEYS[3])
--
-- Returns -1 for a duplicate (nothing written), else the number of frames trimmed (0 or more).
local last = redis.call('HGET', KEYS[2], 'last_seq')
if last and tonumber(last) >= tonumber(ARGV[1]) then return -1 end
local before = redis.call('XLEN', KEYS[1])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[4])
local dropped = before + 1 - redis.call('XLEN', KEYS[1])
redis.call('HSET', KEYS[2], 'last_seq', ARGV[1], 'last_ingest_at', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'ingested', 1)
if dropped > 0 then redis.call('HINCRBY', KEYS[2], 'dropped', dropped) end
if KEYS[3] then redis.call('SADD', KEYS[3], ARGV[5]) end
return dropped
