//! Consistent-hash ring with weights, virtual nodes and bounded loads.
//!
//! Placement (Karger et al. 1997, "Consistent Hashing and Random Trees"): every node owns
//! `round(weight × vnodes)` points on a 64-bit circle; a key belongs to the first point at or after
//! its own position, wrapping at the end. Positions come from one fixed hash, [`hash64`]
//! (MurmurHash64A, seed 0, words read little-endian), so placement is identical in every process and
//! on every platform. A node's replica `i` sits at `hash64(name_utf8 ‖ (i as u32).to_le_bytes())`.
//! Equal points are ordered by node name, so the ring depends only on the set of `(name, weight)`
//! pairs, never on insertion order. Consequently removing a node moves only the keys it owned, and
//! adding one moves keys only onto it.
//!
//! Bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016, "Consistent Hashing with Bounded Loads",
//! <https://arxiv.org/abs/1608.01350>; Envoy's `hash_balance_factor`, HAProxy's
//! `hash-balance-factor`): [`HashRing::acquire`] counts in-flight load per node and walks clockwise
//! from the key's home point past every node whose load has reached its capacity
//! `ceil(c × (total_load + 1) / n × points_i / mean_points)` — with equal weights exactly
//! `ceil(c × (total_load + 1) / n)`. Capacities sum to more than `total_load`, so a node under
//! capacity always exists.
//!
//! Layout: the points are one sorted `Vec<(position, owner slot)>` (interleaved, so the owner comes
//! with the cache line the search ends on); a lookup table indexed by the top bits of the hash
//! narrows the binary search to a bucket of about one point. Adding a node binary-searches where
//! each of its points goes and shifts the blocks between them with `copy_within` (memmove); removing
//! finds its points the same way and closes the gaps. The lookup table is adjusted in one sweep,
//! and rebuilt only when the ring's size changes its ideal size by more than a factor of two.
//! Measured (criterion, `benches/core.rs`): `get` 18 ns at 10 nodes × 1000 points, 41 ns at
//! 1000 × 1000; add + remove of one node at 1000 × 160 points 0.33 ms together.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::error::{invalid, Error, Result};

/// Default virtual nodes per unit of weight. A node's share of the circle varies by about
/// `1/sqrt(vnodes)`, so for 10 equal nodes the largest share over the mean is typically 1.05 at 1000
/// points (99th percentile over node-name sets 1.10), against 1.12 (p99 1.25) at 160, the ketama
/// default. 1000 points cost 16 KB per node; the lookup table keeps lookups O(1) regardless.
pub const DEFAULT_VNODES: u32 = 1000;

/// Upper bound for `vnodes`.
pub const MAX_VNODES: u32 = 1 << 16;

/// Upper bound for one node's points (`round(weight × vnodes)`): 1M points is 16 MB of ring.
pub const MAX_NODE_POINTS: u64 = 1 << 20;

/// Upper bound for the whole ring's points (1 GB of ring), so indices fit `u32` with room.
pub const MAX_TOTAL_POINTS: u64 = 1 << 26;

/// Seed of [`hash64`]. Fixed forever: changing it would move every key.
pub const HASH_SEED: u64 = 0;

