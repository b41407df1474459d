//! Criterion micro-benchmarks of the algorithm layer (no Python): `cargo bench -p pyproxy-core`.

use std::hint::black_box;

use _core::cache::{KeyKind, LruCache, Ttl};
use _core::ring::{self, HashRing};
use criterion::{criterion_group, criterion_main, Criterion};

fn cache(c: &mut Criterion) {
    let n = 100_000u64;
    let keys: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("/api/v1/items/{i:08}").into_bytes())
        .collect();
    let value = vec![b'v'; 100];
    let mut lru = LruCache::new(1 << 40, Some(n as usize), Some(600_000_000_000)).unwrap();
    for k in &keys {
        lru.set(KeyKind::Str, k, &value, Ttl::Default, 1).unwrap();
    }
    let mut i = 0usize;
    c.bench_function("cache/get_hit_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(lru.get(KeyKind::Str, &keys[i], || 2).map(|v| v.len()))
        })
    });
    c.bench_function("cache/get_miss_100k", |b| {
        b.iter(|| black_box(lru.get(KeyKind::Bytes, b"/api/v1/missing", || 2).is_none()))
    });
    let mut j = 0u64;
    c.bench_function("cache/set_evicting_100k", |b| {
        b.iter(|| {
            j += 1;
            let key = format!("/api/v1/new/{j:010}");
            lru.set(KeyKind::Str, key.as_bytes(), &value, Ttl::Default, 3)
                .unwrap();
        })
    });
}

fn ring(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("/api/v1/items/{i:08}").into_bytes())
        .collect();
    c.bench_function("ring/hash64_22b", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(ring::hash64(&keys[i]))
        })
    });
    for (nodes, vnodes) in [
        (10u32, ring::DEFAULT_VNODES),
        (1000, 160),
        (1000, ring::DEFAULT_VNODES),
    ] {
        let r: HashRing = HashRing::with_nodes(
            vnodes,
            None,
            (0..nodes).map(|i| (format!("10.0.{}.{}:8080", i / 256, i % 256), 1.0, ())),
        )
        .unwrap();
        let mut i = 0usize;
        c.bench_function(&format!("ring/get_{nodes}n_{vnodes}v"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(r.get(&keys[i]).unwrap())
            })
        });
    }
    let mut r: HashRing = HashRing::with_nodes(
        160,
        None,
        (0..1000).map(|i| (format!("10.0.{}.{}:8080", i / 256, i % 256), 1.0, ())),
    )
    .unwrap();
    c.bench_function("ring/add_remove_1000n_160v", |b| {
        b.iter(|| {
            r.add("new-node:8080", 1.0, ()).unwrap();
            black_box(r.remove("new-node:8080"))
        })
    });
}

fn window(c: &mut Criterion) {
    use _core::window::{self, SlidingWindow};
    const S: u64 = 1_000_000_000;
    let keys: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("user-{i:08}").into_bytes())
        .collect();
    for exact in [false, true] {
        let mode = if exact { "exact" } else { "counter" };
        let mut w = SlidingWindow::new(1_000_000, 60 * S, exact).unwrap();
        let (mut i, mut now) = (0usize, S);
        c.bench_function(&format!("window/{mode}_hit_10k_keys"), |b| {
            b.iter(|| {
                i = (i + 7919) % keys.len();
                now += 1_000;
                black_box(w.hit(KeyKind::Str, &keys[i], 1, now).unwrap().allowed)
            })
        });
        let mut w = SlidingWindow::new(100, S, exact).unwrap();
        c.bench_function(&format!("window/{mode}_hit_hot_key_denying"), |b| {
            b.iter(|| {
                now += 1_000;
                black_box(w.hit(KeyKind::Str, b"hot", 1, now).unwrap().allowed)
            })
        });
    }
    let mut g = SlidingWindow::new(1 << 40, S, false).unwrap();
    let mut r = SlidingWindow::new(1 << 40, S, false).unwrap();
    let mut u = SlidingWindow::new(1 << 40, S, false).unwrap();
    let (mut i, mut now) = (0usize, S);
    c.bench_function("window/hit_all_3_levels_10k_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            now += 1_000;
            let checks: [(usize, KeyKind, &[u8]); 3] = [
                (0, KeyKind::Str, b"*"),
                (1, KeyKind::Str, b"/v1/chat"),
                (2, KeyKind::Str, &keys[i]),
            ];
            black_box(
                window::hit_all(
                    &mut [Some(&mut g), Some(&mut r), Some(&mut u)],
                    &checks,
                    1,
                    now,
                )
                .unwrap()
                .allowed,
            )
        })
    });
}

fn shared_window(c: &mut Criterion) {
    use _core::shared_window::{Check, SharedWindows};
    const S: u64 = 1_000_000_000;
    let keys: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("user-{i:08}").into_bytes())
        .collect();
    let sw = SharedWindows::new(20_000).unwrap();
    let (mut i, mut now) = (0usize, S);
    c.bench_function("shared_window/hit_10k_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            now += 1_000;
            black_box(
                sw.hit(0, 1_000_000, 60 * S, &keys[i], 1, now)
                    .unwrap()
                    .allowed,
            )
        })
    });
    c.bench_function("shared_window/hit_hot_key_denying", |b| {
        b.iter(|| {
            now += 1_000;
            black_box(sw.hit(0, 100, S, b"hot", 1, now).unwrap().allowed)
        })
    });
    c.bench_function("shared_window/hit_all_3_levels_10k_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            now += 1_000;
            let checks = [
                Check {
                    limiter: 0,
                    limit: u32::MAX as u64,
                    window: S,
                    key: b"*",
                },
                Check {
                    limiter: 1,
                    limit: u32::MAX as u64,
                    window: S,
                    key: b"/v1/chat",
                },
                Check {
                    limiter: 2,
                    limit: u32::MAX as u64,
                    window: S,
                    key: &keys[i],
                },
            ];
            black_box(sw.hit_all(&checks, 1, now).unwrap().allowed)
        })
    });
}

criterion_group!(benches, cache, ring, window, shared_window);
criterion_main!(benches);
