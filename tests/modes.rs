//! `serve --mode api` and `serve --mode stream` as two processes on one ledger: the stream
//! worker ingests, runs the stages and stages products through the API server's HTTP face;
//! the API server owns the ledger and publishes. A restart of the worker resumes from the
//! ledger without taking a file twice.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{ChildServer, bin, eventually, get_json};
use contimg::pipeline::sim;

const OBS: [&str; 3] = [
    "2026-11-30T10:00:00",
    "2026-11-30T10:05:00",
    "2026-11-30T10:10:00",
];

struct Worker(Child);

impl Worker {
    fn start(config: &Path, url: &str) -> Worker {
        let mut child = Command::new(bin())
            .args(["serve", "--mode", "stream", "--url", url, "--config"])
            .arg(config)
            .env("CONTIMG_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the stream worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("contimg: stream worker watching"),
            "unexpected first line {line:?}"
        );
        Worker(child)
    }

    fn sigterm(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn observation(incoming: &Path, t: &str) {
    for sb in 0..16u8 {
        sim::write_subband(
            &incoming.join(format!("{t}_sb{sb:02}.hdf5")),
            71.6,
            2048,
            None,
        )
        .unwrap();
    }
}

async fn count(c: &reqwest::Client, base: &str, event_type: &str) -> usize {
    let mut n = 0;
    let mut from = 0u64;
    loop {
        let page = get_json(c, format!("{base}/api/events?from={from}&limit=1000")).await;
        let events = page["events"].as_array().unwrap();
        n += events
            .iter()
            .filter(|e| e["eventType"] == event_type)
            .count();
        match page["next"].as_u64() {
            Some(next) if !events.is_empty() => from = next,
            _ => return n,
        }
    }
}

#[tokio::test]
async fn api_and_stream_processes_share_one_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (stage, products, incoming) = (
        root.join("stage"),
        root.join("products"),
        root.join("incoming"),
    );
    let api = ChildServer::start(
        &root.join("ledger"),
        &[
            "--mode",
            "api",
            "--stage-root",
            stage.to_str().unwrap(),
            "--products-root",
            products.to_str().unwrap(),
        ],
    );
    let config = root.join("stream.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[paths]
incoming = "{}"
work_root = "{}"
stage_root = "{}"
[ingest]
poll_interval_s = 0.05
stable_s = 0.1
[stages]
runner = "simulate"
[stages.simulate]
tile_size = 32
[mosaic]
tiles = 2
overlap = 1
"#,
            incoming.display(),
            root.join("work").display(),
            stage.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(&incoming).unwrap();
    let worker = Worker::start(&config, &api.base);
    let c = reqwest::Client::new();
    let status = |c: reqwest::Client, url: String| async move {
        get_json(&c, url).await["total_published"].as_u64()
    };

    observation(&incoming, OBS[0]);
    observation(&incoming, OBS[1]);
    // Two images and the mosaic over them, staged by the worker, published by the server.
    let url = api.url("/api/monitoring/publish/status");
    eventually(60.0, || {
        let (c, url) = (c.clone(), url.clone());
        async move { status(c, url).await.filter(|n| *n == 3) }
    })
    .await
    .expect("the worker's products were not all published");
    assert!(
        worker.sigterm().success(),
        "the worker stops cleanly on SIGTERM"
    );

    // The worker comes back; the third observation arrives; nothing is taken twice.
    observation(&incoming, OBS[2]);
    let worker = Worker::start(&config, &api.base);
    eventually(60.0, || {
        let (c, url) = (c.clone(), url.clone());
        async move { status(c, url).await.filter(|n| *n == 5) }
    })
    .await
    .expect("the third image and the second mosaic were not published");
    assert_eq!(count(&c, &api.base, "SubbandFileAccepted").await, 48);
    assert_eq!(count(&c, &api.base, "GroupFormed").await, 3);
    assert_eq!(count(&c, &api.base, "MosaicGroupCreated").await, 2);
    assert_eq!(count(&c, &api.base, "StageStarted").await, 3 * 3 + 2);
    assert!(products.join("mosaics").read_dir().unwrap().count() == 2);
    assert!(products.join("images").read_dir().unwrap().count() == 3);
    drop(worker);
    assert!(api.sigterm().success());
}

#[test]
fn stream_mode_without_a_url_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["serve", "--mode", "stream", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--url"), "{err}");
}
