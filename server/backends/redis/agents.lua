-- agentmesh RedisAgentRegistry: each write is one atomic script.
-- KEYS[1] is the deployment's hash-tagged base ("{prefix}"); ARGV[1] names the op.
local B = KEYS[1]
local ACTIVE, DRAINING, GONE = 1, 2, 3
local LIVE_KEY = B .. ':agents_live' -- ACTIVE/DRAINING agents scored by expire_time
local GONE_KEY = B .. ':agents_gone' -- GONE agents scored by heartbeat_time

local function key(id) return B .. ':agent:' .. id end
local function ns_key(ns) return B .. ':agents:' .. ns end
local function caps_key(ns) return B .. ':caps:' .. ns end

local function cap_names(a)
  local seen, out = {}, {}
  for _, c in ipairs(a.capabilities) do
    if not seen[c.name] then
      seen[c.name] = true
      out[#out + 1] = c.name
    end
  end
  return out
end

local function load(id)
  local raw = redis.call('GET', key(id))
  if not raw then return nil end
  return cjson.decode(raw)
end

-- Save an agent version and keep the indexes and ACTIVE capability counts.
local function put(a, prev)
  local id = a.id
  if prev then
    redis.call('ZREM', ns_key(prev.namespace), id)
    redis.call('ZREM', LIVE_KEY, id)
    redis.call('ZREM', GONE_KEY, id)
    if prev.state == ACTIVE then
      for _, name in ipairs(cap_names(prev)) do
        if redis.call('HINCRBY', caps_key(prev.namespace), name, -1) <= 0 then
          redis.call('HDEL', caps_key(prev.namespace), name)
        end
      end
    end
  end
  redis.call('ZADD', ns_key(a.namespace), 0, id)
  if a.state == GONE then
    redis.call('ZADD', GONE_KEY, a.heartbeat_time, id)
  else
    redis.call('ZADD', LIVE_KEY, a.expire_time, id)
  end
  if a.state == ACTIVE then
    for _, name in ipairs(cap_names(a)) do redis.call('HINCRBY', caps_key(a.namespace), name, 1) end
  end
  local raw = cjson.encode(a)
  redis.call('SET', key(id), raw)
  return raw
end

local OPS = {}

function OPS.register()
  local a = cjson.decode(ARGV[2])
  return put(a, load(a.id))
end

function OPS.heartbeat()
  local prev = load(ARGV[2])
  if not prev or prev.state == GONE then return false end
  local a = cjson.decode(cjson.encode(prev))
  a.in_flight = tonumber(ARGV[3])
  a.load = ARGV[4]
  a.heartbeat_time = ARGV[5]
  a.expire_time = ARGV[6]
  return put(a, prev)
end

function OPS.set_state()
  local raw = redis.call('GET', key(ARGV[2]))
  if not raw then return false end
  local prev = cjson.decode(raw)
  if prev.state == GONE then return raw end
  local a = cjson.decode(raw)
  a.state = tonumber(ARGV[3])
  return put(a, prev)
end

function OPS.expired()
  local out = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LIVE_KEY, '-inf', '(' .. ARGV[2])) do
    local raw = redis.call('GET', key(id))
    if raw then out[#out + 1] = raw end
  end
  return out
end

function OPS.purge()
  local n = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', GONE_KEY, '-inf', '(' .. ARGV[2])) do
    local a = load(id)
    redis.call('ZREM', GONE_KEY, id)
    if a and a.state == GONE then
      redis.call('DEL', key(id))
      redis.call('ZREM', ns_key(a.namespace), id)
      n = n + 1
    end
  end
  return n
end

function OPS.list()
  local ns, flt, after, limit = ARGV[2], cjson.decode(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  local states = {}
  for _, s in ipairs(flt.states) do states[s] = true end
  local any_state = #flt.states == 0
  local min = '-'
  if after ~= '' then min = '(' .. after end
  local out = {}
  while #out < limit do
    local ids = redis.call('ZRANGEBYLEX', ns_key(ns), min, '+', 'LIMIT', 0, 256)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      min = '(' .. id
      local raw = redis.call('GET', key(id))
      if raw then
        local a = cjson.decode(raw)
        local ok = any_state or states[a.state]
        if ok and flt.capability ~= '' then
          ok = false
          for _, c in ipairs(a.capabilities) do
            if c.name == flt.capability then ok = true end
          end
        end
        if ok then
          for k, v in pairs(flt.labels) do
            if a.labels[k] ~= v then ok = false end
          end
        end
        if ok then
          out[#out + 1] = raw
          if #out >= limit then break end
        end
      end
    end
  end
  return out
end

local op = OPS[ARGV[1]]
if not op then return redis.error_reply('agentmesh: unknown agent op ' .. tostring(ARGV[1])) end
return op()
