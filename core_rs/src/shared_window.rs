//! Sliding-window rate-limit counters in shared memory: one table for every worker process of a
//! machine, so a limit of 100/s holds for the whole proxy rather than for each worker.
//!
//! **What is counted.** Each key is counted exactly as [`crate::window`]'s counter mode counts it
//! (the sliding-window counter of HAProxy's `http_req_rate` and Cloudflare's "counting things"
//! post): fixed windows aligned on multiples of `W`, the counts `P` and `C` of the previous and the
//! current one, the estimate `⌊P·(W−e)/W⌋ + C` at offset `e`, a hit of cost `c` allowed iff
//! `estimate + c ≤ L`. Both modules call the one implementation of that math,
//! [`crate::window::counter_decide`], so for one process and a clock that never goes back every
//! `allowed`, `remaining` and `retry_after` is the same as [`crate::window::SlidingWindow`]'s, and
//! its error bounds carry over (never more than `L` in one fixed window; `2L` in the worst
//! `W`-long interval). A key is identified by `(limiter, W, key bytes)`; the limit is an argument
//! of each hit, so a new limit applies to the counts already there.
//!
//! **Where it lives.** One `MAP_SHARED` mapping — anonymous and created here ([`SharedWindows::new`])
//! or a region the caller provides ([`SharedWindows::create_in`] / [`SharedWindows::attach`]) — made
//! before the supervisor forks, so every worker sees the same memory at the same address. Nothing
//! in it is a pointer. Layout, all of it atomics:
//!
//! ```text
//! header   128 B   magic, version, slot count, hash seeds, overflow counter
//! locks    8 B per STRIPE home slots: insert locks (owner pid | time taken, ms)
//! dist     1 B per slot: farthest offset from this home slot any key homed here was placed at
//! slots    32 B each, 32-aligned: key (u128) | state (u128)
//! state    = stamp (u64) | P (u32) | C (u32); stamp = (window index + 2)·W, i.e. the time from
//!            which the slot no longer counts; 0 = never used; top bit set = a claim marker
//!            (the rest of the stamp: the slot's stamp before the claim; low word: the claimer's pid)
//! ```
//!
//! **Keys and collisions.** A key is stored as a 128-bit hash of `(limiter, W, key bytes)`: two
//! independent foldhash passes whose seeds are random per table (kept in its header, so all
//! processes agree). The table is open-addressed with linear probing from the home slot (the first
//! hash's low bits); a lookup stops at a never-used slot or after the `dist` of its home slot —
//! once every slot has been used (a long-running table), `dist` is what keeps a miss from scanning
//! [`PROBE_LIMIT`] slots. Two distinct keys share a counter only if both 64-bit halves collide (one
//! bit is forced to 1 to keep 0 for "no key"): about `n²/2¹²⁸` for `n` live keys, nil in
//! practice. The seeds are secret but foldhash is not a cryptographic hash; a collision would make
//! two keys share one counter (each sees the other's hits: more denials, never fewer for the pair).
//!
//! **Concurrency: one 128-bit compare-and-swap per hit, no lock on the hit path.** A hit reads the
//! slot's state, decides, and installs the charged state with `cmpxchg16b` (aarch64: `ldxp`/`stxp`,
//! through `portable-atomic`), retrying if another hit got there first — so every charge on a slot
//! is decided on the state it replaces and `C + c ≤ L` holds per slot whatever the number of
//! processes and threads. Chosen by measurement (a 2-vCPU x86-64 development machine, a loop of
//! load–decide–update on one slot): 11 ns per update with the CAS against 8.5 ns with a per-slot
//! spinlock held for the same few instructions, uncontended; with two threads on one slot both
//! range 30–280 ns from run to run (cache-line traffic), with no consistent winner. 3 ns is ~10% of
//! a hit in Rust and ~2% of one from Python, and the CAS leaves nothing held when a process dies,
//! where a lock would need owner tracking and stealing on every hit; so the CAS. Whole hits
//! (criterion, 10k keys): 27 ns, as `SlidingWindow`'s 26 ns; `hit_all` over three levels 106 ns
//! against 58 ns (three CAS and a decision per level, twice).
//!
//! A state is only ever written whole, so **a process that dies mid-hit leaves the old or the new
//! state, never half of one.** Two things still use exclusion, both off the hit path and both
//! death-safe:
//! - *Inserting a new key* takes the insert lock of its home slot's stripe (one lock per
//!   [`STRIPE`] home slots), so two processes inserting the same key cannot place it twice: under
//!   the lock the key is looked up again before a slot is claimed. The lock word holds the owner's
//!   pid and when it was taken. A waiter spins briefly, then takes the lock over if the owner is
//!   gone (`kill(pid, 0)` fails with `ESRCH`, or `/proc/<pid>/stat` says zombie: killed but not
//!   reaped yet) or has held it for over [`LOCK_LEASE_MS`] (a reused pid, a stopped process). It
//!   waits at most [`LOCK_WAIT_NS`] in all; past that the new key is treated like a full table
//!   (below), so the caller is never held up longer. (Only the lease can take a lock from a live
//!   owner: one stopped for over a second inside an insert. If it then resumes and inserts the
//!   same key as the new owner, the key has two slots; lookups use the first and the other
//!   expires — that key's count is split for at most two windows.)
//! - *Claiming a slot* (free, or expired) swaps its state for a claim marker holding the claimer's
//!   pid, writes the key, and installs the first charge; a hit that meets a marker does not charge
//!   through it (an insert of the same key waits for it under the lock), and a marker whose pid is
//!   dead counts as free for the next claim (or is taken over, when it already holds the key). A
//!   marker left by a dead process costs one slot until then.
//!
//! Stamps never decrease over a slot's life, and every claim installs a stamp larger than the
//! slot's previous one (claims need that stamp `≤ now` — the marker carries it — and install
//! `(now/W + 2)·W > now`), so a state, once the slot changes key, never comes back: a hit that read
//! the key after the state and whose CAS then succeeds knows the key did not change in between.
//!
//! **Time.** `now` is the caller's, in monotonic nanoseconds (`CLOCK_MONOTONIC`, one clock for
//! every process of a machine), so tests can inject it. Processes read it at slightly different
//! moments, so a hit can arrive with a `now` in a window the slot has already left: it then counts
//! as the start of the slot's window (the previous window at full weight — the conservative end),
//! and its charge goes to that window. Charges only ever move to a later window, so the per-window
//! bound holds over the windows the slot went through.
//!
//! **Expiry.** A slot whose stamp is `≤ now` — no charge in the current or the previous window —
//! answers like an absent key, and the next new key probing past it may claim it: no sweeper.
//! [`SharedWindows::len`] counts the slots that still count.
//!
//! **Full table.** A new key that finds no free or expired slot within [`PROBE_LIMIT`] slots of its
//! home (or whose insert lock stays busy, above) is **allowed without being counted**, and
//! [`SharedWindows::overflows`] counts such events. The reasoning: the keys already in the table
//! (the global and route levels among them) keep being enforced, while denying every new key would
//! let a flood of distinct keys lock out every new client; the counter is there to alarm on, and
//! the fix is a bigger table. Size it at about twice the keys live at once (two windows' worth):
//! linear probing stays short below half full.
//!
//! [`SharedWindows::hit_all`] checks several `(limit, window, key)` triples and charges all or
//! none: every triple is first decided on the states as they stand (a denial there charges nothing
//! and reports like [`crate::window::hit_all`]); then each is charged by its own CAS, re-deciding
//! on the state it replaces, and if one is denied by then (another process charged in between),
//! the charges already made are taken back. Atomic per slot, all-or-none across slots with that
//! rollback: between a charge and its rollback another hit may see it and be denied (never
//! allowed) because of it, and a process killed in between leaves its earlier charges in place —
//! both err towards denying. A lock over several slots would buy exact atomicity at the price of a
//! lock on the hit path.

