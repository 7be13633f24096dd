#!lua
-- audit_append: append one entry to the audit stream and trim it, atomically.
--
-- The only writer of the audit stream: services append through this script and never XDEL or XTRIM the
-- stream themselves (the deploy/ roles make it append-only). The stream is kept bounded: MAXLEN ~ ARGV[1].
--
-- KEYS[1]  the audit stream
-- ARGV[1]  the stream's MAXLEN (approximate, at least 1)
-- ARGV[2..] the entry's field, value, field, value, ... (at least one pair)
--
-- Returns the new entry's id.
local maxlen = tonumber(ARGV[1])
if maxlen == nil or maxlen < 1 or #ARGV < 3 or #ARGV % 2 ~= 1 then
  return redis.error_reply('ERR audit_append: a MAXLEN of at least 1 and field, value pairs are needed')
end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
