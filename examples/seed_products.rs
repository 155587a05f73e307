//! Benchmark helpers for the monitoring endpoints and the publisher.
//!
//! `seed_products --data-dir DIR --products N` writes a ledger holding N products with a
//! realistic history spread over the past week (registered and published; one in ten
//! failed once, retried by an operator and published; one in ten still failed), written
//! through the store's import path.
//!
//! `seed_products --publish-bench DIR --files N --size-mib M [--concurrency K]` first times
//! the ceiling (N files copied, renamed and removed with no fsync and no ledger, as the old
//! system did), then stages N files of M MiB and registers and publishes them through the
//! library, K products in flight at once (default 16), printing both rates.

use std::path::PathBuf;
use std::time::Instant;

use contimg::events::catalogue::{
    DomainEvent, EventMetadata, ProductRegistered, PublishFailed, PublishStarted, PublishSucceeded,
    RetryRequested,
};
use contimg::events::{RecordedEvent, Store};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn seed(dir: PathBuf, n: u64) {
    let store = Store::open(&dir).expect("open ledger");
    assert_eq!(store.event_count(), 0, "seed into an empty ledger");
    let meta = serde_json::to_vec(&EventMetadata::actor("seed")).unwrap();
    let week = 7 * 24 * 3_600_000_000i64;
    let start = chrono::Utc::now().timestamp_micros() - week;
    let step = week / (n as i64 * 6).max(1);
    let mut t = start;
    let mut position = 0u64;
    let mut batch = Vec::with_capacity(1000);
    let began = Instant::now();
    for i in 0..n {
        let id = format!("img_{i:08}");
        let stream = format!("product-{id}");
        let mut events: Vec<(String, u32, Vec<u8>)> = Vec::new();
        let mut push = |e: &dyn Fn() -> (String, Vec<u8>)| {
            let (ty, data) = e();
            events.push((ty, 1, data));
        };
        push(&|| {
            let e = ProductRegistered {
                data_id: id.clone(),
                data_type: "image".into(),
                stage_path: format!("/data/stage/images/{id}.fits"),
                checksum: Some(format!("{:064x}", i)),
                size_bytes: Some(92_160_000),
                qa_status: Some("passed".into()),
                validation_status: Some("validated".into()),
                auto_publish: true,
                metadata: Default::default(),
            };
            (
                ProductRegistered::TYPE.into(),
                serde_json::to_vec(&e).unwrap(),
            )
        });
        let started = |attempt: u32| {
            let e = PublishStarted {
                attempt,
                destination: format!("/data/products/images/{id}.fits"),
                trigger: "auto".into(),
            };
            (
                PublishStarted::TYPE.to_string(),
                serde_json::to_vec(&e).unwrap(),
            )
        };
        let failed = |attempt: u32| {
            let e = PublishFailed {
                attempt,
                error: "No space left on device (os error 28)".into(),
                retryable: true,
                interrupted: false,
                next_retry_at: None,
            };
            (
                PublishFailed::TYPE.to_string(),
                serde_json::to_vec(&e).unwrap(),
            )
        };
        push(&|| started(1));
        if i % 10 == 3 || i % 10 == 4 {
            push(&|| failed(1));
            if i % 10 == 3 {
                // still failed
            } else {
                push(&|| {
                    let e = RetryRequested {
                        actor: Some("operator".into()),
                        reason: None,
                    };
                    (RetryRequested::TYPE.into(), serde_json::to_vec(&e).unwrap())
                });
                push(&|| started(1));
            }
        }
        if i % 10 != 3 {
            push(&|| {
                let e = PublishSucceeded {
                    published_path: format!("/data/products/images/{id}.fits"),
                    checksum: Some(format!("{:064x}", i)),
                    duration_ms: 850,
                    recovered: false,
                };
                (
                    PublishSucceeded::TYPE.into(),
                    serde_json::to_vec(&e).unwrap(),
                )
            });
        }
        for (revision, (ty, version, data)) in events.into_iter().enumerate() {
            t += step;
            batch.push(RecordedEvent {
                event_id: uuid::Uuid::now_v7(),
                stream_id: stream.clone(),
                revision: revision as u64,
                position,
                event_type: ty,
                event_version: version,
                data,
                metadata: meta.clone(),
                created_micros: t,
                checksum: 0,
            });
            position += 1;
        }
        if batch.len() >= 1000 {
            store
                .import_blocking(std::mem::take(&mut batch))
                .expect("import");
        }
    }
    if !batch.is_empty() {
        store.import_blocking(batch).expect("import");
    }
    println!(
        "seeded {n} products, {} events, in {:.1} s",
        store.event_count(),
        began.elapsed().as_secs_f64()
    );
    store.close();
}

