//! LRU cache with per-entry TTL and a byte budget.
//!
//! Layout: entries live in a slab (`Vec<Slot>`) linked into one recency list by `u32` indices; a
//! `hashbrown::HashTable<u32>` maps a key's hash to its slot. Key and value share one heap
//! allocation (`[tag, key..., value...]`), so an entry costs one `malloc` and ~40 bytes of slot.
//!
//! Expiry: an entry with a deadline also sits in an indexed min-heap of `(deadline, slot)` (each slot
//! knows its heap position, so eviction, deletion and TTL updates remove or move its item in
//! O(log n) and the heap never holds stale items). Expired entries are never returned (`get` checks
//! the deadline) and are reclaimed from the top of the heap, a bounded number per write
//! ([`EXPIRE_PER_WRITE`]) plus however many a write needs to fit — no full scan ever. (A lazy heap
//! that left stale items and compacted them spent over half of a set-with-eviction in compaction.)
//!
//! Shared values: a cache may also hold a value as an immutable object of its user's (the Python
//! binding's `bytes`, through [`SharedValue`]), so that reads hand out that object instead of a
//! copy. [`LruCache::get_shared`] turns an inline value into a shared one on its first read (the
//! slot's allocation shrinks to the key), so entries never read stay compact and entries read keep
//! costing nothing per read; [`LruCache::set_shared`] stores a caller's object without copying it.
//! Plain Rust users keep every value inline ([`Inline`], the default, adds nothing to a slot).
//!
//! Byte accounting: each entry is charged `key length + value length + ENTRY_OVERHEAD`, and
//! `bytes() <= max_bytes()` holds after every operation.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::error::{invalid, Result};

/// Bytes charged per entry on top of its key and value: the slot (48 with shared values), the
/// allocation's malloc header and rounding (~16), the hash-table bucket (~8) and the expiry-heap item
/// (16); a shared value adds its object's header (a Python `bytes`: 33, rounded to 48 by pymalloc).
/// Measured at 1M entries (`bench/bench_cache.py::test_memory_overhead`): ~85 bytes for entries
/// never read, ~130 for entries read once (value held as a `bytes`); 96 splits the difference.
pub const ENTRY_OVERHEAD: u64 = 96;

/// How many expired entries a write reclaims beyond what it needs for room. Keeps each write's
/// worst case bounded while still draining a burst of expiries within a few writes.
pub const EXPIRE_PER_WRITE: usize = 16;

const NIL: u32 = u32::MAX;
const NO_DEADLINE: u64 = u64::MAX;

/// Keys from Python are `str` or `bytes`; equal contents of different types are different keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum KeyKind {
    Str = 0,
    Bytes = 1,
}

/// A value held as its owner's immutable object, readable as bytes for as long as it lives.
pub trait SharedValue {
    fn bytes(&self) -> &[u8];
}

/// No shared values: every value is copied into the cache (an uninhabited type, so `Option<Inline>`
/// takes no room in a slot).
pub enum Inline {}

impl SharedValue for Inline {
    fn bytes(&self) -> &[u8] {
        match *self {}
    }
}

struct Slot<S> {
    /// `[kind, key bytes..., value bytes...]`, or `[kind, key bytes...]` when the value is `shared`;
    /// empty when the slot is free.
    data: Box<[u8]>,
    shared: Option<S>,
    /// Length of the key part of `data`, including the kind byte.
    key_len: u32,
    prev: u32,
    /// Next towards the LRU end; for a free slot, the next free slot.
    next: u32,
    /// Monotonic nanoseconds after which the entry is gone; `NO_DEADLINE` for none.
    deadline: u64,
    /// Index of this entry's item in the expiry heap; `NIL` when it has no deadline.
    heap_pos: u32,
}

impl<S: SharedValue> Slot<S> {
    #[inline]
    fn key(&self) -> &[u8] {
        &self.data[..self.key_len as usize]
    }
    #[inline]
    fn value(&self) -> &[u8] {
        match &self.shared {
            Some(s) => s.bytes(),
            None => &self.data[self.key_len as usize..],
        }
    }
    #[inline]
    fn charge(&self) -> u64 {
        // kind byte is bookkeeping, not the caller's key
        LruCache::<S>::charge_for(self.key_len as usize - 1, self.value().len())
    }
    #[inline]
    fn matches(&self, kind: KeyKind, key: &[u8]) -> bool {
        let k = self.key();
        k.len() == key.len() + 1 && k[0] == kind as u8 && bytes_eq(&k[1..], key)
    }
}

