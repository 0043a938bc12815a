-- What this run found wrong in the keys it read, for the replica to say (a warning per
-- incident, `cxgate_redis_repairs_total`): bit i-1 of `fixed` for KEYS[i] holding a value
-- no replica writes (cut back to its bound, or dropped), of `wrong` for KEYS[i] holding
-- another type than a string (a list, a hash: deleted, so this run and every later one
-- goes on as if it were absent). Every answer ends with both, after its own values.
local fixed, wrong = 0, 0
local function main()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local slot = {}
for i, k in ipairs(KEYS) do slot[k] = i end
local function flag(mask, key)
  return bit.bor(mask, bit.lshift(1, (slot[key] or 1) - 1))
end
-- KEYS[i] as stored: a string or nil. One of another type is no state of ours (a stray or
-- tampered key); reading it would fail the whole run, and every run after it.
local function read(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then
    redis.call('DEL', key)
    wrong = flag(wrong, key)
    return nil
  end
  if not v then return nil end
  return v
end
-- KEYS[i] as a number, or nil; text that is no number is dropped.
local function number(key)
  local raw = read(key)
  if raw == nil then return nil end
  local v = tonumber(raw)
  -- Lua reads "inf" and "nan" as numbers too: neither is a time or a count.
  if v ~= nil and (v ~= v or v == math.huge or v == -math.huge) then v = nil end
  if v == nil then
    redis.call('DEL', key)
    fixed = flag(fixed, key)
  end
  return v
end

local function load(key)
  local v = number(key)
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
    fixed = flag(fixed, key)
  end
  return v
end
-- The upstream pause (KEYS[3]) until `untl`: a later end than the pause in force lengthens
-- it (a later window, a longer Retry-After); one naming the same end (within 1.5 s) keeps
-- the earlier of the two, since every end a replica reads is at or after the upstream's
-- real one and a later one is the same end read late (or pushed late); an earlier end
-- never shortens it (an old answer).
local function pause_to(untl)
  local cur = tonumber(redis.call('GET', KEYS[3]))
  if cur == nil or cur <= now or untl > cur + 1500000 or (untl < cur and cur - untl < 1500000) then
    store(KEYS[3], untl)
  end
end
local function earliest(tat, cost, interval, usable)
  return tat - (usable - math.min(cost, usable)) * interval
end

local mode = ARGV[1]
-- The modes a replica sends about its own calls carry its word (see `word` below) in
-- ARGV[2..10]; their own arguments follow, read as P[2], P[3], ...
local P = ARGV
if mode == 'take' or mode == 'seen' or mode == 'done' or mode == 'return' or mode == 'refund'
  or mode == 'beat' then
  P = {}
  for i = 11, #ARGV do P[i - 9] = ARGV[i] end
end
-- The shared allowance, if it holds a whole count; anything else (a stray or tampered key:
-- "abc", "1e9", more digits than a count has) is absent, and deleted so the next report
-- sets it afresh.
local function allowance()
  local raw = read(KEYS[4])
  if not raw then return nil end
  if not string.match(raw, '^%d+$') or #raw > 15 then
    redis.call('DEL', KEYS[4])
    fixed = flag(fixed, KEYS[4])
    return nil
  end
  return tonumber(raw)
end
-- The shared allowance and the ms to its end, read where a call is admitted or the pause is
-- shown: a count holds within the upstream's window only (`longest_ms`, the longest a pause
-- may last), so no replica sets its expiry further out, nor none at all. A later expiry (a
-- stray or tampered key) is cut to the window's end, one with none is dropped; either
-- would refuse every call, on every replica, past any window the upstream counts.
local function windowed(longest_ms)
  local allow = allowance()
  if allow == nil then return nil, -2 end
  local ttl = redis.call('PTTL', KEYS[4])
  if ttl == -1 then
    redis.call('DEL', KEYS[4])
    fixed = flag(fixed, KEYS[4])
    return nil, -2
  end
  -- A replica's reset is rounded up to the ms: 1.5 s of slack, as for ends named twice.
  if ttl > longest_ms + 1500 then
    ttl = math.max(longest_ms, 1)
    redis.call('PEXPIRE', KEYS[4], ttl)
    fixed = flag(fixed, KEYS[4])
  end
  return allow, ttl
