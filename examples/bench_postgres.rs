//! The ledger's two backends side by side: durable appends per second with N concurrent
//! appenders (single events, each acknowledged once durable) on PostgreSQL and on sled,
//! then a bulk-written log replayed through `$all` from each.
//!
//!   cargo run --release --example bench_postgres -- --url postgres://... \
//!       [--appenders 64] [--seconds 10] [--replay 1000000]
//!
//! The URL names an empty database (`tools/bench_postgres.sh` makes a throwaway cluster
//! and runs this). Prints one line per figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use contimg::events::{ExpectedRevision, ProposedEvent, Store};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn payload(i: u64) -> Vec<u8> {
    format!("{{\"data_id\":\"img-{i}\",\"destination\":\"/data/products/images/img-{i}.fits\"}}")
        .into_bytes()
}

/// (events/s, p99 ms, events per durable commit)
fn appenders(store: &Store, n: usize, run: Duration) -> (f64, f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let syncs0 = store.sync_count();
    let start = Instant::now();
    let mut latencies: Vec<f64> = rt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|c| {
                let store = store.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    let stream = format!("scratch-bench-{c}");
                    let mut mine = Vec::new();
                    let mut i = 0;
                    while start.elapsed() < run {
                        let t = Instant::now();
                        let e = ProposedEvent::new("Noted", 1, payload(i));
                        store
                            .append(&stream, ExpectedRevision::Any, vec![e])
                            .await
                            .unwrap();
                        mine.push(t.elapsed().as_secs_f64());
                        i += 1;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    mine
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let events = count.load(Ordering::Relaxed) as f64;
    let rate = events / start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies[(latencies.len() as f64 * 0.99) as usize - 1] * 1000.0;
    let per_commit = events / (store.sync_count() - syncs0).max(1) as f64;
    (rate, p99, per_commit)
}

/// Writes `n` events in appends of 1,000 and replays them: events/s of the replay.
fn replay(store: &Store, n: u64) -> (f64, f64) {
    let start = Instant::now();
    let base = store.event_count();
    let mut i = 0;
    while i < n {
        let events: Vec<_> = (0..1000)
            .map(|k| ProposedEvent::new("Noted", 1, payload(i + k)))
            .collect();
        store
            .append_blocking(
                &format!("scratch-r{}", i / 1000 % 5000),
                ExpectedRevision::Any,
                events,
            )
            .unwrap();
        i += 1000;
    }
    let write = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut bytes = 0usize;
    let seen = store
        .for_each_from(base, |e| {
            bytes += e.data.len();
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, n);
    assert!(bytes > 0);
    (write, seen as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    let url = arg("--url").expect("--url postgres://USER@HOST/DB (an empty database)");
    let n: usize = arg("--appenders").map_or(64, |s| s.parse().unwrap());
    let secs: u64 = arg("--seconds").map_or(10, |s| s.parse().unwrap());
    let replay_n: u64 = arg("--replay").map_or(1_000_000, |s| s.parse().unwrap());
    let run = Duration::from_secs(secs);
    let dir = tempfile::tempdir().unwrap();

    let pg = Store::connect(&url, dir.path()).unwrap();
    let (rate, p99, per) = appenders(&pg, n, run);
    println!(
        "postgres: durable appends, {n} appenders: {rate:.0} events/s, p99 {p99:.2} ms, {per:.1} events per commit"
    );
    let sled_dir = dir.path().join("sled");
    let sled = Store::open(&sled_dir).unwrap();
    let (rate, p99, per) = appenders(&sled, n, run);
    println!(
        "sled:     durable appends, {n} appenders: {rate:.0} events/s, p99 {p99:.2} ms, {per:.1} events per commit"
    );
    let (write, read) = replay(&pg, replay_n);
    println!(
        "postgres: {replay_n} events in appends of 1,000: written at {write:.0} events/s, $all replay {read:.0} events/s"
    );
    let (write, read) = replay(&sled, replay_n);
    println!(
        "sled:     {replay_n} events in appends of 1,000: written at {write:.0} events/s, $all replay {read:.0} events/s"
    );
    pg.close();
    sled.close();
}
