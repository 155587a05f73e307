//! The soak: `--cycles N` (100) rounds of SIGKILL and restart of a real `contimg serve`
//! under `--appenders K` (64) concurrent HTTP appenders and an active automatic
//! publisher. After every kill it checks, on the stopped ledger and on the restarted
//! server: every acknowledged event is present, positions are gapless, `contimg verify`
//! passes, no product is published twice (one `PublishSucceeded` and one file each), and
//! the read model equals a rebuild. Kill times come from a printed seed
//! (`CONTIMG_TEST_SEED` replays them). Prints the totals; exits 1 at the first violation.
//!
//! `target/debug/examples/soak --cycles 5` (what `.ci/run` runs), or with `--bin PATH`
//! another `contimg` (default: the one beside this example's folder).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn start(bin: &Path, data: &Path, held: bool) -> Result<(Child, String), String> {
    let mut child = Command::new(bin)
        .args(["serve", "--mode", "api", "--listen", "127.0.0.1:0"])
        .args(held.then_some("--no-auto-publish"))
        .args([
            "--retry-backoff",
            "0.05",
            "--max-attempts",
            "50",
            "--data-dir",
        ])
        .arg(data)
        .env("CONTIMG_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .map_err(|e| format!("reading the address: {e}"))?;
    let base = line
        .trim()
        .strip_prefix("contimg: listening on ")
        .ok_or_else(|| format!("unexpected first line {line:?}"))?
        .to_string();
    Ok((child, base))
}

async fn get(c: &reqwest::Client, url: String) -> Result<Value, String> {
    c.get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("GET {url}: {e}"))
}

/// Every event id, checking positions are gapless from 0.
async fn all_ids(c: &reqwest::Client, base: &str) -> Result<HashSet<Uuid>, String> {
    let (mut ids, mut from, mut expected) = (HashSet::new(), Some(0u64), 0u64);
    while let Some(f) = from {
        let page = get(c, format!("{base}/api/events?from={f}&limit=5000")).await?;
        for e in page["events"].as_array().ok_or("no events")? {
            if e["position"].as_u64() != Some(expected) {
                return Err(format!("gap: position {} where {expected}", e["position"]));
            }
            expected += 1;
            let id: Uuid = e["eventId"]
                .as_str()
                .unwrap_or("")
                .parse()
                .map_err(|_| "bad id")?;
            if !ids.insert(id) {
                return Err(format!("event {id} twice"));
            }
        }
        from = page["next"].as_u64();
    }
    Ok(ids)
}

struct Shared {
    acked: Mutex<Vec<Uuid>>,
    products: Mutex<Vec<String>>,
    stop: AtomicBool,
}

async fn appender(base: String, n: usize, s: Arc<Shared>) {
    let c = reqwest::Client::new();
    while !s.stop.load(Ordering::Relaxed) {
        let id = Uuid::new_v4();
        let body =
            json!([{"eventId": id.to_string(), "eventType": "Noted", "data": {"appender": n}}]);
        match c
            .post(format!("{base}/api/streams/soak-{}", n % 8))
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().as_u16() == 201 => s.acked.lock().unwrap().push(id),
            Ok(r) => panic!("append answered {}", r.status()),
            Err(_) => return,
        }
    }
}

async fn registrar(base: String, stage: PathBuf, cycle: u64, s: Arc<Shared>) {
    let c = reqwest::Client::new();
    let mut i = 0;
    while !s.stop.load(Ordering::Relaxed) {
        let id = format!("c{cycle}p{i}");
        i += 1;
        let _ = std::fs::write(
            stage.join(format!("{id}.fits")),
            vec![(i % 251) as u8; 256 << 10],
        );
        let r = c
            .post(format!("{base}/api/products"))
            .json(
                &json!({"data_id": id, "data_type": "image", "stage_path": format!("{id}.fits"),
                          "qa_status": "passed", "validation_status": "validated"}),
            )
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 201 => s.products.lock().unwrap().push(id),
            Ok(r) => panic!("registration answered {}", r.status()),
            Err(_) => return,
        }
    }
}

