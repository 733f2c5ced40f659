-- Keeps this instance's connections of one org online; re-creates them after Redis lost its state.
-- Also records each driver's current stamp, so that an expiry published by the sweep reaches the
-- client dashboards entitled to that driver's presence.
-- KEYS: pconn, pstamp, presence. ARGV: expiry, then (driver, conn, stamp) per connection.
local pconn, pstamp, presence = KEYS[1], KEYS[2], KEYS[3]
local exp = ARGV[1]
for i = 2, #ARGV, 3 do
  local driver, conn, stamp = ARGV[i], ARGV[i+1], ARGV[i+2]
  local cur = redis.call('HGET', pconn, driver)
  if not cur then
    redis.call('HSET', pconn, driver, conn)
    cur = conn
  end
  if cur == conn then
    redis.call('ZADD', presence, exp, driver)
    redis.call('HSET', pstamp, driver, stamp)
  end
end
return 1
