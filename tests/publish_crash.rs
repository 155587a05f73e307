//! SIGKILL of a child server while it publishes many products, then restart: every product
//! is either published (right checksum in the products root, nothing left in stage) or back
//! in staging with an interrupted failure; no temporary file remains; nothing is lost.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{ChildServer, eventually};
use rand::Rng;
use serde_json::{Value, json};

const PRODUCTS: usize = 48;

fn checksum(p: &Path) -> Option<String> {
    std::fs::read(p)
        .ok()
        .map(|b| blake3::hash(&b).to_hex().to_string())
}

/// What is left in the products root's folder of temporary copies (the only place a
/// move writes one).
fn temporaries(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join(".contimg-tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}

async fn product(c: &reqwest::Client, base: &str, id: &str) -> Value {
    common::get_json(c, format!("{base}/api/products/{id}")).await
}

/// The invariant that must hold right after any restart.
async fn check_settled(
    c: &reqwest::Client,
    base: &str,
    root: &Path,
    sums: &HashMap<String, String>,
) -> usize {
    assert!(
        temporaries(&root.join("products")).is_empty(),
        "temporary files left behind"
    );
    let mut published = 0;
    for (id, sum) in sums {
        let p = product(c, base, id).await;
        let staged = root.join("stage").join(format!("{id}.fits"));
        let dest = root.join("products/images").join(format!("{id}.fits"));
        match p["status"].as_str() {
            Some("published") => {
                assert_eq!(
                    checksum(&dest).as_ref(),
                    Some(sum),
                    "{id}: published copy intact"
                );
                assert!(!staged.exists(), "{id}: nothing left in stage");
                published += 1;
            }
            Some("staging") => {
                assert_eq!(
                    checksum(&staged).as_ref(),
                    Some(sum),
                    "{id}: staged copy intact"
                );
                assert!(!dest.exists(), "{id}: no half-published copy");
            }
            other => panic!("{id} is {other:?} after recovery: {p}"),
        }
    }
    published
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_publishing_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ledger = root.join("ledger");
    let args = [
        "--stage-root",
        root.join("stage").to_str().unwrap(),
        "--products-root",
        root.join("products").to_str().unwrap(),
        "--retry-backoff",
        "0.05",
        "--max-attempts",
        "50",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut held = args.clone();
    held.push("--no-auto-publish");
    std::fs::create_dir_all(root.join("stage")).unwrap();
    let c = reqwest::Client::new();
    let mut sums = HashMap::new();
    // Kill times and file contents come from a seed, printed so a failure can be replayed.
    let (seed, mut rng) = common::seeded_rng();
    let mut interrupted_seen = 0;
    for cycle in 0..6 {
        // Right after a restart, with the automatic publisher held so nothing moves.
        if cycle > 0 {
            let server = ChildServer::start(&ledger, &held);
            check_settled(&c, &server.base, root, &sums).await;
            assert!(server.sigterm().success());
        }
        let server = ChildServer::start(&ledger, &args);
        // New products every cycle, registered for automatic publishing by a client that
        // keeps going while the server is killed under it, mid-stream.
        // Every other cycle, a large product first: the kill waits until it is being
        // published, so at least those kills land mid-publish (not left to chance).
        let big = cycle % 2 == 1;
        let mut batch = Vec::new();
        for i in 0..PRODUCTS / 4 {
            let id = format!("c{cycle}p{i}");
            let size = if big && i == 0 { 64 << 20 } else { 1 << 20 };
            let mut bytes = vec![0u8; size];
            rng.fill(&mut bytes[..]);
            std::fs::write(root.join("stage").join(format!("{id}.fits")), &bytes).unwrap();
            batch.push((id, blake3::hash(&bytes).to_hex().to_string()));
        }
        let client = {
            let (c, base, batch) = (c.clone(), server.base.clone(), batch.clone());
            tokio::spawn(async move {
                let mut registered = Vec::new();
                for (id, _) in batch {
                    let r = c
                        .post(format!("{base}/api/products"))
                        .json(&json!({"data_id": id, "data_type": "image", "stage_path": format!("{id}.fits"),
                                      "qa_status": "passed", "validation_status": "validated"}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().as_u16() == 201 => registered.push(id),
                        Ok(r) => panic!("registration answered {}", r.status()),
                        Err(_) => break, // killed
                    }
                }
                registered
            })
        };
        if big {
            let first = format!("{}/api/products/c{cycle}p0", server.base);
            let publishing = eventually(20.0, || async {
                let p: Value = match c.get(&first).send().await {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                (p["status"] == "publishing").then_some(())
            })
            .await;
            assert!(publishing.is_some(), "c{cycle}p0 was never seen publishing");
        } else {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(20..120))).await;
        }
        tokio::task::spawn_blocking(move || server.kill9())
            .await
            .unwrap();
        let acknowledged = client.await.unwrap();
        // Acknowledged registrations must survive; an unanswered one may or may not have.
        let server = ChildServer::start(&ledger, &held);
        for (id, sum) in batch {
            let p = product(&c, &server.base, &id).await;
            if p["data_id"] == json!(id) {
                sums.insert(id, sum);
            } else {
                assert!(
                    !acknowledged.contains(&id),
                    "acknowledged registration of {id} lost"
                );
            }
        }
        check_settled(&c, &server.base, root, &sums).await;
        assert!(server.sigterm().success());
    }
    let server = ChildServer::start(&ledger, &held);
    check_settled(&c, &server.base, root, &sums).await;
    assert!(server.sigterm().success());
    let server = ChildServer::start(&ledger, &args);
    // Interrupted publishes are retried automatically; in the end all are published once.
    let all = eventually(30.0, || async {
        let s: Value = common::get_json(&c, server.url("/api/monitoring/publish/status")).await;
        (s["total_published"] == json!(sums.len())).then_some(s)
    })
    .await
    .expect("every product ends up published");
    assert_eq!(all["total_staging"], json!(0));
    assert_eq!(
        check_settled(&c, &server.base, root, &sums).await,
        sums.len()
    );
    for id in sums.keys() {
        let h: Value =
            common::get_json(&c, server.url(&format!("/api/products/{id}/history"))).await;
        let events = h["events"].as_array().unwrap();
        let successes = events
            .iter()
            .filter(|e| e["eventType"] == "PublishSucceeded")
            .count();
        assert_eq!(successes, 1, "{id}: one success event");
        interrupted_seen += events
            .iter()
            .filter(|e| {
                e["eventType"] == "PublishFailed" && e["data"]["interrupted"] == json!(true)
            })
            .count();
        interrupted_seen += events
            .iter()
            .filter(|e| {
                e["eventType"] == "PublishSucceeded" && e["data"]["recovered"] == json!(true)
            })
            .count();
    }
    let files = std::fs::read_dir(root.join("products/images"))
        .unwrap()
        .count();
    assert_eq!(files, sums.len(), "one file per product, no duplicates");
    eprintln!("recoveries seen across the kills: {interrupted_seen}");
    assert!(
        interrupted_seen >= 1,
        "no kill landed mid-publish, so recovery was not exercised (seed {seed})"
    );
    server.kill9();
    let out = common::contimg(&["verify", "--data-dir", ledger.to_str().unwrap()]);
    assert!(out.status.success());
}
