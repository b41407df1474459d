//! The local side of hybrid rate limiting (`pyproxy.ratelimit.hybrid`): one process's view of
//! counters that Redis reconciles, and the all-or-none charge of a request against them.
//!
//! A counter is a sliding-window counter (fixed windows of `w` µs aligned on Redis' clock) whose
//! cluster-wide counts of two windows (`gidx − 1` and `gidx`) are as Redis last reported them, plus
//! the units this process admitted since: `pending` (not sent yet) and `inflight` (sent, reply not
//! back). A request is decided on `⌊P·(W−e)/W⌋ + C` over those counts (the arithmetic of
//! [`crate::window::counter_decide`]) and charged to `pending`. The reconciliation (Python: a Lua
//! script per sync) moves `pending` to `inflight` ([`HybridCounter::begin_sync`]), then either
//! puts it back ([`HybridCounter::sync_failed`]) or takes the new global counts
//! ([`HybridCounter::sync_done`]).

use crate::window::{counter_decide, counter_reset};

/// Units per window index, for the few windows that matter at once (kept in a short list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deltas(Vec<(i64, u64)>);

impl Deltas {
    /// Units of window `idx`.
    #[inline]
    pub fn get(&self, idx: i64) -> u64 {
        self.0
            .iter()
            .find(|(i, _)| *i == idx)
            .map_or(0, |(_, u)| *u)
    }

