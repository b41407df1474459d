//! Sliding-window rate-limit counters keyed by `str | bytes`, in two modes.
//!
//! **Counter mode** (the default; O(1) per hit, one small slot per key) is the sliding-window counter
//! of HAProxy's `http_req_rate` and of Cloudflare's "How we built rate limiting capable of scaling to
//! millions of domains" (<https://blog.cloudflare.com/counting-things-a-lot-of-different-things/>).
//! Time is cut into fixed windows of length `W` aligned on multiples of `W`; a key keeps the count of
//! the current window `C` and of the previous one `P`. At offset `e` into the current window the
//! number of hits in the last `W` is estimated as `⌊P·(W−e)/W⌋ + C` — the previous window's hits are
//! assumed evenly spread, and the share of them still inside the last `W` is rounded down to whole
//! hits — and a hit of cost `c` is allowed iff `estimate + c ≤ L` (`L` = limit). Rounding down is
//! what lets a key under sustained overload get exactly `L` per window: with the unrounded estimate
//! the last unit never fits before the window ends (`L − 1` per window, and `limit=1` would pass one
//! hit every other window). Everything is integer arithmetic (`u128`), so the Python model in
//! `tests/model_window.py` reproduces every decision, `remaining` and `retry_after` exactly.
//! That math is one function, [`counter_decide`]; [`crate::shared_window`] (the same counters in
//! shared memory, for all the worker processes of a machine) calls it too.
//!
//! Error bound of counter mode:
//! - *Uniform traffic*: if the previous window's hits were evenly spread, `P·(W−e)/W` is how many of
//!   them are still inside the last `W`, up to where the grid of hits falls: the estimate is
//!   within one hit of the true sliding count.
//! - *Over-admission*: an interval of length `W` overlaps at most two fixed windows `k−1` and `k`.
//!   It holds at most `P ≤ L` hits of window `k−1` (a window's own count never exceeds `L`: `C + c ≤
//!   L` for every charge), and the hits admitted in window `k` up to offset `e` satisfy
//!   `C ≤ L − ⌊P·(W−e)/W⌋`. So it holds at most `P + C ≤ L + ⌈P·e/W⌉ ≤ 2L` hits: **at most `2L` in
//!   any interval of length `W`** (at most `L + ⌈P·e/W⌉` in `(t − W, t]` at offset `e`), and never
//!   more than `L` in one fixed window, so at most `L` per `W` over long spans. The `2L` needs `L`
//!   hits in the last nanoseconds of one window and `L` more in the last nanoseconds of the next
//!   (a test builds it).
//! - *Under-admission*: a burst at the start of the previous window keeps weighing on the estimate
//!   after it has slid out, so the counter can deny while fewer than `L` hits are in the last `W`; it
//!   never denies while `P + C + c ≤ L`.
//!
//! **Exact mode** keeps a log of `(timestamp, cost)` per key (hits at the same nanosecond merge into
//! one entry) and allows a hit iff the costs logged in `(now − W, now]` plus its cost are `≤ L`, which
//! gives: never more than `L` in *any* half-open interval `[a, a + W)`. Memory per key is one entry
//! per distinct hit time in the last `W`, so up to `L` entries.
//!
//! A denied hit charges nothing. `retry_after` is the wait until the same hit would be allowed if no
//! other hit came: exact in both modes (counter mode solves the interpolation for `e`); `None` when
//! `cost > L` (it can never pass).
//!
//! [`hit_all`] checks several `(limiter, key)` pairs (global, route, user...) and charges all of
//! them or none: every pair is decided first, then charged; a pair listed twice is checked with
//! its combined cost. The binding locks each distinct limiter once, in address order.
//!
//! Time: `now` is monotonic nanoseconds ([`crate::clock`]); each limiter keeps the latest `now` it
//! has seen and treats an earlier one as that latest, so a clock going backwards changes nothing.
//!
//! Idle keys: key slots live in a slab linked in order of their last charge (as in
//! [`crate::cache`]), so keys that can no longer affect a decision — counter mode: no charge in the
//! current or previous window; exact mode: last entry older than `W` — are a suffix of that list.
//! Each hit drops up to [`SWEEP_PER_HIT`] of them from the tail (no scan), so every new key pays for
//! removing idle ones and the table never holds more than one key beyond the most keys that were
//! ever live at once; [`SlidingWindow::len`] drops all idle keys before counting. Dropping an idle
//! key changes no answer: its state is the same as an absent key's.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::ops::DerefMut;

use hashbrown::HashTable;

pub use crate::cache::KeyKind;
use crate::error::{invalid, Result};

/// How many idle keys a hit removes from the tail of the recency list, at most.
pub const SWEEP_PER_HIT: usize = 8;

const NIL: u32 = u32::MAX;

