//! `contimg audit` against real histories: the status at any recorded position equals what
//! the live server showed, from an export, from the stopped folder and from the URL; and an
//! interrupted publish shows up, with its recovery, in the product's timeline.

mod common;

use std::path::Path;

use common::{ChildServer, contimg};
use serde_json::{Value, json};

fn audit(source: &[&str], what: &[&str]) -> Value {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(source);
    args.extend_from_slice(what);
    let out = contimg(&args);
    assert!(
        out.status.success(),
        "contimg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

async fn status(c: &reqwest::Client, base: &str) -> Value {
    common::get_json(c, format!("{base}/api/monitoring/publish/status")).await
}

fn same_but_time(mut offline: Value, live: &Value) -> bool {
    offline["timestamp"] = live["timestamp"].clone();
    &offline == live
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_status_at_every_position_equals_what_the_server_showed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ledger = root.join("ledger");
    let stage = root.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    let args = [
        "--stage-root",
        stage.to_str().unwrap(),
        "--retry-backoff",
        "3600",
    ];
    let c = reqwest::Client::new();
    let mut seen: Vec<Value> = Vec::new();
    let server = ChildServer::start(&ledger, &args);
    let post = |path: String, body: Option<Value>| {
        let mut rb = c.post(format!("{}{path}", server.base));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send()
    };
    for i in 0..5 {
        std::fs::write(stage.join(format!("a{i}.fits")), format!("tile {i}")).unwrap();
        post(
            "/api/products".into(),
            Some(json!({"data_id": format!("a{i}"), "data_type": "image", "stage_path": format!("a{i}.fits"), "auto_publish": false})),
        )
        .await
        .unwrap();
        seen.push(status(&c, &server.base).await);
    }
    for i in [1, 3] {
        std::fs::remove_file(stage.join(format!("a{i}.fits"))).unwrap();
        post(format!("/api/products/a{i}/publish"), None)
            .await
            .unwrap();
        seen.push(status(&c, &server.base).await);
    }
    for i in [0, 2] {
        post(format!("/api/products/a{i}/publish"), None)
            .await
            .unwrap();
        seen.push(status(&c, &server.base).await);
    }
    std::fs::write(stage.join("a1.fits"), "tile 1").unwrap();
    post("/api/monitoring/publish/retry/a1".into(), None)
        .await
        .unwrap();
    seen.push(status(&c, &server.base).await);
    // A crash and a restart in the middle of the history.
    server.kill9();
    let server = ChildServer::start(&ledger, &args);
    c.post(format!("{}/api/products/a4/publish", server.base))
        .send()
        .await
        .unwrap();
    seen.push(status(&c, &server.base).await);

    // From the URL, while it runs.
    for live in &seen {
        let p = live["ledger_position"].to_string();
        let r = audit(&["--url", &server.base], &["status", "--position", &p]);
        assert_eq!(r["position"].to_string(), p);
        assert!(
            same_but_time(r["status"].clone(), live),
            "url at {p}: {} vs {live}",
            r["status"]
        );
    }
    let export = root.join("events.jsonl");
    assert!(
        contimg(&[
            "export",
            "--url",
            &server.base,
            "--out",
            export.to_str().unwrap()
        ])
        .status
        .success()
    );
    assert!(server.sigterm().success());
    // From the export and from the stopped folder.
    for live in &seen {
        let p = live["ledger_position"].to_string();
        for source in [
            ["--export", export.to_str().unwrap()],
            ["--data-dir", ledger.to_str().unwrap()],
        ] {
            let r = audit(&source, &["status", "--position", &p]);
            assert!(
                same_but_time(r["status"].clone(), live),
                "{source:?} at {p}: {} vs {live}",
                r["status"]
            );
        }
    }
    // The failed list as of the moment a3 had failed and a1 not yet been retried.
    let p = seen[6]["ledger_position"].to_string();
    let failed = audit(
        &["--export", export.to_str().unwrap()],
        &["failed", "--position", &p],
    );
    let ids: Vec<&str> = failed["failed_publishes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["data_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"a1") && ids.contains(&"a3"));
    // What happened in the whole window, by type.
    let window = audit(
        &["--data-dir", ledger.to_str().unwrap()],
        &["between", "2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z"],
    );
    assert_eq!(window["by_type"]["ProductRegistered"], json!(5));
    assert_eq!(window["by_type"]["PublishFailed"], json!(2));
    assert_eq!(window["by_type"]["RetryRequested"], json!(1));
    assert_eq!(
        window["total"].as_u64().unwrap(),
        seen.last().unwrap()["ledger_position"].as_u64().unwrap() + 1
    );
}

/// A history that ends in the middle of a publish (as a SIGKILL leaves it), then a start:
/// the product's timeline shows the interruption and its recovery.
#[test]
fn an_interrupted_publish_and_its_recovery_are_in_the_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let stage = root.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(stage.join("cut.fits"), "intact").unwrap();
    let sum = blake3::hash(b"intact").to_hex().to_string();
    let ledger = root.join("ledger");
    // Write the history a crash leaves: a registration, then PublishStarted, nothing after.
    let server = ChildServer::start(
        &ledger,
        &["--stage-root", stage.to_str().unwrap(), "--no-auto-publish"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let r = c
            .post(format!("{}/api/products", server.base))
            .json(&json!({"data_id": "cut", "data_type": "image", "stage_path": "cut.fits", "auto_publish": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    });
    // The crash, then the history it leaves: PublishStarted and nothing after (written
    // offline: the publish lifecycle takes no raw appends over HTTP).
    server.kill9();
    common::append_offline(
        &ledger,
        "product-cut",
        contimg::events::ExpectedRevision::Exact(0),
        &[contimg::events::catalogue::PublishStarted {
            attempt: 1,
            destination: root.join("products/images/cut.fits").display().to_string(),
            trigger: "manual".into(),
        }],
    );

    let server = ChildServer::start(
        &ledger,
        &["--stage-root", stage.to_str().unwrap(), "--no-auto-publish"],
    );
    assert!(server.sigterm().success());
    let timeline = audit(
        &["--data-dir", ledger.to_str().unwrap()],
        &["product", "cut"],
    );
    let events = timeline["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["ProductRegistered", "PublishStarted", "PublishFailed"]
    );
    assert_eq!(events[2]["data"]["interrupted"], json!(true));
    assert_eq!(events[2]["data"]["retryable"], json!(true));
    assert_eq!(events[2]["actor"], json!("recovery"));
    assert!(Path::new(&stage.join("cut.fits")).exists());
    assert_eq!(
        blake3::hash(&std::fs::read(stage.join("cut.fits")).unwrap())
            .to_hex()
            .to_string(),
        sum
    );
    // The human form says the same.
    let out = contimg(&[
        "audit",
        "--data-dir",
        ledger.to_str().unwrap(),
        "product",
        "cut",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PublishFailed") && text.contains("interrupted=true"),
        "{text}"
    );
    // An unknown product is a clear error.
    let out = contimg(&[
        "audit",
        "--data-dir",
        ledger.to_str().unwrap(),
        "product",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("product-nope"));
}

/// The incident for real: SIGKILL while the publisher is busy with a large product (its
/// `PublishStarted` committed, the checksum and durable copy under way), then a start. The
/// timeline shows the publish cut short and what recovery made of it.
#[test]
fn a_publish_cut_by_sigkill_shows_its_recovery_in_the_timeline() {
    const SIZE: usize = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let stage = root.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(stage.join("big.fits"), &data).unwrap();
    drop(data);
    let ledger = root.join("ledger");
    let flags = ["--mode", "api", "--stage-root", stage.to_str().unwrap()];
    let server = ChildServer::start(&ledger, &flags);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(async {
        let c = reqwest::Client::new();
        let r = c
            .post(format!("{}/api/products", server.base))
            .json(
                &json!({"data_id": "big", "data_type": "image", "stage_path": "big.fits",
                          "qa_status": "passed", "validation_status": "validated"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        // The automatic publisher takes it within a second; catch it in the act.
        common::eventually(30.0, || {
            let (c, url) = (c.clone(), format!("{}/api/products/big", server.base));
            async move {
                let p: Value = c.get(url).send().await.ok()?.json().await.ok()?;
                let s = p["status"].as_str()?.to_string();
                (s != "staging").then_some(s)
            }
        })
        .await
        .expect("the publisher never took the product")
    });
    assert_eq!(
        seen, "publishing",
        "the copy finished before the kill could land"
    );
    server.kill9();
    // Restart with the publisher held, so the timeline ends with what recovery did.
    let server = ChildServer::start(
        &ledger,
        &[
            "--mode",
            "api",
            "--stage-root",
            stage.to_str().unwrap(),
            "--no-auto-publish",
        ],
    );
    assert!(server.sigterm().success());

    let timeline = audit(
        &["--data-dir", ledger.to_str().unwrap()],
        &["product", "big"],
    );
    let events = timeline["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.len(), 3, "{types:?}");
    assert_eq!(types[..2], ["ProductRegistered", "PublishStarted"]);
    let recovery = &events[2];
    assert_eq!(recovery["actor"], json!("recovery"));
    let published = root.join("ledger/products/images/big.fits");
    match types[2] {
        // Cut before the rename: the staged file is whole and no temporary is left.
        "PublishFailed" => {
            assert_eq!(recovery["data"]["interrupted"], json!(true));
            assert_eq!(
                std::fs::metadata(stage.join("big.fits")).unwrap().len(),
                SIZE as u64
            );
            assert!(!published.exists());
        }
        // Cut after the rename: recovery found the copy complete and recorded it.
        "PublishSucceeded" => {
            assert_eq!(recovery["data"]["recovered"], json!(true));
            assert_eq!(std::fs::metadata(&published).unwrap().len(), SIZE as u64);
        }
        other => panic!("unexpected recovery event {other}"),
    }
    let leftovers: Vec<_> = std::fs::read_dir(root.join("ledger/products/.contimg-tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Output into a pipe whose reader has gone (`contimg audit ... | head`) ends the command
/// quietly, as for any Unix tool: killed by SIGPIPE, no panic message.
#[test]
fn a_closed_pipe_ends_a_long_listing_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("e.jsonl");
    let lines: Vec<String> = (0..5_000)
        .map(|i| {
            common::export_line(
                &format!("scratch-{i}"),
                0,
                i,
                "Noted",
                json!({"n": i}),
                "2026-11-30T10:00:00Z",
            )
        })
        .collect();
    std::fs::write(&export, lines.concat()).unwrap();
    let ledger = dir.path().join("ledger");
    let import = contimg(&[
        "import",
        "--data-dir",
        ledger.to_str().unwrap(),
        export.to_str().unwrap(),
    ]);
    assert!(import.status.success(), "{import:?}");
    let mut child = std::process::Command::new(common::bin())
        .args([
            "audit",
            "--data-dir",
            ledger.to_str().unwrap(),
            "between",
            "2026-11-30T00:00:00Z",
            "2026-12-01T00:00:00Z",
            "--limit",
            "5000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