/// The invariants, on a restarted server.
async fn check(
    c: &reqwest::Client,
    base: &str,
    products_root: &Path,
    s: &Shared,
) -> Result<(u64, u64), String> {
    let present = all_ids(c, base).await?;
    let lost = s
        .acked
        .lock()
        .unwrap()
        .iter()
        .filter(|id| !present.contains(id))
        .count();
    if lost > 0 {
        return Err(format!("{lost} acknowledged events lost"));
    }
    let products: Vec<String> = s.products.lock().unwrap().clone();
    let (mut published, mut recovered) = (0u64, 0u64);
    for id in &products {
        let h = get(c, format!("{base}/api/products/{id}/history")).await?;
        let events = h["events"].as_array().cloned().unwrap_or_default();
        let ok = events
            .iter()
            .filter(|e| e["eventType"] == "PublishSucceeded")
            .count();
        if ok > 1 {
            return Err(format!("{id} published {ok} times"));
        }
        published += ok as u64;
        recovered += events
            .iter()
            .filter(|e| {
                e["data"]["interrupted"] == json!(true) || e["data"]["recovered"] == json!(true)
            })
            .count() as u64;
    }
    // Every product in the ledger (a registration cut off by a kill may be there too, and
    // published): one file per published product, no more.
    let mut live = get(c, format!("{base}/api/monitoring/publish/status")).await?;
    let total = live["total_published"].as_u64().unwrap_or(0);
    let files = std::fs::read_dir(products_root.join("images")).map_or(0, |d| d.count()) as u64;
    if files != total {
        return Err(format!(
            "{files} published files for {total} published products"
        ));
    }
    let r = c
        .post(format!("{base}/api/projections/rebuild"))
        .send()
        .await
        .map_err(|e| format!("rebuild: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("rebuild answered {}", r.status()));
    }
    let mut rebuilt = get(c, format!("{base}/api/monitoring/publish/status")).await?;
    // Figures of the clock, not of the model, move between two reads.
    for v in [&mut live, &mut rebuilt] {
        v["timestamp"] = Value::Null;
        v["oldest_staging_hours"] = Value::Null;
    }
    // The check runs with the automatic publisher held, so nothing moves between the reads.
    if live != rebuilt {
        return Err(format!(
            "read model {live} differs from its rebuild {rebuilt}"
        ));
    }
    Ok((published, recovered))
}

fn main() -> ExitCode {
    let cycles: u64 = arg("--cycles").and_then(|s| s.parse().ok()).unwrap_or(100);
    let appenders: usize = arg("--appenders")
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let bin = arg("--bin").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("own path");
        exe.parent()
            .and_then(Path::parent)
            .expect("target folder")
            .join("contimg")
    });
    let seed = std::env::var("CONTIMG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!(
        "soak: {cycles} cycles, {appenders} appenders, seed {seed} (CONTIMG_TEST_SEED replays it)"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let data = dir.path().join("var");
    let (stage, products_root) = (data.join("stage"), data.join("products"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let shared = Arc::new(Shared {
        acked: Mutex::new(Vec::new()),
        products: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let kills = AtomicU64::new(0);
    let started = Instant::now();
    let result: Result<(u64, u64), String> = rt.block_on(async {
        let c = reqwest::Client::new();
        let mut last = (0, 0);
        for cycle in 0..=cycles {
            // The checks, on a server with the automatic publisher held (recovery has run).
            let (mut child, base) = start(&bin, &data, true)?;
            std::fs::create_dir_all(&stage).map_err(|e| e.to_string())?;
            last = check(&c, &base, &products_root, &shared).await?;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            if cycle == cycles {
                break;
            }
            // The load, on a server publishing, until the kill.
            let (mut child, base) = start(&bin, &data, false)?;
            shared.stop.store(false, Ordering::Relaxed);
            let mut tasks: Vec<_> = (0..appenders)
                .map(|n| tokio::spawn(appender(base.clone(), n, shared.clone())))
                .collect();
            tasks.push(tokio::spawn(registrar(
                base.clone(),
                stage.clone(),
                cycle,
                shared.clone(),
            )));
            tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            kills.fetch_add(1, Ordering::Relaxed);
            shared.stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await.map_err(|e| format!("a client failed: {e}"))?;
            }
            let out = Command::new(&bin)
                .args(["verify", "--data-dir"])
                .arg(&data)
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "verify failed after cycle {cycle}: {}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
        Ok(last)
    });
    let acked = shared.acked.lock().unwrap().len();
    let registered = shared.products.lock().unwrap().len();
    match result {
        Ok((published, recovered)) => {
            println!(
                "soak: {} kills in {:.1} s; {acked} acknowledged appends all present, gapless, verify clean after every kill; {registered} products registered, {published} published and none twice, {recovered} interrupted or recovered publishes settled; read model equal to its rebuild after every kill",
                kills.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("soak: FAILED (seed {seed}): {e}");
            ExitCode::from(1)
        }
    }
}
