#!lua name=agentmesh_tasks
-- agentmesh RedisTaskStore: every TaskStore transition as one atomic call.
-- A Redis Functions library (see _scripts.py): loaded once, then each FCALL runs
-- `call` (at the end). KEYS[1] is the deployment's hash-tagged base ("{prefix}");
-- every key used below is derived from it, so all of them live in one Redis
-- Cluster slot. ARGV[1] names the operation; the rest are its arguments (see
-- tasks.py). Times are strings (exact Python float reprs); computed times use %.17g.

-- Per-call state. A library's locals outlive the call, and one library serves
-- every key prefix: begin() sets all of these at the start of each call, and
-- nothing else may keep call-dependent values between calls.
local ARGV, B, S2S_KEY, RETRY_KEY, LEASE_KEY, SEQ_KEY
local NULL -- cjson.null (cjson cannot be reached while Redis 7.0 loads a library)
local cache -- id -> task decoded or written by this call
local delta, delta_order, counted -- counters: see bump()
local PENDING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, RETRYING, DEAD = 1, 2, 3, 4, 5, 6, 7, 8
local WF_RUNNING, WF_SUCCEEDED, WF_FAILED, WF_CANCELLED = 1, 2, 3, 4
local TERMINAL = {[SUCCEEDED] = true, [FAILED] = true, [CANCELLED] = true, [DEAD] = true}
local LIVE = {[PENDING] = true, [QUEUED] = true, [RUNNING] = true, [RETRYING] = true}
local STATE_NAME = {'PENDING', 'QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED',
                    'RETRYING', 'DEAD_LETTERED'}
local PRIORITY_SHIFT = 1099511627776 -- 2^40: score = -priority * 2^40 + seq

local function fmt(x) return string.format('%.17g', x) end
-- The hot batch operations (create_tasks, lease_batch, complete_many) reply with
-- ONE JSON text rather than a nested Redis array: the client parses it in one C
-- call, where its pure-Python RESP parser costs microseconds per element. Stored
-- documents are embedded as they are (they are JSON already); numbers use fmt.
local function jarray(parts) return '[' .. table.concat(parts, ',') .. ']' end
local function seg(s) return #s .. ':' .. s end
local function tkey(id) return B .. ':task:' .. id end
local function wkey(id) return B .. ':wf:' .. id end
local function qkey(ns, cap) return B .. ':q:' .. seg(ns) .. ':' .. cap end
local function akey(agent) return B .. ':agent_tasks:' .. agent end
local function skey(ns) return B .. ':stats:' .. ns end
local function rkey(ns) return B .. ':running:' .. seg(ns) end
local function bkey(ns) return B .. ':bucket:' .. seg(ns) end
local function fbqkey(ns, fb, cap) return B .. ':fbq:' .. seg(ns) .. ':' .. seg(fb) .. ':' .. cap end
local function fbpkey(ns, fb) return B .. ':fbp:' .. seg(ns) .. ':' .. fb end
local KEY_SCAN = 32

local function pyrepr(s) return "'" .. s .. "'" end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local function load(id)
  local t = cache[id]
  if t then return t end
  local raw = redis.call('GET', tkey(id))
  if not raw then return nil end
  t = cjson.decode(raw)
  cache[id] = t
  return t
end

local function load_wf(id)
  local raw = redis.call('GET', wkey(id))
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save_wf(wf)
  local raw = cjson.encode(wf)
  redis.call('SET', wkey(wf.id), raw)
  return raw
end

local function num(x) return tonumber(x) or 0 end

