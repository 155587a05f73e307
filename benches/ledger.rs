//! Ledger throughput, with the raw ceiling of this machine measured in the same run.
//!
//! `cargo bench --bench ledger` (set `CONTIMG_BENCH_DIR` to choose the disk; default
//! `target/bench-ledger`; `CONTIMG_BENCH_REPLAY` sets the replay size, default 2,000,000).
//!
//! Figures:
//! - raw ceiling: a sled batch of N small values, `flush`, `fdatasync` of the data file,
//!   no ledger on top, for N = 1 and N = 64;
//! - the same with the ledger's keys (a log chunk, and per event a stream-index key: layout
//!   3), and with an id-index key beside each (ids of version 7 as the ledger made them):
//!   what sled allows the ledger, and what it allowed layout 2, with two index keys an
//!   event;
//! - durable single-event appends per second with 1 appender and with 64 concurrent ones;
//! - `$all` replay (decode and checksum every record) in events per second.
//!
//! The ledger and the ceilings run on mimalloc, the allocator `contimg` ships with
//! (`src/main.rs`); before f02c99e they ran on glibc's (`docs/benchmarks.md`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contimg::events::{ExpectedRevision, ProposedEvent, Store};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUN: Duration = Duration::from_secs(4);

fn bench_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("CONTIMG_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench-ledger"));
    let dir = base.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn payload(i: u64) -> Vec<u8> {
    format!(r#"{{"attempt":1,"destination":"/data/products/images/2026-11-30T10:{:02}:00.img.fits","trigger":"auto","n":{i}}}"#, i % 60).into_bytes()
}

/// sled batch + flush + fdatasync, nothing else: what the disk allows.
fn raw_ceiling(batch: usize) -> f64 {
    let dir = bench_dir(&format!("raw-{batch}"));
    let db = sled::open(&dir).unwrap();
    let tree = db.open_tree("log").unwrap();
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
        .unwrap();
    let value = vec![7u8; 220];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        let mut b = sled::Batch::default();
        for _ in 0..batch {
            b.insert(&n.to_be_bytes(), value.clone());
            n += 1;
        }
        tree.apply_batch(b).unwrap();
        db.flush().unwrap();
        data.sync_data().unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The same, with the keys the ledger writes (one log chunk per batch, and per event a
/// stream-index entry): sled and the disk doing the ledger's writes with none of its
/// logic. With `id_index`, an id-index entry beside each, as layout 2 wrote.
fn raw_ceiling_ledger_shaped(batch: usize, id_index: bool) -> f64 {
    let dir = bench_dir(&format!("raw-shaped-{batch}-{id_index}"));
    let db = sled::open(&dir).unwrap();
    let tree = db.open_tree("ledger").unwrap();
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
        .unwrap();
    let record = vec![7u8; 220];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        let mut b = sled::Batch::default();
        let mut chunk = vec![0xC1u8];
        for i in 0..batch {
            let stream = format!("product-bench-{i}");
            let rev = (n / batch as u64).to_be_bytes();
            chunk.extend_from_slice(&(record.len() as u32).to_le_bytes());
            chunk.extend_from_slice(&record);
            b.insert(
                [&[b'S'][..], stream.as_bytes(), &[0], &rev].concat(),
                &n.to_be_bytes(),
            );
            if id_index {
                b.insert(
                    [
                        &[b'I'][..],
                        stream.as_bytes(),
                        &[0],
                        uuid::Uuid::now_v7().as_bytes(),
                    ]
                    .concat(),
                    &[0u8; 16],
                );
            }
            n += 1;
        }
        b.insert(
            [&[b'L'][..], &(n - batch as u64).to_be_bytes()].concat(),
            chunk,
        );
        tree.apply_batch(b).unwrap();
        db.flush().unwrap();
        data.sync_data().unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn appenders(concurrency: usize) -> (f64, f64) {
    let dir = bench_dir(&format!("append-{concurrency}"));
    let store = Store::open(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..concurrency)
            .map(|c| {
                let store = store.clone();
                let count = count.clone();
                let latencies = latencies.clone();
                tokio::spawn(async move {
                    let stream = format!("product-bench-{c}");
                    let mut i = 0;
                    let mut mine = Vec::new();
                    while start.elapsed() < RUN {
                        let t = Instant::now();
                        let e = ProposedEvent::new("PublishStarted", 1, payload(i));
                        store
                            .append(&stream, ExpectedRevision::Any, vec![e])
                            .await
                            .unwrap();
                        mine.push(t.elapsed().as_secs_f64());
                        i += 1;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    latencies.lock().unwrap().extend(mine);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!(
        "  ({concurrency} appenders: {:.1} events per durable commit on average)",
        count.load(Ordering::Relaxed) as f64 / store.sync_count().max(1) as f64
    );
    let mut l = latencies.lock().unwrap().clone();
    l.sort_by(f64::total_cmp);
    let p99 = l[(l.len() as f64 * 0.99) as usize - 1] * 1000.0;
    // Replay the log these appenders wrote: the shape a live ledger has.
    let start = Instant::now();
    let n = store.for_each_from(0, |_| Ok(())).unwrap();
    println!(
        "  $all replay of this log ({n} events): {:.0} events/s",
        n as f64 / start.elapsed().as_secs_f64()
    );
    store.close();
    (rate, p99)
}

fn replay(n: u64) -> f64 {
    let dir = bench_dir("replay");
    let store = Store::open(&dir).unwrap();
    let mut i = 0;
    while i < n {
        let events: Vec<_> = (0..1000)
            .map(|k| ProposedEvent::new("PublishStarted", 1, payload(i + k)))
            .collect();
        store
            .append_blocking(
                &format!("product-r{}", i / 1000 % 5000),
                ExpectedRevision::Any,
                events,
            )
            .unwrap();
        i += 1000;
    }
    let start = Instant::now();
    let mut bytes = 0usize;
    let seen = store
        .for_each_from(0, |e| {
            bytes += e.data.len();
            Ok(())
        })
        .unwrap();
    let rate = seen as f64 / start.elapsed().as_secs_f64();
    assert_eq!(seen, n);
    assert!(bytes > 0);
    store.close();
    drop(store);
    // The same scan through sled alone, without decoding: the ceiling for replay.
    let db = sled::open(dir.join("log")).unwrap();
    let tree = db.open_tree("ledger").unwrap();
    let start = Instant::now();
    let mut scanned = 0u64;
    for item in tree.scan_prefix([b'L']) {
        let (_, v) = item.unwrap();
        bytes += v.len();
        scanned += 1;
    }
    let raw = scanned as f64 / start.elapsed().as_secs_f64();
    assert!(bytes > 0);
    println!("raw sled scan of {scanned} log chunks: {raw:>10.0} chunks/s (no decoding)");
    rate
}

fn main() {
    // `cargo test --benches` runs this binary with --bench absent: stay quick then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Ok(c) = std::env::var("CONTIMG_BENCH_ONLY_APPENDERS") {
        let (rate, p99) = appenders(c.parse().unwrap());
        println!("durable appends, {c} appenders: {rate:.0} events/s p99 {p99:.2} ms");
        return;
    }
    let raw1 = raw_ceiling(1);
    println!("raw ceiling, batch of 1:   {raw1:>10.0} events/s  (sled batch + flush + fdatasync)");
    let raw64 = raw_ceiling(64);
    println!("raw ceiling, batch of 64:  {raw64:>10.0} events/s");
    let shaped1 = raw_ceiling_ledger_shaped(1, false);
    println!("raw ceiling, ledger's keys, batch of 1:  {shaped1:>10.0} events/s");
    let shaped64 = raw_ceiling_ledger_shaped(64, false);
    println!(
        "raw ceiling, ledger's keys (one index key an event), batch of 64: {shaped64:>10.0} events/s  ({:.0}% of raw batch-64)",
        shaped64 / raw64 * 100.0
    );
    let two_keys64 = raw_ceiling_ledger_shaped(64, true);
    println!(
        "raw ceiling, layout 2's keys (two index keys an event), batch of 64: {two_keys64:>10.0} events/s  ({:.0}% of raw batch-64)",
        two_keys64 / raw64 * 100.0
    );
    let (one, p99_one) = appenders(1);
    println!(
        "durable appends, 1 appender:   {one:>10.0} events/s  p99 {p99_one:.2} ms  ({:.0}% of raw batch-1)",
        one / raw1 * 100.0
    );
    let (many, p99_many) = appenders(64);
    println!(
        "durable appends, 64 appenders: {many:>10.0} events/s  p99 {p99_many:.2} ms  ({:.0}% of raw batch-64)",
        many / raw64 * 100.0
    );
    let n = std::env::var("CONTIMG_BENCH_REPLAY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let r = replay(n);
    println!("$all replay of {n} bulk-written events:  {r:>10.0} events/s");
}
