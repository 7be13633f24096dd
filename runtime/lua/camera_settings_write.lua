#!lua
-- camera_settings_write: set (or delete) one camera's settings and bump the settings' version, if nobody wrote
-- since the caller read the version (compare and set).
--
-- Workers poll the version key alone (a cheap GET per batch) and read the hash when it changed; writing both
-- at once means a worker that sees a new version always finds the settings of that version. The settings carry
-- their version inside (packed by the caller as ARGV[1] + 1), so the caller retries when another write came first.
-- Both keys carry the `{control}` hash tag (one slot on a cluster).
--
-- KEYS[1]  the camera settings hash
-- KEYS[2]  the settings version counter
-- ARGV[1]  the version the caller read ('0' when the counter did not exist)
-- ARGV[2]  the camera
-- ARGV[3]  the packed settings, or '' to delete the camera's settings
--
-- Returns {1, previous packed settings or false} written; {0, false} the version moved on (nothing written).
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[1] then return {0, false} end
local previous = redis.call('HGET', KEYS[1], ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[2])
else
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
end
redis.call('SET', KEYS[2], tonumber(ARGV[1]) + 1)
return {1, previous}
