#!lua
-- hash_field_swap: set (or delete) one field of a hash if it still holds what the caller read (compare and set).
--
-- A read-modify-write of an operator's per-camera entry (e.g. `patchcore drift set`, which merges the given
-- settings into the stored ones): a change made by another writer between the read and the write is not
-- overwritten; the caller reads again and retries.
--
-- KEYS[1]  the hash
-- ARGV[1]  the field
-- ARGV[2]  '1' if the caller read a value, '0' if the field was absent
-- ARGV[3]  the value the caller read ('' when absent)
-- ARGV[4]  the new value, or '' to delete the field
--
-- Returns 1 written; 0 the field changed since the caller read it (nothing written).
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if current ~= ARGV[3] then return 0 end
elseif current then
  return 0
end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
end
return 1
