-- Sets offline the drivers of one org whose instance stopped refreshing them (it died). Atomic, so
-- when every instance sweeps, each expiry is published once.
-- KEYS: pconn, pstamp, presence. ARGV: now (ms), publish command, live channel.
local pconn, pstamp, presence = KEYS[1], KEYS[2], KEYS[3]
local now, pub, channel = ARGV[1], ARGV[2], ARGV[3]
local n = 0
for _, driver in ipairs(redis.call('ZRANGEBYSCORE', presence, '-inf', now)) do
  redis.call('ZREM', presence, driver)
  redis.call('HDEL', pconn, driver)
  local stamp = redis.call('HGET', pstamp, driver) or ''
  redis.call('HDEL', pstamp, driver)
  local frame = '{"type":"presence","driver":' .. cjson.encode(driver) .. ',"online":false,"ts":' .. now .. '}'
  redis.call(pub, channel, stamp .. '\t' .. frame)
  n = n + 1
end
return n