/// MurmurHash64A (Austin Appleby, SMHasher), seed [`HASH_SEED`], 8-byte words read little-endian.
///
/// Chosen because it is fast on short keys (one multiply chain per 8 bytes), has a well-known
/// reference implementation to check against, and is a few lines of pure Python for the test model.
/// It is not keyed: anyone can compute where a key lands (bounded loads cap the harm of skew).
#[inline]
pub fn hash64(data: &[u8]) -> u64 {
    const M: u64 = 0xc6a4_a793_5bd1_e995;
    const R: u32 = 47;
    let mut h = HASH_SEED ^ (data.len() as u64).wrapping_mul(M);
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let mut k = u64::from_le_bytes(word).wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h ^= k;
        h = h.wrapping_mul(M);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate() {
            h ^= u64::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> R;
    h = h.wrapping_mul(M);
    h ^= h >> R;
    h
}

/// Position of replica `index` of node `name`: `hash64(name ‖ index as u32 little-endian)`.
pub fn vnode_point(name: &str, index: u32) -> u64 {
    let mut buf = Vec::with_capacity(name.len() + 4);
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    hash64(&buf)
}

/// Points a node of `weight` gets: `round(weight × vnodes)`, halves rounded away from zero.
pub fn points_for(weight: f64, vnodes: u32) -> Result<u32> {
    if !(weight.is_finite() && weight > 0.0) {
        return Err(invalid(format!(
            "weight must be a finite number > 0, got {weight}"
        )));
    }
    let points = (weight * f64::from(vnodes)).round();
    if points < 1.0 {
        return Err(invalid(format!(
            "weight {weight} is too small: round(weight × vnodes={vnodes}) is 0 points"
        )));
    }
    if points > MAX_NODE_POINTS as f64 {
        return Err(invalid(format!(
            "weight {weight} is too large: round(weight × vnodes={vnodes}) exceeds {MAX_NODE_POINTS} points"
        )));
    }
    Ok(points as u32)
}

/// Validate a bounded-load factor: finite and `> 1.0`.
pub fn check_balance_factor(factor: f64) -> Result<f64> {
    if factor.is_finite() && factor > 1.0 {
        Ok(factor)
    } else {
        Err(invalid(format!(
            "balance_factor must be a finite number > 1.0, got {factor}"
        )))
    }
}

/// Node handle: an index into the ring's slots, stable while the node is on the ring.
pub type Slot = u32;

struct Node<T> {
    name: Box<str>,
    weight: f64,
    points: u32,
    load: u64,
    data: T,
}

/// A consistent-hash ring. `T` is per-node data the caller wants back with lookups (the Python
/// binding keeps the node's name object there so a lookup returns it without allocating).
pub struct HashRing<T = ()> {
    vnodes: u32,
    balance_factor: Option<f64>,
    slots: Vec<Option<Node<T>>>,
    free: Vec<Slot>,
    /// Slot of each node, hashed by name.
    by_name: HashTable<Slot>,
    hasher: foldhash::fast::RandomState,
    /// Sorted by `(pos, owner name)`.
    points: Vec<Point>,
    /// `lut[b]` = index of the first point whose top `lut_bits` bits are `>= b`; `lut.len() = 2^bits + 1`.
    lut: Vec<u32>,
    lut_bits: u32,
    total_load: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    pos: u64,
    owner: Slot,
}

/// Lookup-table size for `n` points: one to two points per bucket, 2..=2^20 buckets (4 MB at most,
/// reached at 1M points).
fn lut_bits_for(n: usize) -> u32 {
    let n = n.max(2) as u64;
    (63 - n.leading_zeros()).clamp(1, 20)
}

impl<T> HashRing<T> {
    /// An empty ring. `vnodes` is points per unit weight (1..=[`MAX_VNODES`]); `balance_factor`
    /// (> 1.0) turns on bounded loads for [`acquire`](Self::acquire).
    pub fn new(vnodes: u32, balance_factor: Option<f64>) -> Result<Self> {
        if vnodes == 0 || vnodes > MAX_VNODES {
            return Err(invalid(format!(
                "vnodes must be in 1..={MAX_VNODES}, got {vnodes}"
            )));
        }
        let balance_factor = balance_factor.map(check_balance_factor).transpose()?;
        let mut ring = HashRing {
            vnodes,
            balance_factor,
            slots: Vec::new(),
            free: Vec::new(),
            by_name: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            points: Vec::new(),
            lut: Vec::new(),
            lut_bits: 1,
            total_load: 0,
        };
        ring.rebuild_lut();
        Ok(ring)
    }

    /// A ring holding `nodes` (`(name, weight, data)`; a repeated name keeps its last weight),
    /// sorted once instead of merged node by node.
    pub fn with_nodes<I>(vnodes: u32, balance_factor: Option<f64>, nodes: I) -> Result<Self>
    where
        I: IntoIterator<Item = (String, f64, T)>,
    {
        let mut ring = Self::new(vnodes, balance_factor)?;
        let mut total: u64 = 0;
        for (name, weight, data) in nodes {
            let points = points_for(weight, vnodes)?;
            match ring.slot_of(&name) {
                Some(slot) => {
                    let node = ring.node_mut(slot);
                    total -= u64::from(node.points);
                    node.weight = weight;
                    node.points = points;
                    node.data = data;
                }
                None => {
                    ring.insert_slot(name.into_boxed_str(), weight, points, data);
                }
            }
            total += u64::from(points);
            if total > MAX_TOTAL_POINTS {
                return Err(too_many_points());
            }
        }
        let mut points: Vec<Point> = Vec::with_capacity(total as usize);
        for (slot, node) in ring.slots.iter().enumerate() {
            if let Some(node) = node {
                points.extend((0..node.points).map(|i| Point {
                    pos: vnode_point(&node.name, i),
                    owner: slot as Slot,
                }));
            }
        }
        let slots = &ring.slots;
        let name = |s: Slot| slots[s as usize].as_ref().map_or("", |n| &n.name);
        points.sort_unstable_by(|a, b| {
            a.pos
                .cmp(&b.pos)
                .then_with(|| name(a.owner).cmp(name(b.owner)))
        });
        ring.points = points;
        ring.rebuild_lut();
        Ok(ring)
    }

    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    pub fn balance_factor(&self) -> Option<f64> {
        self.balance_factor
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Number of points on the ring (sum of every node's `round(weight × vnodes)`).
    pub fn point_count(&self) -> usize {
        self.points.len()
    }

    /// Sum of all nodes' loads.
    pub fn total_load(&self) -> u64 {
        self.total_load
    }

    pub fn slot_of(&self, name: &str) -> Option<Slot> {
        let h = self.hasher.hash_one(name);
        let slots = &self.slots;
        self.by_name
            .find(h, |&s| {
                slots[s as usize].as_ref().is_some_and(|n| &*n.name == name)
            })
            .copied()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.slot_of(name).is_some()
    }

    #[inline]
    fn node(&self, slot: Slot) -> &Node<T> {
        self.slots[slot as usize]
            .as_ref()
            .expect("owner slots always hold a node")
    }

    fn node_mut(&mut self, slot: Slot) -> &mut Node<T> {
        self.slots[slot as usize]
            .as_mut()
            .expect("owner slots always hold a node")
    }

    pub fn name(&self, slot: Slot) -> &str {
        &self.node(slot).name
    }

    pub fn data(&self, slot: Slot) -> &T {
        &self.node(slot).data
    }

    pub fn weight(&self, slot: Slot) -> f64 {
        self.node(slot).weight
    }

    pub fn load(&self, slot: Slot) -> u64 {
        self.node(slot).load
    }

    /// `(slot, name, weight, load, data)` of every node, in name order.
    pub fn nodes(&self) -> Vec<(Slot, &str, f64, u64, &T)> {
        let mut out: Vec<_> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(s, n)| {
                n.as_ref()
                    .map(|n| (s as Slot, &*n.name, n.weight, n.load, &n.data))
            })
            .collect();
        out.sort_unstable_by(|a, b| a.1.cmp(b.1));
        out
    }

    fn insert_slot(&mut self, name: Box<str>, weight: f64, points: u32, data: T) -> Slot {
        let h = self.hasher.hash_one(&*name);
        let node = Node {
            name,
            weight,
            points,
            load: 0,
            data,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(node);
                s
            }
            None => {
                self.slots.push(Some(node));
                (self.slots.len() - 1) as Slot
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_name.insert_unique(h, slot, |&s| {
            hasher.hash_one(slots[s as usize].as_ref().map_or("", |n| &*n.name))
        });
        slot
    }

    /// Add `name` with `weight`, or change its weight if present (its load is kept).
    /// Returns the node's slot and, for an update, the data it held before.
    pub fn add(&mut self, name: &str, weight: f64, data: T) -> Result<(Slot, Option<T>)> {
        let points = points_for(weight, self.vnodes)?;
        let existing = self.slot_of(name);
        let old_points = existing.map_or(0, |s| u64::from(self.node(s).points));
        let total = self.points.len() as u64 - old_points + u64::from(points);
        if total > MAX_TOTAL_POINTS {
            return Err(too_many_points());
        }
        let (slot, old) = match existing {
            Some(slot) => {
                self.remove_points(slot);
                let node = self.node_mut(slot);
                node.weight = weight;
                node.points = points;
                (slot, Some(std::mem::replace(&mut node.data, data)))
            }
            None => (self.insert_slot(name.into(), weight, points, data), None),
        };
        self.merge_points(slot, points);
        Ok((slot, old))
    }

    /// Remove `name`; returns its data, or `None` if it is not on the ring. Its load is dropped.
    pub fn remove(&mut self, name: &str) -> Option<T> {
        let slot = self.slot_of(name)?;
        self.remove_points(slot);
        let h = self.hasher.hash_one(name);
        if let Ok(entry) = self.by_name.find_entry(h, |&s| s == slot) {
            entry.remove();
        }
        let node = self.slots[slot as usize].take()?;
        self.total_load -= node.load;
        self.free.push(slot);
        Some(node.data)
    }

    /// Sorted positions of `slot`'s points.
    fn positions_of(&self, slot: Slot) -> Vec<u64> {
        let node = self.node(slot);
        let mut pos: Vec<u64> = (0..node.points)
            .map(|i| vnode_point(&node.name, i))
            .collect();
        pos.sort_unstable();
        pos
    }

    /// Index where a point `(pos, name)` sorts: before every point that is greater.
    fn insertion_index(&self, pos: u64, name: &str) -> usize {
        let slots = &self.slots;
        self.points.partition_point(|p| {
            p.pos < pos
                || (p.pos == pos && slots[p.owner as usize].as_ref().map_or("", |n| &n.name) < name)
        })
    }

    /// Insert `slot`'s points (it holds none yet): each block of old points between two new ones
    /// moves up once, by the number of new points below it.
    fn merge_points(&mut self, slot: Slot, count: u32) {
        let new = self.positions_of(slot);
        debug_assert_eq!(new.len(), count as usize);
        let name = self.node(slot).name.clone();
        let at: Vec<usize> = new
            .iter()
            .map(|&q| self.insertion_index(q, &name))
            .collect();
        let old_len = self.points.len();
        self.points.resize(
            old_len + new.len(),
            Point {
                pos: 0,
                owner: slot,
            },
        );
        let mut end = old_len;
        for j in (0..new.len()).rev() {
            self.points.copy_within(at[j]..end, at[j] + j + 1);
            self.points[at[j] + j] = Point {
                pos: new[j],
                owner: slot,
            };
            end = at[j];
        }
        self.adjust_lut(&new, true);
    }

    /// Delete `slot`'s points: each block of remaining points moves down once.
    fn remove_points(&mut self, slot: Slot) {
        let gone = self.positions_of(slot);
        let name = self.node(slot).name.clone();
        let mut at: Vec<usize> = Vec::with_capacity(gone.len());
        for (j, &q) in gone.iter().enumerate() {
            // A node's own equal positions sit side by side (same position, same name).
            let i = match at.last() {
                Some(&prev) if j > 0 && gone[j - 1] == q => prev + 1,
                _ => self.insertion_index(q, &name),
            };
            if self.points.get(i).map(|p| p.owner) != Some(slot) {
                // Unreachable while the ring is sorted; stay correct rather than corrupt it.
                self.points.retain(|p| p.owner != slot);
                self.rebuild_lut();
                return;
            }
            at.push(i);
        }
        let len = self.points.len();
        for (j, &i) in at.iter().enumerate() {
            let next = at.get(j + 1).copied().unwrap_or(len);
            self.points.copy_within(i + 1..next, i - j);
        }
        self.points.truncate(len - at.len());
        self.adjust_lut(&gone, false);
    }

    /// Shift the lookup table for sorted positions just inserted (`added`) or deleted: bucket `b`'s
    /// start moves by the number of those positions in buckets below `b`. Rebuilt instead when the
    /// ring's size calls for a table two or more times larger or smaller (hysteresis, so a ring
    /// hovering at a power of two does not rebuild on every change).
    fn adjust_lut(&mut self, changed: &[u64], added: bool) {
        let want = lut_bits_for(self.points.len());
        if want.abs_diff(self.lut_bits) > 1 {
            self.rebuild_lut();
            return;
        }
        let shift = 64 - self.lut_bits;
        let mut below = 0usize;
        for (b, start) in self.lut.iter_mut().enumerate() {
            while below < changed.len() && ((changed[below] >> shift) as usize) < b {
                below += 1;
            }
            if added {
                *start += below as u32;
            } else {
                *start -= below as u32;
            }
        }
        // The last entry is the end of the array, past every bucket.
        if let Some(last) = self.lut.last_mut() {
            *last = self.points.len() as u32;
        }
    }

    fn rebuild_lut(&mut self) {
        let bits = lut_bits_for(self.points.len());
        let buckets = 1usize << bits;
        let shift = 64 - bits;
        self.lut.clear();
        self.lut.reserve(buckets + 1);
        let mut i = 0usize;
        for b in 0..buckets {
            while i < self.points.len() && ((self.points[i].pos >> shift) as usize) < b {
                i += 1;
            }
            self.lut.push(i as u32);
        }
        self.lut.push(self.points.len() as u32);
        self.lut_bits = bits;
    }

    /// Index of the first point at or after `h`, wrapping to 0; the ring must not be empty.
    #[inline]
    fn home_index(&self, h: u64) -> usize {
        let b = (h >> (64 - self.lut_bits)) as usize;
        let lo = self.lut[b] as usize;
        let hi = self.lut[b + 1] as usize;
        let idx = lo + self.points[lo..hi].partition_point(|p| p.pos < h);
        if idx == self.points.len() {
            0
        } else {
            idx
        }
    }

    #[cold]
    #[inline(never)]
    fn empty() -> Error {
        Error::Empty("the hash ring has no nodes".into())
    }

    /// The node owning `key` (bytes of a `str` key are its UTF-8).
    #[inline]
    pub fn get(&self, key: &[u8]) -> Result<Slot> {
        if self.points.is_empty() {
            return Err(Self::empty());
        }
        Ok(self.points[self.home_index(hash64(key))].owner)
    }

    /// Up to `n` distinct nodes in ring order from `key`'s home point: its owner first, then the next
    /// distinct nodes clockwise (failover order). `n` at or above the node count returns every node.
    pub fn get_n(&self, key: &[u8], n: usize) -> Result<Vec<Slot>> {
        if self.points.is_empty() {
            return Err(Self::empty());
        }
        let want = n.min(self.len());
        let mut out: Vec<Slot> = Vec::with_capacity(want);
        if want == 0 {
            return Ok(out);
        }
        let mut seen = vec![false; self.slots.len()];
        let start = self.home_index(hash64(key));
        let len = self.points.len();
        for step in 0..len {
            let owner = self.points[(start + step) % len].owner;
            if !seen[owner as usize] {
                seen[owner as usize] = true;
                out.push(owner);
                if out.len() == want {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Capacity of `slot` under bounded loads with factor `c`, for one more unit of load:
    /// `ceil(c × (total_load + 1) / n × (points × n / total_points))`.
    fn capacity(&self, c: f64, slot: Slot) -> f64 {
        let n = self.len() as u64;
        let base = c * (self.total_load.saturating_add(1)) as f64 / n as f64;
        let rel = (u64::from(self.node(slot).points) * n) as f64 / self.points.len() as f64;
        (base * rel).ceil()
    }

    /// Pick a node for `key` and count one unit of load on it. Without a balance factor this is
    /// [`get`](Self::get); with one, nodes at capacity are skipped clockwise from the home point.
    pub fn acquire(&mut self, key: &[u8]) -> Result<Slot> {
        if self.points.is_empty() {
            return Err(Self::empty());
        }
        let start = self.home_index(hash64(key));
        let mut chosen = self.points[start].owner;
        if let Some(c) = self.balance_factor {
            let len = self.points.len();
            // Some node is always under capacity (capacities sum to > total_load); the home node
            // remains the answer only if rounding ever said otherwise.
            for step in 0..len {
                let owner = self.points[(start + step) % len].owner;
                if (self.node(owner).load as f64) < self.capacity(c, owner) {
                    chosen = owner;
                    break;
                }
            }
        }
        let node = self.node_mut(chosen);
        node.load = node.load.saturating_add(1);
        self.total_load = self.total_load.saturating_add(1);
        Ok(chosen)
    }

    /// Give back one unit of load taken by [`acquire`](Self::acquire) on `slot`.
    pub fn release(&mut self, slot: Slot) -> Result<()> {
        let node = self.node_mut(slot);
        if node.load == 0 {
            return Err(invalid(format!(
                "node {:?} has no load to release",
                node.name
            )));
        }
        node.load -= 1;
        self.total_load -= 1;
        Ok(())
    }
}

#[cold]
#[inline(never)]
fn too_many_points() -> Error {
    invalid(format!("the ring would exceed {MAX_TOTAL_POINTS} points"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> HashRing {
        HashRing::with_nodes(
            DEFAULT_VNODES,
            None,
            names.iter().map(|n| (n.to_string(), 1.0, ())),
        )
        .unwrap()
    }

    fn layout(r: &HashRing) -> Vec<(u64, String)> {
        r.points
            .iter()
            .map(|p| (p.pos, r.name(p.owner).to_string()))
            .collect()
    }

    /// The sorted array and lookup table match a ring built from scratch with the same nodes.
    fn assert_consistent(r: &HashRing) {
        let fresh: HashRing = HashRing::with_nodes(
            r.vnodes(),
            None,
            r.nodes()
                .into_iter()
                .map(|(_, n, w, _, _)| (n.to_string(), w, ())),
        )
        .unwrap();
        assert_eq!(layout(r), layout(&fresh));
        let shift = 64 - r.lut_bits;
        for (b, &start) in r.lut.iter().enumerate().take(1 << r.lut_bits) {
            let expect = r
                .points
                .partition_point(|p| ((p.pos >> shift) as usize) < b);
            assert_eq!(start as usize, expect, "bucket {b}");
        }
        assert_eq!(*r.lut.last().unwrap() as usize, r.points.len());
    }

    fn owner(r: &HashRing, key: &str) -> String {
        r.name(r.get(key.as_bytes()).unwrap()).to_string()
    }

    #[test]
    fn hash_matches_reference_murmurhash64a() {
        // Values from the SMHasher reference C code (MurmurHash64A, seed 0).
        assert_eq!(hash64(b""), 0);
        assert_eq!(hash64(b"a"), 0x0717_17d2_d36b_6b11);
        assert_eq!(hash64(b"abc"), 0x9cc9_c334_98a9_5efb);
        assert_eq!(hash64(b"hello world"), 0xd3ba_2368_a832_afce);
        assert_eq!(hash64(b"0123456789abcdef"), 0x93a9_2d1a_91a2_4bc7);
        assert_eq!(hash64(b"the quick brown fox jumps"), 0x7abc_f0ac_f218_f0c8);
        assert_eq!(vnode_point("node-1", 0), 0xac8a_6062_1c4e_a7bf);
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let a = ring(&["a", "b", "c", "d"]);
        let mut b: HashRing = HashRing::new(DEFAULT_VNODES, None).unwrap();
        for n in ["d", "b", "a", "c"] {
            b.add(n, 1.0, ()).unwrap();
        }
        assert_eq!(layout(&a), layout(&b));
        for k in 0..2000 {
            let key = format!("key{k}");
            assert_eq!(owner(&a, &key), owner(&b, &key));
        }
    }

    #[test]
    fn removal_moves_only_the_removed_nodes_keys() {
        let mut r = ring(&["a", "b", "c", "d", "e"]);
        let before: Vec<String> = (0..5000).map(|k| owner(&r, &format!("k{k}"))).collect();
        r.remove("c").unwrap();
        for (k, was) in before.iter().enumerate() {
            let now = owner(&r, &format!("k{k}"));
            if was != "c" {
                assert_eq!(&now, was);
            } else {
                assert_ne!(now, "c");
            }
        }
        r.add("c", 1.0, ()).unwrap();
        let again: Vec<String> = (0..5000).map(|k| owner(&r, &format!("k{k}"))).collect();
        assert_eq!(before, again);
    }

    #[test]
    fn ties_are_ordered_by_name() {
        // Force a tie: give "zz" the point "a" will get, then merge "a" in.
        let pa = vnode_point("a", 0);
        let mut t: HashRing = HashRing::new(1, None).unwrap();
        t.add("zz", 1.0, ()).unwrap();
        t.points[0].pos = pa;
        let zz = t.slot_of("zz").unwrap();
        t.add("a", 1.0, ()).unwrap();
        let a = t.slot_of("a").unwrap();
        assert_eq!(
            t.points,
            vec![Point { pos: pa, owner: a }, Point { pos: pa, owner: zz }]
        );
        t.remove("a").unwrap();
        assert_eq!(t.points, vec![Point { pos: pa, owner: zz }]);
    }

    #[test]
    fn lookup_table_agrees_with_plain_binary_search() {
        let r = ring(&["n1", "n2", "n3", "n4", "n5", "n6", "n7"]);
        for k in 0..20_000u64 {
            let h = hash64(&k.to_le_bytes());
            let plain = r.points.partition_point(|p| p.pos < h) % r.points.len();
            assert_eq!(r.home_index(h), plain);
        }
        let last = r.points.partition_point(|p| p.pos < u64::MAX) % r.points.len();
        assert_eq!(r.home_index(u64::MAX), last);
        assert_eq!(r.home_index(0), 0);
    }

    #[test]
    fn add_remove_churn_keeps_array_and_table_exact() {
        // Sizes cross several powers of two, so both the incremental and the rebuild paths run.
        let mut r: HashRing = HashRing::new(37, None).unwrap();
        let mut state = 0x1234_5678_u64;
        for step in 0..300 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let name = format!("n{}", (state >> 33) % 40);
            if r.contains(&name) && step % 3 != 0 {
                r.remove(&name).unwrap();
            } else {
                let weight = [0.5, 1.0, 2.0, 3.5][(state >> 20) as usize % 4];
                r.add(&name, weight, ()).unwrap();
            }
            if step % 10 == 0 {
                assert_consistent(&r);
            }
        }
        assert_consistent(&r);
        for name in r
            .nodes()
            .into_iter()
            .map(|n| n.1.to_string())
            .collect::<Vec<_>>()
        {
            r.remove(&name).unwrap();
        }
        assert_consistent(&r);
        assert!(r.is_empty() && r.point_count() == 0);
    }

    #[test]
    fn weights_set_point_counts() {
        let mut r: HashRing = HashRing::new(10, None).unwrap();
        r.add("a", 2.0, ()).unwrap();
        r.add("b", 0.25, ()).unwrap(); // 2.5 rounds away from zero
        assert_eq!(r.point_count(), 23);
        assert!(r.add("c", 0.01, ()).is_err());
        assert!(r.add("c", 0.0, ()).is_err());
        assert!(r.add("c", f64::NAN, ()).is_err());
        assert!(r.add("c", -1.0, ()).is_err());
        assert!(r.add("c", 1e300, ()).is_err());
        assert_eq!(r.len(), 2);
        r.add("a", 1.0, ()).unwrap();
        assert_eq!(r.point_count(), 13);
    }

    #[test]
    fn get_n_returns_distinct_nodes_in_ring_order() {
        let r = ring(&["a", "b", "c"]);
        let all = r.get_n(b"k", 10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0], r.get(b"k").unwrap());
        assert_eq!(r.get_n(b"k", 2).unwrap(), all[..2]);
        assert!(r.get_n(b"k", 0).unwrap().is_empty());
    }

    #[test]
    fn empty_ring_errors() {
        let r: HashRing = HashRing::new(4, None).unwrap();
        assert!(matches!(r.get(b"x"), Err(Error::Empty(_))));
        assert!(matches!(r.get_n(b"x", 1), Err(Error::Empty(_))));
        assert!(HashRing::<()>::new(0, None).is_err());
        assert!(HashRing::<()>::new(4, Some(1.0)).is_err());
        assert!(HashRing::<()>::new(4, Some(f64::INFINITY)).is_err());
    }

    #[test]
    fn bounded_loads_never_exceed_capacity() {
        let mut r: HashRing =
            HashRing::with_nodes(100, Some(1.25), (0..8).map(|i| (format!("n{i}"), 1.0, ())))
                .unwrap();
        let mut taken = Vec::new();
        for k in 0..2000 {
            // All keys equal: the worst skew possible.
            let cap = (1.25 * (r.total_load() + 1) as f64 / 8.0).ceil() as u64;
            let s = r
                .acquire(if k % 2 == 0 { b"hot" } else { b"hot2" })
                .unwrap();
            assert!(r.load(s) <= cap, "load {} > cap {cap}", r.load(s));
            taken.push(s);
        }
        let max = (0..8)
            .map(|i| r.load(r.slot_of(&format!("n{i}")).unwrap()))
            .max()
            .unwrap();
        assert!(max as f64 <= (1.25f64 * 2000.0 / 8.0).ceil());
        for s in taken {
            r.release(s).unwrap();
        }
        assert_eq!(r.total_load(), 0);
        let home = r.get(b"hot").unwrap();
        assert_eq!(r.acquire(b"hot").unwrap(), home);
        r.release(home).unwrap();
        assert!(r.release(home).is_err());
    }

    #[test]
    fn remove_drops_load_and_reuses_slot() {
        let mut r = ring(&["a", "b"]);
        let s = r.acquire(b"x").unwrap();
        let name = r.name(s).to_string();
        assert_eq!(r.total_load(), 1);
        r.remove(&name).unwrap();
        assert_eq!(r.total_load(), 0);
        assert!(r.remove(&name).is_none());
        let (again, old) = r.add("c", 1.0, ()).unwrap();
        assert_eq!(again, s);
        assert!(old.is_none());
        assert_eq!(r.len(), 2);
    }
}
