-- Connections going online, many per call: (org, driver, conn, name, line) each. Publishes the
-- presence line, kicks an older connection of the driver on another instance, and returns each
-- driver's newest live position ("<live ts>\t<frame>", or false).
local find, sub = string.find, string.sub
local exp = ARGV[1]
local out = {}
for i = 2, #ARGV, 5 do
  local org, driver, conn, name, line = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  local pconn = 'trk:pconn:' .. org
  local prev = redis.call('HGET', pconn, driver)
  redis.call('HSET', pconn, driver, conn)
  redis.call('HSET', 'trk:pstamp:' .. org, driver, sub(line, 1, find(line, '\t', 1, true) - 1))
  redis.call('ZADD', 'trk:presence:' .. org, exp, driver)
  redis.call('SADD', 'trk:orgs', org)
  if name ~= '' then redis.call('HSET', 'trk:names:' .. org, driver, name) end
  redis.call('PUBLISH', 'trk:live:' .. org, line)
  if prev and prev ~= conn then
    redis.call('PUBLISH', 'trk:ctl', 'kick\t' .. org .. '\t' .. driver .. '\t' .. conn)
  end
  out[#out + 1] = redis.call('HGET', 'trk:lastpos:' .. org, driver)
end
return out
