//! The shared cache tier's Lua scripts: every call that touches more than one key, or a
//! key of ours that anyone with access to Redis may have overwritten, runs as one script, so
//! it is atomic and reads with `pcall` (a key of the wrong type is an answer, never an error
//! that would count Redis as down). `super::shared` says when each runs.

/// The Lua helpers every script below starts with: a generation counter read as a number
/// (`nil` for a key of another type or anything but a plain count: tampered, to be
/// replaced), and a generation as the text a write compares (`nil` for another type).
const LUA_COUNTS: &str = r"
local function count(k)
  local v = redis.pcall('GET', k)
  if v == false then return 0 end
  if type(v) ~= 'string' or not string.match(v, '^%d+$') or #v > 15 then return nil end
  return tonumber(v)
end
local function text(k)
  local v = redis.pcall('GET', k)
  if v == false then return '0' end
  if type(v) ~= 'string' then return nil end
  return v
end
";

/// A script: [`LUA_COUNTS`] and `body`.
fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{LUA_COUNTS}{body}"))
}

/// Reads an entry and the keys beside it as `MGET` would, but bounded (KEYS[1]: the entry,
/// KEYS[2]: the global generation, then the other generations, then, with ARGV[3], a fill
/// lock; ARGV[1]: the largest entry read, in bytes; ARGV[2]: the largest generation read;
/// ARGV[3], optional: the fill lock's lease in ms). Answers the entry (nil when absent,
/// over the bound or of another type), then its size when it was not read (`-1` for
/// another type), then every generation's value: nil when absent, over its bound or of
/// another type, except the global generation, which is `""` when over its bound or of
/// another type, so the reader can replace it. A value over its bound is never read
/// (`STRLEN` first): one planted value the size of Redis's memory costs a `STRLEN`, not a
/// transfer. Last, with a lock, its value while it is held (`'1'` for one over 256 bytes); one planted with no expiry or with
/// one past the lease (no replica sets such a lock: a holder sets and extends it to the
/// lease) is treated as expired and deleted, so it holds nobody back: waiting it out would
/// spend the waiting request's whole `max_wait`, and the budget would then refuse it.
pub(super) static READ: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    script(
        r"
local out = {false, false}
local size = redis.pcall('STRLEN', KEYS[1])
if type(size) ~= 'number' then out[2] = '-1'
elseif size > tonumber(ARGV[1]) then out[2] = tostring(size)
elseif size > 0 then out[1] = redis.call('GET', KEYS[1]) end
local last, bound = #KEYS, tonumber(ARGV[2])
if ARGV[3] then last = last - 1 end
for i = 2, last do
  local v = false
  local len = redis.pcall('STRLEN', KEYS[i])
  if type(len) ~= 'number' or len > bound then
    if i == 2 then v = '' end
  else
    v = redis.call('GET', KEYS[i])
  end
  out[#out + 1] = v
end
if ARGV[3] then
  local lock, lease = KEYS[#KEYS], tonumber(ARGV[3])
  local ttl = redis.call('PTTL', lock)
  local held = false
  if ttl == -1 or ttl > lease then
    redis.call('DEL', lock)
  elseif ttl > 0 then
    held = '1'
    local len = redis.pcall('STRLEN', lock)
    if type(len) == 'number' and len <= 256 then held = redis.call('GET', lock) end
  end
  out[#out + 1] = held
end
return out
",
    )
});

/// Stores an entry only when no generation it was looked up under has moved since
/// (KEYS: the entry, the global generation, n group generations, n group sets; ARGV: the
/// entry, its expiry in ms, then the expected generations in the same order), and records it
/// in its groups' sets, which live at least as long as it does. A generation of another type
/// than a string refuses the write; a set of another type is replaced.
pub(super) static WRITE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    script(
        r"
local n = (#KEYS - 2) / 2
for i = 0, n do
  if text(KEYS[2 + i]) ~= ARGV[3 + i] then return 0 end
end
local px = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
for i = 1, n do
  local set = KEYS[2 + n + i]
  local t = redis.call('TYPE', set).ok
  if t ~= 'set' and t ~= 'none' then redis.call('DEL', set) end
  redis.call('SADD', set, KEYS[1])
  if redis.call('PTTL', set) < px then redis.call('PEXPIRE', set, px) end
end
return 1
",
    )
});

/// Bumps each group's generation and deletes its entries (KEYS: generation and set, in
/// pairs; ARGV[1]: how long a generation is kept, in ms; ARGV[2]: what every entry key of
/// this deployment starts with). Only a set's members that are this deployment's entry keys
/// are deleted: a set is a list anyone with access to Redis may have added any key to. A
/// generation or a set of the wrong type is replaced. Answers the entries deleted and the
/// keys replaced.
pub(super) static INVALIDATE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    script(
        r"
local removed, replaced = 0, 0
local prefix = ARGV[2]
for i = 1, #KEYS, 2 do
  local gen = count(KEYS[i])
  if gen == nil then gen = 0; replaced = replaced + 1 end
  redis.call('SET', KEYS[i], string.format('%d', gen + 1), 'PX', ARGV[1])
  local t = redis.call('TYPE', KEYS[i + 1]).ok
  if t == 'set' then
    for _, entry in ipairs(redis.call('SMEMBERS', KEYS[i + 1])) do
      if string.sub(entry, 1, #prefix) == prefix then
        removed = removed + redis.call('DEL', entry)
      end
    end
  elseif t ~= 'none' then
    replaced = replaced + 1
  end
  redis.call('DEL', KEYS[i + 1])
end
return {removed, replaced}
",
    )
});

/// Bumps the global generation (KEYS[1]) past both what it holds and ARGV[1], the highest
/// this replica has seen: a lost or reset counter never takes a purge back. A key of another
/// type, or not a count, is replaced. Answers the new generation and 1 when it replaced one.
pub(super) static BUMP_ALL: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    script(
        r"
local gen, replaced = count(KEYS[1]), 0
if gen == nil then gen = 0; replaced = 1 end
local floor = tonumber(ARGV[1])
if gen < floor then gen = floor end
redis.call('SET', KEYS[1], string.format('%d', gen + 1))
return {gen + 1, replaced}
",
    )
});

/// Raises the global generation (KEYS[1]) to ARGV[1] when it holds less (it was lost,
/// evicted or reset) or something that is not a count; answers the generation it holds now
/// and 1 when it had to be set.
pub(super) static RAISE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    script(
        r"
local gen = count(KEYS[1])
local floor = tonumber(ARGV[1])
if gen == nil or gen < floor then
  redis.call('SET', KEYS[1], ARGV[1])
  return {floor, 1}
end
return {gen, 0}
",
    )
});

/// Releases a fill lock and leaves, in the same step, the note of the failed call its holder
/// made (KEYS[1]: the lock, KEYS[2]: the note; ARGV[1]: the lock's value, ARGV[2]: the note,
/// ARGV[3]: the note's life in ms): only while the lock is still this holder's, so a
/// replica that waited on it finds the note the moment it sees the lock gone. Answers 1
/// when released.
pub(super) static RELEASE_FAILED: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| {
        script(
            r"
if redis.pcall('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
return 1
",
        )
    });