-- Counters: the stats:<ns> and running:<ns> hashes. A task transition changes
-- several fields and a batch changes the same fields many times, so put_task
-- only adds to `delta` here, and `call` writes each key and field once, at the
-- end of the call (one HINCRBY with the net change, none when it is 0).
-- Nothing else writes these hashes, so a field read once in the call (kept in
-- `counted`) plus its pending delta is its current value: counter() and
-- counter_sum() are what an HGET/HMGET right after each HINCRBY would give.
local function bump(key, field, by)
  local d = delta[key]
  if not d then
    d = {}
    delta[key] = d
  end
  local cur = d[field]
  if cur == nil then
    cur = 0
    delta_order[#delta_order + 1] = {key, field}
  end
  d[field] = cur + by
end

local function counter_sum(key, fields)
  local c = counted[key]
  if not c then
    c = {}
    counted[key] = c
  end
  local missing = {}
  for _, f in ipairs(fields) do
    if c[f] == nil then missing[#missing + 1] = f end
  end
  if #missing > 0 then
    local v = redis.call('HMGET', key, unpack(missing))
    for i, f in ipairs(missing) do c[f] = num(v[i]) end
  end
  local d, sum = delta[key], 0
  for _, f in ipairs(fields) do sum = sum + c[f] + (d and d[f] or 0) end
  return sum
end

local function counter(key, field) return counter_sum(key, {field}) end

local function flush_counters()
  for _, kf in ipairs(delta_order) do
    local n = delta[kf[1]][kf[2]]
    if n ~= 0 then redis.call('HINCRBY', kf[1], kf[2], n) end
  end
end

-- RUNNING counters a task occupies: its capability and each label.
local function running_incr(t, by)
  local rk = rkey(t.namespace)
  bump(rk, 'c:' .. t.capability, by)
  if type(t.labels) == 'table' then
    for k, v in pairs(t.labels) do bump(rk, 'l:' .. k .. '=' .. v, by) end
  end
end

-- Save a task version; keep counters and indexes; append (prev state, json) to R.
local function put_task(t, prev, R)
  local id = t.id
  if t.state == QUEUED then
    if not prev or prev.state ~= QUEUED then
      local s2s = num(t.schedule_to_start_timeout)
      if s2s > 0 then t.queue_deadline = fmt(num(t.update_time) + s2s) else t.queue_deadline = '0.0' end
    end
  elseif num(t.queue_deadline) ~= 0 then
    t.queue_deadline = '0.0'
  end
  if prev then
    local psk = skey(prev.namespace)
    bump(psk, tostring(prev.state), -1)
    if LIVE[prev.state] then
      bump(psk, 'c:' .. prev.state .. ':' .. prev.capability, -1)
    end
    if TERMINAL[prev.state] then
      bump(psk, 'ended', -1)
      if prev.state == SUCCEEDED and not prev.human_intervened then
        bump(psk, 'autonomous', -1)
      end
    end
    if prev.state == QUEUED then
      redis.call('ZREM', qkey(prev.namespace, prev.capability), id)
      -- only a QUEUED version with a queue_deadline is in S2S_KEY (below)
      if num(prev.queue_deadline) > 0 then redis.call('ZREM', S2S_KEY, id) end
      local fb = prev.fallback_capability
      if fb and fb ~= '' then
        local fq = fbqkey(prev.namespace, fb, prev.capability)
        redis.call('ZREM', fq, id)
        if redis.call('ZCARD', fq) == 0 then
          redis.call('SREM', fbpkey(prev.namespace, fb), prev.capability)
        end
      end
    elseif prev.state == RETRYING then
      redis.call('ZREM', RETRY_KEY, id)
    elseif prev.state == RUNNING then
      redis.call('ZREM', LEASE_KEY, id)
      redis.call('SREM', akey(prev.agent_id), id)
      running_incr(prev, -1)
    end
  end
  local sk = skey(t.namespace)
  bump(sk, tostring(t.state), 1)
  if LIVE[t.state] then
    bump(sk, 'c:' .. t.state .. ':' .. t.capability, 1)
  end
  if TERMINAL[t.state] then
    bump(sk, 'ended', 1)
    if t.state == SUCCEEDED and not t.human_intervened then
      bump(sk, 'autonomous', 1)
    end
  end
  if t.state == QUEUED then
    local score = fmt(-t.priority * PRIORITY_SHIFT + t.seq)
    redis.call('ZADD', qkey(t.namespace, t.capability), score, id)
    local fb = t.fallback_capability
    if fb and fb ~= '' then
      redis.call('ZADD', fbqkey(t.namespace, fb, t.capability), score, id)
      redis.call('SADD', fbpkey(t.namespace, fb), t.capability)
    end
    if num(t.queue_deadline) > 0 then redis.call('ZADD', S2S_KEY, t.queue_deadline, id) end
  elseif t.state == RETRYING then
    redis.call('ZADD', RETRY_KEY, t.retry_time, id)
  elseif t.state == RUNNING then
    redis.call('ZADD', LEASE_KEY, t.lease_deadline, id)
    redis.call('SADD', akey(t.agent_id), id)
    running_incr(t, 1)
  end
  local raw = cjson.encode(t)
  redis.call('SET', tkey(id), raw)
  if not (prev and prev.seq == t.seq and prev.namespace == t.namespace) then
    redis.call('ZADD', B .. ':tasks:' .. t.namespace, t.seq, id) -- else it is there already
  end
  cache[id] = t
  if R then
    R[#R + 1] = prev and prev.state or 0
    R[#R + 1] = raw
  end
  return raw
end

local BACKLOG = {PENDING .. '', QUEUED .. '', RETRYING .. ''} -- the counters' field names
local function backlog(ns) return counter_sum(skey(ns), BACKLOG) end

local function close_attempt(attempts, now, failure)
  local n = #attempts
  if n == 0 or attempts[n].end_time ~= NULL then return attempts end
  local out = {}
  for i = 1, n - 1 do out[i] = attempts[i] end
  local last = copy(attempts[n])
  last.end_time = now
  last.failure = failure or NULL
  out[n] = last
  return out
end

local function dependents_map(wf)
  local deps = {}
  for _, s in ipairs(wf.steps) do deps[s.id] = {} end
  for _, s in ipairs(wf.steps) do
    for _, d in ipairs(s.depends_on) do
      if deps[d] then table.insert(deps[d], s.id) end
    end
  end
  return deps
end

local function descendants(wf, root)
  local deps = dependents_map(wf)
  local seen, order, stack = {}, {}, {root}
  while #stack > 0 do
    local cur = table.remove(stack)
    for _, c in ipairs(deps[cur] or {}) do
      if not seen[c] then
        seen[c] = true
        order[#order + 1] = c
        stack[#stack + 1] = c
      end
    end
  end
  return order
end

local function output_or_empty(p)
  local o = p.output
  if o == nil or o == NULL then return {data = '', metadata = {}} end
  return o
end

-- Parents' outputs when all of them succeeded, else nil.
local function ready_outputs(wf, t)
  local outs = {}
  for _, d in ipairs(t.depends_on) do
    local p = load(wf.step_tasks[d])
    if not p or p.state ~= SUCCEEDED then return nil end
    outs[p.step_id] = output_or_empty(p)
  end
  return outs
end

local function advance_workflow(done, now, R)
  local wf = load_wf(done.workflow_id)
  if not wf then return '' end
  local deps = dependents_map(wf)
  for _, sid in ipairs(deps[done.step_id] or {}) do
    local child = load(wf.step_tasks[sid])
    if child and child.state == PENDING then
      local outs = ready_outputs(wf, child)
      if outs then
        local n = copy(child)
        n.state = QUEUED
        n.update_time = now
        n.dependency_outputs = outs
        put_task(n, child, R)
      end
    end
  end
  if wf.state == WF_RUNNING then
    for _, s in ipairs(wf.steps) do
      local t = load(wf.step_tasks[s.id])
      if not t or t.state ~= SUCCEEDED then return '' end
    end
    wf.state = WF_SUCCEEDED
    wf.end_time = now
    return save_wf(wf)
  end
  return ''
end

local function fail_workflow(ended, reason, now, R)
  local wf = load_wf(ended.workflow_id)
  if not wf then return '' end
  for _, sid in ipairs(descendants(wf, ended.step_id)) do
    local child = load(wf.step_tasks[sid])
    if child and not TERMINAL[child.state] then
      local n = copy(child)
      n.state = CANCELLED
      n.update_time = now
      n.end_time = now
      n.failure = {error_type = 'UPSTREAM_FAILED', non_retryable = true,
                   message = 'upstream step ' .. pyrepr(ended.step_id) .. ' ended ' ..
                             STATE_NAME[ended.state]}
      if child.state == RUNNING then n.attempts = close_attempt(child.attempts, now, nil) end
      put_task(n, child, R)
    end
  end
  if wf.state == WF_RUNNING then
    wf.state = WF_FAILED
    wf.failure_reason = reason
    wf.end_time = now
    return save_wf(wf)
  end
  return ''
end

-- Fenced load: the task, or an error reply table.
local function running(id, token)
  local t = load(id)
  if not t then return nil, {'notfound'} end
  if t.state ~= RUNNING or t.fencing_token ~= tonumber(token) then
    return nil, {'stale', t.state, t.fencing_token}
  end
  return t, nil
end

local OPS = {}

-- The checks of a batch of creates, all made before anything is written.
-- Returns the name of the first id that is taken ('tasks/<id>': a stored task,
-- or an earlier item of the batch), or nil and, per item, the id of the task its
-- request id already names (false when it names none). An item whose request id
-- names a task (stored, or created by an earlier item) is a replay: its own id
-- is not checked, since the replay returns that task and creates nothing.
local function check_creates(items)
  local ids, rids, replay_of = {}, {}, {}
  for i, item in ipairs(items) do
    local t, rid = item[1], item[2]
    local of = false
    if rid ~= '' then
      local ns = rids[t.namespace]
      if not ns then
        ns = {}
        rids[t.namespace] = ns
      end
      of = ns[rid]
      if of == nil then
        of = redis.call('HGET', B .. ':idem:' .. t.namespace, rid) or false
        ns[rid] = of or t.id -- a later item with rid replays this one
      end
    end
    if not of then
      if ids[t.id] or redis.call('EXISTS', tkey(t.id)) == 1 then return 'tasks/' .. t.id end
      ids[t.id] = true
    end
    replay_of[i] = of
  end
  return nil, replay_of
end

-- Create one QUEUED task whose id check_creates cleared: 'dup' + existing raw,
-- 'full', or 'ok' (R gets prev, raw). `of` is the task its request id names.
local function create_one(t, rid, of, maxq, R)
  if of then return 'dup', redis.call('GET', tkey(of)) end
  if maxq > 0 and backlog(t.namespace) >= maxq then return 'full' end
  t.seq = redis.call('INCR', SEQ_KEY)
  t.state = QUEUED
  put_task(t, nil, R)
  if rid ~= '' then redis.call('HSET', B .. ':idem:' .. t.namespace, rid, t.id) end
  return 'ok'
end

-- Creates in one call: all ids checked first (a taken one refuses the whole batch,
-- nothing written: reply [["exists", "tasks/<id>"]]), then each item in order,
-- idempotent on its request id; stops at the first 'full'.
-- Reply (JSON): per item ["dup", doc] | ["ok", prev, seq, queue_deadline] | ["full"] (last).
-- A created task is the submitted document with only state (QUEUED), seq and
-- queue_deadline changed (put_task), so the reply carries those two values and the
-- caller rebuilds the task from the one it sent instead of decoding it again.
function OPS.create_tasks()
  local items, maxq = cjson.decode(ARGV[2]), tonumber(ARGV[3])
  local taken, replay_of = check_creates(items)
  if taken then return jarray({jarray({'"exists"', cjson.encode(taken)})}) end
  local out = {}
  for i, item in ipairs(items) do
    local t, R = item[1], {}
    local status, raw = create_one(t, item[2], replay_of[i], maxq, R)
    if status == 'full' then
      out[#out + 1] = '["full"]'
      break
    end
    if status == 'dup' then
      out[#out + 1] = jarray({'"dup"', raw or 'null'})
    else
      out[#out + 1] = jarray({'"ok"', fmt(R[1]), fmt(t.seq), cjson.encode(t.queue_deadline or '')})
    end
  end
  return jarray(out)
end

function OPS.create_workflow()
  local wf = cjson.decode(ARGV[2])
  local tasks = cjson.decode(ARGV[3])
  local rid, maxq = ARGV[4], tonumber(ARGV[5])
  local ikey = B .. ':idem:' .. wf.namespace
  if rid ~= '' then
    local existing = redis.call('HGET', ikey, 'wf:' .. rid)
    if existing then return {'dup', redis.call('GET', wkey(existing))} end
  end
  -- Every id checked before anything is written: one taken refuses the workflow.
  if redis.call('EXISTS', wkey(wf.id)) == 1 then return {'exists', 'workflows/' .. wf.id} end
  local ids = {}
  for _, t in ipairs(tasks) do
    if ids[t.id] or redis.call('EXISTS', tkey(t.id)) == 1 then return {'exists', 'tasks/' .. t.id} end
    ids[t.id] = true
  end
  if maxq > 0 and backlog(wf.namespace) + #tasks > maxq then return {'full'} end
  wf.seq = redis.call('INCR', SEQ_KEY)
  local R = {'ok', save_wf(wf)}
  redis.call('ZADD', B .. ':wfs:' .. wf.namespace, wf.seq, wf.id)
  for _, t in ipairs(tasks) do
    t.seq = redis.call('INCR', SEQ_KEY)
    if #t.depends_on > 0 then t.state = PENDING else t.state = QUEUED end
    put_task(t, nil, R)
  end
  if rid ~= '' then redis.call('HSET', ikey, 'wf:' .. rid, wf.id) end
  return R
end

-- Token bucket (server/domain/limits.py bucket_take): new tokens, ok.
local function bucket_take(ns, cap, rate, now, commit)
  local bk = bkey(ns)
  local v = redis.call('HMGET', bk, cap .. ':t', cap .. ':s')
  local tokens, stamp = num(v[1]), num(v[2])
  local burst = math.max(1, rate)
  if stamp <= 0 then tokens = burst else tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate) end
  local ok = tokens >= 1
  if ok then tokens = tokens - 1 end
  if commit then redis.call('HSET', bk, cap .. ':t', fmt(tokens), cap .. ':s', fmt(now)) end
  return ok
end

local function cap_allows(ns, cap, L, now)
  local most = num(L.cap[cap])
  if most > 0 and counter(rkey(ns), 'c:' .. cap) >= most then return false end
  local rate = num(L.rates[cap])
  if rate > 0 then return bucket_take(ns, cap, rate, now, false) end
  return true
end

local function key_allows(t, ns, L)
  local label = L.label
  if not label or label == '' or type(t.labels) ~= 'table' then return true end
  local v = t.labels[label]
  if not v then return true end
  local lim = L.keys[v]
  if lim == nil then lim = L.key_default end
  lim = num(lim)
  if lim <= 0 then return true end
  return counter(rkey(ns), 'l:' .. label .. '=' .. v) < lim
end

-- Best entry of a queue the key limit lets through: id, score (stale entries dropped).
local function eligible(q, ns, L)
  local depth = 1
  if L.label and L.label ~= '' then depth = KEY_SCAN end
  while true do
    local top = redis.call('ZRANGE', q, 0, depth - 1, 'WITHSCORES')
    if not top[1] then return nil end
    local stale = false
    for i = 1, #top, 2 do
      local t = load(top[i])
      if not t or t.state ~= QUEUED then
        redis.call('ZREM', q, top[i])
        stale = true
      elseif key_allows(t, ns, L) then
        return top[i], tonumber(top[i + 1])
      end
    end
    if not stale then return nil end
  end
end

-- The primaries with tasks in a fallback queue of fb, read once per lease_batch
-- (memo): while it runs the set can only lose members, and a member it lost has
-- an empty queue, where eligible() finds nothing, as if it were not listed.
local function fallback_primaries(ns, fb, memo)
  local k = fbpkey(ns, fb)
  local m = memo[k]
  if not m then
    m = redis.call('SMEMBERS', k)
    memo[k] = m
  end
  return m
end

-- Lease the best eligible task (or nil); limits are re-checked on every call.
local function lease_one(ns, agent, now, dflt, scope, L, caps, memo)
  local nnow = tonumber(now)
  local own, avail = {}, {}
  local queues = {}
  for _, c in ipairs(caps) do
    own[c] = true
    if cap_allows(ns, c, L, nnow) then queues[#queues + 1] = {qkey(ns, c), false} end
  end
  for _, c in ipairs(scope.avail) do avail[c] = true end
  for _, fb in ipairs(scope.fb) do
    for _, primary in ipairs(fallback_primaries(ns, fb, memo)) do
      if not avail[primary] and not own[primary] and cap_allows(ns, primary, L, nnow) then
        queues[#queues + 1] = {fbqkey(ns, fb, primary), true}
      end
    end
  end
  local best, best_score, via_fb
  for _, q in ipairs(queues) do
    local id, score = eligible(q[1], ns, L)
    if id and (not best or score < best_score) then best, best_score, via_fb = id, score, q[2] end
  end
  if not best then return nil end
  local t = load(best)
  local n = copy(t)
  local timeout = tonumber(t.execution_timeout) or 0
  if timeout == 0 then timeout = dflt end
  local hb = num(t.heartbeat_timeout)
  if hb > 0 and hb < timeout then timeout = hb end
  local rate = num(L.rates[t.capability])
  if rate > 0 then bucket_take(ns, t.capability, rate, nnow, true) end
  n.state = RUNNING
  n.attempt = t.attempt + 1
  n.fencing_token = t.fencing_token + 1
  n.agent_id = agent
  n.start_time = now
  n.update_time = now
  n.served_by_fallback = via_fb
  n.lease_deadline = fmt(nnow + timeout)
  local atts = {}
  for i, a in ipairs(t.attempts) do atts[i] = a end
  atts[#atts + 1] = {attempt = n.attempt, agent_id = agent, start_time = now,
                     end_time = NULL, failure = NULL}
  n.attempts = atts
  return put_task(n, t, nil)
end

-- Up to ARGV[8] leases in one atomic step, best first; limits re-checked per lease.
-- Nothing is leased unless the agent ARGV[3] is live: ACTIVE (agents.lua keeps each
-- ACTIVE agent's expire_time in the hash {P}:agents_active, the one key read here)
-- with expire_time > now. Reply (JSON): the leased task documents.
function OPS.lease_batch()
  local expire = redis.call('HGET', B .. ':agents_active', ARGV[3])
  if not expire or tonumber(expire) <= tonumber(ARGV[4]) then return '[]' end
  local count = tonumber(ARGV[8])
  local caps = {}
  for i = 9, #ARGV do caps[#caps + 1] = ARGV[i] end
  local scope, L = cjson.decode(ARGV[6]), cjson.decode(ARGV[7])
  local J, memo = {'['}, {}
  for i = 1, count do
    local r = lease_one(ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), scope, L, caps, memo)
    if not r then break end
    if i > 1 then J[#J + 1] = ',' end
    J[#J + 1] = r
  end
  J[#J + 1] = ']'
  return table.concat(J)
end

function OPS.expire_queued()
  local now, limit = ARGV[2], tonumber(ARGV[3])
  local R = {'ok', ''}
  local ids = redis.call('ZRANGEBYSCORE', S2S_KEY, '-inf', '(' .. now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local t = load(id)
    if t and t.state == QUEUED and num(t.queue_deadline) > 0 then
      local n = copy(t)
      n.state = FAILED
      n.update_time = now
      n.end_time = now
      n.failure = {error_type = 'SCHEDULE_TO_START_TIMEOUT', non_retryable = true,
                   message = 'no agent started it within ' .. string.format('%g',
                     num(t.schedule_to_start_timeout)) .. 's'}
      put_task(n, t, R)
      if n.workflow_id ~= '' then
        local reason = 'step ' .. pyrepr(n.step_id) .. ' failed: ' .. n.failure.error_type ..
                       ': ' .. n.failure.message
        local raw = fail_workflow(n, reason, now, R)
        if raw ~= '' then R[2] = raw end
      end
    else
      redis.call('ZREM', S2S_KEY, id)
    end
  end
  return R
end

local function complete_one(id, token, output, now)
  -- The same lease reporting again (or this script retried after its reply was
  -- lost) is accepted without effect: the first result stays.
  local cur = load(id)
  if cur and cur.state == SUCCEEDED and cur.fencing_token == tonumber(token) then
    return {'ok', ''}
  end
  local t, err = running(id, token)
  if not t then return err end
  local n = copy(t)
  n.state = SUCCEEDED
  n.output = output
  n.update_time = now
  n.end_time = now
  n.attempts = close_attempt(t.attempts, now, nil)
  local R = {'ok', ''}
  put_task(n, t, R)
  if n.workflow_id ~= '' then R[2] = advance_workflow(n, now, R) end
  return R
end

-- Append a reply table of complete_one to the JSON pieces J: ["ok", workflow doc or
-- null, prev, doc, ...], ["stale", state, token] or ["notfound"]. The reply is
-- joined once at the end: every concatenation copies, and the documents are long.
local function result_json(J, R)
  local n = #J
  J[n + 1] = '["' .. R[1] .. '"'
  n = n + 1
  if R[1] ~= 'ok' then
    for i = 2, #R do
      J[n + 1], J[n + 2] = ',', fmt(R[i])
      n = n + 2
    end
  else
    J[n + 1], J[n + 2] = ',', R[2] ~= '' and R[2] or 'null'
    n = n + 2
    for i = 3, #R, 2 do
      J[n + 1], J[n + 2], J[n + 3], J[n + 4] = ',', fmt(R[i]), ',', R[i + 1]
      n = n + 4
    end
  end
  J[n + 1] = ']'
end

-- Results in one call: one reply per item ('ok' + transition, 'stale', 'notfound'),
-- as one JSON array (see result_json).
function OPS.complete_many()
  local J = {'['}
  for i, item in ipairs(cjson.decode(ARGV[2])) do
    if i > 1 then J[#J + 1] = ',' end
    result_json(J, complete_one(item[1], item[2], item[3], ARGV[3]))
  end
  J[#J + 1] = ']'
  return table.concat(J)
end

-- This failure already closed attempt `token` (the script retried after its reply
-- was lost): the task still carries the token, is no longer RUNNING, and its last
-- attempt ended with exactly this failure.
local function failed_before(t, token, failure)
  if t.state == RUNNING or t.fencing_token ~= tonumber(token) then return false end
  local last = t.attempts[#t.attempts]
  return last ~= nil and type(last.failure) == 'table'
    and last.failure.error_type == failure.error_type and last.failure.message == failure.message
end

function OPS.fail()
  local failure = cjson.decode(ARGV[4])
  local t, err = running(ARGV[2], ARGV[3])
  if not t then
    local cur = load(ARGV[2])
    if cur and failed_before(cur, ARGV[3], failure) then return {'ok', ''} end
    return err
  end
  local verdict, retry_at, now = ARGV[5], ARGV[6], ARGV[7]
  local n = copy(t)
  n.failure = failure
  n.attempts = close_attempt(t.attempts, now, failure)
  n.update_time = now
  local R = {'ok', ''}
  if verdict == 'retry' then
    if tonumber(retry_at) <= tonumber(now) then
      n.state = QUEUED
    else
      n.state = RETRYING
      n.retry_time = retry_at
    end
    put_task(n, t, R)
    return R
  end
  if verdict == 'fail' then n.state = FAILED else n.state = DEAD end
  n.end_time = now
  put_task(n, t, R)
  if n.workflow_id ~= '' then
    local word = 'failed'
    if n.state == DEAD then word = 'dead-lettered' end
    local reason = 'step ' .. pyrepr(n.step_id) .. ' ' .. word .. ': ' .. failure.error_type ..
                   ': ' .. failure.message
    R[2] = fail_workflow(n, reason, now, R)
  end
  return R
end

function OPS.renew_lease()
  local t, err = running(ARGV[2], ARGV[3])
  if not t then return err end
  local n = copy(t)
  n.lease_deadline = ARGV[4]
  return {'ok', put_task(n, t, nil)}
end

function OPS.promote_due()
  local now, limit = ARGV[2], tonumber(ARGV[3])
  local R = {'ok', ''}
  local ids = redis.call('ZRANGEBYSCORE', RETRY_KEY, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local t = load(id)
    if t and t.state == RETRYING then
      local n = copy(t)
      n.state = QUEUED
      n.update_time = now
      put_task(n, t, R)
    else
      redis.call('ZREM', RETRY_KEY, id)
    end
  end
  return R
end

function OPS.cancel_task()
  local id, reason, now = ARGV[2], ARGV[3], ARGV[4]
  local t = load(id)
  if not t then return {'notfound'} end
  if TERMINAL[t.state] then return {'ended', t.state} end
  local n = copy(t)
  n.state = CANCELLED
  n.update_time = now
  n.end_time = now
  if t.state == RUNNING then n.attempts = close_attempt(t.attempts, now, nil) end
  local msg = reason
  if msg == '' then msg = 'cancelled by a client' end
  n.failure = {error_type = 'CANCELLED', message = msg, non_retryable = true}
  local R = {'ok', ''}
  put_task(n, t, R)
  if n.workflow_id ~= '' then
    R[2] = fail_workflow(n, 'step ' .. pyrepr(n.step_id) .. ' cancelled: ' .. reason, now, R)
  end
  return R
end

function OPS.cancel_workflow()
  local id, reason, now = ARGV[2], ARGV[3], ARGV[4]
  local wf = load_wf(id)
  if not wf then return {'notfound'} end
  if wf.state ~= WF_RUNNING then return {'ended', wf.state} end
  local msg = reason
  if msg == '' then msg = 'workflow cancelled' end
  local R = {'ok', ''}
  for _, s in ipairs(wf.steps) do
    local t = load(wf.step_tasks[s.id])
    if t and not TERMINAL[t.state] then
      local n = copy(t)
      n.state = CANCELLED
      n.update_time = now
      n.end_time = now
      if t.state == RUNNING then n.attempts = close_attempt(t.attempts, now, nil) end
      n.failure = {error_type = 'CANCELLED', message = msg, non_retryable = true}
      put_task(n, t, R)
    end
  end
  wf.state = WF_CANCELLED
  wf.end_time = now
  if reason == '' then wf.failure_reason = 'cancelled by a client' else wf.failure_reason = reason end
  R[2] = save_wf(wf)
  return R
end

function OPS.redrive()
  local id, new_input, now = ARGV[2], ARGV[3], ARGV[4]
  local t = load(id)
  if not t then return {'notfound'} end
  if t.state ~= DEAD and t.state ~= FAILED and t.state ~= CANCELLED then
    return {'notredrivable', t.state}
  end
  local wf = nil
  if t.workflow_id ~= '' then wf = load_wf(t.workflow_id) end
  local state, outputs = QUEUED, t.dependency_outputs
  if wf and #t.depends_on > 0 then
    local outs = ready_outputs(wf, t)
    if outs then outputs = outs else state = PENDING end
  end
  local n = copy(t)
  n.state = state
  if new_input ~= '' then n.input = cjson.decode(new_input) end
  n.human_intervened = true
  n.budget_start = t.attempt
  n.failure = NULL
  n.end_time = '0.0'
  n.update_time = now
  n.seq = redis.call('INCR', SEQ_KEY)
  n.dependency_outputs = outputs
  local R = {'ok', ''}
  put_task(n, t, R)
  if wf then
    for _, sid in ipairs(descendants(wf, t.step_id)) do
      local child = load(wf.step_tasks[sid])
      if child and child.state == CANCELLED and type(child.failure) == 'table'
          and child.failure.error_type == 'UPSTREAM_FAILED' then
        local c = copy(child)
        c.state = PENDING
        c.failure = NULL
        c.end_time = '0.0'
        c.update_time = now
        put_task(c, child, R)
      end
    end
    local still_failed = false
    for _, s in ipairs(wf.steps) do
      local st = load(wf.step_tasks[s.id])
      if st and (st.state == FAILED or st.state == DEAD or st.state == CANCELLED) then
        still_failed = true
      end
    end
    if wf.state ~= WF_RUNNING and not still_failed then
      wf.state = WF_RUNNING
      wf.failure_reason = ''
      wf.end_time = '0.0'
      R[2] = save_wf(wf)
    end
  end
  return R
end

-- Reads (one round trip each) ------------------------------------------------

function OPS.expired_leases()
  local ids = redis.call('ZRANGEBYSCORE', LEASE_KEY, '-inf', '(' .. ARGV[2], 'LIMIT', 0,
                         tonumber(ARGV[3]))
  local out = {}
  for _, id in ipairs(ids) do
    local raw = redis.call('GET', tkey(id))
    if raw then out[#out + 1] = raw end
  end
  return out
end

function OPS.leases_of()
  local out = {}
  for _, id in ipairs(redis.call('SMEMBERS', akey(ARGV[2]))) do
    local raw = redis.call('GET', tkey(id))
    if raw then out[#out + 1] = raw end
  end
  return out
end

function OPS.list_tasks()
  local ns, st, cap, wfid = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
  local before, limit = tonumber(ARGV[6]), tonumber(ARGV[7])
  -- Optional (older callers pass none): labels as JSON, create_time bounds.
  local want = {}
  if ARGV[8] and ARGV[8] ~= '' then want = cjson.decode(ARGV[8]) end
  local after_t, before_t = tonumber(ARGV[9] or '0') or 0, tonumber(ARGV[10] or '0') or 0
  local function labels_match(t)
    local have = t.labels
    for k, v in pairs(want) do
      if type(have) ~= 'table' or have[k] ~= v then return false end
    end
    return true
  end
  local function time_match(t)
    if after_t == 0 and before_t == 0 then return true end
    local c = tonumber(t.create_time) or 0
    return (after_t == 0 or c >= after_t) and (before_t == 0 or c < before_t)
  end
  local max = '+inf'
  if before > 0 then max = '(' .. before end
  local out, offset, batch = {}, 0, 256
  while #out < limit do
    local ids = redis.call('ZREVRANGEBYSCORE', B .. ':tasks:' .. ns, max, '-inf', 'LIMIT',
                           offset, batch)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      local raw = redis.call('GET', tkey(id))
      if raw then
        local t = cjson.decode(raw)
        if (st == 0 or t.state == st) and (cap == '' or t.capability == cap)
            and (wfid == '' or t.workflow_id == wfid) and time_match(t)
            and labels_match(t) then
          out[#out + 1] = raw
          if #out >= limit then break end
        end
      end
    end
    offset = offset + batch
  end
  return out
end

function OPS.list_workflows()
  local ns, st, before, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local max = '+inf'
  if before > 0 then max = '(' .. before end
  local out, offset, batch = {}, 0, 256
  while #out < limit do
    local ids = redis.call('ZREVRANGEBYSCORE', B .. ':wfs:' .. ns, max, '-inf', 'LIMIT',
                           offset, batch)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      local raw = redis.call('GET', wkey(id))
      if raw and (st == 0 or cjson.decode(raw).state == st) then
        out[#out + 1] = raw
        if #out >= limit then break end
      end
    end
    offset = offset + batch
  end
  return out
end

-- Snapshots. export: ARGV[2] namespace, ARGV[3] '1' to limit to it; returns
-- {seq, {task JSON...}, {workflow JSON...}}. Namespaces come from a SCAN of
-- the per-namespace indexes (a keyspace walk: snapshots only).
local function glob_escape(s) return (string.gsub(s, '([%*%?%[%]\\])', '\\%1')) end

local function index_namespaces(kind)
  local found, cursor = {}, '0'
  local head = B .. ':' .. kind .. ':'
  repeat
    local r = redis.call('SCAN', cursor, 'MATCH', glob_escape(head) .. '*', 'COUNT', 1000)
    cursor = r[1]
    for _, k in ipairs(r[2]) do found[#found + 1] = string.sub(k, #head + 1) end
  until cursor == '0'
  return found
end

function OPS.export()
  local only = ARGV[3] == '1'
  local tasks, wfs = {}, {}
  local tns, wns
  if only then tns, wns = {ARGV[2]}, {ARGV[2]} else
    tns, wns = index_namespaces('tasks'), index_namespaces('wfs') end
  for _, ns in ipairs(tns) do
    for _, id in ipairs(redis.call('ZRANGE', B .. ':tasks:' .. ns, 0, -1)) do
      local raw = redis.call('GET', tkey(id))
      if raw then tasks[#tasks + 1] = raw end
    end
  end
  for _, ns in ipairs(wns) do
    for _, id in ipairs(redis.call('ZRANGE', B .. ':wfs:' .. ns, 0, -1)) do
      local raw = redis.call('GET', wkey(id))
      if raw then wfs[#wfs + 1] = raw end
    end
  end
  return {tonumber(redis.call('GET', SEQ_KEY)) or 0, tasks, wfs}
end

-- import: ARGV[2] task docs, ARGV[3] workflow docs, ARGV[4] seq, ARGV[5] '1' dry
-- run. Refuses (writing nothing) when a namespace of the records holds tasks.
function OPS.import()
  local tasks, wfs, seq, dry = cjson.decode(ARGV[2]), cjson.decode(ARGV[3]),
                               tonumber(ARGV[4]), ARGV[5] == '1'
  local seen, busy = {}, {}
  local function check(ns)
    if seen[ns] then return end
    seen[ns] = true
    if redis.call('ZCARD', B .. ':tasks:' .. ns) > 0 or
       redis.call('ZCARD', B .. ':wfs:' .. ns) > 0 then busy[#busy + 1] = ns end
  end
  for _, t in ipairs(tasks) do check(t.namespace) end
  for _, w in ipairs(wfs) do check(w.namespace) end
  if #busy > 0 then return {'busy', unpack(busy)} end
  if dry then return {'ok'} end
  for _, w in ipairs(wfs) do
    save_wf(w)
    redis.call('ZADD', B .. ':wfs:' .. w.namespace, w.seq, w.id)
  end
  for _, t in ipairs(tasks) do put_task(t, nil, nil) end
  if seq > (tonumber(redis.call('GET', SEQ_KEY)) or 0) then redis.call('SET', SEQ_KEY, seq) end
  return {'ok'}
end

-- Entry points, registered by _scripts.py: `call` runs any op, `call_ro` (a
-- no-writes function, FCALL_RO) only these reads.
local READ_ONLY = {list_tasks = true, list_workflows = true, expired_leases = true,
                   leases_of = true, export = true}

local function begin(keys, args)
  ARGV = args
  B = keys[1]
  S2S_KEY, RETRY_KEY, LEASE_KEY, SEQ_KEY = B .. ':s2s', B .. ':retry', B .. ':leases', B .. ':seq'
  NULL = cjson.null
  cache, delta, delta_order, counted = {}, {}, {}, {}
end

local function call(keys, args)
  begin(keys, args)
  local op = OPS[args[1]]
  if not op then return redis.error_reply('agentmesh: unknown task op ' .. tostring(args[1])) end
  -- Counters are written even when the op fails half-way, like its other writes
  -- (a call's writes are never rolled back).
  local ok, res = pcall(op)
  flush_counters()
  if not ok then error(res, 0) end
  return res
end

local function call_ro(keys, args)
  if not READ_ONLY[args[1]] then
    return redis.error_reply('agentmesh: not a read-only task op ' .. tostring(args[1]))
  end
  return call(keys, args)
end