/// Counters returned by [`LruCache::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    /// Entries removed to make room (byte budget or entry limit).
    pub evictions: u64,
    /// Entries removed because their TTL ran out.
    pub expirations: u64,
    pub bytes: u64,
    pub entries: u64,
}

/// What a write says about expiry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ttl {
    /// Use the cache's `default_ttl` (none if it has none).
    Default,
    /// Never expires.
    Never,
    /// Expires this many nanoseconds after `now`.
    Nanos(u64),
}

pub struct LruCache<S: SharedValue = Inline> {
    table: HashTable<u32>,
    slots: Vec<Slot<S>>,
    free_head: u32,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next eviction.
    tail: u32,
    /// Min-heap of `(deadline, slot)`, indexed by `Slot::heap_pos`.
    expiry: Vec<(u64, u32)>,
    hasher: foldhash::fast::RandomState,
    max_bytes: u64,
    max_entries: usize,
    default_ttl: Option<u64>,
    stats: Stats,
}

/// A value to store: copied in, or the caller's object kept as it is.
enum NewValue<'a, S> {
    Copy(&'a [u8]),
    Shared(S),
}

impl<S: SharedValue> NewValue<'_, S> {
    fn len(&self) -> usize {
        match self {
            NewValue::Copy(v) => v.len(),
            NewValue::Shared(s) => s.bytes().len(),
        }
    }
}

impl LruCache {
    /// A cache that copies every value in. `max_bytes` > 0; `max_entries` ≥ 1 if given;
    /// `default_ttl` in nanoseconds, > 0 if given.
    pub fn new(
        max_bytes: u64,
        max_entries: Option<usize>,
        default_ttl: Option<u64>,
    ) -> Result<Self> {
        Self::with_shared_values(max_bytes, max_entries, default_ttl)
    }
}