end
-- KEYS[5]: every replica's calls out, one record per replica,
-- "id,until,word,cells,base;": until when (µs) its lease holds, the number of the word that
-- based it, its cells out, and the first call number (the replica's own sequence) that
-- base does not count. A record is based on the replica's own count (its ledger knows its
-- calls out, those sent on the fallback too) when there is none; after that each call
-- booked adds its cells and each call ending takes them off, in the same script run as
-- its booking or its report, so a call is never out of the flight before its report is in
-- the count. Every word renews the lease (a few seconds; a replica with calls out beats
-- every second), so a lost key is whole again at each replica's next word, and a replica
-- gone (killed) says no more: its cells leave when its lease ends, seconds later. A
-- record whose lease ends before the one its replica last saw it given is older than the
-- replica's word (Redis restored from an older snapshot or append-only file, the key set
-- back by hand): it counts calls that have long landed, and the replica bases it again. A
-- key that does not parse, or is longer than a fleet's records can be, is a stray or
-- tampered key: it goes, and each replica's next word bases its record again.
local function flights()
  local raw = read(KEYS[5])
  local t = {}
  if not raw then return t end
  if #raw > 4096 then
    redis.call('DEL', KEYS[5])
    fixed = flag(fixed, KEYS[5])
    return t
  end
  local kept = 0
  for id, u, w, c, b in string.gmatch(raw, '(%w+),(%d+),(%d+),(%d+),(%d+);') do
    u, w, c, b = tonumber(u), tonumber(w), tonumber(c), tonumber(b)
    if u <= now + 3600000000 then
      kept = kept + 1
      if u > now then t[id] = {u, w, c, b} end
    end
  end
  -- Text no record explains, or a lease past any replica's: dropped (the next store
  -- writes the records kept).
  if string.len((string.gsub(raw, '%w+,%d+,%d+,%d+,%d+;', ''))) > 0 or kept < select(2, string.gsub(raw, ';', ';')) then
    fixed = flag(fixed, KEYS[5])
  end
  return t
