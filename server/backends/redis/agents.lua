#!lua name=agentmesh_agents
-- agentmesh RedisAgentRegistry: each write is one atomic call. A Redis Functions
-- library (see _scripts.py): each FCALL runs `call` (at the end). KEYS[1] is the
-- deployment's hash-tagged base ("{prefix}"); ARGV[1] names the op.
local ACTIVE, DRAINING, GONE = 1, 2, 3

-- Per-call state, set by `call` at the start of each call (the library's
-- locals outlive the call and one library serves every key prefix).
local ARGV, B
local LIVE_KEY -- ACTIVE/DRAINING agents scored by expire_time
local GONE_KEY -- GONE agents scored by their last sign of life (see last_seen)
local ACTIVE_KEY -- hash: ACTIVE agent id -> expire_time (tasks.lua reads it to lease)

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

-- The last sign of life: the last heartbeat, or the registration of an agent
-- that never beat (its heartbeat_time is 0), so such an agent stays readable as
-- GONE for the retention like any other, instead of being purged at once.
local function last_seen(a)
  return math.max(tonumber(a.heartbeat_time) or 0, tonumber(a.register_time) or 0)
end

local function same_list(x, y)
  if #x ~= #y then return false end
  for i = 1, #x do
    if x[i] ~= y[i] then return false end
  end
  return true
end

-- Save an agent version and keep the indexes and ACTIVE capability counts.
-- A stored agent is in ns_key(namespace), and in GONE_KEY if GONE else in
-- LIVE_KEY; an ACTIVE one is in ACTIVE_KEY with its expire_time, so that a
-- lease (tasks.lua) checks liveness with one HGET instead of decoding the card.
-- What a new version leaves as it was (a heartbeat: same namespace, state and
-- capabilities) is not written again. ZADD moves a member's score.
local function put(a, prev)
  local id = a.id
  local same_ns = prev and prev.namespace == a.namespace
  local same_caps = same_ns and prev.state == ACTIVE and a.state == ACTIVE
                    and same_list(cap_names(prev), cap_names(a))
  if prev then
    if not same_ns then redis.call('ZREM', ns_key(prev.namespace), id) end
    if (prev.state == GONE) ~= (a.state == GONE) then
      redis.call('ZREM', prev.state == GONE and GONE_KEY or LIVE_KEY, id)
    end
    if prev.state == ACTIVE and not same_caps then
      for _, name in ipairs(cap_names(prev)) do
        if redis.call('HINCRBY', caps_key(prev.namespace), name, -1) <= 0 then
          redis.call('HDEL', caps_key(prev.namespace), name)
        end
      end
    end
  end
  if not same_ns then redis.call('ZADD', ns_key(a.namespace), 0, id) end
  if a.state == GONE then
    redis.call('ZADD', GONE_KEY, last_seen(a), id)
  else
    redis.call('ZADD', LIVE_KEY, a.expire_time, id)
  end
  if a.state == ACTIVE and not same_caps then
    for _, name in ipairs(cap_names(a)) do redis.call('HINCRBY', caps_key(a.namespace), name, 1) end
  end
  if a.state == ACTIVE then
    redis.call('HSET', ACTIVE_KEY, id, a.expire_time)
  elseif prev and prev.state == ACTIVE then
    redis.call('HDEL', ACTIVE_KEY, id)
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
  local a = {}
  for k, v in pairs(prev) do a[k] = v end -- put() reads prev, never changes it
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

-- Entry points, registered by _scripts.py: `call` runs any op, `call_ro` (a
-- no-writes function, FCALL_RO) only these reads.
local READ_ONLY = {list = true, expired = true}

local function call(keys, args)
  ARGV, B = args, keys[1]
  LIVE_KEY, GONE_KEY, ACTIVE_KEY = B .. ':agents_live', B .. ':agents_gone', B .. ':agents_active'
  local op = OPS[args[1]]
  if not op then return redis.error_reply('agentmesh: unknown agent op ' .. tostring(args[1])) end
  return op()
end

local function call_ro(keys, args)
  if not READ_ONLY[args[1]] then
    return redis.error_reply('agentmesh: not a read-only agent op ' .. tostring(args[1]))
  end
  return call(keys, args)
end
