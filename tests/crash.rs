//! Crash tests: a child `contimg serve` under append load from many concurrent HTTP
//! clients, killed with SIGKILL at moments drawn from a printed seed. Every acknowledged
//! event must survive, and every batch sent (answered or not) is there whole or not at all.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ChildServer, contimg};
use rand::Rng;
use serde_json::{Value, json};
use uuid::Uuid;

/// Every batch sent, answered or not: each must be in the ledger whole or not at all.
type Sent = Arc<Mutex<Vec<Vec<Uuid>>>>;

/// Appends until the server goes away; returns the ids the server acknowledged.
async fn load(
    base: String,
    client_no: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Uuid>>>,
    sent: Sent,
) {
    let c = reqwest::Client::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // Some clients send batches, some share a stream.
        let stream = if client_no.is_multiple_of(3) {
            "scratch-shared".to_string()
        } else {
            format!("scratch-{client_no}")
        };
        let size = if client_no % 4 == 1 { 5 } else { 1 };
        let ids: Vec<Uuid> = (0..size).map(|_| Uuid::new_v4()).collect();
        sent.lock().unwrap().push(ids.clone());
        let body: Vec<Value> = ids
            .iter()
            .map(|id| json!({"eventId": id.to_string(), "eventType": "Noted", "data": {"client": client_no, "n": n}}))
            .collect();
        match c
            .post(format!("{base}/api/streams/{stream}"))
            .json(&body)
            .send()
            .await
        {
            Ok(resp) if resp.status().as_u16() == 201 => acked.lock().unwrap().extend(ids),
            Ok(resp) => panic!("unexpected status {}", resp.status()),
            Err(_) => return, // the server died: this append was never acknowledged
        }
    }
}

/// Every event in the ledger, read back over HTTP; positions must be gapless from 0.
async fn read_back(base: &str) -> HashSet<Uuid> {
    let c = reqwest::Client::new();
    let mut ids = HashSet::new();
    let mut from = Some(0u64);
    let mut expected_pos = 0u64;
    while let Some(f) = from {
        let page: Value =
            common::get_json(&c, format!("{base}/api/events?from={f}&limit=5000")).await;
        for e in page["events"].as_array().unwrap() {
            assert_eq!(
                e["position"].as_u64().unwrap(),
                expected_pos,
                "positions must be gapless"
            );
            expected_pos += 1;
            assert!(
                ids.insert(e["eventId"].as_str().unwrap().parse().unwrap()),
                "duplicate event"
            );
        }
        from = page["next"].as_u64();
    }
    ids
}

async fn run_cycle(
    dir: &std::path::Path,
    acked: &Arc<Mutex<Vec<Uuid>>>,
    sent: &Sent,
    wait_ms: u64,
    graceful: bool,
) {
    let server = ChildServer::start(dir, &[]);
    // Everything acknowledged before, in any earlier life of the server, is here.
    let present = read_back(&server.base).await;
    // And every batch, acknowledged or cut off by the kill, is there whole or not at all.
    for batch in sent.lock().unwrap().iter() {
        let n = batch.iter().filter(|id| present.contains(id)).count();
        assert!(
            n == 0 || n == batch.len(),
            "a batch of {} is in the ledger by halves ({n})",
            batch.len()
        );
    }
    let missing = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|id| !present.contains(id))
        .count();
    assert_eq!(missing, 0, "{missing} acknowledged events lost");

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..24)
        .map(|i| {
            tokio::spawn(load(
                server.base.clone(),
                i,
                stop.clone(),
                acked.clone(),
                sent.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    if graceful {
        let status = tokio::task::spawn_blocking(move || server.sigterm())
            .await
            .unwrap();
        assert!(status.success(), "serve exits 0 on SIGTERM, got {status}");
    } else {
        tokio::task::spawn_blocking(move || server.kill9())
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_appends_survive_sigkill_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sent: Sent = Arc::default();
    // Kill times from a seed, printed so a failure can be replayed.
    let (_seed, mut rng) = common::seeded_rng();
    for cycle in 0..12 {
        // Mostly SIGKILL; two graceful stops check that pending appends are answered.
        let wait = rng.gen_range(150..700);
        run_cycle(&ledger, &acked, &sent, wait, cycle % 6 == 5).await;
    }
    let batches = sent.lock().unwrap().iter().filter(|b| b.len() > 1).count();
    assert!(batches > 0, "no multi-event batch was sent");
    let total = acked.lock().unwrap().len();
    assert!(
        total > 100,
        "the load produced only {total} acknowledged events"
    );
    // A last life: everything acknowledged is present.
    let server = ChildServer::start(&ledger, &[]);
    let present = read_back(&server.base).await;
    assert!(acked.lock().unwrap().iter().all(|id| present.contains(id)));
    for batch in sent.lock().unwrap().iter() {
        let n = batch.iter().filter(|id| present.contains(id)).count();
        assert!(
            n == 0 || n == batch.len(),
            "a batch in the ledger by halves"
        );
    }
    server.kill9();
    let out = contimg(&["verify", "--data-dir", ledger.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
