local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function load(key)
  local v = tonumber(redis.call('GET', key))
  if v == nil or v < now then return now end
  return v
end
local function store(key, v)
  redis.call('SET', key, string.format('%.0f', v), 'PX', math.floor((v - now) / 1000) + 1000)
end
-- A stored state further ahead than the configured shares can book (a full burst plus the
-- longest wait) is not trusted (a stray or tampered key): it is cut back to that bound, as
-- the upstream's own pauses are.
local function bounded(key, span)
  local v = load(key)
  if v > now + span then
    v = now + span
    store(key, v)
  end
  return v
end
local function earliest(tat, cost, interval, usable)
  return tat - (usable - math.min(cost, usable)) * interval
end

local mode = ARGV[1]
-- The shared allowance, if it holds a whole count; anything else (a stray or tampered key:
-- "abc", "1e9", more digits than a count has) is absent, and deleted so the next report
-- sets it afresh.
local function allowance()
  local raw = redis.call('GET', KEYS[4])
  if not raw then return nil end
  if not string.match(raw, '^%d+$') or #raw > 15 then
    redis.call('DEL', KEYS[4])
    return nil
  end
  return tonumber(raw)
end
local function land(cost)
  local n = (tonumber(redis.call('GET', KEYS[5])) or 0) - cost
  if n > 0 then redis.call('SET', KEYS[5], n, 'PX', 300000) else redis.call('DEL', KEYS[5]) end
  return math.max(n, 0)
end
if mode == 'learning' then
  -- A replica that knows nothing of the upstream's count asks before it sends the call that
  -- would learn it: the count is known (1), this replica sends that call (0: the marker is
  -- its own for ARGV[2] ms, or until an answer or a failure), or another replica's is out
  -- (2, and how long its marker lasts).
  if allowance() ~= nil and redis.call('PTTL', KEYS[4]) > 0 then return {1} end
  if redis.call('EXISTS', KEYS[8]) == 1 then return {1} end
  if redis.call('SET', KEYS[7], '1', 'NX', 'PX', tonumber(ARGV[2])) then return {0} end
  return {2, redis.call('PTTL', KEYS[7])}
end
if mode == 'seen' then
  local inflight = land(tonumber(ARGV[2]))
  -- An answer ends any replica's learning call; one that is no limit answer teaches every
  -- replica (even without a count: the shares pace then).
  redis.call('DEL', KEYS[7])
  if tonumber(ARGV[6]) == 1 then redis.call('SET', KEYS[8], '1', 'PX', 3600000) end
  local remaining, reset_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
  if remaining < 0 then return {0} end
  local left = math.max(remaining - inflight, 0)
  -- The upstream itself said stop: the pause every replica obeys. A 0 reached only by
  -- calls still out is no pause (see the take below).
  if remaining == 0 and reset_ms > 0 then
    local untl = now + reset_ms * 1000
    if untl > load(KEYS[3]) then store(KEYS[3], untl) end
  end
  local cur = allowance()
  local ttl = redis.call('PTTL', KEYS[4])
  if cur ~= nil and ttl > 0 and (reset_ms == 0 or math.abs(ttl - reset_ms) < 1500) then
    -- Within a window a report only lowers the count, except a 0 our own calls reached:
    -- once none is out, the upstream's word is the count again.
    if left < cur or (cur < 1 and inflight == 0) then
      redis.call('SET', KEYS[4], left, 'KEEPTTL')
    end
  else
    if reset_ms <= 0 then reset_ms = tonumber(ARGV[5]) end
    redis.call('SET', KEYS[4], left, 'PX', reset_ms)
  end
  return {0}
end
if mode == 'done' then
  land(tonumber(ARGV[2]))
  -- A call that failed teaches nothing: the next one learns, on whichever replica.
  redis.call('DEL', KEYS[7])
  return {0}
end
-- The resume count; anything but a small whole number (a stray or tampered key) counts
-- from 0 again, which every replica also takes as "resumed".
local function resumes()
  local e = tonumber(redis.call('GET', KEYS[6]))
  if e == nil or e < 0 or e >= 1e15 or e ~= math.floor(e) then return 0 end
  return e
end
if mode == 'resume' then
  -- Whether a pause was in force: a pause ahead, or an allowance used up that has yet to
  -- renew. Keys holding anything else (garbage, a pause past) are deleted all the same.
  local n = 0
  local pause = tonumber(redis.call('GET', KEYS[3]))
  if pause ~= nil and pause > now then n = 1 end
  local allow = allowance()
  if allow ~= nil and allow < 1 and redis.call('PTTL', KEYS[4]) > 0 then n = 1 end
  redis.call('DEL', KEYS[3], KEYS[4])
  local e = resumes() + 1
  redis.call('SET', KEYS[6], string.format('%.0f', e))
  return {n, e}
