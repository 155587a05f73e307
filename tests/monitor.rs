//! `contimg monitor` against a real server: each flag, each exit code, `--json` parsed back.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{TestServer, bin};
use contimg::api::ServerConfig;
use serde_json::{Value, json};

async fn monitor(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .arg("monitor")
            .args(&args)
            .env_remove("CONTIMG_API_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn one_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {text:?}"));
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_flags_exit_codes_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::under(dir.path());
    config.publish.max_attempts = 1;
    config.token = Some("tok".into());
    let stage = config.publish.stage_root.clone();
    let server = TestServer::start_with(dir.path(), config).await;
    let url = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let a = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["--url".to_string(), url.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // Quiet server: exit 0, readable summary, and valid JSON.
    let out = monitor(a(&[])).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no alerts"));
    let out = monitor(a(&["--json"])).await;
    assert_eq!(out.status.code(), Some(0));
    let doc = one_json(&out);
    assert_eq!(doc["status"]["total_published"], json!(0));
    assert_eq!(doc["alert_count"], json!(0));

    // One product fails and exhausts its single attempt: alerts, exit 1.
    std::fs::write(stage.join("x.fits"), b"data").unwrap();
    let r = c
        .post(server.url("/api/products"))
        .bearer_auth("tok")
        .json(&json!({"data_id": "x", "data_type": "image", "stage_path": "x.fits", "auto_publish": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    std::fs::rename(stage.join("x.fits"), stage.join("x.away")).unwrap();
    let r = c
        .post(server.url("/api/products/x/publish"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let out = monitor(a(&["--json"])).await;
    assert_eq!(out.status.code(), Some(1));
    let names: Vec<String> = one_json(&out)["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["low_success_rate", "max_attempts_exceeded"]);
    // Thresholds from a file turn alerts off.
    let thresholds = dir.path().join("t.json");
    std::fs::write(
        &thresholds,
        r#"{"min_success_rate": 0, "max_attempts_exceeded": 5}"#,
    )
    .unwrap();
    let out = monitor(a(&["--alert-thresholds", thresholds.to_str().unwrap()])).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A bad thresholds file: exit 2, still one JSON document.
    std::fs::write(&thresholds, "{oops").unwrap();
    let out = monitor(a(&[
        "--json",
        "--alert-thresholds",
        thresholds.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(one_json(&out)["error"].is_string());

    // Retries need the token.
    let out = monitor(a(&["--retry-failed", "x"])).await;
    assert_eq!(out.status.code(), Some(1));
    // Still failing (file away): 1.
    let out = monitor(a(&["--token", "tok", "--json", "--retry-failed", "x"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(one_json(&out)["success"], json!(false));
    std::fs::rename(stage.join("x.away"), stage.join("x.fits")).unwrap();
    let out = monitor(a(&["--token", "tok", "--retry-failed", "x"])).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Already published counts as success.
    let out = monitor(a(&["--token", "tok", "--json", "--retry-failed", "x"])).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(one_json(&out)["already_published"], json!(true));
    let out = monitor(a(&["--token", "tok", "--retry-failed", "nope"])).await;
    assert_eq!(out.status.code(), Some(1));

    // retry-all: 0 when none failed, 1 when one did.
    for id in ["y", "z"] {
        std::fs::write(stage.join(format!("{id}.fits")), id).unwrap();
        c.post(server.url("/api/products"))
            .bearer_auth("tok")
            .json(&json!({"data_id": id, "data_type": "image", "stage_path": format!("{id}.fits"), "auto_publish": false}))
            .send()
            .await
            .unwrap();
        std::fs::rename(
            stage.join(format!("{id}.fits")),
            stage.join(format!("{id}.away")),
        )
        .unwrap();
        c.post(server.url(&format!("/api/products/{id}/publish")))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap();
    }
    std::fs::rename(stage.join("y.away"), stage.join("y.fits")).unwrap();
    let out = monitor(a(&[
        "--token",
        "tok",
        "--json",
        "--retry-all",
        "--limit",
        "5",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    let doc = one_json(&out);
    assert_eq!(
        (
            doc["total_attempted"].clone(),
            doc["successful"].clone(),
            doc["failed"].clone()
        ),
        (json!(2), json!(1), json!(1))
    );
    std::fs::rename(stage.join("z.away"), stage.join("z.fits")).unwrap();
    let out = monitor(a(&[
        "--token",
        "tok",
        "--retry-all",
        "--limit",
        "5",
        "--max-attempts",
        "3",
    ]))
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Wrong arguments and an unreachable server: 2, one line, or one JSON document.
    let out = monitor(vec!["--json".into(), "--limit".into(), "3".into()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(one_json(&out)["error"].is_string());
    let dead = vec!["--url".to_string(), "http://127.0.0.1:1".to_string()];
    let out = monitor(dead.clone()).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    let mut dead_json = dead;
    dead_json.push("--json".into());
    let out = monitor(dead_json).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        one_json(&out)["error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1")
    );

    // Daemon: checks until SIGTERM, then exits 0.
    let mut child = Command::new(bin())
        .args([
            "monitor",
            "--url",
            &url,
            "--json",
            "--daemon",
            "--interval",
            "0.1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(stdout);
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            lines.push(l);
        }
        lines
    })
    .await
    .unwrap();
    for l in &lines {
        let doc: Value = serde_json::from_str(l.trim()).unwrap();
        assert!(doc["status"]["total_published"].is_u64());
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(0));
    server.stop().await;
}

/// `--daemon --webhook`: each alert is posted when it starts and when it clears, and a
/// receiver that fails is retried, in order, without holding the checks up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_posts_alerts_to_a_webhook_when_they_start_and_clear() {
    use std::sync::{Arc, Mutex};
    // The receiver: answers 500 to its first request, then keeps every body.
    let got: Arc<Mutex<(usize, Vec<Value>)>> = Arc::default();
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let got = got.clone();
                async move {
                    let mut g = got.lock().unwrap();
                    g.0 += 1;
                    if g.0 == 1 {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    g.1.push(v);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::under(dir.path());
    let stage = config.publish.stage_root.clone();
    let server = TestServer::start_with(dir.path(), config).await;
    let url = format!("http://{}", server.addr);
    let thresholds = dir.path().join("thresholds.json");
    std::fs::write(
        &thresholds,
        r#"{"max_failed": 0, "min_success_rate": 0, "max_failures_1h": 1000}"#,
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args([
            "monitor",
            "--url",
            &url,
            "--json",
            "--daemon",
            "--interval",
            "0.2",
        ])
        .args(["--webhook", &hook, "--alert-thresholds"])
        .arg(&thresholds)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // A publish that fails (its staged file is gone): `too_many_failed` starts.
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(stage.join("f.fits"), b"SIMPLE").unwrap();
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{url}/api/products"))
        .json(&json!({"data_id": "f", "data_type": "image", "stage_path": "f.fits", "auto_publish": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    std::fs::remove_file(stage.join("f.fits")).unwrap();
    let r = c
        .post(format!("{url}/api/products/f/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let started = common::eventually(20.0, || {
        let got = got.clone();
        async move { (!got.lock().unwrap().1.is_empty()).then_some(()) }
    })
    .await;
    assert!(started.is_some(), "no notification arrived");
    // The file is back: the retry publishes it, and the alert clears.
    std::fs::write(stage.join("f.fits"), b"SIMPLE").unwrap();
    let r = c
        .post(format!("{url}/api/monitoring/publish/retry/f"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let cleared = common::eventually(20.0, || {
        let got = got.clone();
        async move { (got.lock().unwrap().1.len() >= 2).then_some(()) }
    })
    .await;
    assert!(cleared.is_some(), "the clearing was not posted");
    // The server goes away: that is an alert of its own.
    server.stop().await;
    let gone = common::eventually(20.0, || {
        let got = got.clone();
        async move { (got.lock().unwrap().1.len() >= 3).then_some(()) }
    })
    .await;
    assert!(gone.is_some(), "the unreachable server was not posted");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let (requests, bodies) = got.lock().unwrap().clone();
    assert!(
        requests >= 3,
        "the failed first delivery was retried ({requests} requests)"
    );
    let events: Vec<(&str, &str)> = bodies
        .iter()
        .map(|b| {
            (
                b["event"].as_str().unwrap(),
                b["alert"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("started", "too_many_failed"),
            ("cleared", "too_many_failed"),
            ("started", "server_unreachable")
        ]
    );
    assert_eq!(bodies[0]["source"], json!(url));
    assert!(bodies[0]["alert"]["message"].is_string());
    assert!(bodies[1]["at"].is_string());
    assert_eq!(bodies[2]["alert"]["severity"], "critical");
}