end
local function store_flights(t)
  local parts, last = {}, now
  for id, r in pairs(t) do
    parts[#parts + 1] = string.format('%s,%.0f,%.0f,%.0f,%.0f;', id, r[1], r[2], r[3], r[4])
    if r[1] > last then last = r[1] end
  end
  if #parts == 0 then
    redis.call('DEL', KEYS[5])
    return
  end
  redis.call('SET', KEYS[5], table.concat(parts), 'PX', math.floor((last - now) / 1000) + 1)
end
local function out(t)
  local o = 0
  for _, r in pairs(t or flights()) do o = o + r[3] end
  return o
end
local lease = math.min(math.max(tonumber(ARGV[5]) or 0, 1000000), 3600000000)
-- The word of the replica ARGV[2], its number ARGV[3] (later words have higher ones): its
-- ARGV[4] cells out, the lease ARGV[5] µs, the cells ARGV[6] it last knew out on the
-- others, its next call number ARGV[7]; then the call it is about, if any: its number
-- ARGV[8] (-1: none), whether a take booked it here ARGV[9], its cells ARGV[10]. Returns
-- the replica's record. When the others' records are gone while this replica knew of
-- calls out on them (Redis lost the key), those calls stay out on a record of their own,
-- "lost", for 2 s (at most the lease): by then they have been answered or their replicas
-- have based their records again. `seen` is the lease end this replica was last given
-- (0: none known): a record ending before it was set back, and is based again.
local call = tonumber(ARGV[8]) or -1
local function word(t, leaving, seen)
  local id, w = ARGV[2], tonumber(ARGV[3]) or 0
  if not string.match(id or '', '^%w+$') or #id < 8 or #id > 40 then return nil end
  local r = t[id]
  local set_back = r ~= nil and (seen or 0) > 0 and r[1] < seen
  if set_back then
    r = nil
    t[id] = nil
  end
  if r == nil then
    r = {now + lease, w, math.max(tonumber(ARGV[4]) or 0, 0), math.max(tonumber(ARGV[7]) or 0, 0)}
    t[id] = r
    local others = math.max(tonumber(ARGV[6]) or 0, 0)
    local known = false
    for k, _ in pairs(t) do
      if k ~= id then known = true end
    end
    if others > 0 and not known and not set_back then t.lost = {now + math.min(lease, 2000000), 0, others, 0} end
    return r
  end
  r[1] = now + lease
  -- A call ending after the word that based the record: its cells come off if that base
  -- counted it (sent before) or its take added them.
  if leaving and w > r[2] and call >= 0 and (call < r[4] or tonumber(ARGV[9]) == 1) then
    r[3] = math.max(r[3] - math.max(tonumber(ARGV[10]) or 0, 0), 0)
  end
  return r
end
local function say(leaving)
  local t = flights()
  if word(t, leaving) then store_flights(t) end
end
-- The mark that some replica learnt the upstream's count: '1', or the limit and window it
-- learnt; anything else is dropped.
local function learnt()
  local v = read(KEYS[8])
  if v ~= nil and v ~= '1' and not string.match(v, '^%d+:%d+$') then
    redis.call('DEL', KEYS[8])
    fixed = flag(fixed, KEYS[8])
    return nil
  end
  return v
end
-- The blind pause's probe: absent (none), 0 (due: the next call to go is the probe), or
-- until when (µs) the probe taken is out, while every other call waits.
local function probe_due(ttl_ms)
  redis.call('SET', KEYS[9], '0', 'PX', math.max(ttl_ms, 0) + 3600000)
end
if mode == 'learning' then
  -- A replica that knows nothing of the upstream's count asks before it sends the call that
  -- would learn it: the count is known (1), this replica sends that call (0: the marker is
  -- its own for ARGV[2] ms, or until an answer or a failure), or another replica's is out
  -- (2, and how long its marker lasts).
  if allowance() ~= nil and redis.call('PTTL', KEYS[4]) > 0 then return {1} end
  if learnt() ~= nil then return {1} end
  -- A marker with no expiry, or a longer one than any replica sets, is no replica's: it
  -- would hold every replica's first call back for good.
  local held = redis.call('PTTL', KEYS[7])
  if held == -1 or held > tonumber(ARGV[2]) then
    redis.call('DEL', KEYS[7])
    fixed = flag(fixed, KEYS[7])
  end
  if redis.call('SET', KEYS[7], '1', 'NX', 'PX', tonumber(ARGV[2])) then return {0} end
  return {2, redis.call('PTTL', KEYS[7])}
end
if mode == 'seen' then
  say(true)
  -- An answer ends any replica's learning call; one that is no limit answer teaches every
  -- replica (even without a count: the shares pace then), with the limit and window it
  -- showed, for a replica that has not seen them yet.
  redis.call('DEL', KEYS[7])
  local answered = tonumber(P[6]) == 1
  if answered then
    local limit, window = tonumber(P[8]) or 0, tonumber(P[9]) or 0
    if limit > 0 and window > 0 then
      redis.call('SET', KEYS[8], limit .. ':' .. window, 'PX', 3600000)
    elseif learnt() == nil then
      redis.call('SET', KEYS[8], '1', 'PX', 3600000)
    end
  end
  -- remaining: -1 when the answer had none; reset_ms: 0 when it named no reset, -1 when
  -- the reset it named has passed (it was counted in a window already over).
  local remaining, reset_ms = tonumber(P[3]), tonumber(P[4])
  -- A blind pause (a limit answer naming no time) ends in one probe across the replicas;
  -- a refusal while one is due keeps it due; any other answer ends the probing.
  if tonumber(P[7]) == 1 then
    probe_due(reset_ms)
  elseif answered then
    redis.call('DEL', KEYS[9])
  elseif redis.call('EXISTS', KEYS[9]) == 1 then
    probe_due(reset_ms)
  end
  if remaining < 0 or reset_ms < 0 then return {0} end
  -- The upstream itself said stop: the pause every replica obeys. A 0 reached only by
  -- calls still out is no pause (see the take below).
  if remaining == 0 and reset_ms > 0 then pause_to(now + reset_ms * 1000) end
  -- KEYS[4] is the lowest Remaining reported in the upstream's window: calls are counted
  -- in another order than they were sent and answered, so a higher report is older news.
  -- What may go is that less every call out (KEYS[5]), those sent before the report too.
  -- The key expires at the latest reset named for the window, never before: a report of the
-- window answered late must find it, not open a window of its own.
  local cur = allowance()
  local ttl = redis.call('PTTL', KEYS[4])
  if cur ~= nil and ttl > 0 then
    -- The first report of a window the replicas assumed (KEYS[10]: when it began, see the
    -- take): the upstream began it when it counted its first call, perhaps one sent before
    -- the assumption, so the reset it names replaces the assumed one, earlier or later.
    local assumed = number(KEYS[10])
    if assumed ~= nil and reset_ms > 0 and now + reset_ms * 1000 > assumed + 1500000 then
      redis.call('SET', KEYS[4], math.min(cur, remaining), 'PX', reset_ms)
      redis.call('DEL', KEYS[10])
      return {0}
    end
    if reset_ms == 0 or math.abs(ttl - reset_ms) < 1500 then
      if remaining < cur then redis.call('SET', KEYS[4], remaining, 'KEEPTTL') end
      if reset_ms > ttl then redis.call('PEXPIRE', KEYS[4], reset_ms) end
      return {0}
    end
    -- Counted in a window before the one in force: it says nothing of this one.
    if reset_ms < ttl then return {0} end
  end
  -- A window the replicas know nothing of yet: this report opens it.
  if reset_ms == 0 then reset_ms = tonumber(P[5]) end
  redis.call('SET', KEYS[4], remaining, 'PX', reset_ms)
  redis.call('DEL', KEYS[10])
  return {0}
end
if mode == 'beat' then
  -- A replica with calls out (or whose record still counts some) renews its lease (P[2]:
  -- the lease end it was last given), and learns the new end and its cells counted.
  local t = flights()
  local r = word(t, false, tonumber(P[2]) or 0)
  if r == nil then return {0, 0} end
  store_flights(t)
  return {r[1], r[3]}
end
if mode == 'done' then
  -- The word is about the call; P[2] is unused, P[5] the call's cost.
  say(true)
  local cost = tonumber(P[5]) or 0
  -- A call that failed teaches nothing: the next one learns, on whichever replica.
  redis.call('DEL', KEYS[7])
  -- Sent (P[3]), it may have been counted: it comes off the window's count.
  local cur = allowance()
  if tonumber(P[3]) == 1 and cur ~= nil and redis.call('PTTL', KEYS[4]) > 0 then
    redis.call('SET', KEYS[4], math.max(cur - cost, 0), 'KEEPTTL')
  end
  -- The probe (P[4]) ended unanswered: the next call is the probe.
  if tonumber(P[4]) == 1 and redis.call('EXISTS', KEYS[9]) == 1 then
    redis.call('SET', KEYS[9], '0', 'KEEPTTL')
  end
  return {0}
end
-- The resume count; anything but a small whole number (a stray or tampered key) counts
-- from 0 again, which every replica also takes as "resumed".
local function resumes()
  local e = number(KEYS[6])
  if e == nil then return 0 end
  if e < 0 or e >= 1e15 or e ~= math.floor(e) then
    fixed = flag(fixed, KEYS[6])
    return 0
  end
  return e
end
if mode == 'resume' then
  -- Whether a pause was in force: a pause ahead, or an allowance used up that has yet to
  -- renew. Keys holding anything else (garbage, a pause past) are deleted all the same.
  local n = 0
  local pause = number(KEYS[3])
  if pause ~= nil and pause > now then n = 1 end
  local allow = allowance()
  if allow ~= nil and allow - out() < 1 and redis.call('PTTL', KEYS[4]) > 0 then n = 1 end
  redis.call('DEL', KEYS[3], KEYS[4], KEYS[9], KEYS[10])
  local e = resumes() + 1
  redis.call('SET', KEYS[6], string.format('%.0f', e))
  return {n, e}
end
if mode == 'pause' then
  pause_to(now + tonumber(ARGV[2]))
  return {0, resumes()}
end
if mode == 'peek' then
  local longest = tonumber(ARGV[2])
  local left, dry = 0, 0
  local pause = number(KEYS[3])
  if pause ~= nil and pause > now then
    -- Cut back and stored as a take cuts it, so it is one repair, not one per look.
    if pause > now + longest then
      pause = now + longest
      store(KEYS[3], pause)
      fixed = flag(fixed, KEYS[3])
    end
    left = pause - now
  end
  local allow, ttl = windowed(math.floor(longest / 1000))
  local shown = -1
  if allow ~= nil then
    if ttl > 0 then
      local o = out()
      shown = math.max(math.floor(allow - o), 0)
      if allow < 1 and o <= 0 then dry = math.min(ttl * 1000, longest) end
    end
  end
  return {left, dry, resumes(), shown}
end
if mode == 'return' or mode == 'refund' then
  for i = 1, 2 do
    local after, before = tonumber(P[2 * i]), tonumber(P[2 * i + 1])
    if after > 0 and number(KEYS[i]) == after then
      if before > now then store(KEYS[i], before) else redis.call('DEL', KEYS[i]) end
    end
  end
  -- An admitted call that was not sent (refund) leaves the flight: what may go is the
  -- count less the calls out.
  say(mode == 'refund')
  if mode == 'refund' then
    -- If it was the probe, the next call is.
    if tonumber(P[7]) == 1 and redis.call('EXISTS', KEYS[9]) == 1 then
      redis.call('SET', KEYS[9], '0', 'KEEPTTL')
    end
  end
  return {0}
end

-- take: cost, global interval and usable cells, client interval and usable cells (0 = do
-- not book the client), max wait, debt owed from a spell on the local fallback, and the
-- longest pause a stored one may still have left (all in µs); then the upstream's learnt
-- limit (0: none) and window (ms), how long a probe may be out (µs); what this replica
-- knows of the upstream's window: the count left (-1: nothing), the ms to its reset, and
-- how many ms ago it was assumed (-1: it was named); the resume count it has acted on; and
-- the cells it spent while cut off from Redis that have been answered since (once, on
-- its first take back), whether its record is to be based again, the lease end it was last
-- given (0: none) and how long a call may be out (µs). Its word is about this call,
-- counted out here once booked (unless the record's base counts it already). Every answer
-- ends with the shared count (-1: none), the ms to its end and the cells out on every
-- replica, which the replica mirrors, and its record's lease end and cells.
local cost = tonumber(P[2])
local gi, gu = tonumber(P[3]), tonumber(P[4])
local ci, cu = tonumber(P[5]), tonumber(P[6])
local max_wait = tonumber(P[7])
local owed = tonumber(P[8])
local longest = tonumber(P[9])
if owed > 0 then store(KEYS[1], load(KEYS[1]) + owed) end

local t = flights()
-- Back from the fallback (P[18]): its record is based again, on a count that has the calls
-- it sent alone that are still out.
if tonumber(P[18]) == 1 then t[ARGV[2]] = nil end
local mine = word(t, false, tonumber(P[19]) or 0)
local allow, ttl = windowed(math.floor(longest / 1000))
-- The replica's knowledge of the window, unless an operator has ended the pause (and the
-- count with it) since it last looked: then it knows of a count that is gone for good.
local seed_left, seed_ms = tonumber(P[13]) or -1, tonumber(P[14]) or 0
local since = tonumber(P[15]) or -1
local apart = math.max(tonumber(P[17]) or 0, 0)
local heard = (tonumber(P[16]) or 0) >= resumes()
seed_ms = math.min(seed_ms, math.floor(longest / 1000))
if heard and seed_left >= 0 and seed_ms > 0 then
  if allow == nil or ttl <= 0 then
    -- The shared count is gone (Redis restarted or flushed, the key evicted or deleted)
    -- while this replica knows of a window not yet ended: the window goes on from what it
    -- knows, never from a full allowance, and never unlimited.
    allow = seed_left
    ttl = seed_ms
    redis.call('SET', KEYS[4], string.format('%.0f', allow), 'PX', seed_ms)
    if since >= 0 then
      redis.call('SET', KEYS[10], string.format('%.0f', now - since * 1000), 'PX', seed_ms)
    end
  elseif seed_left < allow and math.abs(ttl - seed_ms) < 1500 then
    -- Within one window the count only goes down: a higher one (Redis restored from an
    -- older snapshot, a key set back by hand) is older news than this replica's. It keeps
    -- its lower count and writes it back; a later window (a later end) may be higher.
    allow = seed_left
    redis.call('SET', KEYS[4], string.format('%.0f', allow), 'KEEPTTL')
  end
end
if allow ~= nil and apart > 0 and ttl > 0 then
  -- Calls this replica made alone were counted upstream without the others knowing.
  allow = math.max(allow - apart, 0)
  redis.call('SET', KEYS[4], string.format('%.0f', allow), 'KEEPTTL')
end
-- Calls in flight never outnumber the cells the global share could book over twice the
-- longest a call may be out: a larger count is a stray or tampered key, not believed. It
-- goes (said once, in Redis's log), and each replica states its count again.
local o = out(t)
local out_for = math.max(tonumber(P[20]) or lease, lease)
if o > gu + math.ceil(2 * out_for / gi) then
  redis.log(redis.LOG_WARNING, 'cxgate: ' .. KEYS[5] .. ' held an implausible count of calls in flight (' .. tostring(o) .. '); reset')
  fixed = flag(fixed, KEYS[5])
  t = {}
  mine = word(t, false)
  o = out(t)
end
store_flights(t)
local function reply(r)
  for i = #r + 1, 8 do r[i] = 0 end
  local shown, left_ms = -1, 0
  if allow ~= nil and ttl > 0 then shown, left_ms = allow, ttl end
  r[9], r[10], r[11], r[12], r[13] = shown, left_ms, o, 0, 0
  if mine ~= nil then r[12], r[13] = mine[1], mine[3] end
  return r
end

local pause = number(KEYS[3])
if pause ~= nil and pause > now then
  if pause > now + longest then
    pause = now + longest
    store(KEYS[3], pause)
    fixed = flag(fixed, KEYS[3])
  end
  return reply({3, pause - now})
end

local probe = number(KEYS[9])
-- A probe out longer than any replica claims one for is no replica's: it holds the calls
-- no longer than a claim would.
local claim = tonumber(P[12]) or 0
if probe ~= nil and probe > now + math.max(claim, 1000000) then
  probe = now + math.max(claim, 1000000)
  redis.call('SET', KEYS[9], string.format('%.0f', probe), 'PX', math.floor(claim / 1000) + 3600000)
  fixed = flag(fixed, KEYS[9])
end
if probe ~= nil and probe > now then return reply({3, math.min(probe - now, 1000000)}) end

local limit, window_ms = tonumber(P[10]) or 0, tonumber(P[11]) or 0
if limit == 0 then
  -- Not learnt here yet: what another replica learnt.
  local l, w = string.match(learnt() or '', '^(%d+):(%d+)$')
  if l then limit, window_ms = tonumber(l), tonumber(w) end
end
if allow == nil and limit > 0 and window_ms > 0 then
  -- The count's window ended (its key expired at the reset) and this replica knows of no
  -- later one: the new one holds the learnt limit (less the calls still out on every
  -- replica, as always), never what the shares alone allow, until a report of the new
  -- window replaces it.
  allow = limit
  ttl = window_ms
  redis.call('SET', KEYS[4], string.format('%.0f', allow), 'PX', window_ms)
  redis.call('SET', KEYS[10], string.format('%.0f', now), 'PX', window_ms)
end
if allow ~= nil and allow - o < cost then
  ttl = redis.call('PTTL', KEYS[4])
  -- Used up by calls still out (on any replica): their answers say what is left, so ask
  -- again in a second rather than at the reset. This call is none of them, even when
  -- its replica's record was based on this word (which counts it): a count run dry with
  -- nothing else out is refused until the reset, as the status shows it.
  local others = o
  if mine ~= nil and call >= 0 and call < mine[4] then others = others - cost end
  if ttl > 0 and others > 0 then return reply({3, math.min(ttl * 1000, 1000000)}) end
  if ttl > 0 then return reply({3, math.min(ttl * 1000, longest)}) end
end

-- The global state may also hold the debt replicas back from their fallbacks handed over
-- (each at most its part of a burst and a wait, so all of them at most one more): cut back
-- to one span, as it was, the next booking would forgive the calls they sent alone while
-- the others spent the shared count.
local g = bounded(KEYS[1], 2 * (gi * gu + max_wait) + owed)
local gw = math.max(earliest(g, cost, gi, gu) - now, 0)
local c, cw = now, 0
if cu > 0 then
  c = bounded(KEYS[2], ci * cu + max_wait)
  cw = math.max(earliest(c, cost, ci, cu) - now, 0)
end
-- A cost above a share's usable burst could only be booked as debt past it, locking every
-- caller out until it drained: nothing is booked, and the refusal says when the share is
-- next full. Replicas refuse such a cost before asking; this guards terms that disagree.
if cu > 0 and cost > cu then return reply({2, math.max(c - now, 0)}) end
if cost > gu then return reply({1, math.max(g - now, 0)}) end
if math.max(gw, cw) > max_wait then
  if cw >= gw then return reply({2, cw}) end
  return reply({1, gw})
end
local c_after = 0
if cu > 0 then
  c_after = math.max(c, now + cw) + cost * ci
  store(KEYS[2], c_after)
  if cw > 0 then return reply({4, cw, c, c_after, 0, 0, now}) end
end
local g_after = math.max(g, now + gw) + cost * gi
store(KEYS[1], g_after)
-- Booked: this call is out, on this replica's record (unless its base counts it).
if mine ~= nil and call >= mine[4] then
  mine[3] = mine[3] + cost
  o = o + cost
  store_flights(t)
end
-- The probe due after a blind pause: this call is it, every other waits for its answer.
local probing = 0
if probe ~= nil then
  local claim = tonumber(P[12])
  redis.call('SET', KEYS[9], string.format('%.0f', now + claim), 'PX', math.floor(claim / 1000) + 3600000)
  probing = 1
end
return reply({0, gw, c, c_after, g, g_after, now, probing})
end
local r = main()
r[#r + 1] = fixed
r[#r + 1] = wrong
return r