use std::hash::Hasher;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use foldhash::quality::FoldHasher;
use foldhash::SharedSeed;
use portable_atomic::AtomicU128;

use crate::clock;
use crate::error::{invalid, Error, Result};
use crate::window::{counter_decide, counter_reset, AllDecision, Decision};

/// Largest `limit` (counts are 32-bit in a slot's state).
pub const MAX_LIMIT: u64 = u32::MAX as u64;
/// Largest window: 2^60 ns, about 36 years.
pub const MAX_WINDOW_NS: u64 = 1 << 60;
/// Largest `now`: 2^62 − 1 ns, about 146 years of uptime (keeps every stamp below the claim bit).
pub const MAX_NOW_NS: u64 = (1 << 62) - 1;
/// A new key is placed at most this many slots past its home slot.
pub const PROBE_LIMIT: usize = 128;
/// Home slots per insert lock.
pub const STRIPE: usize = 8;
/// An insert lock held longer than this is taken over even if its owner's pid is alive.
pub const LOCK_LEASE_MS: u32 = 1000;
/// The longest an insert waits for its lock before treating the key like a full table.
pub const LOCK_WAIT_NS: u64 = 2_000_000;
/// Most slots a table may have (32 GiB of slots).
pub const MAX_SLOTS: usize = 1 << 30;

const MIN_SLOTS: usize = 16;
const MAGIC: u64 = u64::from_le_bytes(*b"pyxSHWIN");
const VERSION: u64 = 1;
const HEADER_BYTES: usize = 128;
const SLOT_BYTES: usize = 32;
/// Top bit of a state's stamp: the slot is being claimed; the low word holds the claimer's pid.
const CLAIM: u64 = 1 << 63;
/// Spins on a busy insert lock before asking whether its owner is alive.
const SPINS: u32 = 256;

#[repr(C)]
struct Header {
    magic: u64,
    version: u64,
    slots: u64,
    /// Per-hasher and shared seeds of the two hashes.
    seeds: [u64; 4],
    overflows: AtomicU64,
    _reserved: [u64; 8],
}

#[repr(C, align(32))]
struct Slot {
    /// 128-bit key hash; 0 until the slot is first claimed.
    key: AtomicU128,
    /// `stamp << 64 | P << 32 | C`, or a claim marker.
    state: AtomicU128,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_BYTES);

#[inline]
fn pack(stamp: u64, prev: u64, cur: u64) -> u128 {
    ((stamp as u128) << 64) | ((prev << 32) | cur) as u128
}

#[inline]
fn stamp_of(s: u128) -> u64 {
    (s >> 64) as u64
}

#[inline]
fn prev_of(s: u128) -> u64 {
    (s as u64) >> 32
}

#[inline]
fn cur_of(s: u128) -> u64 {
    s as u64 & 0xffff_ffff
}

#[inline]
fn is_claim(s: u128) -> bool {
    stamp_of(s) & CLAIM != 0
}

/// A claim marker: the claimer's pid, and the stamp the slot had before it was claimed (so the
/// stamp installed after the claim can be made larger: see the module doc).
#[inline]
fn marker(pid: u32, old_stamp: u64) -> u128 {
    pack(CLAIM | old_stamp, 0, pid as u64)
}

/// The stamp a slot had before it was claimed (of a marker), or its stamp.
#[inline]
fn old_stamp(s: u128) -> u64 {
    stamp_of(s) & !CLAIM
}

#[inline]
fn claim_pid(s: u128) -> u32 {
    s as u32
}

/// A key as the table knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Key {
    id: u128,
    home: usize,
}

/// `now` against a window `w`: the offset into the current fixed window and the stamp a slot
/// charged in it carries.
#[derive(Clone, Copy, Debug, Default)]
struct Frame {
    now: u64,
    w: u64,
    /// `now % w`
    e: u64,
    /// `(now / w + 2) · w`
    stamp: u64,
}

impl Frame {
    #[inline]
    fn new(now: u64, w: u64) -> Frame {
        let idx = now / w;
        Frame {
            now,
            w,
            e: now - idx * w,
            stamp: (idx + 2) * w,
        }
    }
}

/// A slot's counts as a hit at some `now` sees them.
#[derive(Clone, Copy, Debug)]
struct View {
    prev: u64,
    cur: u64,
    e: u64,
    /// The stamp of the window these counts are in (where a charge goes).
    stamp: u64,
    /// How far `now` lies before that window's start (`> 0` only when the slot is ahead of it).
    lag: u64,
}

#[inline]
fn view(s: u128, f: Frame) -> View {
    let st = stamp_of(s);
    let here = |prev, cur| View {
        prev,
        cur,
        e: f.e,
        stamp: f.stamp,
        lag: 0,
    };
    if st == f.stamp {
        here(prev_of(s), cur_of(s))
    } else if st < f.stamp {
        if st + f.w == f.stamp {
            here(cur_of(s), 0) // charged in the previous window
        } else {
            here(0, 0) // two windows old, or never charged
        }
    } else {
        // The slot is in a later window than `now` (another process's clock read came later):
        // count as that window's start.
        View {
            prev: prev_of(s),
            cur: cur_of(s),
            e: 0,
            stamp: st,
            lag: (st - 2 * f.w) - f.now,
        }
    }
}

#[inline]
fn decide(v: View, cost: u64, limit: u64, w: u64) -> Decision {
    let mut d = counter_decide(v.prev, v.cur, cost, limit, v.e, w);
    if v.lag > 0 {
        d.retry_after = d
            .retry_after
            .map(|r| if r == 0 { 0 } else { r.saturating_add(v.lag) });
    }
    d
}

/// What applying a hit to a slot found.
enum Applied {
    /// Decided (and charged when allowed and `cost > 0`: the stamp charged).
    Done(Decision, Option<u64>),
    /// The slot holds another key now.
    Gone,
    /// The slot holds this key under a claim marker (`state`).
    Claiming(u128),
}

/// The check an allowed [`SharedWindows::hit_all_binding`] advertises (`RateLimit` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Index into the checks.
    pub index: usize,
    /// Whole units it has left after the charge.
    pub remaining: u64,
    /// Nanoseconds until its usage has aged out entirely (`remaining` back to its limit).
    pub reset: u64,
}

/// One triple of [`SharedWindows::hit_all`].
#[derive(Clone, Copy, Debug)]
pub struct Check<'a> {
    /// A namespace of the caller's choosing (the binding uses the key's type, `str` or `bytes`).
    pub limiter: u64,
    pub limit: u64,
    /// Window in nanoseconds.
    pub window: u64,
    pub key: &'a [u8],
}

