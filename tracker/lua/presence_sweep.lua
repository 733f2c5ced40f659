-- Sets offline the drivers whose instance stopped refreshing them (it died). Atomic, so when every
-- instance sweeps, each expiry is published once.
local now = ARGV[1]
local n = 0
for _, org in ipairs(redis.call('SMEMBERS', 'trk:orgs')) do
  local zkey = 'trk:presence:' .. org
  for _, driver in ipairs(redis.call('ZRANGEBYSCORE', zkey, '-inf', now)) do
    redis.call('ZREM', zkey, driver)
    redis.call('HDEL', 'trk:pconn:' .. org, driver)
    local stamp = redis.call('HGET', 'trk:pstamp:' .. org, driver) or ''
    redis.call('HDEL', 'trk:pstamp:' .. org, driver)
    local frame = '{"type":"presence","driver":' .. cjson.encode(driver) .. ',"online":false,"ts":' .. now .. '}'
    redis.call('PUBLISH', 'trk:live:' .. org, stamp .. '\t' .. frame)
    n = n + 1
  end
end
return n
