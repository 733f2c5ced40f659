-- Connections of one org closing, many per call: (driver, conn, line). Offline only if that
-- connection is still the one that set the driver online, so a stale offline never hides a newer
-- connection. KEYS: pconn, pstamp, presence. ARGV: publish command, live channel, then the connections.
local pconn, pstamp, presence = KEYS[1], KEYS[2], KEYS[3]
local pub, channel = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 3 do
  local driver, conn, line = ARGV[i], ARGV[i+1], ARGV[i+2]
  if redis.call('HGET', pconn, driver) == conn then
    redis.call('HDEL', pconn, driver)
    redis.call('HDEL', pstamp, driver)
    redis.call('ZREM', presence, driver)
    redis.call(pub, channel, line)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
