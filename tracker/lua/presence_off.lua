-- Connections closing, many per call: (org, driver, conn, line). Offline only if that connection
-- is still the one that set the driver online, so a stale offline never hides a newer connection.
local out = {}
for i = 1, #ARGV, 4 do
  local org, driver, conn, line = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local pconn = 'trk:pconn:' .. org
  if redis.call('HGET', pconn, driver) == conn then
    redis.call('HDEL', pconn, driver)
    redis.call('HDEL', 'trk:pstamp:' .. org, driver)
    redis.call('ZREM', 'trk:presence:' .. org, driver)
    redis.call('PUBLISH', 'trk:live:' .. org, line)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