/// What a hit (or a peek) decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Whole units still available after this hit (before it, when denied).
    pub remaining: u64,
    /// Nanoseconds until the same hit would be allowed: `Some(0)` when allowed, `None` if never
    /// (`cost > limit`).
    pub retry_after: Option<u64>,
}

/// The outcome of [`hit_all`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllDecision {
    pub allowed: bool,
    /// Index (into the checks) of the first check that denies.
    pub first_denied: Option<usize>,
    /// Longest wait over the denying checks (`Some(0)` when allowed, `None` if one can never pass).
    pub retry_after: Option<u64>,
    /// Smallest `remaining` over all checks: after charging when allowed, as they stand when denied.
    pub remaining: u64,
}

/// A limiter's `now`, already clamped to its clock, with its fixed window worked out once per
/// window rather than divided out on every hit.
#[derive(Clone, Copy, Debug)]
struct Now {
    ns: u64,
    /// `ns / W`
    idx: u64,
    /// `ns % W`
    e: u64,
}

/// Per-key state of one mode.
trait KeyState {
    fn empty() -> Self;
    /// Forget what has aged out by `now`; never changes what [`KeyState::decide`] answers.
    fn advance(&mut self, now: Now, window: u64);
    /// Whether a hit of `cost` at `now` fits (after [`KeyState::advance`] to `now`).
    fn decide(&self, cost: u64, limit: u64, now: Now, window: u64) -> Decision;
    fn charge(&mut self, cost: u64, now: Now);
    /// For a key charged at `now`: the time from which it can no longer influence a decision.
    fn idle_from(now: Now, window: u64) -> u64;
}

/// Counter mode: counts of the current and the previous fixed window.
struct Counter {
    /// Index of the current fixed window (`now / W`).
    idx: u64,
    prev: u64,
    cur: u64,
}

impl KeyState for Counter {
    fn empty() -> Self {
        Counter {
            idx: 0,
            prev: 0,
            cur: 0,
        }
    }

    #[inline]
    fn advance(&mut self, now: Now, _window: u64) {
        let idx = now.idx;
        if idx > self.idx {
            self.prev = if idx == self.idx + 1 { self.cur } else { 0 };
            self.cur = 0;
            self.idx = idx;
        }
    }

    #[inline]
    fn decide(&self, cost: u64, limit: u64, now: Now, window: u64) -> Decision {
        counter_decide(self.prev, self.cur, cost, limit, now.e, window)
    }

    #[inline]
    fn charge(&mut self, cost: u64, _now: Now) {
        self.cur = self.cur.saturating_add(cost);
    }

    #[inline]
    fn idle_from(now: Now, window: u64) -> u64 {
        // the start of the second fixed window after this one
        now.idx.saturating_add(2).saturating_mul(window)
    }
}

/// Exact mode: the log of charges still inside the window, oldest first.
struct Log {
    entries: VecDeque<(u64, u64)>,
    sum: u64,
}

impl KeyState for Log {
    fn empty() -> Self {
        Log {
            entries: VecDeque::new(),
            sum: 0,
        }
    }

    #[inline]
    fn advance(&mut self, now: Now, window: u64) {
        let now = now.ns;
        // An entry at `t` counts for nows in [t, t + W).
        while let Some(&(t, c)) = self.entries.front() {
            if t.saturating_add(window) > now {
                break;
            }
            self.entries.pop_front();
            self.sum -= c;
        }
    }

    #[inline]
    fn decide(&self, cost: u64, limit: u64, now: Now, window: u64) -> Decision {
        let now = now.ns;
        let remaining = limit.saturating_sub(self.sum);
        if cost <= remaining {
            return Decision {
                allowed: true,
                remaining: remaining - cost,
                retry_after: Some(0),
            };
        }
        if cost > limit {
            return Decision {
                allowed: false,
                remaining,
                retry_after: None,
            };
        }
        // Wait until enough of the oldest entries have aged out to make room for `cost`.
        let excess = cost - remaining;
        let mut freed = 0u64;
        let mut wait = 0;
        for &(t, c) in &self.entries {
            freed += c;
            if freed >= excess {
                wait = t.saturating_add(window).saturating_sub(now);
                break;
            }
        }
        Decision {
            allowed: false,
            remaining,
            retry_after: Some(wait),
        }
    }

    #[inline]
    fn charge(&mut self, cost: u64, now: Now) {
        let now = now.ns;
        match self.entries.back_mut() {
            Some((t, c)) if *t == now => *c += cost,
            _ => self.entries.push_back((now, cost)),
        }
        self.sum += cost;
    }

    #[inline]
    fn idle_from(now: Now, window: u64) -> u64 {
        now.ns.saturating_add(window)
    }
}