end
if mode == 'pause' then
  local untl = now + tonumber(ARGV[2])
  if untl > load(KEYS[3]) then store(KEYS[3], untl) end
  return {0, resumes()}
end
if mode == 'peek' then
  local longest = tonumber(ARGV[2])
  local left, dry = 0, 0
  local pause = tonumber(redis.call('GET', KEYS[3]))
  if pause ~= nil and pause > now then left = math.min(pause - now, longest) end
  local allow = allowance()
  local shown = -1
  if allow ~= nil then
    local ttl = redis.call('PTTL', KEYS[4])
    if ttl > 0 then
      shown = math.max(math.floor(allow), 0)
      local out = tonumber(redis.call('GET', KEYS[5])) or 0
      if allow < 1 and out <= 0 then dry = math.min(ttl * 1000, longest) end
    end
  end
  return {left, dry, resumes(), shown}
end
if mode == 'return' or mode == 'refund' then
  for i = 1, 2 do
    local after, before = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
    if after > 0 and tonumber(redis.call('GET', KEYS[i])) == after then
      if before > now then store(KEYS[i], before) else redis.call('DEL', KEYS[i]) end
    end
  end
  if mode == 'refund' then
    -- An admitted call that was not sent: it leaves the flight, and the allowance it was
    -- counted against (while that window lasts) gets its cells back.
    local cost = tonumber(ARGV[6])
    land(cost)
    if tonumber(redis.call('GET', KEYS[4])) ~= nil and redis.call('PTTL', KEYS[4]) > 0 then
      redis.call('INCRBY', KEYS[4], cost)
    end
  end
  return {0}
end

-- take: cost, global interval and usable cells, client interval and usable cells (0 = do
-- not book the client), max wait, debt owed from a spell on the local fallback, and the
-- longest pause a stored one may still have left (all in µs); then the upstream's learnt
-- limit (0: none) and window (ms).
local cost = tonumber(ARGV[2])
local gi, gu = tonumber(ARGV[3]), tonumber(ARGV[4])
local ci, cu = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_wait = tonumber(ARGV[7])
local owed = tonumber(ARGV[8])
if owed > 0 then store(KEYS[1], load(KEYS[1]) + owed) end

local pause = tonumber(redis.call('GET', KEYS[3]))
if pause ~= nil and pause > now then
  local longest = tonumber(ARGV[9])
  if pause > now + longest then
    pause = now + longest
    store(KEYS[3], pause)
  end
  return {3, pause - now}
end

local allow = allowance()
local limit, window_ms = tonumber(ARGV[10]) or 0, tonumber(ARGV[11]) or 0
if allow == nil and limit > 0 and window_ms > 0 then
  -- The count's window ended (its key expired at the reset): the new one holds the learnt
  -- limit less the calls still out on every replica, never what the shares alone allow,
  -- until a report of the new window replaces it.
  local out = tonumber(redis.call('GET', KEYS[5])) or 0
  allow = math.max(limit - out, 0)
  redis.call('SET', KEYS[4], string.format('%.0f', allow), 'PX', window_ms)
end
if allow ~= nil and allow < cost then
  local ttl = redis.call('PTTL', KEYS[4])
  -- Used up by calls still out (on any replica): their answers say what is left, so ask
  -- again in a second rather than at the reset.
  local out = tonumber(redis.call('GET', KEYS[5])) or 0
  if ttl > 0 and out > 0 then return {3, math.min(ttl * 1000, 1000000)} end
  if ttl > 0 then return {3, math.min(ttl * 1000, tonumber(ARGV[9]))} end
end

local g = bounded(KEYS[1], gi * gu + max_wait + owed)
local gw = math.max(earliest(g, cost, gi, gu) - now, 0)
local c, cw = now, 0
if cu > 0 then
  c = bounded(KEYS[2], ci * cu + max_wait)
  cw = math.max(earliest(c, cost, ci, cu) - now, 0)
end
if math.max(gw, cw) > max_wait then
  if cw >= gw then return {2, cw} end
  return {1, gw}
end
local c_after = 0
if cu > 0 then
  c_after = math.max(c, now + cw) + cost * ci
  store(KEYS[2], c_after)
  if cw > 0 then return {4, cw, c, c_after, 0, 0, now} end
end
local g_after = math.max(g, now + gw) + cost * gi
store(KEYS[1], g_after)
if allow ~= nil then redis.call('DECRBY', KEYS[4], cost) end
redis.call('INCRBY', KEYS[5], cost)
redis.call('PEXPIRE', KEYS[5], 300000)
return {0, gw, c, c_after, g, g_after, now}