impl<S: SharedValue> LruCache<S> {
    /// A cache that may also hold values as `S` objects ([`LruCache::get_shared`],
    /// [`LruCache::set_shared`]); arguments as [`LruCache::new`].
    pub fn with_shared_values(
        max_bytes: u64,
        max_entries: Option<usize>,
        default_ttl: Option<u64>,
    ) -> Result<Self> {
        if max_bytes == 0 {
            return Err(invalid("max_bytes must be > 0"));
        }
        if max_entries == Some(0) {
            return Err(invalid("max_entries must be >= 1"));
        }
        if default_ttl == Some(0) {
            return Err(invalid("default_ttl must be > 0"));
        }
        let max_entries = max_entries
            .unwrap_or(u32::MAX as usize - 1)
            .min(u32::MAX as usize - 1);
        Ok(LruCache {
            table: HashTable::new(),
            slots: Vec::new(),
            free_head: NIL,
            head: NIL,
            tail: NIL,
            expiry: Vec::new(),
            hasher: foldhash::fast::RandomState::default(),
            max_bytes,
            max_entries,
            default_ttl,
            stats: Stats::default(),
        })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
    pub fn max_entries(&self) -> Option<usize> {
        (self.max_entries != u32::MAX as usize - 1).then_some(self.max_entries)
    }
    pub fn default_ttl(&self) -> Option<u64> {
        self.default_ttl
    }
    /// Number of stored entries, including expired ones not reclaimed yet.
    pub fn len(&self) -> usize {
        self.stats.entries as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> u64 {
        self.stats.bytes
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// What `set` would charge for this key and value.
    pub fn charge_for(key_len: usize, value_len: usize) -> u64 {
        key_len as u64 + value_len as u64 + ENTRY_OVERHEAD
    }

    #[inline]
    fn hash(&self, kind: KeyKind, key: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        std::hash::Hasher::write_u8(&mut h, kind as u8);
        std::hash::Hasher::write(&mut h, key);
        std::hash::Hasher::finish(&h)
    }

    #[inline]
    fn find(&self, hash: u64, kind: KeyKind, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| slots[i as usize].matches(kind, key))
            .copied()
    }

    /// Look a key up, counting a hit or a miss; a hit becomes the most recently used.
    ///
    /// `now` is only called when the entry found has a deadline, so misses and entries without TTL
    /// never pay for a clock read.
    #[inline]
    pub fn get(&mut self, kind: KeyKind, key: &[u8], now: impl FnOnce() -> u64) -> Option<&[u8]> {
        let i = self.lookup(kind, key, now)?;
        Some(self.slots[i as usize].value())
    }

    /// As [`LruCache::get`], but the value comes back as a shared object: an inline value is turned
    /// into one by `share` on its first read (its copy in the slot is then freed), so later reads
    /// return the same object.
    #[inline]
    pub fn get_shared(
        &mut self,
        kind: KeyKind,
        key: &[u8],
        now: impl FnOnce() -> u64,
        share: impl FnOnce(&[u8]) -> S,
    ) -> Option<&S> {
        let i = self.lookup(kind, key, now)?;
        let slot = &mut self.slots[i as usize];
        if slot.shared.is_none() {
            let shared = share(slot.value());
            slot.data = slot.key().into();
            slot.shared = Some(shared);
        }
        slot.shared.as_ref()
    }

    /// The live slot of a key, counting a hit or a miss; a hit becomes the most recently used.
    #[inline]
    fn lookup(&mut self, kind: KeyKind, key: &[u8], now: impl FnOnce() -> u64) -> Option<u32> {
        let hash = self.hash(kind, key);
        let Some(i) = self.find(hash, kind, key) else {
            self.stats.misses += 1;
            return None;
        };
        let deadline = self.slots[i as usize].deadline;
        if deadline != NO_DEADLINE && deadline <= now() {
            // Expired: reclaim it now rather than waiting for the heap to reach it.
            self.remove_slot(hash, i);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            return None;
        }
        self.stats.hits += 1;
        self.touch(i);
        Some(i)
    }

    /// Whether a live entry exists; changes neither recency nor counters.
    pub fn contains(&self, kind: KeyKind, key: &[u8], now: u64) -> bool {
        let hash = self.hash(kind, key);
        self.find(hash, kind, key)
            .is_some_and(|i| self.slots[i as usize].deadline > now)
    }

    /// Remaining lifetime of a live entry: `None` if absent or expired, `Some(None)` if it never
    /// expires, `Some(Some(ns))` otherwise.
    pub fn ttl(&self, kind: KeyKind, key: &[u8], now: u64) -> Option<Option<u64>> {
        let hash = self.hash(kind, key);
        let slot = &self.slots[self.find(hash, kind, key)? as usize];
        match slot.deadline {
            NO_DEADLINE => Some(None),
            d if d > now => Some(Some(d - now)),
            _ => None,
        }
    }

    /// Insert or replace, copying `value`. Fails (changing nothing) if the entry alone exceeds the
    /// byte budget.
    pub fn set(
        &mut self,
        kind: KeyKind,
        key: &[u8],
        value: &[u8],
        ttl: Ttl,
        now: u64,
    ) -> Result<()> {
        self.store(kind, key, NewValue::Copy(value), ttl, now)
    }

    /// Insert or replace, keeping `value` itself (no copy); as [`LruCache::set`] otherwise. On
    /// failure `value` is dropped.
    pub fn set_shared(
        &mut self,
        kind: KeyKind,
        key: &[u8],
        value: S,
        ttl: Ttl,
        now: u64,
    ) -> Result<()> {
        self.store(kind, key, NewValue::Shared(value), ttl, now)
    }

    fn store(
        &mut self,
        kind: KeyKind,
        key: &[u8],
        value: NewValue<'_, S>,
        ttl: Ttl,
        now: u64,
    ) -> Result<()> {
        let charge = Self::charge_for(key.len(), value.len());
        if charge > self.max_bytes {
            return Err(too_large(key.len(), value.len(), self.max_bytes));
        }
        if key.len() > u32::MAX as usize - 1 {
            return Err(invalid("key is longer than 4 GiB"));
        }
        let deadline = match ttl {
            Ttl::Default => self
                .default_ttl
                .map_or(NO_DEADLINE, |t| now.saturating_add(t)),
            Ttl::Never => NO_DEADLINE,
            Ttl::Nanos(t) => now.saturating_add(t),
        };
        let hash = self.hash(kind, key);
        if let Some(i) = self.find(hash, kind, key) {
            // Replace in place; the old charge is released before room is made for the new one.
            let old = self.slots[i as usize].charge();
            self.stats.bytes -= old;
            let slot = &mut self.slots[i as usize];
            match value {
                NewValue::Copy(v)
                    if slot.shared.is_none() && slot.data.len() == key.len() + 1 + v.len() =>
                {
                    slot.data[key.len() + 1..].copy_from_slice(v);
                }
                NewValue::Copy(v) => {
                    slot.shared = None;
                    slot.data = pack(kind, key, v);
                }
                NewValue::Shared(s) => {
                    if slot.shared.is_none() {
                        slot.data = slot.key().into();
                    }
                    slot.shared = Some(s);
                }
            }
            slot.deadline = deadline;
            self.stats.bytes += charge;
            self.touch(i);
            self.heap_update(i);
            // Make room without evicting the entry just written.
            self.make_room(0, 0, now, Some(i));
            return Ok(());
        }
        self.make_room(charge, 1, now, None);
        let (data, shared) = match value {
            NewValue::Copy(v) => (pack(kind, key, v), None),
            NewValue::Shared(s) => (pack(kind, key, &[]), Some(s)),
        };
        let i = self.alloc_slot(Slot {
            data,
            shared,
            key_len: key.len() as u32 + 1,
            prev: NIL,
            next: NIL,
            deadline,
            heap_pos: NIL,
        });
        let slots = &self.slots;
        let hasher = &self.hasher;
        self.table
            .insert_unique(hash, i, |&j| rehash(hasher, slots[j as usize].key()));
        self.link_front(i);
        self.stats.bytes += charge;
        self.stats.entries += 1;
        self.heap_update(i);
        Ok(())
    }

    /// Remove a key; `true` if a live entry was removed.
    pub fn delete(&mut self, kind: KeyKind, key: &[u8], now: u64) -> bool {
        let hash = self.hash(kind, key);
        match self.find(hash, kind, key) {
            Some(i) => {
                let live = self.slots[i as usize].deadline > now;
                self.remove_slot(hash, i);
                if !live {
                    self.stats.expirations += 1;
                }
                live
            }
            None => false,
        }
    }

    /// Drop every entry (counters other than bytes/entries are kept).
    pub fn clear(&mut self) {
        self.table.clear();
        self.slots.clear();
        self.expiry.clear();
        self.free_head = NIL;
        self.head = NIL;
        self.tail = NIL;
        self.stats.bytes = 0;
        self.stats.entries = 0;
    }

    /// Reclaim up to `limit` expired entries (a background sweeper can call this); returns how many.
    pub fn purge_expired(&mut self, now: u64, limit: usize) -> usize {
        let mut n = 0;
        while n < limit && self.expire_one(now) {
            n += 1;
        }
        n
    }

    /// Keys from most to least recently used, as `(kind, key)` — for inspection and tests.
    pub fn keys_mru(&self) -> Vec<(KeyKind, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.len());
        let mut i = self.head;
        while i != NIL {
            let s = &self.slots[i as usize];
            let kind = if s.data[0] == KeyKind::Str as u8 {
                KeyKind::Str
            } else {
                KeyKind::Bytes
            };
            out.push((kind, s.key()[1..].to_vec()));
            i = s.next;
        }
        out
    }

    /// Evict until `extra_bytes` and `extra_entries` more fit; never evicts `keep`.
    fn make_room(&mut self, extra_bytes: u64, extra_entries: usize, now: u64, keep: Option<u32>) {
        let mut spare_expiries = EXPIRE_PER_WRITE;
        loop {
            let over = self.stats.bytes + extra_bytes > self.max_bytes
                || self.len() + extra_entries > self.max_entries;
            if !over && spare_expiries == 0 {
                return;
            }
            // Expired entries go first: they are dead weight whatever their recency.
            if self.expire_one(now) {
                if !over {
                    spare_expiries -= 1;
                }
                continue;
            }
            if !over {
                return;
            }
            let victim = if self.tail == keep.unwrap_or(NIL) {
                self.slots[self.tail as usize].prev
            } else {
                self.tail
            };
            debug_assert!(
                victim != NIL,
                "the budget check guarantees the new entry fits alone"
            );
            if victim == NIL {
                return;
            }
            let hash = rehash(&self.hasher, self.slots[victim as usize].key());
            self.remove_slot(hash, victim);
            self.stats.evictions += 1;
        }
    }

    /// Reclaim the entry at the top of the heap if its deadline has passed.
    fn expire_one(&mut self, now: u64) -> bool {
        match self.expiry.first() {
            Some(&(deadline, i)) if deadline <= now => {
                let hash = rehash(&self.hasher, self.slots[i as usize].key());
                self.remove_slot(hash, i);
                self.stats.expirations += 1;
                true
            }
            _ => false,
        }
    }

    /// Put slot `i`'s heap item in line with its deadline: insert, move or remove it.
    fn heap_update(&mut self, i: u32) {
        let (deadline, pos) = {
            let s = &self.slots[i as usize];
            (s.deadline, s.heap_pos)
        };
        match (deadline != NO_DEADLINE, pos != NIL) {
            (true, false) => {
                self.expiry.push((deadline, i));
                let at = self.expiry.len() - 1;
                self.slots[i as usize].heap_pos = at as u32;
                self.sift_up(at);
            }
            (true, true) => {
                self.expiry[pos as usize].0 = deadline;
                let at = self.sift_up(pos as usize);
                self.sift_down(at);
            }
            (false, true) => self.heap_remove(i),
            (false, false) => {}
        }
    }

    fn heap_remove(&mut self, i: u32) {
        let pos = self.slots[i as usize].heap_pos as usize;
        self.slots[i as usize].heap_pos = NIL;
        let last = self.expiry.len() - 1;
        if pos != last {
            self.expiry.swap(pos, last);
            self.expiry.pop();
            self.slots[self.expiry[pos].1 as usize].heap_pos = pos as u32;
            let at = self.sift_up(pos);
            self.sift_down(at);
        } else {
            self.expiry.pop();
        }
    }

    /// Move the item at `at` towards the root while it is earlier than its parent; returns where it
    /// ended.
    fn sift_up(&mut self, mut at: usize) -> usize {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.expiry[parent].0 <= self.expiry[at].0 {
                break;
            }
            self.heap_swap(at, parent);
            at = parent;
        }
        at
    }

