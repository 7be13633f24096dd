#!lua flags=allow-cross-slot-keys
-- read_fair: read at most `cap` entries in all from several streams, fairly.
--
-- The streams are read in the order given (the caller rotates it between calls). XREADGROUP's COUNT
-- applies per stream, so each stream is read with a share of what is left, and streams that filled
-- their share are read again while room is left (new entries, start id '>', only: a re-read of pending
-- ones, '0', would return the same entries). A backlogged camera cannot starve the others, and the
-- total never exceeds the cap.
-- On a Redis Cluster the streams lie in different slots of one node (the caller groups them by node):
-- KEYS[1], the first stream, routes the call, and `allow-cross-slot-keys` lets the script read the
-- node's other slots. Not `no-writes`: XREADGROUP changes the group's pending list.
--
-- KEYS[1]  the first stream of ARGV[5..] (routes the call)
-- ARGV[1]  consumer group
-- ARGV[2]  consumer name
-- ARGV[3]  cap: the most entries returned, over all streams
-- ARGV[4]  start id: '>' (new entries) or '0' (those pending to the consumer, one pass)
-- ARGV[5..] the streams, in the order to read them
--
-- Returns [[stream, [[id, [field, value, ...]], ...]], ...]: only streams that gave entries.
local remaining = tonumber(ARGV[3])
local active, out = {unpack(ARGV, 5)}, {}
while remaining > 0 and #active > 0 do
  local share, again = math.max(1, math.floor(remaining / #active)), {}
  for _, stream in ipairs(active) do
    if remaining == 0 then break end
    local count = math.min(share, remaining)
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', stream, ARGV[4])
    if reply and #reply[1][2] > 0 then
      local entries = reply[1][2]
      out[#out + 1] = {stream, entries}
      remaining = remaining - #entries
      if #entries == count and ARGV[4] == '>' then again[#again + 1] = stream end
    end
  end
  active = again
end
return out
