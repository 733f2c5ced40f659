-- Keeps this instance's connections online; re-creates them after Redis lost its state.
-- Also records each driver's current stamp, so that an expiry published by the sweep reaches the
-- client dashboards entitled to that driver's presence.
local exp = ARGV[1]
for i = 2, #ARGV, 4 do
  local org, driver, conn, stamp = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local cur = redis.call('HGET', 'trk:pconn:' .. org, driver)
  if not cur then
    redis.call('HSET', 'trk:pconn:' .. org, driver, conn)
    redis.call('SADD', 'trk:orgs', org)
    cur = conn
  end
  if cur == conn then
    redis.call('ZADD', 'trk:presence:' .. org, exp, driver)
    redis.call('HSET', 'trk:pstamp:' .. org, driver, stamp)
  end
end
return 1