/// Counter mode's decision for a key whose previous and current fixed windows hold `prev` and `cur`,
/// at offset `e` (`0 ≤ e < window`) into the current one: the estimate `⌊prev·(W−e)/W⌋ + cur`,
/// its rounding and the exact `retry_after` described in the module doc. The one implementation
/// of that math: [`SlidingWindow`]'s counter mode and [`crate::shared_window`] both call it, so
/// the two agree on every answer.
#[inline]
pub fn counter_decide(prev: u64, cur: u64, cost: u64, limit: u64, e: u64, window: u64) -> Decision {
    let e64 = e;
    // ⌊P·(W−e)/W⌋, in u64 when P·W fits (the usual case: divisions by u128 are slow).
    let weighted = match prev.checked_mul(window - e64) {
        Some(0) => 0,
        Some(x) => x / window,
        None => (prev as u128 * (window - e64) as u128 / window as u128) as u64,
    };
    let w = window as u128;
    let e = e64 as u128;
    let (prev, cur) = (prev as u128, cur as u128);
    let (cost, limit) = (cost as u128, limit as u128);
    let used = weighted as u128 + cur;
    if used + cost <= limit {
        return Decision {
            allowed: true,
            remaining: to_u64(limit - used - cost),
            retry_after: Some(0),
        };
    }
    let remaining = to_u64(limit.saturating_sub(used));
    if cost > limit {
        return Decision {
            allowed: false,
            remaining,
            retry_after: None,
        };
    }
    let wait = if cur + cost <= limit {
        // Later in this window (at worst at its end, where P' = C and C + cost fits).
        // P > 0 here, else the hit would have fitted.
        first_fit(w, prev, limit - cur - cost).saturating_sub(e)
    } else {
        // Only the next window can take it; there P' = C, which is > 0 since C > L − cost.
        (w - e) + first_fit(w, cur, limit - cost)
    };
    Decision {
        allowed: false,
        remaining,
        retry_after: Some(to_u64(wait)),
    }
}

/// First offset e' into a window of `w` at which ⌊p·(W−e')/W⌋ <= s, i.e. p·(W−e') < (s+1)·W:
/// e' = W + 1 − ⌈(s+1)·W / p⌉ (clamped at 0). `p` > 0.
#[inline]
fn first_fit(w: u128, p: u128, s: u128) -> u128 {
    let num = (s + 1).saturating_mul(w);
    // u64 division when it fits: a u128 one is a slow library call
    let q = match (u64::try_from(num), u64::try_from(p)) {
        (Ok(n), Ok(d)) => n.div_ceil(d) as u128,
        _ => num.div_ceil(p),
    };
    (w + 1).saturating_sub(q)
}

/// Nanoseconds until a counter with `prev` units in the previous fixed window and `cur` in this
/// one, `e` ns into a window of `window`, no longer counts anything (its `remaining` is back to
/// the limit): this window's units weigh until the next window has slid past enough of them,
/// the previous window's until their weight rounds down to 0.
pub fn counter_reset(prev: u64, cur: u64, e: u64, window: u64) -> u64 {
    let (w, e) = (window as u128, e as u128);
    to_u64(if cur > 0 {
        (w - e) + first_fit(w, cur as u128, 0)
    } else if prev > 0 {
        first_fit(w, prev as u128, 0).saturating_sub(e)
    } else {
        0
    })
}

#[inline]
fn to_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

struct Slot<S> {
    /// `[kind, key bytes...]`; empty when the slot is free.
    key: Box<[u8]>,
    /// Towards the most recently charged key.
    prev: u32,
    /// Towards the least recently charged key; for a free slot, the next free slot.
    next: u32,
    /// From this time on the key is idle ([`KeyState::idle_from`] of its last charge); kept so the
    /// per-hit sweep compares instead of dividing.
    idle_from: u64,
    state: S,
}

impl<S> Slot<S> {
    #[inline]
    fn matches(&self, kind: KeyKind, key: &[u8]) -> bool {
        self.key.len() == key.len() + 1
            && self.key[0] == kind as u8
            && bytes_eq(&self.key[1..], key)
    }
}

/// Equal-length byte strings; short ones compared inline (8 bytes at a time) instead of through a
/// `memcmp` call, which costs more than the comparison for typical rate-limit keys.
#[inline]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n > 32 {
        return a == b;
    }
    if n < 8 {
        return a.iter().zip(b).all(|(x, y)| x == y);
    }
    let word = |s: &[u8], i: usize| u64::from_ne_bytes(s[i..i + 8].try_into().unwrap_or([0; 8]));
    let mut i = 0;
    while i + 8 < n {
        if word(a, i) != word(b, i) {
            return false;
        }
        i += 8;
    }
    // The last 8 bytes, overlapping the previous word when n is not a multiple of 8.
    word(a, n - 8) == word(b, n - 8)
}

/// Where a key is in a [`Table`]: its hash and slot (`NIL` if absent).
#[derive(Clone, Copy)]
struct Probe {
    hash: u64,
    slot: u32,
}