    fn sift_down(&mut self, mut at: usize) {
        let n = self.expiry.len();
        loop {
            let (l, r) = (2 * at + 1, 2 * at + 2);
            let mut min = at;
            if l < n && self.expiry[l].0 < self.expiry[min].0 {
                min = l;
            }
            if r < n && self.expiry[r].0 < self.expiry[min].0 {
                min = r;
            }
            if min == at {
                return;
            }
            self.heap_swap(at, min);
            at = min;
        }
    }

    #[inline]
    fn heap_swap(&mut self, a: usize, b: usize) {
        self.expiry.swap(a, b);
        self.slots[self.expiry[a].1 as usize].heap_pos = a as u32;
        self.slots[self.expiry[b].1 as usize].heap_pos = b as u32;
    }

    fn remove_slot(&mut self, hash: u64, i: u32) {
        if let Ok(entry) = self.table.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        self.unlink(i);
        if self.slots[i as usize].heap_pos != NIL {
            self.heap_remove(i);
        }
        let slot = &mut self.slots[i as usize];
        self.stats.bytes -= slot.charge();
        self.stats.entries -= 1;
        slot.data = Box::default();
        slot.shared = None;
        slot.deadline = NO_DEADLINE;
        slot.next = self.free_head;
        self.free_head = i;
    }