/// Sliding-window counters shared by the processes that map the same memory (see the module doc).
pub struct SharedWindows {
    base: NonNull<u8>,
    len: usize,
    /// Unmapped on drop (created by [`SharedWindows::new`]).
    owned: bool,
    mask: usize,
    header: *const Header,
    locks: *const AtomicU64,
    dist: *const AtomicU8,
    slots: *const Slot,
    shared_seeds: [SharedSeed; 2],
    hasher_seeds: [u64; 2],
}

// SAFETY: every byte of the region is read and written through atomics only; the pointers are fixed
// for the mapping's lifetime, which this value outlives (it unmaps only in `drop`).
unsafe impl Send for SharedWindows {}
// SAFETY: as above; no method takes `&mut self` to reach shared state, all of it is atomic.
unsafe impl Sync for SharedWindows {}

/// Layout of a table of `slots` slots: (locks offset, dist offset, slots offset, total bytes).
fn layout(slots: usize) -> (usize, usize, usize, usize) {
    let locks = HEADER_BYTES;
    let dist = locks + (slots / STRIPE) * 8;
    let table = (dist + slots).next_multiple_of(64);
    (locks, dist, table, table + slots * SLOT_BYTES)
}

fn slots_for(capacity: usize) -> Result<usize> {
    if capacity == 0 || capacity > MAX_SLOTS {
        return Err(invalid(format!(
            "capacity must be between 1 and {MAX_SLOTS}, got {capacity}"
        )));
    }
    Ok(capacity.next_power_of_two().max(MIN_SLOTS))
}

fn random_u64s() -> [u64; 4] {
    let mut buf = [0u8; 32];
    // SAFETY: `buf` is valid for 32 writable bytes.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let mut out = [0u64; 4];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    }
    if got != buf.len() as isize {
        // No getrandom (very old kernel): the clock and the pid, mixed. Only hash-flooding
        // resistance depends on it.
        let mut h = FoldHasher::with_seed(clock::monotonic_ns(), SharedSeed::global_fixed());
        h.write_u32(std::process::id());
        for o in out.iter_mut() {
            h.write_u64(*o);
            *o = h.finish();
        }
    }
    out
}