/// Keys → state, in a slab linked most-recently-charged first.
struct Table<S> {
    limit: u64,
    window: u64,
    map: HashTable<u32>,
    slots: Vec<Slot<S>>,
    free: u32,
    head: u32,
    tail: u32,
    len: usize,
    hasher: foldhash::quality::RandomState,
    /// The slot the last successful probe found: the same key again (a global or route level's
    /// single key, a hot user) skips hashing and the table. Checked by comparing the slot's key,
    /// so a slot freed or reused since is simply a miss here.
    last: std::cell::Cell<u32>,
}

impl<S: KeyState> Table<S> {
    fn new(limit: u64, window: u64) -> Self {
        Table {
            limit,
            window,
            map: HashTable::new(),
            slots: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            hasher: foldhash::quality::RandomState::default(),
            last: std::cell::Cell::new(NIL),
        }
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
        self.map
            .find(hash, |&i| slots[i as usize].matches(kind, key))
            .copied()
    }

    /// Decide for `key` at `now` and charge it if allowed (a cost of 0 never creates a key).
    #[inline]
    fn hit(&mut self, kind: KeyKind, key: &[u8], cost: u64, now: Now) -> Result<Decision> {
        self.sweep(now.ns, SWEEP_PER_HIT);
        let probe = self.probe(kind, key);
        let decision = self.decide(probe, cost, now);
        if decision.allowed {
            self.charge(probe, kind, key, cost, now)?;
        }
        Ok(decision)
    }

    #[inline]
    fn probe(&self, kind: KeyKind, key: &[u8]) -> Probe {
        let last = self.last.get();
        if self
            .slots
            .get(last as usize)
            .is_some_and(|s| s.matches(kind, key))
        {
            // The hash is only needed to insert a key that is not there: this one is.
            return Probe {
                hash: 0,
                slot: last,
            };
        }
        let hash = self.hash(kind, key);
        let slot = self.find(hash, kind, key).unwrap_or(NIL);
        if slot != NIL {
            self.last.set(slot);
        }
        Probe { hash, slot }
    }

    /// Whether `cost` fits for the probed key at `now`.
    #[inline]
    fn decide(&mut self, probe: Probe, cost: u64, now: Now) -> Decision {
        let (limit, window) = (self.limit, self.window);
        if probe.slot == NIL {
            return S::empty().decide(cost, limit, now, window);
        }
        let st = &mut self.slots[probe.slot as usize].state;
        st.advance(now, window);
        st.decide(cost, limit, now, window)
    }

    /// Charge `cost` (already decided to fit) to the probed key. Only inserts may happen between a
    /// probe and its charge (never a removal), so a found slot is still the key's; an absent key
    /// is looked up again, as an earlier charge in the same `hit_all` may have created it.
    #[inline]
    fn charge(
        &mut self,
        probe: Probe,
        kind: KeyKind,
        key: &[u8],
        cost: u64,
        now: Now,
    ) -> Result<()> {
        if cost == 0 {
            return Ok(());
        }
        let window = self.window;
        let i = if probe.slot != NIL {
            probe.slot
        } else {
            match self.find(probe.hash, kind, key) {
                Some(i) => i,
                None => self.insert(probe.hash, kind, key)?,
            }
        };
        let slot = &mut self.slots[i as usize];
        slot.state.advance(now, window); // a new key's state starts at time 0
        slot.state.charge(cost, now);
        slot.idle_from = S::idle_from(now, window);
        self.move_to_front(i);
        Ok(())
    }