    fn alloc_slot(&mut self, slot: Slot<S>) -> u32 {
        if self.free_head != NIL {
            let i = self.free_head;
            self.free_head = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            i
        } else {
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        }
    }

    #[inline]
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.link_front(i);
        }
    }

    #[inline]
    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        if prev != NIL {
            self.slots[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
    }

    #[inline]
    fn link_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        if old != NIL {
            self.slots[old as usize].prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }
}

/// Equality of two slices of the same length. Keys are mostly short, where a `memcmp` call through the
/// PLT costs more than the comparison (4% of a `get` hit in a perf profile); compare 8 bytes at a time
/// inline instead.
#[inline(always)]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    debug_assert_eq!(a.len(), b.len());
    if a.len() > 32 {
        return a == b;
    }
    let (mut a, mut b) = (a, b);
    while a.len() >= 8 {
        let (x, rest_a) = a.split_at(8);
        let (y, rest_b) = b.split_at(8);
        if u64::from_ne_bytes(x.try_into().unwrap_or_default())
            != u64::from_ne_bytes(y.try_into().unwrap_or_default())
        {
            return false;
        }
        a = rest_a;
        b = rest_b;
    }
    a == b
}

fn rehash(hasher: &foldhash::fast::RandomState, tagged_key: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    std::hash::Hasher::write_u8(&mut h, tagged_key[0]);
    std::hash::Hasher::write(&mut h, &tagged_key[1..]);
    std::hash::Hasher::finish(&h)
}

