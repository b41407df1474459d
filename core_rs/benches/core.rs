//! Criterion micro-benchmarks of the algorithm layer (no Python): `cargo bench -p pyproxy-core`.

use std::hint::black_box;

use _core::cache::{KeyKind, LruCache, Ttl};
use criterion::{criterion_group, criterion_main, Criterion};

fn cache(c: &mut Criterion) {
    let n = 100_000u64;
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("/api/v1/items/{i:08}").into_bytes()).collect();
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
            lru.set(KeyKind::Str, key.as_bytes(), &value, Ttl::Default, 3).unwrap();
        })
    });
}

criterion_group!(benches, cache);
criterion_main!(benches);