    fn insert(&mut self, hash: u64, kind: KeyKind, key: &[u8]) -> Result<u32> {
        if self.free == NIL && self.slots.len() >= NIL as usize {
            return Err(invalid("too many keys (2^32 - 1) in one SlidingWindow"));
        }
        let mut tagged = Vec::with_capacity(key.len() + 1);
        tagged.push(kind as u8);
        tagged.extend_from_slice(key);
        let slot = Slot {
            key: tagged.into_boxed_slice(),
            prev: NIL,
            next: NIL,
            idle_from: 0,
            state: S::empty(),
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            i
        } else {
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.map
            .insert_unique(hash, i, |&j| rehash(hasher, &slots[j as usize].key));
        self.link_front(i);
        self.len += 1;
        Ok(i)
    }

    /// Remove `key`; whether it still had a say at `now` (an idle key is removed too, but whether
    /// a sweep got to it first is not observable).
    fn reset(&mut self, kind: KeyKind, key: &[u8], now: u64) -> bool {
        let hash = self.hash(kind, key);
        match self.find(hash, kind, key) {
            Some(i) => {
                let live = self.slots[i as usize].idle_from > now;
                self.remove(hash, i);
                live
            }
            None => false,
        }
    }

    /// Drop up to `budget` idle keys from the tail; returns how many.
    #[inline]
    fn sweep(&mut self, now: u64, budget: usize) -> usize {
        let mut n = 0;
        while n < budget && self.tail != NIL && self.slots[self.tail as usize].idle_from <= now {
            let i = self.tail;
            let hash = rehash(&self.hasher, &self.slots[i as usize].key);
            self.remove(hash, i);
            n += 1;
        }
        n
    }

    fn remove(&mut self, hash: u64, i: u32) {
        if let Ok(entry) = self.map.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        self.unlink(i);
        let slot = &mut self.slots[i as usize];
        slot.key = Box::default();
        slot.state = S::empty();
        slot.next = self.free;
        self.free = i;
        self.len -= 1;
    }

    #[inline]
    fn move_to_front(&mut self, i: u32) {
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

fn rehash(hasher: &foldhash::quality::RandomState, tagged_key: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    std::hash::Hasher::write_u8(&mut h, tagged_key[0]);
    std::hash::Hasher::write(&mut h, &tagged_key[1..]);
    std::hash::Hasher::finish(&h)
}

enum Keys {
    Counter(Table<Counter>),
    Exact(Table<Log>),
}

/// Rate-limit counters: at most `limit` units per `window` nanoseconds per key (see the module doc
/// for the two modes and their guarantees).
pub struct SlidingWindow {
    limit: u64,
    window: u64,
    /// Latest `now` seen; earlier ones are treated as this.
    clock: u64,
    /// The fixed window `clock` is in: `[start, start + W)`, index `idx`.
    win_start: u64,
    win_idx: u64,
    keys: Keys,
}

impl SlidingWindow {
    /// `limit` ≥ 1 units per `window` ≥ 1 ns; `exact` selects the log mode.
    pub fn new(limit: u64, window: u64, exact: bool) -> Result<Self> {
        if limit == 0 {
            return Err(invalid("limit must be >= 1"));
        }
        if window == 0 {
            return Err(invalid("window must be at least 1 ns"));
        }
        let keys = if exact {
            Keys::Exact(Table::new(limit, window))
        } else {
            Keys::Counter(Table::new(limit, window))
        };
        Ok(SlidingWindow {
            limit,
            window,
            clock: 0,
            win_start: 0,
            win_idx: 0,
            keys,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window in nanoseconds.
    pub fn window(&self) -> u64 {
        self.window
    }

    pub fn is_exact(&self) -> bool {
        matches!(self.keys, Keys::Exact(_))
    }

    #[inline]
    fn observe(&mut self, now: u64) -> Now {
        if now > self.clock {
            self.clock = now;
            if now - self.win_start >= self.window {
                self.win_idx = now / self.window;
                self.win_start = self.win_idx * self.window;
            }
        }
        Now {
            ns: self.clock,
            idx: self.win_idx,
            e: self.clock - self.win_start,
        }
    }

    /// Charge `cost` to `key` if that keeps it within the limit; a denied hit charges nothing.
    /// Fails only if a new key would not fit in the table (2^32 − 1 keys).
    #[inline]
    pub fn hit(&mut self, kind: KeyKind, key: &[u8], cost: u64, now: u64) -> Result<Decision> {
        let now = self.observe(now);
        match &mut self.keys {
            Keys::Counter(t) => t.hit(kind, key, cost, now),
            Keys::Exact(t) => t.hit(kind, key, cost, now),
        }
    }

    /// What [`SlidingWindow::hit`] would answer, charging nothing.
    #[inline]
    pub fn peek(&mut self, kind: KeyKind, key: &[u8], cost: u64, now: u64) -> Decision {
        let now = self.observe(now);
        let probe = self.probe(kind, key);
        self.decide(probe, cost, now)
    }

    #[inline]
    fn probe(&self, kind: KeyKind, key: &[u8]) -> Probe {
        match &self.keys {
            Keys::Counter(t) => t.probe(kind, key),
            Keys::Exact(t) => t.probe(kind, key),
        }
    }

    #[inline]
    fn decide(&mut self, probe: Probe, cost: u64, now: Now) -> Decision {
        match &mut self.keys {
            Keys::Counter(t) => t.decide(probe, cost, now),
            Keys::Exact(t) => t.decide(probe, cost, now),
        }
    }

    #[inline]
    fn charge(
        &mut self,
        probe: Probe,
        kind: KeyKind,
        key: &[u8],
        cost: u64,
        now: Now,
    ) -> Result<()> {
        match &mut self.keys {
            Keys::Counter(t) => t.charge(probe, kind, key, cost, now),
            Keys::Exact(t) => t.charge(probe, kind, key, cost, now),
        }
    }

    #[inline]
    fn sweep(&mut self, now: u64, budget: usize) {
        match &mut self.keys {
            Keys::Counter(t) => t.sweep(now, budget),
            Keys::Exact(t) => t.sweep(now, budget),
        };
    }

    /// Forget `key`; `true` if it was live (not idle) as of the latest `now` seen.
    pub fn reset(&mut self, kind: KeyKind, key: &[u8]) -> bool {
        let now = self.clock;
        match &mut self.keys {
            Keys::Counter(t) => t.reset(kind, key, now),
            Keys::Exact(t) => t.reset(kind, key, now),
        }
    }

    /// Number of keys that can still influence a decision: drops every idle key (as of the latest
    /// `now` seen) first.
    pub fn len(&mut self) -> usize {
        self.sweep(self.clock, usize::MAX);
        self.tracked()
    }

    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    /// Keys held right now, idle ones not swept yet included (what the memory is spent on).
    pub fn tracked(&self) -> usize {
        match &self.keys {
            Keys::Counter(t) => t.len,
            Keys::Exact(t) => t.len,
        }
    }
}

/// Check several `(limiter, key)` pairs at once and charge `cost` to every one of them only if all
/// allow it. `limiters` are distinct (e.g. lock guards; `None` entries are refused); each check is
/// `(index into limiters, kind, key)`. A pair that appears several times is charged that many times, so its later occurrences
/// are checked with the cost of all its occurrences so far.
pub fn hit_all<G: DerefMut<Target = SlidingWindow>>(
    limiters: &mut [Option<G>],
    checks: &[(usize, KeyKind, &[u8])],
    cost: u64,
    now: u64,
) -> Result<AllDecision> {
    if checks.is_empty() {
        return Err(invalid("checks must not be empty"));
    }
    // Probes of the first few checks are kept for the charging pass (no allocation); later ones,
    // rare, are looked up again.
    const KEPT: usize = 4;
    let mut probes = [Probe { hash: 0, slot: NIL }; KEPT];
    let mut allowed = true;
    let mut first_denied = None;
    let mut retry_after = Some(0u64);
    let mut remaining = u64::MAX;
    for (i, &(l, kind, key)) in checks.iter().enumerate() {
        let occurrences = checks[..=i]
            .iter()
            .filter(|&&(l2, k2, key2)| l2 == l && k2 == kind && key2 == key)
            .count() as u64;
        let first_use = !checks[..i].iter().any(|&(l2, _, _)| l2 == l);
        let lim = at(limiters, l)?;
        let t = lim.observe(now);
        if first_use {
            // Sweep before this limiter's first probe: from here on only inserts happen to it, so
            // its probes stay valid until they are charged.
            lim.sweep(t.ns, SWEEP_PER_HIT);
        }
        let probe = lim.probe(kind, key);
        if i < KEPT {
            probes[i] = probe;
        }
        let d = lim.decide(probe, cost.saturating_mul(occurrences), t);
        remaining = remaining.min(d.remaining);
        if !d.allowed {
            allowed = false;
            first_denied.get_or_insert(i);
            retry_after = match (retry_after, d.retry_after) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
    }
    let probe_of = |lim: &SlidingWindow, i: usize, kind: KeyKind, key: &[u8]| {
        if i < KEPT {
            probes[i]
        } else {
            lim.probe(kind, key)
        }
    };
    if allowed {
        for (i, &(l, kind, key)) in checks.iter().enumerate() {
            let lim = at(limiters, l)?;
            let t = lim.observe(now);
            let probe = probe_of(lim, i, kind, key);
            lim.charge(probe, kind, key, cost, t)?;
        }
    } else {
        // Nothing was charged: report what every pair has left as it stands.
        remaining = u64::MAX;
        for (i, &(l, kind, key)) in checks.iter().enumerate() {
            let lim = at(limiters, l)?;
            let t = lim.observe(now);
            let probe = probe_of(lim, i, kind, key);
            remaining = remaining.min(lim.decide(probe, 0, t).remaining);
        }
    }
    Ok(AllDecision {
        allowed,
        first_denied,
        retry_after,
        remaining,
    })
}

#[inline]
fn at<G: DerefMut<Target = SlidingWindow>>(
    limiters: &mut [Option<G>],
    l: usize,
) -> Result<&mut SlidingWindow> {
    limiters
        .get_mut(l)
        .and_then(|g| g.as_deref_mut())
        .ok_or_else(|| invalid("check refers to a missing limiter"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const K: KeyKind = KeyKind::Str;

    fn counter(limit: u64, window: u64) -> SlidingWindow {
        SlidingWindow::new(limit, window, false).unwrap()
    }

    fn exact(limit: u64, window: u64) -> SlidingWindow {
        SlidingWindow::new(limit, window, true).unwrap()
    }

    #[test]
    fn counter_allows_limit_then_denies_with_exact_retry() {
        let mut w = counter(3, S);
        for left in [2, 1, 0] {
            let d = w.hit(K, b"a", 1, 0).unwrap();
            assert_eq!(
                d,
                Decision {
                    allowed: true,
                    remaining: left,
                    retry_after: Some(0)
                }
            );
        }
        let d = w.hit(K, b"a", 1, 0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        // cur = 3 fills the window: in the next one prev = 3 weighs ⌊3·(S−e)/S⌋, which is 2 from
        // e = 1 ns on.
        let wait = d.retry_after.unwrap();
        assert_eq!(wait, S + 1);
        assert!(!w.hit(K, b"a", 1, wait - 1).unwrap().allowed);
        assert!(w.hit(K, b"a", 1, wait).unwrap().allowed);
        // other keys are independent; str and bytes keys are distinct
        assert!(w.hit(K, b"b", 3, 0).unwrap().allowed);
        assert!(w.hit(KeyKind::Bytes, b"a", 3, wait).unwrap().allowed);
    }

    #[test]
    fn counter_interpolates_previous_window() {
        let mut w = counter(10, 100);
        assert!(w.hit(K, b"k", 10, 50).unwrap().allowed);
        // at 150: e = 50, estimate = 10·50/100 = 5 → 5 more fit
        let d = w.peek(K, b"k", 1, 150);
        assert_eq!(d.remaining, 4);
        assert!(w.hit(K, b"k", 5, 150).unwrap().allowed);
        let d = w.hit(K, b"k", 1, 150).unwrap();
        assert!(!d.allowed);
        // needs ⌊10·(100−e)/100⌋ <= 10−5−1, i.e. e >= 51
        assert_eq!(d.retry_after, Some(1));
        assert!(w.hit(K, b"k", 1, 151).unwrap().allowed);
        // two windows later everything is gone
        assert_eq!(w.peek(K, b"k", 10, 300).remaining, 0);
        assert!(w.peek(K, b"k", 10, 300).allowed);
    }

    #[test]
    fn counter_worst_case_is_two_limits() {
        let (l, win) = (10, S);
        let mut w = counter(l, win);
        let mut admitted = 0;
        for _ in 0..l {
            admitted += w.hit(K, b"k", 1, win - 1).unwrap().allowed as u64;
        }
        for _ in 0..l {
            admitted += w.hit(K, b"k", 1, 2 * win - 2).unwrap().allowed as u64;
        }
        // all of these lie in [win − 1, 2·win − 2]: within one window length
        assert_eq!(admitted, 2 * l);
    }

    #[test]
    fn exact_never_exceeds_limit_in_any_interval() {
        let (l, win) = (5u64, 1000u64);
        let mut w = exact(l, win);
        let mut log = Vec::new();
        let mut now = 0u64;
        let mut x = 12345u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += x % 120;
            let cost = x % 3;
            if w.hit(K, b"k", cost, now).unwrap().allowed {
                log.push((now, cost));
            }
        }
        for &(a, _) in &log {
            let sum: u64 = log
                .iter()
                .filter(|&&(t, _)| t >= a && t < a + win)
                .map(|&(_, c)| c)
                .sum();
            assert!(sum <= l, "{sum} in [{a}, {a}+{win})");
        }
    }

    #[test]
    fn exact_retry_after_is_when_oldest_entries_expire() {
        let mut w = exact(3, 100);
        w.hit(K, b"k", 1, 10).unwrap();
        w.hit(K, b"k", 1, 20).unwrap();
        w.hit(K, b"k", 1, 30).unwrap();
        let d = w.hit(K, b"k", 2, 50).unwrap();
        assert_eq!(
            d,
            Decision {
                allowed: false,
                remaining: 0,
                retry_after: Some(70)
            }
        );
        assert!(!w.hit(K, b"k", 2, 119).unwrap().allowed);
        assert!(w.hit(K, b"k", 2, 120).unwrap().allowed);
    }

    #[test]
    fn cost_above_limit_never_passes_and_cost_zero_is_a_peek() {
        for mut w in [counter(3, S), exact(3, S)] {
            let d = w.hit(K, b"k", 4, 0).unwrap();
            assert_eq!(
                d,
                Decision {
                    allowed: false,
                    remaining: 3,
                    retry_after: None
                }
            );
            let d = w.hit(K, b"k", 0, 0).unwrap();
            assert_eq!(
                d,
                Decision {
                    allowed: true,
                    remaining: 3,
                    retry_after: Some(0)
                }
            );
            assert_eq!(w.tracked(), 0, "neither a denial nor cost 0 creates a key");
        }
    }

    #[test]
    fn time_going_backwards_is_treated_as_latest() {
        for mut w in [counter(2, 100), exact(2, 100)] {
            assert!(w.hit(K, b"k", 2, 1_000).unwrap().allowed);
            let d = w.hit(K, b"k", 1, 0).unwrap();
            assert!(!d.allowed);
            assert_eq!(d, w.hit(K, b"k", 1, 1_000).unwrap());
        }
    }

    #[test]
    fn idle_keys_are_swept_and_memory_stays_bounded() {
        for mut w in [counter(5, S), exact(5, S)] {
            // 1M distinct keys, 100k per window: at most 200k keys are live at once in counter mode
            // (2 windows), 100k in exact mode (1 window); the table never holds more than one extra.
            let mut peak_live = 0usize;
            for n in 0..1_000_000u64 {
                let now = n * (S / 100_000);
                w.hit(K, &n.to_le_bytes(), 1, now).unwrap();
                peak_live = peak_live.max(w.tracked());
            }
            let live_bound = if w.is_exact() { 100_000 } else { 200_000 };
            assert!(peak_live <= live_bound + 1, "peak {peak_live}");
            let later = 1_000_000 * (S / 100_000) + 3 * S;
            w.hit(K, b"x", 1, later).unwrap();
            assert_eq!(w.len(), 1);
            assert_eq!(w.tracked(), 1);
        }
    }

    #[test]
    fn sweeping_an_idle_key_changes_no_answer() {
        let mut w = counter(4, 100);
        w.hit(K, b"a", 4, 0).unwrap();
        w.hit(K, b"b", 1, 250).unwrap(); // sweeps a (idle: no charge in windows 1 and 2)
        assert_eq!(w.tracked(), 1);
        assert_eq!(w.hit(K, b"a", 4, 250).unwrap().remaining, 0);
    }

    #[test]
    fn short_key_comparison() {
        for n in 0..48usize {
            let a: Vec<u8> = (0..n as u8).collect();
            assert!(bytes_eq(&a, &a.clone()));
            for i in 0..n {
                let mut b = a.clone();
                b[i] ^= 1;
                assert!(!bytes_eq(&a, &b), "n={n} i={i}");
            }
            assert!(!bytes_eq(&a, &[0; 49][..n + 1]));
        }
    }

    #[test]
    fn reset_forgets_a_key() {
        let mut w = counter(1, S);
        w.hit(K, b"a", 1, 0).unwrap();
        assert!(!w.hit(K, b"a", 1, 0).unwrap().allowed);
        assert!(w.reset(K, b"a"));
        assert!(!w.reset(K, b"a"));
        assert!(w.hit(K, b"a", 1, 0).unwrap().allowed);
    }

    #[test]
    fn hit_all_charges_none_unless_all_allow() {
        let mut g = counter(100, S);
        let mut r = counter(2, S);
        let mut u = exact(5, S);
        let checks: [(usize, KeyKind, &[u8]); 3] = [(0, K, b"*"), (1, K, b"/x"), (2, K, b"alice")];
        let mut ls = [Some(&mut g), Some(&mut r), Some(&mut u)];
        let d = hit_all(&mut ls, &checks, 1, 0).unwrap();
        assert_eq!(
            d,
            AllDecision {
                allowed: true,
                first_denied: None,
                retry_after: Some(0),
                remaining: 1
            }
        );
        hit_all(&mut ls, &checks, 1, 0).unwrap();
        let d = hit_all(&mut ls, &checks, 1, 0).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.first_denied, Some(1));
        assert_eq!(d.remaining, 0);
        assert!(d.retry_after.unwrap() > 0);
        assert_eq!(
            g.peek(K, b"*", 0, 0).remaining,
            98,
            "the denied call charged nothing"
        );
        assert_eq!(u.peek(K, b"alice", 0, 0).remaining, 3);
    }

    #[test]
    fn hit_all_counts_a_repeated_pair_once_per_occurrence() {
        let mut a = exact(3, S);
        let checks: [(usize, KeyKind, &[u8]); 2] = [(0, K, b"k"), (0, K, b"k")];
        let d = hit_all(&mut [Some(&mut a)], &checks, 1, 0).unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 1));
        let d = hit_all(&mut [Some(&mut a)], &checks, 1, 0).unwrap();
        assert_eq!(
            (d.allowed, d.first_denied, d.remaining),
            (false, Some(1), 1)
        );
        assert_eq!(a.peek(K, b"k", 0, 0).remaining, 1);
        assert!(hit_all(&mut [Some(&mut a)], &[], 1, 0).is_err());
        assert!(hit_all(&mut [Some(&mut a)], &[(1, K, b"k")], 1, 0).is_err());
        assert!(hit_all::<&mut SlidingWindow>(&mut [None], &[(0, K, b"k")], 1, 0).is_err());
    }

    #[test]
    fn extreme_values_do_not_panic() {
        for exact_mode in [false, true] {
            let mut w = SlidingWindow::new(u64::MAX >> 1, u64::MAX, exact_mode).unwrap();
            let _ = w.hit(K, b"k", u64::MAX >> 1, u64::MAX).unwrap();
            let _ = w.hit(K, b"k", u64::MAX, u64::MAX).unwrap();
            let _ = w.hit(K, b"k", 1, 0).unwrap();
            let mut w = SlidingWindow::new(u64::MAX, 1, exact_mode).unwrap();
            let _ = w.hit(K, b"k", u64::MAX, u64::MAX - 1).unwrap();
            let _ = w.hit(K, b"k", 1, u64::MAX).unwrap();
        }
        assert!(SlidingWindow::new(0, 1, false).is_err());
        assert!(SlidingWindow::new(1, 0, true).is_err());
    }
}