fn pack(kind: KeyKind, key: &[u8], value: &[u8]) -> Box<[u8]> {
    let mut v = Vec::with_capacity(1 + key.len() + value.len());
    v.push(kind as u8);
    v.extend_from_slice(key);
    v.extend_from_slice(value);
    v.into_boxed_slice()
}

#[cold]
#[inline(never)]
fn too_large(key_len: usize, value_len: usize, max_bytes: u64) -> crate::error::Error {
    invalid(format!(
        "entry of {} bytes (key {key_len} + value {value_len} + overhead {ENTRY_OVERHEAD}) exceeds max_bytes={max_bytes}",
        LruCache::<Inline>::charge_for(key_len, value_len)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cache(max_bytes: u64) -> LruCache {
        LruCache::new(max_bytes, None, None).unwrap()
    }

    #[test]
    fn get_set_delete_roundtrip() {
        let mut c = cache(10_000);
        c.set(KeyKind::Str, b"a", b"1", Ttl::Default, 1).unwrap();
        assert_eq!(c.get(KeyKind::Str, b"a", || 1), Some(&b"1"[..]));
        assert_eq!(
            c.get(KeyKind::Bytes, b"a", || 1),
            None,
            "str and bytes keys are distinct"
        );
        assert!(c.delete(KeyKind::Str, b"a", 1));
        assert!(!c.delete(KeyKind::Str, b"a", 1));
        assert_eq!(c.len(), 0);
        assert_eq!(c.bytes(), 0);
        let st = c.stats();
        assert_eq!((st.hits, st.misses), (1, 1));
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let per = LruCache::<Inline>::charge_for(1, 10);
        let mut c = cache(per * 3);
        for k in [b"a", b"b", b"c"] {
            c.set(KeyKind::Str, k, &[0; 10], Ttl::Default, 1).unwrap();
        }
        c.get(KeyKind::Str, b"a", || 1); // a is now MRU; b is LRU
        c.set(KeyKind::Str, b"d", &[0; 10], Ttl::Default, 1)
            .unwrap();
        assert!(!c.contains(KeyKind::Str, b"b", 1));
        assert!(c.contains(KeyKind::Str, b"a", 1));
        assert_eq!(c.stats().evictions, 1);
        assert!(c.bytes() <= c.max_bytes());
    }

    #[test]
    fn oversized_value_is_rejected_and_changes_nothing() {
        let mut c = cache(200);
        c.set(KeyKind::Str, b"a", b"x", Ttl::Default, 1).unwrap();
        let before = c.stats();
        assert!(c
            .set(KeyKind::Str, b"b", &[0; 500], Ttl::Default, 1)
            .is_err());
        assert_eq!(c.stats(), before);
    }

    #[test]
    fn replacing_with_a_bigger_value_evicts_others_not_itself() {
        let per = LruCache::<Inline>::charge_for(1, 10);
        let mut c = cache(per * 3);
        for k in [b"a", b"b", b"c"] {
            c.set(KeyKind::Str, k, &[0; 10], Ttl::Default, 1).unwrap();
        }
        c.set(KeyKind::Str, b"a", &[1; 40], Ttl::Default, 1)
            .unwrap();
        assert!(c.contains(KeyKind::Str, b"a", 1));
        assert_eq!(c.get(KeyKind::Str, b"a", || 1).unwrap(), &[1; 40][..]);
        assert!(c.bytes() <= c.max_bytes());
    }

    #[test]
    fn ttl_expiry_and_reclaim() {
        let mut c = LruCache::<Inline>::new(1 << 20, None, Some(10 * S)).unwrap();
        c.set(KeyKind::Str, b"a", b"1", Ttl::Default, 0).unwrap();
        c.set(KeyKind::Str, b"b", b"1", Ttl::Nanos(S), 0).unwrap();
        c.set(KeyKind::Str, b"c", b"1", Ttl::Never, 0).unwrap();
        assert_eq!(c.ttl(KeyKind::Str, b"a", 0), Some(Some(10 * S)));
        assert_eq!(c.ttl(KeyKind::Str, b"c", 0), Some(None));
        assert_eq!(c.get(KeyKind::Str, b"b", || 2 * S), None);
        assert_eq!(c.stats().expirations, 1);
        // a expires at 10 s; a write after that reclaims it without anyone reading it
        c.set(KeyKind::Str, b"d", b"1", Ttl::Never, 11 * S).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.stats().expirations, 2);
    }

    /// The heap holds exactly one item per entry with a deadline, each knowing its position, and
    /// satisfies the heap order.
    fn check_heap(c: &LruCache) {
        let with_deadline = c
            .slots
            .iter()
            .filter(|s| !s.data.is_empty() && s.deadline != NO_DEADLINE)
            .count();
        assert_eq!(c.expiry.len(), with_deadline);
        for (pos, &(d, i)) in c.expiry.iter().enumerate() {
            assert_eq!(c.slots[i as usize].heap_pos as usize, pos);
            assert_eq!(c.slots[i as usize].deadline, d);
            if pos > 0 {
                assert!(c.expiry[(pos - 1) / 2].0 <= d);
            }
        }
    }

    #[test]
    fn heap_stays_exact_under_rewrites_evictions_and_deletes() {
        let mut c =
            LruCache::<Inline>::new(LruCache::<Inline>::charge_for(3, 1) * 50, None, Some(S))
                .unwrap();
        for n in 0..20_000u64 {
            let key = format!("{:03}", (n * 7919) % 120);
            let ttl = match n % 4 {
                0 => Ttl::Never,
                1 => Ttl::Nanos(S * (n % 13 + 1)),
                _ => Ttl::Default,
            };
            c.set(KeyKind::Str, key.as_bytes(), b"v", ttl, n * 1000)
                .unwrap();
            if n % 5 == 0 {
                c.delete(KeyKind::Str, format!("{:03}", n % 120).as_bytes(), n * 1000);
            }
            if n % 1000 == 0 {
                check_heap(&c);
            }
        }
        check_heap(&c);
        c.purge_expired(u64::MAX, usize::MAX);
        check_heap(&c);
    }

    #[test]
    fn entry_limit_is_enforced() {
        let mut c = LruCache::<Inline>::new(1 << 20, Some(2), None).unwrap();
        for k in [b"a", b"b", b"c"] {
            c.set(KeyKind::Bytes, k, b"v", Ttl::Default, 1).unwrap();
        }
        assert_eq!(c.len(), 2);
        let keys: Vec<_> = c.keys_mru().into_iter().map(|(_, k)| k).collect();
        assert_eq!(keys, vec![b"c".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn invalid_construction() {
        assert!(LruCache::<Inline>::new(0, None, None).is_err());
        assert!(LruCache::<Inline>::new(1, Some(0), None).is_err());
        assert!(LruCache::<Inline>::new(1, None, Some(0)).is_err());
    }

    /// A shared value that counts how many of its kind are alive (to see the cache drop them).
    struct Counted(Vec<u8>, std::rc::Rc<std::cell::Cell<usize>>);

    impl Counted {
        fn new(v: &[u8], live: &std::rc::Rc<std::cell::Cell<usize>>) -> Self {
            live.set(live.get() + 1);
            Counted(v.to_vec(), live.clone())
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.set(self.1.get() - 1);
        }
    }

    impl SharedValue for Counted {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
    }

    #[test]
    fn first_read_shares_the_value_and_later_reads_reuse_it() {
        let live = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut c: LruCache<Counted> = LruCache::with_shared_values(10_000, None, None).unwrap();
        c.set(KeyKind::Str, b"k", b"value", Ttl::Default, 1)
            .unwrap();
        let charged = c.bytes();
        let mut made = 0;
        for _ in 0..3 {
            let v = c.get_shared(
                KeyKind::Str,
                b"k",
                || 1,
                |v| {
                    made += 1;
                    Counted::new(v, &live)
                },
            );
            assert_eq!(v.map(|v| v.bytes()), Some(&b"value"[..]));
        }
        assert_eq!(made, 1, "made once, then reused");
        assert_eq!(live.get(), 1);
        let slot = &c.slots[c
            .find(c.hash(KeyKind::Str, b"k"), KeyKind::Str, b"k")
            .unwrap() as usize];
        assert_eq!(&slot.data[..], b"\x00k", "the inline copy is freed");
        assert_eq!(c.bytes(), charged, "sharing changes no accounting");
        assert_eq!(c.get(KeyKind::Str, b"k", || 1), Some(&b"value"[..]));
        assert_eq!(c.stats().hits, 4);
        assert!(c
            .get_shared(KeyKind::Str, b"missing", || 1, |v| Counted::new(v, &live))
            .is_none());
        assert_eq!(c.stats().misses, 1);
    }

    #[test]
    fn shared_values_are_replaced_evicted_and_dropped() {
        let live = std::rc::Rc::new(std::cell::Cell::new(0));
        let per_entry = LruCache::<Counted>::charge_for(1, 4);
        let mut c: LruCache<Counted> =
            LruCache::with_shared_values(2 * per_entry, None, None).unwrap();
        c.set_shared(
            KeyKind::Bytes,
            b"a",
            Counted::new(b"aaaa", &live),
            Ttl::Default,
            1,
        )
        .unwrap();
        assert_eq!(c.bytes(), per_entry);
        assert_eq!(c.get(KeyKind::Bytes, b"a", || 1), Some(&b"aaaa"[..]));
        // Replaced by a copy: the object goes, the value is inline again.
        c.set(KeyKind::Bytes, b"a", b"AAAA", Ttl::Default, 1)
            .unwrap();
        assert_eq!(live.get(), 0);
        assert_eq!(c.get(KeyKind::Bytes, b"a", || 1), Some(&b"AAAA"[..]));
        // Replaced by another object of a different size: accounting follows.
        c.set_shared(
            KeyKind::Bytes,
            b"a",
            Counted::new(b"aa", &live),
            Ttl::Default,
            1,
        )
        .unwrap();
        assert_eq!(c.bytes(), per_entry - 2);
        c.set_shared(
            KeyKind::Bytes,
            b"b",
            Counted::new(b"bbbb", &live),
            Ttl::Default,
            1,
        )
        .unwrap();
        c.set_shared(
            KeyKind::Bytes,
            b"c",
            Counted::new(b"cccc", &live),
            Ttl::Default,
            1,
        )
        .unwrap();
        assert_eq!(c.len(), 2, "the LRU entry was evicted");
        assert_eq!(live.get(), 2, "and its object dropped");
        assert!(c.delete(KeyKind::Bytes, b"b", 1));
        assert_eq!(live.get(), 1);
        let too_big = Counted::new(&vec![0; 2 * per_entry as usize], &live);
        assert!(c
            .set_shared(KeyKind::Bytes, b"d", too_big, Ttl::Default, 1)
            .is_err());
        assert_eq!(live.get(), 1, "a refused object is dropped");
        c.clear();
        assert_eq!(live.get(), 0);
    }
}