/// Writes every dirty page of the machine back before a timed phase: the staged files
/// just written (and the ceiling's copies) would otherwise be written back by the kernel
/// during the phase, at a moment that differs from run to run.
fn settle_disk() {
    // SAFETY: sync(2) takes no argument and cannot fail.
    unsafe { libc::sync() };
}

fn publish_bench(dir: PathBuf, files: usize, size_mib: usize, concurrency: usize) {
    use contimg::api::{AppState, ServerConfig};
    use contimg::pipeline::publish::{Registration, Trigger};
    let concurrency = concurrency.max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let mut config = ServerConfig::under(&dir);
        config.auto_publish = false;
        let stage = config.publish.stage_root.clone();
        let state = AppState::open(store.clone(), config).await.unwrap();
        // The read model follows the log, as under `serve`.
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let follower = tokio::spawn(state.projections.clone().run(stop_rx));
        std::fs::create_dir_all(&stage).unwrap();
        let bytes: Vec<u8> = (0..size_mib * 1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        let write_all = |prefix: &str| {
            for i in 0..files {
                let mut b = bytes.clone();
                b[0] = i as u8;
                b[1] = (i >> 8) as u8;
                std::fs::write(stage.join(format!("{prefix}{i}.fits")), b).unwrap();
            }
        };

        // The ceiling, in the same run on the same filesystem: what the old system did per
        // product (copy to the products folder, rename into place, remove the source) with
        // no fsync and no ledger, one at a time.
        let bare = dir.join("bare");
        std::fs::create_dir_all(&bare).unwrap();
        write_all("b");
        settle_disk();
        let began = Instant::now();
        for i in 0..files {
            let from = stage.join(format!("b{i}.fits"));
            let tmp = bare.join(format!(".b{i}.tmp"));
            std::fs::copy(&from, &tmp).unwrap();
            std::fs::rename(&tmp, bare.join(format!("b{i}.fits"))).unwrap();
            std::fs::remove_file(&from).unwrap();
        }
        let bare_secs = began.elapsed().as_secs_f64();

        // contimg: each product registered, then published, with every fsync and event,
        // `concurrency` products in flight at once (sharing the ledger's group commits).
        write_all("f");
        settle_disk();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let began = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (publisher, next) = (state.publisher.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= files {
                        break;
                    }
                    publisher
                        .register(Registration {
                            data_id: format!("f{i}"),
                            data_type: "image".into(),
                            stage_path: format!("f{i}.fits"),
                            qa_status: None,
                            validation_status: None,
                            auto_publish: false,
                            metadata: Default::default(),
                        })
                        .await
                        .unwrap();
                    publisher.publish(&format!("f{i}"), Trigger::Manual).await.unwrap();
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        let secs = began.elapsed().as_secs_f64();
        println!(
            "bare copy, rename and remove without fsync or ledger (the ceiling): {files} files of \
             {size_mib} MiB in {bare_secs:.2} s: {:.1} per s",
            files as f64 / bare_secs
        );
        println!(
            "registered and published {files} files of {size_mib} MiB, {concurrency} at a time, in {secs:.2} s: \
             {:.1} publishes/s ({:.0} MiB/s), {:.0}% of the ceiling",
            files as f64 / secs,
            (files * size_mib) as f64 / secs,
            100.0 * bare_secs / secs
        );
        let _ = stop.send(true);
        let _ = follower.await;
        store.close();
    });
}

fn main() {
    if let Some(dir) = arg("--publish-bench") {
        let files = arg("--files").and_then(|s| s.parse().ok()).unwrap_or(200);
        let size = arg("--size-mib").and_then(|s| s.parse().ok()).unwrap_or(1);
        let concurrency = arg("--concurrency")
            .and_then(|s| s.parse().ok())
            .unwrap_or(16);
        return publish_bench(PathBuf::from(dir), files, size, concurrency);
    }
    let dir = arg("--data-dir").expect("--data-dir DIR");
    let n = arg("--products")
        .and_then(|s| s.parse().ok())
        .expect("--products N");
    seed(PathBuf::from(dir), n);
}
