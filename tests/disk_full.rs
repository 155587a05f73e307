//! A full disk, for real: the ledger and the products root each on a small tmpfs in a mount
//! namespace this test makes for itself (`unshare --mount`, as root), so nothing outside
//! the test sees the mounts and they vanish with it.
//!
//! - Appends that would eat into the ledger's reserve answer 507 with a JSON `detail`;
//!   every acknowledged event is readable, no refused one is; once space is freed appends
//!   succeed again, and `contimg verify` passes on the ledger afterwards.
//! - A publish into a full products root fails as `PublishFailed` with the reason, leaves
//!   its source and no temporary behind, and succeeds when retried after space is freed.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

const MIB: u64 = 1024 * 1024;

/// `contimg serve` inside a mount namespace of its own, its ledger and products root on
/// two tmpfs mounts there; after the server exits, the same shell runs `contimg verify`
/// on the ledger (which vanishes with the namespace).
struct Namespaced {
    shell: Child,
    base: String,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Namespaced {
    fn start(config: &Path, ledger: &Path, products: &Path) -> Namespaced {
        let unshare = common::require_tool(
            &["/usr/bin/unshare", "/bin/unshare"],
            "apt-get install util-linux",
        );
        let script = r#"
            set -e
            mount -t tmpfs -o size=48m contimg-ledger "$1"
            mount -t tmpfs -o size=16m contimg-products "$2"
            bin="$3"; config="$4"; ledger="$1"
            set +e
            "$bin" serve --mode api --listen 127.0.0.1:0 --config "$config"
            echo "server exited $?"
            "$bin" verify --data-dir "$ledger"
        "#;
        let mut shell = Command::new(unshare)
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(ledger)
            .arg(products)
            .arg(common::bin())
            .arg(config)
            .env("CONTIMG_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn unshare");
        let mut stdout = BufReader::new(shell.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("contimg: listening on ")
            .unwrap_or_else(|| panic!("no address from the server: {line:?}"))
            .to_string();
        Namespaced {
            shell,
            base,
            stdout,
        }
    }

    /// A path inside the namespace, as this process reaches it.
    fn inside(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.shell.id())).join(path.strip_prefix("/").unwrap())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGTERM to the server (the shell's child), then what the shell printed after it.
    fn stop(mut self) -> String {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.shell.id()))
                .unwrap();
        let server: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
        // SAFETY: signalling our own grandchild.
        unsafe { libc::kill(server, libc::SIGTERM) };
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let status = self.shell.wait().unwrap();
        assert!(status.success(), "verify failed: {rest}");
        rest
    }
}

impl Drop for Namespaced {
    fn drop(&mut self) {
        if let Ok(None) = self.shell.try_wait() {
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.shell.id()))
            {
                for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
                    // SAFETY: killing our own grandchild.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = self.shell.kill();
            let _ = self.shell.wait();
        }
    }
}

fn free_bytes(path: &Path) -> u64 {
    contimg::disk::space(path).expect("statvfs").0
}

/// Writes a file of `bytes` (in 1 MiB writes; stops quietly when the space runs out).
fn fill(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; MIB as usize];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = f.sync_all();
}

/// A batch of 16 events of about 60 KiB each: about 1 MiB of log.
fn heavy_batch(round: usize) -> (Vec<String>, Value) {
    let pad = "x".repeat(60 * 1024);
    let ids: Vec<String> = (0..16).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let events: Vec<Value> = ids
        .iter()
        .map(
            |id| json!({"eventId": id, "eventType": "Noted", "data": {"round": round, "pad": pad}}),
        )
        .collect();
    (ids, Value::Array(events))
}