    /// Add `units` to window `idx`.
    #[inline]
    pub fn add(&mut self, idx: i64, units: u64) {
        match self.0.iter_mut().find(|(i, _)| *i == idx) {
            Some((_, u)) => *u = u.saturating_add(units),
            None => self.0.push((idx, units)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(window index, units)`, in the order the windows were first charged.
    pub fn items(&self) -> &[(i64, u64)] {
        &self.0
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, u)| *u).sum()
    }

    /// Move every unit into `other`.
    fn move_into(&mut self, other: &mut Deltas) {
        for (idx, units) in self.0.drain(..) {
            other.add(idx, units);
        }
    }
}

/// One counter's view (see the module doc).
#[derive(Clone, Debug)]
pub struct HybridCounter {
    pub limit: u64,
    /// Window, µs (at least 1).
    pub w: u64,
    /// The window the global counts are of (Redis clock); far in the past until the first sync.
    pub gidx: i64,
    /// Global count of window `gidx − 1`.
    pub gp: u64,
    /// Global count of window `gidx`.
    pub gc: u64,
    pub pending: Deltas,
    pub inflight: Deltas,
    /// Used since the last sync (only those are reconciled; idle ones may be dropped).
    pub used: bool,
    /// Dropped by its limiter (no longer reconciled): [`charge_all`] refuses it.
    pub retired: bool,
}

/// What a charge saw of one counter: the request's window, its offset, the current window's
/// count before the charge, the units left after it, and µs until its usage ages out entirely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charged {
    pub idx: i64,
    pub e: u64,
    pub cur: u64,
    pub remaining: u64,
    pub reset: u64,
}

impl HybridCounter {
    pub fn new(limit: u64, w: u64) -> Self {
        HybridCounter {
            limit,
            w: w.max(1),
            gidx: -(1 << 62),
            gp: 0,
            gc: 0,
            pending: Deltas::default(),
            inflight: Deltas::default(),
            used: true,
            retired: false,
        }
    }

    /// Units in window `idx` as far as this process knows.
    #[inline]
    pub fn count(&self, idx: i64) -> u64 {
        let global = if idx == self.gidx {
            self.gc
        } else if idx == self.gidx - 1 {
            self.gp
        } else {
            0
        };
        global
            .saturating_add(self.pending.get(idx))
            .saturating_add(self.inflight.get(idx))
    }

    /// The window index of `t_us` and the offset in it.
    #[inline]
    pub fn frame(&self, t_us: u64) -> (i64, u64) {
        let idx = t_us / self.w;
        (idx as i64, t_us - idx * self.w)
    }

    /// Nothing to push and not used since the last sync: may be forgotten.
    pub fn idle(&self) -> bool {
        !self.used && self.pending.is_empty() && self.inflight.is_empty()
    }

    /// A sync starts: what is pending goes in flight; returns everything in flight.
    pub fn begin_sync(&mut self) -> &Deltas {
        self.used = false;
        let mut pending = std::mem::take(&mut self.pending);
        pending.move_into(&mut self.inflight);
        &self.inflight
    }

    /// The sync failed (or may not have run): what was in flight is pending again.
    pub fn sync_failed(&mut self) {
        let mut inflight = std::mem::take(&mut self.inflight);
        inflight.move_into(&mut self.pending);
        self.used = true;
    }

    /// The sync ran at Redis time `now_us` and reported the global counts of the previous and the
    /// current window: those replace this view's; units still pending for windows that no longer
    /// matter are dropped. Returns the units the sync pushed.
    pub fn sync_done(&mut self, now_us: u64, gp: u64, gc: u64) -> u64 {
        let pushed = self.inflight.total();
        self.inflight = Deltas::default();
        self.gidx = self.frame(now_us).0;
        self.gp = gp;
        self.gc = gc;
        let oldest = self.gidx - 1;
        self.pending.0.retain(|(i, _)| *i >= oldest);
        pushed
    }
}

/// Charge `cost` to every counter at Redis time `t_us` if each one's estimate leaves room for it
/// (all or none). Allowed: `out` gets one [`Charged`] per counter and the units are pending;
/// denied, or a counter retired: `false`, nothing charged (`out` may hold a partial view). The counters must be
/// distinct objects (a counter listed twice would need its own cost added: the caller's general
/// path does that).
pub fn charge_all(
    counters: &mut [&mut HybridCounter],
    cost: u64,
    t_us: u64,
    out: &mut Vec<Charged>,
) -> bool {
    out.clear();
    for c in counters.iter() {
        if c.retired {
            return false;
        }
        let (idx, e) = c.frame(t_us);
        let (prev, cur) = (c.count(idx - 1), c.count(idx));
        let d = counter_decide(prev, cur, cost, c.limit, e, c.w);
        if !d.allowed {
            return false;
        }
        out.push(Charged {
            idx,
            e,
            cur,
            remaining: d.remaining,
            // as the Redis script gives it: after the charge
            reset: counter_reset(prev, cur.saturating_add(cost), e, c.w),
        });
    }
    for (c, got) in counters.iter_mut().zip(out.iter()) {
        if cost > 0 {
            c.pending.add(got.idx, cost);
        }
        c.used = true;
    }
    true
}

/// The index of the charged counter a `RateLimit` header advertises: the least remaining, on a
/// tie the one whose usage ages out last (`Decision.binding`'s choice).
pub fn binding(charged: &[Charged]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, c) in charged.iter().enumerate() {
        let better = match best {
            None => true,
            Some(b) => {
                let b = &charged[b];
                c.remaining < b.remaining || (c.remaining == b.remaining && c.reset > b.reset)
            }
        };
        if better {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(cs: &mut [HybridCounter], cost: u64, t: u64) -> Option<Vec<Charged>> {
        let mut refs: Vec<&mut HybridCounter> = cs.iter_mut().collect();
        let mut out = Vec::new();
        charge_all(&mut refs, cost, t, &mut out).then_some(out)
    }

    #[test]
    fn charges_all_or_none_and_counts_pending_units() {
        let mut cs = [
            HybridCounter::new(3, 1_000_000),
            HybridCounter::new(10, 1_000_000),
        ];
        for left in [2, 1, 0] {
            let got = charge(&mut cs, 1, 5_000_000).expect("room");
            assert_eq!(got[0].remaining, left);
            assert_eq!(got[0].idx, 5);
        }
        assert!(charge(&mut cs, 1, 5_000_000).is_none());
        assert_eq!(cs[1].pending.get(5), 3, "a denial charges nothing");
        // the next window: ⌊3·(W−e)/W⌋ of the previous one still counts (2 at e = 0.2 s)
        let got = charge(&mut cs, 1, 6_200_000).expect("one unit of room");
        assert_eq!(
            (got[0].remaining, got[1].remaining),
            (0, 10 - 3 * 8 / 10 - 1)
        );
        assert_eq!(binding(&got), Some(0));
        assert!(charge(&mut cs, 1, 6_200_000).is_none());
        let mut fresh = [HybridCounter::new(3, 1_000_000)];
        fresh[0].retired = true;
        assert!(
            charge(&mut fresh, 1, 0).is_none(),
            "a retired counter is never charged"
        );
    }

    #[test]
    fn a_sync_moves_units_through_flight_and_takes_the_global_counts() {
        let mut c = HybridCounter::new(100, 1_000_000);
        c.pending.add(7, 4);
        assert_eq!(c.begin_sync().items(), &[(7, 4)]);
        assert!(c.pending.is_empty() && !c.used);
        c.pending.add(7, 1);
        c.sync_failed();
        assert_eq!(
            (c.pending.get(7), c.inflight.is_empty(), c.used),
            (5, true, true)
        );
        c.begin_sync();
        c.pending.add(6, 2); // a unit for a window about to stop mattering
        c.pending.add(8, 1);
        assert_eq!(c.sync_done(8_500_000, 40, 9), 5);
        assert_eq!((c.gidx, c.count(7), c.count(8)), (8, 40, 10));
        assert_eq!(c.pending.items(), &[(8, 1)], "window 6 no longer matters");
        assert!(!c.idle());
        c.begin_sync();
        c.sync_done(8_600_000, 40, 10);
        assert!(c.idle());
    }

    #[test]
    fn binding_prefers_least_remaining_then_latest_reset() {
        let mk = |remaining, reset| Charged {
            idx: 0,
            e: 0,
            cur: 0,
            remaining,
            reset,
        };
        assert_eq!(binding(&[mk(5, 10), mk(3, 1), mk(3, 7)]), Some(2));
        assert_eq!(binding(&[]), None);
    }
}
