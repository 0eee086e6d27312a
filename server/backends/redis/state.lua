#!lua name=agentmesh_state
-- agentmesh RedisStateStore: each write (with its revision and change-log
-- entry) is one atomic call. A Redis Functions library (see _scripts.py): each
-- FCALL runs `call` (at the end). KEYS[1] is the deployment's hash-tagged base
-- ("{prefix}"); ARGV[1] names the op, ARGV[2] the namespace, ARGV[3] the log size.

-- Per-call state, set by begin() at the start of each call (the library's
-- locals outlive the call and one library serves every key prefix).
local ARGV, B, NS, LOG_SIZE, S, ENTRIES, KEYSET, REV, LOG, LOCKS, NSS

local function begin(keys, args)
  ARGV, B = args, keys[1]
  NS, LOG_SIZE = args[2], tonumber(args[3])
  S = B .. ':st:' .. #NS .. ':' .. NS
  ENTRIES, KEYSET, REV, LOG = S .. ':e', S .. ':k', S .. ':rev', S .. ':log'
  LOCKS = S .. ':locks'
  NSS = B .. ':st_nss'
end

local function ns_keys(ns)
  local s = B .. ':st:' .. #ns .. ':' .. ns
  return s .. ':e', s .. ':k', s .. ':rev', s .. ':log', s .. ':locks'
end

local function agent_key(agent) return B .. ':lkagent:' .. agent end

-- A lock record {token, owner, agent, expire} (expire "0.0": free), or a free one.
local function load_lock(locks_key, name)
  local raw = redis.call('HGET', locks_key, name)
  if not raw then return {token = 0, owner = '', agent = '', expire = '0.0'} end
  return cjson.decode(raw)
end

local function held(lock, now) return tonumber(lock.expire) > tonumber(now) end

local function grant_reply(name, l)
  return {'ok', name, l.owner, l.agent, l.token, l.expire}
end

-- Refuse a write whose fence (ARGV lock name, token) is not the current grant.
local function fence_error(lock_name, token, now)
  if lock_name == '' then return nil end
  local l = load_lock(LOCKS, lock_name)
  local h = held(l, now)
  if l.token ~= tonumber(token) or not h then
    return {'stale', l.token, h and 1 or 0}
  end
  return nil
end

local function log_event(kind, entry_raw)
  local n = redis.call('RPUSH', LOG, '{"type":' .. kind .. ',"entry":' .. entry_raw .. '}')
  if n > LOG_SIZE then redis.call('LTRIM', LOG, -LOG_SIZE, -1) end
end

local function remove(key, entry, now)
  redis.call('HDEL', ENTRIES, key)
  redis.call('ZREM', KEYSET, key)
  local rev = redis.call('INCR', REV)
  log_event(2, '{"key":' .. cjson.encode(key) .. ',"value":{"data":"","metadata":{}},"version":' ..
               entry.version .. ',"revision":' .. rev .. ',"update_time":' .. cjson.encode(now) ..
               ',"expire_time":"0.0"}')
  return rev
end

-- The live entry (decoded) and its JSON, or nil after removing an expired one.
local function live(key, now)
  local raw = redis.call('HGET', ENTRIES, key)
  if not raw then return nil, nil end
  local e = cjson.decode(raw)
  local exp = tonumber(e.expire_time) or 0
  if exp > 0 and exp <= tonumber(now) then
    remove(key, e, now)
    return nil, nil
  end
  return e, raw
end

local OPS = {}

function OPS.get()
  local _, raw = live(ARGV[4], ARGV[5])
  return raw or false
end

-- The entry this write id made, when it is among the namespace's last RETRY_REACH
-- writes: a retry whose first run committed, after which other writers moved the
-- key on before the retry arrived (the entry itself then carries their id). Read
-- only on the refusal path. Beyond that reach the retry answers a mismatch.
local RETRY_REACH = 64
local LOG_PUT_PREFIX = '{"type":1,"entry":'