#[tokio::test]
#[ignore = "needs root, unshare and mount: tmpfs mounts in a mount namespace of its own"]
async fn a_full_disk_refuses_appends_and_fails_publishes_without_losing_anything() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test mounts tmpfs file systems and needs root"
    );
    let root = tempfile::tempdir().unwrap();
    let ledger = root.path().join("ledger");
    let products = root.path().join("products");
    let stage = root.path().join("stage");
    for d in [&ledger, &products, &stage] {
        std::fs::create_dir_all(d).unwrap();
    }
    let config = root.path().join("contimg.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {ledger:?}\n\
             [paths]\nstage_root = {stage:?}\nproducts_root = {products:?}\n\
             [publish]\nauto_publish = false\nmax_attempts = 5\n\
             [ledger]\nreserve_mb = 8\n"
        ),
    )
    .unwrap();
    let ns = Namespaced::start(&config, &ledger, &products);
    let client = reqwest::Client::new();
    let ledger_in = ns.inside(&ledger);
    let products_in = ns.inside(&products);
    assert!(
        free_bytes(&ledger_in) < 49 * MIB,
        "the ledger is not on the test's tmpfs"
    );

    // The ledger's file system nearly full: 4 MiB above the reserve.
    let filler = ledger_in.join("filler");
    fill(&filler, free_bytes(&ledger_in).saturating_sub(12 * MIB));
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    let mut detail = None;
    for round in 0..40 {
        let (ids, body) = heavy_batch(round);
        let resp = client
            .post(ns.url("/api/streams/fill-1"))
            .json(&body)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            201 => acknowledged.extend(ids),
            507 => {
                let v: Value = resp.json().await.unwrap();
                detail = v["detail"].as_str().map(String::from);
                refused.extend(ids);
                break;
            }
            other => panic!("append answered {other}: {}", resp.text().await.unwrap()),
        }
    }
    let detail = detail.expect("appends never reached the reserve");
    assert!(detail.contains("reserve"), "{detail}");
    assert!(
        !acknowledged.is_empty(),
        "nothing was appended before the reserve"
    );
    eprintln!(
        "{} events acknowledged, then 507: {detail}",
        acknowledged.len()
    );
    // Still refused while nothing is freed, small appends included.
    let small =
        json!([{"eventId": uuid::Uuid::new_v4().to_string(), "eventType": "Noted", "data": {}}]);
    let resp = client
        .post(ns.url("/api/streams/fill-1"))
        .json(&small)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 507);
    refused.push(small[0]["eventId"].as_str().unwrap().to_string());

    // Every acknowledged event is readable, no refused one is.
    let page = common::get_json(&client, ns.url("/api/streams/fill-1?limit=10000")).await;
    let read: Vec<String> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        read, acknowledged,
        "the stream holds exactly what was acknowledged"
    );
    assert!(refused.iter().all(|id| !read.contains(id)));

    // Space freed: appends succeed again, on the same server.
    std::fs::remove_file(&filler).unwrap();
    let (ids, body) = heavy_batch(99);
    let resp = client
        .post(ns.url("/api/streams/fill-1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    acknowledged.extend(ids);

    // A publish into a full products root: 6 MiB into 4 MiB of free space.
    let staged = stage.join("big.fits");
    fill(&staged, 6 * MIB);
    let staged_hash = blake3::hash(&std::fs::read(&staged).unwrap());
    let resp = client
        .post(ns.url("/api/products"))
        .json(&json!({"data_id": "big", "data_type": "image", "stage_path": "big.fits"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let products_filler = products_in.join("filler");
    fill(
        &products_filler,
        free_bytes(&products_in).saturating_sub(4 * MIB),
    );
    let resp = client
        .post(ns.url("/api/products/big/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    let reason = v["detail"].as_str().unwrap().to_string();
    assert!(reason.contains("No space left on device"), "{reason}");
    let product = common::get_json(&client, ns.url("/api/products/big")).await;
    // Back in staging, with the failure recorded: a failed publish is retried from there.
    assert_eq!(product["status"], "staging");
    assert_eq!(product["publish_attempts"], 1);
    assert!(
        product["publish_error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{product}"
    );
    let failed = common::get_json(&client, ns.url("/api/monitoring/publish/failed")).await;
    assert_eq!(failed["failed_publishes"][0]["data_id"], "big");
    assert_eq!(failed["failed_publishes"][0]["retryable"], true);
    assert_eq!(
        blake3::hash(&std::fs::read(&staged).unwrap()),
        staged_hash,
        "the source changed"
    );
    let leftovers: Vec<_> = std::fs::read_dir(products_in.join(".contimg-tmp"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");

    // Space freed: the retry publishes it, once.
    std::fs::remove_file(&products_filler).unwrap();
    let resp = client
        .post(ns.url("/api/monitoring/publish/retry/big"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let v: Value = resp.json().await.unwrap();
    let published = v["published_path"].as_str().unwrap().to_string();
    let published_in = ns.inside(Path::new(&published));
    assert_eq!(
        blake3::hash(&std::fs::read(&published_in).unwrap()),
        staged_hash
    );
    assert!(
        !staged.exists(),
        "the source stays after a verified publish"
    );
    let history = common::get_json(&client, ns.url("/api/products/big/history")).await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types.iter().filter(|t| **t == "PublishFailed").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "PublishSucceeded").count(),
        1,
        "{types:?}"
    );

    // Stopped: the ledger verifies (inside the namespace, before the tmpfs goes).
    let out = ns.stop();
    assert!(out.contains("server exited 0"), "{out}");
    assert!(out.contains("ok:"), "{out}");
}