impl SharedWindows {
    /// A table of at least `capacity` slots (rounded up to a power of two, at least 16) in a new
    /// anonymous `MAP_SHARED` mapping. Processes forked after this share it.
    pub fn new(capacity: usize) -> Result<Self> {
        let slots = slots_for(capacity)?;
        let len = layout(slots).3;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::System(format!(
                "could not map {len} bytes of shared memory for SharedWindows({capacity}): {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: the mapping is `len` bytes, zero-filled, page-aligned and ours.
        let mut t = unsafe { Self::create_in(ptr.cast(), len, capacity) }?;
        t.owned = true;
        Ok(t)
    }

    /// Bytes a table of `capacity` slots needs (for [`SharedWindows::create_in`]).
    pub fn region_len(capacity: usize) -> Result<usize> {
        Ok(layout(slots_for(capacity)?).3)
    }

    /// Format a table of `capacity` slots at the start of `region`.
    ///
    /// # Safety
    /// `region` must be 64-byte aligned, valid for reads and writes of `len` bytes, zero-filled,
    /// shared with the processes that will use it (`MAP_SHARED`) and not otherwise used; it must
    /// outlive the returned value and every value [`SharedWindows::attach`]ed to it.
    pub unsafe fn create_in(region: *mut u8, len: usize, capacity: usize) -> Result<Self> {
        let slots = slots_for(capacity)?;
        if len < layout(slots).3 || region.is_null() || region as usize % 64 != 0 {
            return Err(invalid(format!(
                "a SharedWindows of {slots} slots needs a 64-byte aligned region of {} bytes",
                layout(slots).3
            )));
        }
        let header = region.cast::<Header>();
        // SAFETY: the caller guarantees the region is ours, writable and large enough; no other
        // process reads it before this returns.
        unsafe {
            (*header).slots = slots as u64;
            (*header).seeds = random_u64s();
            (*header).version = VERSION;
            std::sync::atomic::fence(Ordering::Release);
            (*header).magic = MAGIC;
            Self::attach(region, len)
        }
    }

    /// A view of a table [`SharedWindows::create_in`] formatted in `region`.
    ///
    /// # Safety
    /// As for [`SharedWindows::create_in`], except that `region` holds a formatted table.
    pub unsafe fn attach(region: *mut u8, len: usize) -> Result<Self> {
        let base = NonNull::new(region).ok_or_else(|| invalid("null region"))?;
        if len < HEADER_BYTES || region as usize % 64 != 0 {
            return Err(invalid(
                "region too small or misaligned for a SharedWindows",
            ));
        }
        let header = region.cast::<Header>().cast_const();
        // SAFETY: the header is within the region (checked above) and written before `magic`.
        let (magic, version, slots, seeds) = unsafe {
            (
                (*header).magic,
                (*header).version,
                (*header).slots as usize,
                (*header).seeds,
            )
        };
        if magic != MAGIC || version != VERSION {
            return Err(invalid("region does not hold a SharedWindows table"));
        }
        if !slots.is_power_of_two() || !(MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
            return Err(invalid("corrupt SharedWindows header (slot count)"));
        }
        let (locks, dist, table, need) = layout(slots);
        if len < need {
            return Err(invalid("region smaller than its SharedWindows table"));
        }
        if !AtomicU128::is_lock_free() {
            // portable-atomic would fall back to a lock inside this process: useless across
            // processes.
            return Err(Error::System(
                "SharedWindows needs a 128-bit compare-and-swap (x86-64 cmpxchg16b, aarch64)"
                    .into(),
            ));
        }
        Ok(SharedWindows {
            base,
            len,
            owned: false,
            mask: slots - 1,
            header,
            // SAFETY (the three below): offsets within `need <= len` bytes, suitably aligned
            // (8, 1 and 64 bytes) since the region is 64-byte aligned.
            locks: unsafe { region.add(locks) }.cast::<AtomicU64>(),
            dist: unsafe { region.add(dist) }.cast::<AtomicU8>(),
            slots: unsafe { region.add(table) }.cast::<Slot>(),
            shared_seeds: [
                SharedSeed::from_u64(seeds[2]),
                SharedSeed::from_u64(seeds[3]),
            ],
            hasher_seeds: [seeds[0], seeds[1]],
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Size of the mapped region in bytes.
    pub fn region_bytes(&self) -> usize {
        self.len
    }

    /// New keys that were allowed without being counted because no slot could be had (module doc).
    pub fn overflows(&self) -> u64 {
        self.header().overflows.load(Ordering::Relaxed)
    }

    /// Slots that still count at `now` (a charge in the current or the previous window). Reads
    /// every slot.
    pub fn len(&self, now: u64) -> usize {
        (0..=self.mask)
            .filter(|&i| {
                let s = self.slot(i).state.load(Ordering::Relaxed);
                !is_claim(s) && stamp_of(s) > now
            })
            .count()
    }

    pub fn is_empty(&self, now: u64) -> bool {
        self.len(now) == 0
    }

    #[inline]
    fn header(&self) -> &Header {
        // SAFETY: `header` points at the region's formatted header for `self`'s lifetime.
        unsafe { &*self.header }
    }

    #[inline]
    fn slot(&self, i: usize) -> &Slot {
        debug_assert!(i <= self.mask);
        // SAFETY: `i <= mask`, within the slot array.
        unsafe { &*self.slots.add(i) }
    }

    #[inline]
    fn dist(&self, home: usize) -> &AtomicU8 {
        // SAFETY: `home <= mask`, within the dist array.
        unsafe { &*self.dist.add(home) }
    }

    #[inline]
    fn lock_word(&self, home: usize) -> &AtomicU64 {
        // SAFETY: `home / STRIPE < slots / STRIPE`, within the lock array.
        unsafe { &*self.locks.add(home / STRIPE) }
    }

    #[inline]
    fn probe_limit(&self) -> usize {
        PROBE_LIMIT.min(self.mask + 1)
    }

    #[inline]
    fn key(&self, limiter: u64, window: u64, key: &[u8]) -> Key {
        let hash = |n: usize| {
            let mut h = FoldHasher::with_seed(self.hasher_seeds[n], &self.shared_seeds[n]);
            h.write_u64(limiter);
            h.write_u64(window);
            h.write(key);
            h.finish()
        };
        let (a, b) = (hash(0), hash(1));
        Key {
            id: ((a as u128) << 64) | (b | 1) as u128,
            home: a as usize & self.mask,
        }
    }

    /// Charge `cost` to `key` (of `window` ns, in namespace `limiter`) if the sliding-window
    /// estimate leaves room under `limit`; a denial charges nothing, `cost = 0` never creates a key.
    #[inline]
    pub fn hit(
        &self,
        limiter: u64,
        limit: u64,
        window: u64,
        key: &[u8],
        cost: u64,
        now: u64,
    ) -> Result<Decision> {
        check(limit, window, now)?;
        let k = self.key(limiter, window, key);
        Ok(self.charge(&k, Frame::new(now, window), limit, cost).0)
    }

    /// Check several triples and charge `cost` to each only if all allow it (module doc). A
    /// triple listed twice is charged twice; its later occurrences are decided with the cost of
    /// all its occurrences so far, as [`crate::window::hit_all`] does.
    pub fn hit_all(&self, checks: &[Check<'_>], cost: u64, now: u64) -> Result<AllDecision> {
        self.hit_all_with(checks, cost, now, None)
    }

    /// [`SharedWindows::hit_all`], and when it allows the request, the check a `RateLimit`
    /// header advertises: the one with the least remaining after the charge (on a tie, the one
    /// whose usage ages out last) — `None` when denied. Computed from the counts the decision
    /// read, so it costs no second look at the table.
    pub fn hit_all_binding(
        &self,
        checks: &[Check<'_>],
        cost: u64,
        now: u64,
    ) -> Result<(AllDecision, Option<Binding>)> {
        let mut binding = None;
        let d = self.hit_all_with(checks, cost, now, Some(&mut binding))?;
        Ok((d, binding))
    }

    fn hit_all_with(
        &self,
        checks: &[Check<'_>],
        cost: u64,
        now: u64,
        mut binding: Option<&mut Option<Binding>>,
    ) -> Result<AllDecision> {
        if checks.is_empty() {
            return Err(invalid("checks must not be empty"));
        }
        for c in checks {
            check(c.limit, c.window, now)?;
        }
        let n = checks.len();
        // Per check: its key, frame, and where pass 1 found it (slot and the state read there).
        type Entry = (Key, Frame, Option<(usize, u128)>);
        let mut inline: [Entry; INLINE] = [(Key::default(), Frame::default(), None); INLINE];
        let mut heap = Vec::new();
        let keys: &mut [Entry] = if n <= INLINE {
            &mut inline[..n]
        } else {
            heap.resize(n, (Key::default(), Frame::default(), None));
            &mut heap
        };
        // Pass 1: decide every triple on the states as they stand.
        let mut allowed = true;
        let mut first_denied = None;
        let mut retry_after = Some(0u64);
        for (i, c) in checks.iter().enumerate() {
            let k = self.key(c.limiter, c.window, c.key);
            let f = Frame::new(now, c.window);
            let found = self.find(&k).filter(|&(_, s)| !is_claim(s));
            keys[i] = (k, f, found);
            let occurrences = 1 + keys[..i].iter().filter(|e| e.0.id == k.id).count() as u64;
            let v = view(found.map_or(0, |(_, s)| s), f);
            let d = decide(v, cost.saturating_mul(occurrences), c.limit, c.window);
            if !d.allowed {
                allowed = false;
                first_denied.get_or_insert(i);
                retry_after = match (retry_after, d.retry_after) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
        }
        if !allowed {
            // Nothing was charged: what every triple has left as it stands.
            let standing = checks.iter().zip(keys.iter()).map(|(c, &(_, f, found))| {
                let v = view(found.map_or(0, |(_, s)| s), f);
                decide(v, 0, c.limit, c.window).remaining
            });
            return Ok(AllDecision {
                allowed,
                first_denied,
                retry_after,
                remaining: standing.min().unwrap_or(0),
            });
        }
        // Pass 2: charge each, re-deciding on the state replaced; undo on a late denial.
        let mut charged_inline = [None; INLINE];
        let mut charged_heap = Vec::new();
        let charged: &mut [Option<(usize, u64)>] = if n <= INLINE {
            &mut charged_inline[..n]
        } else {
            charged_heap.resize(n, None);
            &mut charged_heap
        };
        let mut remaining = u64::MAX;
        for (i, c) in checks.iter().enumerate() {
            let (k, f, found) = keys[i];
            let (d, at) = self.charge_found(&k, f, c.limit, cost, found);
            if !d.allowed {
                for j in (0..i).rev() {
                    if let Some((slot, stamp)) = charged[j] {
                        self.rollback(slot, &keys[j].0, stamp, keys[j].1.w, cost);
                    }
                }
                return Ok(AllDecision {
                    allowed: false,
                    first_denied: Some(i),
                    retry_after: d.retry_after,
                    remaining: d.remaining,
                });
            }
            charged[i] = at;
            remaining = remaining.min(d.remaining);
            if let Some(best) = binding.as_deref_mut() {
                let v = view(found.map_or(0, |(_, s)| s), f);
                let reset = counter_reset(v.prev, v.cur.saturating_add(cost), v.e, f.w);
                let better = match best {
                    None => true,
                    Some(b) => {
                        d.remaining < b.remaining || (d.remaining == b.remaining && reset > b.reset)
                    }
                };
                if better {
                    *best = Some(Binding {
                        index: i,
                        remaining: d.remaining,
                        reset,
                    });
                }
            }
        }
        Ok(AllDecision {
            allowed: true,
            first_denied: None,
            retry_after: Some(0),
            remaining,
        })
    }

    /// Decide and charge; also returns where the charge went (slot, stamp), if anywhere.
    #[inline]
    fn charge(&self, k: &Key, f: Frame, limit: u64, cost: u64) -> (Decision, Option<(usize, u64)>) {
        self.charge_found(k, f, limit, cost, self.find(k))
    }

    /// [`SharedWindows::charge`] given what a [`SharedWindows::find`] returned.
    #[inline]
    fn charge_found(
        &self,
        k: &Key,
        f: Frame,
        limit: u64,
        cost: u64,
        mut found: Option<(usize, u128)>,
    ) -> (Decision, Option<(usize, u64)>) {
        // Fast path, no lock: the key's slot, charged by CAS.
        for _ in 0..2 {
            let Some((i, s)) = found else { break };
            if let Applied::Done(d, at) = self.apply(i, s, k, f, limit, cost) {
                return (d, at.map(|stamp| (i, stamp)));
            }
            found = self.find(k);
        }
        self.insert(k, f, limit, cost)
    }

    /// The slot holding `k`'s key (in whatever state), if any, with the state read there just
    /// before the key.
    #[inline]
    fn find(&self, k: &Key) -> Option<(usize, u128)> {
        let dist = self.dist(k.home).load(Ordering::Acquire) as usize;
        for d in 0..=dist {
            let i = (k.home + d) & self.mask;
            let slot = self.slot(i);
            let s = slot.state.load(Ordering::Acquire);
            let key = slot.key.load(Ordering::Acquire);
            if key == k.id {
                return Some((i, s));
            }
            // Never claimed: no key homed here was placed past it.
            if key == 0 && s == 0 {
                return None;
            }
        }
        None
    }

    /// Decide on slot `i`, whose state `s` was read before its key was found to be `k`'s, and
    /// charge by CAS.
    #[inline]
    fn apply(&self, i: usize, mut s: u128, k: &Key, f: Frame, limit: u64, cost: u64) -> Applied {
        let slot = self.slot(i);
        let mut key_checked = true;
        loop {
            // The key is read after the state: if the CAS below succeeds, the state did not change
            // since, so neither did the key (module doc).
            if !key_checked && slot.key.load(Ordering::Acquire) != k.id {
                return Applied::Gone;
            }
            if is_claim(s) {
                return Applied::Claiming(s);
            }
            let v = view(s, f);
            let d = decide(v, cost, limit, f.w);
            if !d.allowed || cost == 0 {
                return Applied::Done(d, None);
            }
            let new = pack(v.stamp, v.prev, v.cur + cost);
            match slot
                .state
                .compare_exchange_weak(s, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Applied::Done(d, Some(v.stamp)),
                Err(now_there) => {
                    s = now_there;
                    key_checked = false;
                }
            }
        }
    }

    /// The slow path: the key was not found. Under its stripe's insert lock, look again, then
    /// claim a slot and install the first charge.
    #[cold]
    #[inline(never)]
    fn insert(&self, k: &Key, f: Frame, limit: u64, cost: u64) -> (Decision, Option<(usize, u64)>) {
        let fresh = decide(view(0, f), cost, limit, f.w);
        if !fresh.allowed || cost == 0 {
            return (fresh, None); // neither creates a key
        }
        let Some(_lock) = self.lock(k.home) else {
            return self.overflow(fresh);
        };
        let pid = my_pid();
        for _ in 0..64 {
            if let Some((i, s)) = self.find(k) {
                match self.apply(i, s, k, f, limit, cost) {
                    Applied::Done(d, at) => return (d, at.map(|stamp| (i, stamp))),
                    Applied::Gone => continue,
                    Applied::Claiming(s) => {
                        // Our key under a marker: a claimer that died between writing the key and
                        // the first charge (take the slot over), or one reclaiming our expired
                        // slot for another key (wait for it to write that key).
                        let owner = claim_pid(s);
                        if owner != pid && old_stamp(s) <= f.now && !pid_alive(owner) {
                            let mark = marker(pid, old_stamp(s));
                            let slot = self.slot(i);
                            if slot
                                .state
                                .compare_exchange(s, mark, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                            {
                                self.publish(i, mark, f, cost);
                                return (fresh, Some((i, f.stamp)));
                            }
                        } else {
                            std::thread::yield_now();
                        }
                        continue;
                    }
                }
            }
            let Some((i, mark)) = self.claim(k, f.now, pid) else {
                return self.overflow(fresh);
            };
            self.slot(i).key.store(k.id, Ordering::Release);
            self.publish(i, mark, f, cost);
            return (fresh, Some((i, f.stamp)));
        }
        self.overflow(fresh)
    }

    /// Replace our claim marker on slot `i` by the first charge.
    #[inline]
    fn publish(&self, i: usize, mark: u128, f: Frame, cost: u64) {
        // Only a process that finds our pid dead takes a marker away: the CAS cannot fail while
        // we run, but a plain store would hide it if it ever did.
        let _ = self.slot(i).state.compare_exchange(
            mark,
            pack(f.stamp, 0, cost),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    #[cold]
    fn overflow(&self, fresh: Decision) -> (Decision, Option<(usize, u64)>) {
        self.header().overflows.fetch_add(1, Ordering::Relaxed);
        (fresh, None)
    }

    /// Claim the first free slot within the probe limit of `k`'s home: never used, expired by
    /// `now`, or left under a marker by a dead process (and expired before that). Records its
    /// distance in `dist` before the key is written. Returns the slot and our marker on it.
    fn claim(&self, k: &Key, now: u64, pid: u32) -> Option<(usize, u128)> {
        for d in 0..self.probe_limit() {
            let i = (k.home + d) & self.mask;
            let slot = self.slot(i);
            let mut s = slot.state.load(Ordering::Acquire);
            loop {
                // `old_stamp(s) <= now` for both: the stamp installed after the claim (> now)
                // is then larger than any the slot had.
                let free = old_stamp(s) <= now
                    && (!is_claim(s) || (claim_pid(s) != pid && !pid_alive(claim_pid(s))));
                if !free {
                    break;
                }
                let mark = marker(pid, old_stamp(s));
                match slot
                    .state
                    .compare_exchange(s, mark, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        self.dist(k.home).fetch_max(d as u8, Ordering::Release);
                        return Some((i, mark));
                    }
                    Err(now_there) => s = now_there,
                }
            }
        }
        None
    }

    /// Take back a charge of `cost` made at `stamp` (by [`SharedWindows::hit_all`]).
    fn rollback(&self, i: usize, k: &Key, stamp: u64, w: u64, cost: u64) {
        let slot = self.slot(i);
        let mut s = slot.state.load(Ordering::Acquire);
        loop {
            if is_claim(s) || slot.key.load(Ordering::Acquire) != k.id {
                return; // expired and reused: the charge no longer counts anyway
            }
            let st = stamp_of(s);
            let new = if st == stamp {
                pack(st, prev_of(s), cur_of(s).saturating_sub(cost))
            } else if st == stamp + w {
                pack(st, prev_of(s).saturating_sub(cost), cur_of(s))
            } else {
                return;
            };
            match slot
                .state
                .compare_exchange_weak(s, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(now_there) => s = now_there,
            }
        }
    }

    /// Take the insert lock of `home`'s stripe, or `None` after [`LOCK_WAIT_NS`] (module doc).
    fn lock(&self, home: usize) -> Option<InsertLock<'_>> {
        let word = self.lock_word(home);
        let me = owner_word(my_pid());
        let mut spins = 0;
        let mut deadline = None;
        loop {
            let cur = word.load(Ordering::Relaxed);
            if cur == 0 {
                if word
                    .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(InsertLock { word, me });
                }
                continue;
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let (owner, since) = (cur as u32, (cur >> 32) as u32);
            let held_ms = now_ms().wrapping_sub(since);
            if held_ms > LOCK_LEASE_MS || !pid_alive(owner) {
                if word
                    .compare_exchange(cur, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(InsertLock { word, me });
                }
                continue;
            }
            let t = clock::monotonic_ns();
            if t >= *deadline.get_or_insert(t + LOCK_WAIT_NS) {
                return None;
            }
            std::thread::yield_now();
        }
    }
}

impl Drop for SharedWindows {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: `base`/`len` are the mapping `new` made; nothing borrows it past `self`.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }
}

const INLINE: usize = 4;

/// A held insert lock; released on drop unless another process took it over meanwhile.
struct InsertLock<'a> {
    word: &'a AtomicU64,
    me: u64,
}

impl Drop for InsertLock<'_> {
    fn drop(&mut self) {
        let _ = self
            .word
            .compare_exchange(self.me, 0, Ordering::Release, Ordering::Relaxed);
    }
}

#[inline]
fn check(limit: u64, window: u64, now: u64) -> Result<()> {
    if limit == 0 || limit > MAX_LIMIT || window == 0 || window > MAX_WINDOW_NS || now > MAX_NOW_NS
    {
        return Err(bad_args(limit, window, now));
    }
    Ok(())
}

#[cold]
#[inline(never)]
fn bad_args(limit: u64, window: u64, now: u64) -> Error {
    if limit == 0 || limit > MAX_LIMIT {
        invalid(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {limit}"
        ))
    } else if window == 0 || window > MAX_WINDOW_NS {
        invalid(format!(
            "window must be between 1 ns and {MAX_WINDOW_NS} ns, got {window} ns"
        ))
    } else {
        invalid(format!("now must be at most {MAX_NOW_NS} ns, got {now}"))
    }
}

/// This process's pid, cached once the `pthread_atfork` handler that forgets it in a forked child
/// is registered (until then, asked each time).
///
/// No `Once` guards the registration: a fork while another thread ran a `Once` would leave it
/// running forever in the child. A flag decides who registers; nobody waits.
fn my_pid() -> u32 {
    static PID: AtomicU32 = AtomicU32::new(0);
    /// 0: not registered, 1: being registered, 2: registered.
    static ATFORK: AtomicU8 = AtomicU8::new(0);
    extern "C" fn forget() {
        PID.store(0, Ordering::Relaxed);
    }
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    if ATFORK
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        // SAFETY: registers a handler that only stores to an atomic (async-signal-safe).
        unsafe { libc::pthread_atfork(None, None, Some(forget)) };
        ATFORK.store(2, Ordering::Release);
    }
    let p = std::process::id();
    if ATFORK.load(Ordering::Acquire) == 2 {
        PID.store(p, Ordering::Relaxed);
    }
    p
}

/// Milliseconds on the coarse monotonic clock, wrapping at 2^32 (lock ages are compared wrapping).
fn now_ms() -> u32 {
    (clock::coarse_ns() / 1_000_000) as u32
}

fn owner_word(pid: u32) -> u64 {
    ((now_ms() as u64) << 32) | pid as u64
}

/// Whether `pid` is a live process: it exists and is not a zombie (killed, not yet reaped).
fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    if pid == my_pid() {
        return true;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    }
    match std::fs::read(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'
        Ok(stat) => match stat.iter().rposition(|&b| b == b')') {
            Some(j) => !matches!(stat.get(j + 2), Some(b'Z' | b'X' | b'x')),
            None => true,
        },
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{self, KeyKind, SlidingWindow};
    use std::sync::atomic::AtomicBool;

    const S: u64 = 1_000_000_000;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn agrees_with_sliding_window_counter_mode() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..40 {
            let limit = 1 + rng.below(12);
            let window = [100, 1_000, 3 * S / 1000, S, 7][round % 5];
            let sw = SharedWindows::new(256).unwrap();
            let mut local = SlidingWindow::new(limit, window, false).unwrap();
            let keys: [&[u8]; 4] = [b"a", b"b", b"user-000123", b""];
            let mut now = 1_000 * S;
            for _ in 0..3_000 {
                now += match rng.below(4) {
                    0 => 0,
                    1 => rng.below(window / 4 + 1),
                    2 => rng.below(2 * window + 1),
                    _ => rng.below(5 * window + 1),
                };
                let key = keys[rng.below(4) as usize];
                let cost = rng.below(limit + 3);
                let want = local.hit(KeyKind::Str, key, cost, now).unwrap();
                let got = sw
                    .hit(KeyKind::Str as u64, limit, window, key, cost, now)
                    .unwrap();
                assert_eq!(got, want, "round {round} now {now} cost {cost}");
            }
            assert_eq!(sw.len(now), local.len(), "live keys");
            assert_eq!(sw.overflows(), 0);
        }
    }

    #[test]
    fn hit_all_agrees_with_window_hit_all() {
        let mut rng = Rng(12345);
        for round in 0..30 {
            let specs: Vec<(u64, u64)> = (0..3)
                .map(|_| (1 + rng.below(8), [100, 1_000, 250][rng.below(3) as usize]))
                .collect();
            let sw = SharedWindows::new(256).unwrap();
            let mut locals: Vec<SlidingWindow> = specs
                .iter()
                .map(|&(l, w)| SlidingWindow::new(l, w, false).unwrap())
                .collect();
            let keys: [&[u8]; 2] = [b"x", b"y"];
            let mut now = 10_000;
            for _ in 0..2_000 {
                now += rng.below(120);
                let n = 1 + rng.below(4) as usize;
                let picks: Vec<(usize, &[u8])> = (0..n)
                    .map(|_| (rng.below(3) as usize, keys[rng.below(2) as usize]))
                    .collect();
                let cost = rng.below(5);
                // one SlidingWindow per level ↔ the level number as the shared table's limiter id
                let local_checks: Vec<(usize, KeyKind, &[u8])> =
                    picks.iter().map(|&(l, k)| (l, KeyKind::Str, k)).collect();
                let mut guards: Vec<Option<&mut SlidingWindow>> =
                    locals.iter_mut().map(Some).collect();
                let want = window::hit_all(&mut guards, &local_checks, cost, now).unwrap();
                let shared_checks: Vec<Check<'_>> = picks
                    .iter()
                    .map(|&(l, k)| Check {
                        limiter: l as u64,
                        limit: specs[l].0,
                        window: specs[l].1,
                        key: k,
                    })
                    .collect();
                let got = sw.hit_all(&shared_checks, cost, now).unwrap();
                assert_eq!(
                    got, want,
                    "round {round} now {now} picks {picks:?} cost {cost}"
                );
            }
        }
        let sw = SharedWindows::new(16).unwrap();
        assert!(sw.hit_all(&[], 1, 0).is_err());
    }

    #[test]
    fn threads_never_admit_more_than_the_limit_in_one_window() {
        // Every thread hits at the same `now`: exactly `limit` pass, whatever the interleaving.
        let sw = SharedWindows::new(64).unwrap();
        let limit = 5_000;
        let allowed = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut n = 0;
                    for _ in 0..4_000 {
                        n += sw.hit(0, limit, S, b"hot", 1, 7 * S + 5).unwrap().allowed as u64;
                    }
                    allowed.fetch_add(n, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(allowed.load(Ordering::Relaxed), limit);
        assert_eq!(sw.len(7 * S + 5), 1, "one key, one slot");
    }

    #[test]
    fn threads_with_a_moving_clock_stay_within_limit_per_window() {
        // A shared clock each thread reads then hits with (so hits arrive out of clock order, as
        // across processes): the slot's count for a window never exceeds the limit, so the total
        // is at most limit · (windows spanned).
        let sw = SharedWindows::new(1024).unwrap();
        let (limit, window) = (50u64, 1_000_000u64);
        let clock = AtomicU64::new(window * 10);
        let allowed = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (sw, clock, allowed, stop) = (&sw, &clock, &allowed, &stop);
                s.spawn(move || {
                    let mut n = 0;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let now = clock.fetch_add(97, Ordering::Relaxed);
                        n += sw.hit(0, limit, window, b"hot", 1, now).unwrap().allowed as u64;
                        // and a stream of distinct keys: inserts, claims of expired slots
                        i += 1;
                        let k = ((t << 32) | (i % 100)).to_le_bytes();
                        sw.hit(1, 3, window, &k, 1, now).unwrap();
                        if now > window * 60 {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    allowed.fetch_add(n, Ordering::Relaxed);
                });
            }
        });
        let last = clock.load(Ordering::Relaxed);
        let spanned = last / window - 10 + 1;
        let total = allowed.load(Ordering::Relaxed);
        assert!(total <= limit * spanned, "{total} > {limit} x {spanned}");
        assert!(
            total >= limit * (spanned - 2),
            "{total} far below {limit} x {spanned}"
        );
        assert_eq!(sw.overflows(), 0);
    }

    #[test]
    fn expired_slots_are_reused() {
        let sw = SharedWindows::new(16).unwrap();
        assert_eq!(sw.capacity(), 16);
        let w = 100;
        for i in 0..16u8 {
            assert!(sw.hit(0, 2, w, &[i], 2, 1_000).unwrap().allowed);
        }
        assert_eq!(sw.len(1_000), 16);
        // one window on: all still count (as the previous window)
        assert!(!sw.hit(0, 2, w, &[3], 1, 1_100).unwrap().allowed);
        assert_eq!(sw.len(1_150), 16);
        // two windows on: every slot is free again; 16 new keys fit without overflow
        for i in 16..32u8 {
            assert!(sw.hit(0, 2, w, &[i], 2, 1_200).unwrap().allowed);
        }
        assert_eq!(sw.overflows(), 0);
        assert_eq!(sw.len(1_200), 16);
        // an old key comes back with nothing counted
        assert_eq!(sw.hit(0, 2, w, &[0], 0, 1_200).unwrap().remaining, 2);
    }

    #[test]
    fn a_full_table_allows_new_keys_and_counts_the_overflow() {
        let sw = SharedWindows::new(16).unwrap();
        for i in 0..16u8 {
            sw.hit(0, 1, S, &[i], 1, S).unwrap();
        }
        assert_eq!(sw.overflows(), 0);
        // the 17th live key: allowed, not tracked, counted
        for n in 1..=3 {
            let d = sw.hit(0, 1, S, b"late", 1, S).unwrap();
            assert!(d.allowed);
            assert_eq!(sw.overflows(), n);
        }
        assert_eq!(sw.len(S), 16);
        // keys already in the table are still enforced
        assert!(!sw.hit(0, 1, S, &[7], 1, S).unwrap().allowed);
        // a denial or a zero cost never needs a slot, so never overflows
        assert!(!sw.hit(0, 1, S, b"late", 2, S).unwrap().allowed);
        assert!(sw.hit(0, 1, S, b"late", 0, S).unwrap().allowed);
        assert_eq!(sw.overflows(), 3);
    }

    #[test]
    fn identity_is_limiter_window_and_key() {
        let sw = SharedWindows::new(64).unwrap();
        assert!(sw.hit(0, 1, S, b"k", 1, S).unwrap().allowed);
        assert!(!sw.hit(0, 1, S, b"k", 1, S).unwrap().allowed);
        assert!(
            sw.hit(1, 1, S, b"k", 1, S).unwrap().allowed,
            "another limiter"
        );
        assert!(
            sw.hit(0, 1, 2 * S, b"k", 1, S).unwrap().allowed,
            "another window"
        );
        // the limit is per call: the same counter under a higher limit
        assert_eq!(sw.hit(0, 3, S, b"k", 1, S).unwrap().remaining, 1);
    }

    #[test]
    fn a_stale_now_counts_in_the_slots_window() {
        let sw = SharedWindows::new(16).unwrap();
        let w = 1_000;
        assert!(sw.hit(0, 4, w, b"k", 4, 5_500).unwrap().allowed); // window 5
        assert!(sw.hit(0, 4, w, b"k", 0, 6_000).unwrap().remaining == 0); // window 6, e = 0: P weighs 4
        assert!(sw.hit(0, 4, w, b"k", 1, 6_500).unwrap().allowed); // ⌊4·0.5⌋ = 2 → 1 fits
                                                                   // a process whose clock read came earlier (window 5) is treated as 6_000
        let d = sw.hit(0, 4, w, b"k", 1, 5_900).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        // at 6_000 + e it needs ⌊4·(1000−e)/1000⌋ + 1 + 1 ≤ 4, i.e. e ≥ 251; plus the 100 ns lag
        assert_eq!(d.retry_after, Some(100 + 251));
    }

    #[test]
    fn hit_all_binding_names_the_tightest_check_and_when_it_resets() {
        let sw = SharedWindows::new(64).unwrap();
        let check = |limit, window, key| Check {
            limiter: 0,
            limit,
            window,
            key,
        };
        // global 100/s, key 5/s, route 5/10s: the key and route both have 4 left after the first
        // hit; the route's usage ages out later, so it binds.
        let checks = [
            check(100, S, b"g"),
            check(5, S, b"k"),
            check(5, 10 * S, b"r"),
        ];
        let now = 3 * S + S / 4;
        let (d, b) = sw.hit_all_binding(&checks, 1, now).unwrap();
        assert!(d.allowed);
        let b = b.unwrap();
        assert_eq!((b.index, b.remaining), (2, 4));
        // one unit in the current 10 s window, 3.25 s in: it counts in full to the window's end,
        // and from the next window's first nanosecond ⌊1·(W−e)/W⌋ is 0
        assert_eq!(b.reset, (10 * S - now) + 1);
        // the same hit, as plain hit_all, agrees on the decision
        let plain = sw.hit_all(&checks[..2], 1, now).unwrap();
        assert!(plain.allowed);
        // now the key has 2 left, the route 3: the key binds
        let (_, b) = sw.hit_all_binding(&checks, 1, now).unwrap();
        assert_eq!(b.unwrap().index, 1);
        assert_eq!(b.unwrap().remaining, 2);
        // denied: no binding
        let (d, b) = sw
            .hit_all_binding(&[check(1, S, b"k2"), check(1, S, b"k2")], 1, now)
            .unwrap();
        assert!(!d.allowed);
        assert_eq!(b, None);
        assert_eq!(counter_reset(0, 0, 5, 10), 0);
        assert_eq!(counter_reset(4, 0, 5, 10), 10 + 1 - 3 - 5);
        assert_eq!(counter_reset(1, 0, 5, 10), 0); // 1 ns into the window it weighs nothing
    }

    #[test]
    fn hit_all_rolls_back_a_charge_denied_late() {
        let sw = SharedWindows::new(64).unwrap();
        let checks = [
            Check {
                limiter: 0,
                limit: 10,
                window: S,
                key: b"global",
            },
            Check {
                limiter: 0,
                limit: 1,
                window: S,
                key: b"user",
            },
        ];
        let d = sw.hit_all(&checks, 1, S).unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 0));
        let d = sw.hit_all(&checks, 1, S).unwrap();
        assert_eq!((d.allowed, d.first_denied), (false, Some(1)));
        assert_eq!(
            sw.hit(0, 10, S, b"global", 0, S).unwrap().remaining,
            9,
            "nothing charged"
        );
        // the rollback itself: charge then take back, in the same and in the next window
        let k = sw.key(0, S, b"global");
        let (d, at) = sw.charge(&k, Frame::new(S, S), 10, 3);
        assert!(d.allowed);
        let (i, stamp) = at.unwrap();
        sw.rollback(i, &k, stamp, S, 3);
        assert_eq!(sw.hit(0, 10, S, b"global", 0, S).unwrap().remaining, 9);
        let (_, at) = sw.charge(&k, Frame::new(S, S), 10, 3);
        sw.hit(0, 10, S, b"global", 1, 2 * S).unwrap(); // rolls the slot into the next window
        let (i, stamp) = at.unwrap();
        sw.rollback(i, &k, stamp, S, 3);
        // at 2S (e = 0) P weighs fully: 1 (the first charge) + 1 (this window) used
        assert_eq!(sw.hit(0, 10, S, b"global", 0, 2 * S).unwrap().remaining, 8);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(SharedWindows::new(0).is_err());
        assert!(SharedWindows::new(MAX_SLOTS + 1).is_err());
        let sw = SharedWindows::new(1).unwrap();
        assert_eq!(sw.capacity(), 16);
        assert!(sw.hit(0, 0, S, b"k", 1, 0).is_err());
        assert!(sw.hit(0, MAX_LIMIT + 1, S, b"k", 1, 0).is_err());
        assert!(sw.hit(0, 1, 0, b"k", 1, 0).is_err());
        assert!(sw.hit(0, 1, MAX_WINDOW_NS + 1, b"k", 1, 0).is_err());
        assert!(sw.hit(0, 1, S, b"k", 1, MAX_NOW_NS + 1).is_err());
        // extremes that are allowed do not overflow
        let d = sw
            .hit(0, MAX_LIMIT, MAX_WINDOW_NS, b"k", MAX_LIMIT, MAX_NOW_NS)
            .unwrap();
        assert!(d.allowed);
        let d = sw
            .hit(0, MAX_LIMIT, MAX_WINDOW_NS, b"k", u64::MAX, MAX_NOW_NS)
            .unwrap();
        assert_eq!(d.retry_after, None);
        let d = sw
            .hit(0, MAX_LIMIT, MAX_WINDOW_NS, b"k", 1, MAX_NOW_NS)
            .unwrap();
        assert!(!d.allowed);
    }

    #[test]
    fn a_caller_provided_region_can_be_attached() {
        let len = SharedWindows::region_len(100).unwrap();
        let mut mem = vec![0u128; len.div_ceil(16) + 4];
        // 64-byte align inside the buffer
        let base = mem.as_mut_ptr().cast::<u8>();
        let base = unsafe { base.add(base.align_offset(64)) };
        let a = unsafe { SharedWindows::create_in(base, len, 100) }.unwrap();
        let b = unsafe { SharedWindows::attach(base, len) }.unwrap();
        assert_eq!(b.capacity(), 128);
        assert!(a.hit(0, 1, S, b"k", 1, S).unwrap().allowed);
        assert!(
            !b.hit(0, 1, S, b"k", 1, S).unwrap().allowed,
            "same table, same seeds"
        );
        drop((a, b));
        let mut junk = vec![0u128; 64];
        assert!(unsafe { SharedWindows::attach(junk.as_mut_ptr().cast(), 1024) }.is_err());
    }

    /// Fork a child that runs `f` on the table and exits at once (no unwinding, no allocation in
    /// `f`), and wait until it has exited but leave it unreaped (a zombie), as a killed worker is
    /// until its supervisor reaps it. Returns its pid.
    fn child_dies_after(f: impl FnOnce()) -> libc::pid_t {
        // SAFETY: the child only runs `f` (atomics on the shared mapping) and `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            f();
            unsafe { libc::_exit(0) };
        }
        // Wait for the exit without reaping it (WNOWAIT), for 10 s at most: a child stuck on a
        // lock another test thread held at the fork must fail the test, not hang it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let flags = libc::WEXITED | libc::WNOWAIT | libc::WNOHANG;
            let rc = unsafe { libc::waitid(libc::P_PID, pid as u32, &mut info, flags) };
            assert_eq!(rc, 0);
            if unsafe { info.si_pid() } == pid {
                return pid;
            }
            if std::time::Instant::now() > deadline {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                reap(pid);
                panic!("forked child {pid} did not exit");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn reap(pid: libc::pid_t) {
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }

    #[test]
    fn an_insert_lock_left_by_a_dead_process_is_taken_over() {
        let sw = SharedWindows::new(64).unwrap();
        let k = sw.key(0, S, b"new-key");
        let pid = child_dies_after(|| {
            std::mem::forget(sw.lock(k.home).unwrap());
        });
        assert_eq!(
            sw.lock_word(k.home).load(Ordering::Relaxed) as u32,
            pid as u32
        );
        let t = std::time::Instant::now();
        assert!(sw.hit(0, 1, S, b"new-key", 1, S).unwrap().allowed);
        assert!(
            !sw.hit(0, 1, S, b"new-key", 1, S).unwrap().allowed,
            "it was counted"
        );
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
        assert_eq!(sw.overflows(), 0);
        reap(pid);
    }

    #[test]
    fn a_claim_left_by_a_dead_process_is_reclaimed() {
        let sw = SharedWindows::new(16).unwrap();
        let k = sw.key(0, S, b"k");
        // the child dies after writing the key, before the first charge
        let pid = child_dies_after(|| {
            let _lock = sw.lock(k.home).unwrap();
            let (i, _) = sw.claim(&k, S, my_pid()).unwrap();
            sw.slot(i).key.store(k.id, Ordering::Release);
            std::mem::forget(_lock);
        });
        assert!(sw.hit(0, 1, S, b"k", 1, S).unwrap().allowed);
        assert!(!sw.hit(0, 1, S, b"k", 1, S).unwrap().allowed);
        assert_eq!(sw.len(S), 1);
        // and one dying right after its claim, before the key: the slot is free for others
        let pid2 = child_dies_after(|| {
            let _ = sw.claim(&sw.key(0, S, b"other"), S, my_pid());
        });
        for i in 0..15u8 {
            assert!(sw.hit(0, 1, S, &[i], 1, S).unwrap().allowed);
        }
        assert_eq!(sw.overflows(), 0, "all 16 slots usable");
        assert_eq!(sw.len(S), 16);
        reap(pid);
        reap(pid2);
    }

    #[test]
    fn pid_liveness() {
        assert!(pid_alive(my_pid()));
        assert!(!pid_alive(0));
        let pid = child_dies_after(|| {});
        assert!(!pid_alive(pid as u32), "a zombie is dead");
        reap(pid);
        assert!(!pid_alive(pid as u32));
    }
}
