-- Connections going online, many per call: (org, driver, conn, name, line) each. Publishes the
-- presence line, kicks an older connection of the driver (on any instance), and returns, per
-- connection: the driver's newest live position ("<live ts>\t<frame>", or false), the
-- connection's generation, and whether it is still the driver's current connection when the
-- script ends (a later connection of the same driver in this call supersedes it).
--
-- This script is the one serialisation point across instances: "newest" means registered last
-- here. A generation grows per driver (and with the server's clock, so that it still grows after
-- Redis lost its state); `kick` carries it, and an instance closes (4001) its connections of that
-- driver with a lower one. A kick that arrives late never closes a newer connection.
local find, sub = string.find, string.sub
local exp = ARGV[1]
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local entries = {}
for i = 2, #ARGV, 5 do
  local org, driver, conn, name, line = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  local pconn = 'trk:pconn:' .. org
  local prev = redis.call('HGET', pconn, driver)
  local gen = tonumber(redis.call('HGET', 'trk:pgen:' .. org, driver) or '0') + 1
  if gen < clock then gen = clock end
  local gens = string.format('%.0f', gen)
  redis.call('HSET', 'trk:pgen:' .. org, driver, gens)
  redis.call('HSET', pconn, driver, conn)
  redis.call('HSET', 'trk:pstamp:' .. org, driver, sub(line, 1, find(line, '\t', 1, true) - 1))
  redis.call('ZADD', 'trk:presence:' .. org, exp, driver)
  redis.call('SADD', 'trk:orgs', org)
  if name ~= '' then redis.call('HSET', 'trk:names:' .. org, driver, name) end
  redis.call('PUBLISH', 'trk:live:' .. org, line)
  if prev and prev ~= conn then
    redis.call('PUBLISH', 'trk:ctl', 'kick\t' .. org .. '\t' .. driver .. '\t' .. conn .. '\t' .. gens)
  end
  entries[#entries + 1] = {pconn, driver, conn}
  out[#out + 1] = redis.call('HGET', 'trk:lastpos:' .. org, driver)
  out[#out + 1] = gens
  out[#out + 1] = 0
end
for j, e in ipairs(entries) do
  if redis.call('HGET', e[1], e[2]) == e[3] then out[3 * j] = 1 end
end
return out