local function own_write(key, wid)
  local needle = ',"w":' .. cjson.encode(wid) .. '}'
  local tail = redis.call('LRANGE', LOG, -RETRY_REACH, -1)
  for i = #tail, 1, -1 do
    local item = tail[i]
    if string.find(item, needle, 1, true) and item:sub(1, #LOG_PUT_PREFIX) == LOG_PUT_PREFIX then
      local raw = item:sub(#LOG_PUT_PREFIX + 1, -2)
      local entry = cjson.decode(raw)
      if entry.key == key and entry.w == wid then return raw end
    end
  end
  return nil
end

function OPS.put()
  local key, value, expected, expire, now = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  local wid = ARGV[11] or ''
  local cur, cur_raw = live(key, now)
  -- A retry of this very write (its reply was lost and the client sent it again):
  -- the entry carries the write's id, so answer what the first run did.
  if cur and wid ~= '' and cur.w == wid then return {'ok', cur_raw} end
  local refused = fence_error(ARGV[9], ARGV[10], now)
  if refused then return refused end
  redis.call('SADD', NSS, NS)
  local version = 0
  if cur then version = cur.version end
  if expected ~= '' and tonumber(expected) ~= version then
    local mine = wid ~= '' and own_write(key, wid)
    if mine then return {'ok', mine} end
    return {'mismatch', version}
  end
  local rev = redis.call('INCR', REV)
  local raw = '{"key":' .. cjson.encode(key) .. ',"value":' .. value .. ',"version":' ..
              (version + 1) .. ',"revision":' .. rev .. ',"update_time":' .. cjson.encode(now) ..
              ',"expire_time":' .. cjson.encode(expire) .. ',"w":' .. cjson.encode(wid) .. '}'
  redis.call('HSET', ENTRIES, key, raw)
  if not cur then redis.call('ZADD', KEYSET, 0, key) end -- a live entry's key is there
  log_event(1, raw)
  return {'ok', raw}
end

function OPS.delete()
  local key, expected, now = ARGV[4], ARGV[5], ARGV[6]
  local refused = fence_error(ARGV[7], ARGV[8], now)
  if refused then return refused end
  local cur = live(key, now)
  if not cur then return {'notfound'} end
  if expected ~= '' and tonumber(expected) ~= cur.version then return {'mismatch', cur.version} end
  return {'ok', remove(key, cur, now)}
end

function OPS.list()
  -- ARGV[5] is the lower bound, computed by the caller (Lua string comparison
  -- follows the server's locale, not byte order)
  local prefix, min, limit, now = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
  local max = '+'
  if prefix ~= '' then max = '[' .. prefix .. '\255' end
  local out = {}
  while #out < limit do
    local keys = redis.call('ZRANGEBYLEX', KEYSET, min, max, 'LIMIT', 0, 256)
    if #keys == 0 then break end
    for _, k in ipairs(keys) do
      min = '(' .. k
      local _, raw = live(k, now)
      if raw then
        out[#out + 1] = raw
        if #out >= limit then break end
      end
    end
  end
  return out
end

function OPS.events()
  local prefix, after, limit = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local first = redis.call('LINDEX', LOG, 0)
  if not first then
    -- no history: fine unless the namespace was restored at a later revision
    local current = tonumber(redis.call('GET', REV)) or 0
    if after < current then return {'range', current + 1, current} end
    return {'ok'}
  end
  local oldest = cjson.decode(first).entry.revision
  local current = tonumber(redis.call('GET', REV)) or 0
  if after < oldest - 1 then return {'range', oldest, current} end
  local out = {'ok'}
  if after >= current then return out end
  -- revisions in the log are contiguous: revision r sits at index r - oldest
  local index = after - oldest + 1
  while #out - 1 < limit do
    local batch = redis.call('LRANGE', LOG, index, index + 255)
    if #batch == 0 then break end
    for _, ev in ipairs(batch) do
      local k = cjson.decode(ev).entry.key
      if string.sub(k, 1, #prefix) == prefix then
        out[#out + 1] = ev
        if #out - 1 >= limit then break end
      end
    end
    index = index + 256
  end
  return out
end

-- Locks: S:locks hash name -> {token, owner, agent, expire}; the record stays
-- after release so the token counter is never reused. {P}:lkagent:<agent> is a
-- set of [namespace, name] JSON arrays of the locks an agent session holds.

function OPS.acquire()
  local name, owner, agent, expire, now = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  local l = load_lock(LOCKS, name)
  if held(l, now) and not (owner ~= '' and owner == l.owner) then
    return {'held', name, l.owner, l.agent, l.token, l.expire}
  end
  if l.agent ~= '' then redis.call('SREM', agent_key(l.agent), cjson.encode({NS, name})) end
  l = {token = l.token + 1, owner = owner, agent = agent, expire = expire}
  redis.call('HSET', LOCKS, name, cjson.encode(l))
  redis.call('SADD', NSS, NS)
  if agent ~= '' then redis.call('SADD', agent_key(agent), cjson.encode({NS, name})) end
  return grant_reply(name, l)
end

function OPS.renew()
  local name, token, expire, now = ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
  local l = load_lock(LOCKS, name)
  local h = held(l, now)
  if l.token ~= token or not h then return {'stale', l.token, h and 1 or 0} end
  l.expire = expire
  redis.call('HSET', LOCKS, name, cjson.encode(l))
  return grant_reply(name, l)
end

function OPS.release()
  local name, token, now = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local l = load_lock(LOCKS, name)
  local h = held(l, now)
  if l.token ~= token or token <= 0 then return {'stale', l.token, h and 1 or 0} end
  if l.agent ~= '' then redis.call('SREM', agent_key(l.agent), cjson.encode({NS, name})) end
  if l.expire ~= '0.0' or l.owner ~= '' then
    redis.call('HSET', LOCKS, name, cjson.encode({token = l.token, owner = '', agent = '',
                                                  expire = '0.0'}))
  end
  return {'ok', h and 1 or 0}
end

function OPS.release_agent()
  local agent, now = ARGV[4], ARGV[5]
  local ak = agent_key(agent)
  local out = {}
  for _, member in ipairs(redis.call('SMEMBERS', ak)) do
    local m = cjson.decode(member)
    local ns, name = m[1], m[2]
    local _, _, _, _, locks = ns_keys(ns)
    local l = load_lock(locks, name)
    if l.agent == agent then
      if held(l, now) then out[#out + 1] = member end
      redis.call('HSET', locks, name, cjson.encode({token = l.token, owner = '', agent = '',
                                                    expire = '0.0'}))
    end
  end
  redis.call('DEL', ak)
  return out
end

-- Snapshots: one script reads every namespace (ARGV[2] = '' for all, else
-- one), so the export is one consistent cut: {ns, revision, [entries], {locks}}.
function OPS.export()
  local only, now = ARGV[4], ARGV[5]
  local names
  if only == '1' then names = {NS} else names = redis.call('SMEMBERS', NSS) end
  table.sort(names)
  local out = {}
  for _, ns in ipairs(names) do
    local e, k, rev, _, locks = ns_keys(ns)
    local revision = tonumber(redis.call('GET', rev)) or 0
    local lock_raw = redis.call('HGETALL', locks)
    if revision > 0 or #lock_raw > 0 then
      local entries = {}
      for _, key in ipairs(redis.call('ZRANGE', k, 0, -1)) do
        local raw = redis.call('HGET', e, key)
        if raw then
          local exp = tonumber(cjson.decode(raw).expire_time) or 0
          if exp == 0 or exp > tonumber(now) then entries[#entries + 1] = raw end
        end
      end
      local tokens = {}
      for i = 1, #lock_raw, 2 do tokens[#tokens + 1] = lock_raw[i]
        tokens[#tokens + 1] = cjson.decode(lock_raw[i + 1]).token end
      out[#out + 1] = {ns, revision, entries, tokens}
    end
  end
  return out
end

-- ARGV[4]: JSON [[ns, revision, [entry JSON text...], {name: token}], ...];
-- ARGV[5] '1' for a dry run. Refuses (writing nothing) if a namespace is in use.
function OPS.import()
  local dump, dry = cjson.decode(ARGV[4]), ARGV[5] == '1'
  local busy = {}
  for _, d in ipairs(dump) do
    local _, _, rev, _, locks = ns_keys(d[1])
    if (tonumber(redis.call('GET', rev)) or 0) > 0 or redis.call('HLEN', locks) > 0 then
      busy[#busy + 1] = d[1]
    end
  end
  if #busy > 0 then return {'busy', unpack(busy)} end
  if dry then return {'ok'} end
  for _, d in ipairs(dump) do
    local e, k, rev, _, locks = ns_keys(d[1])
    redis.call('SADD', NSS, d[1])
    redis.call('SET', rev, d[2])
    for _, raw in ipairs(d[3]) do
      local key = cjson.decode(raw).key
      redis.call('HSET', e, key, raw)
      redis.call('ZADD', k, 0, key)
    end
    for name, token in pairs(d[4]) do
      redis.call('HSET', locks, name, cjson.encode({token = token, owner = '', agent = '',
                                                    expire = '0.0'}))
    end
  end
  return {'ok'}
end

-- Entry points, registered by _scripts.py: `call` runs any op, `call_ro` (a
-- no-writes function, FCALL_RO) only these reads.
local READ_ONLY = {events = true, export = true}

local function call(keys, args)
  begin(keys, args)
  local op = OPS[args[1]]
  if not op then return redis.error_reply('agentmesh: unknown state op ' .. tostring(args[1])) end
  return op()
end

local function call_ro(keys, args)
  if not READ_ONLY[args[1]] then
    return redis.error_reply('agentmesh: not a read-only state op ' .. tostring(args[1]))
  end
  return call(keys, args)
end
