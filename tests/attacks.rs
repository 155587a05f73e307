//! The attacks of a loopback client on `contimg serve`, each against a real server: none
//! may move, delete or hang on a file the publisher did not stage, and the ledger says why
//! nothing happened. Then the HTTP face's limits: timeouts, same-origin rules, `Host`,
//! hyper's own errors as JSON, method labels, replays, and overlapping roots.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ChildServer, TestServer, append_offline, eventually, get_json};
use contimg::api::ServerConfig;
use contimg::events::ExpectedRevision;
use contimg::events::catalogue::{ProductFinalized, ProductRegistered, PublishStarted};
use serde_json::{Value, json};

/// A folder outside every root, with content to compare byte for byte.
fn outside_folder(root: &Path) -> (PathBuf, Vec<(PathBuf, Vec<u8>)>) {
    let dir = root.join("outside/precious.ms");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let files = vec![
        (dir.join("table.dat"), b"the only copy".to_vec()),
        (dir.join("sub/x"), vec![7u8; 5000]),
    ];
    for (p, b) in &files {
        std::fs::write(p, b).unwrap();
    }
    (dir, files)
}

fn still_there(files: &[(PathBuf, Vec<u8>)]) {
    for (p, b) in files {
        assert_eq!(
            &std::fs::read(p).unwrap_or_else(|e| panic!("{} is gone: {e}", p.display())),
            b,
            "{} changed",
            p.display()
        );
    }
}

/// A ledger folder in a fresh temporary folder, its server's configuration, and its
/// stage root, created.
fn layout() -> (tempfile::TempDir, PathBuf, ServerConfig, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("var");
    let config = ServerConfig::under(&ledger);
    let stage = config.publish.stage_root.clone();
    std::fs::create_dir_all(&stage).unwrap();
    (dir, ledger, config, stage)
}

/// Registers a staged image (`path` relative to the stage root), without automatic
/// publishing; the status code.
async fn register(
    c: &reqwest::Client,
    server: &TestServer,
    id: &str,
    path: impl AsRef<str>,
) -> u16 {
    c.post(server.url("/api/products"))
        .json(&json!({"data_id": id, "data_type": "image", "stage_path": path.as_ref(), "auto_publish": false}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Registers a staged image through a server started for it, then stops that server,
/// so that a test can write the rest of the history offline.
async fn register_then_stop(ledger: &Path, config: &ServerConfig, id: &str, path: &str) {
    let server = TestServer::start_with(ledger, config.clone()).await;
    assert_eq!(
        register(&reqwest::Client::new(), &server, id, path).await,
        201
    );
    server.stop().await;
}

fn event(ty: &str, data: Value) -> Value {
    json!({"eventId": uuid::Uuid::new_v4().to_string(), "eventType": ty, "data": data, "metadata": {}})
}

fn registered(id: &str, stage_path: &Path, checksum: Option<String>) -> ProductRegistered {
    ProductRegistered {
        data_id: id.into(),
        data_type: "ms".into(),
        stage_path: stage_path.display().to_string(),
        checksum,
        size_bytes: None,
        qa_status: Some("passed".into()),
        validation_status: Some("validated".into()),
        auto_publish: true,
        metadata: Default::default(),
    }
}

/// A registration of a staged image as the publisher writes it (checksum included).
fn registered_image(id: &str, stage_path: &Path) -> ProductRegistered {
    ProductRegistered {
        data_type: "image".into(),
        checksum: Some("0".repeat(64)),
        ..registered(id, stage_path, None)
    }
}

async fn product(c: &reqwest::Client, base: &str, id: &str) -> Value {
    get_json(c, format!("{base}/api/products/{id}")).await
}

async fn wait_failed(c: &reqwest::Client, base: &str, id: &str) -> Value {
    eventually(15.0, || async {
        let p = product(c, base, id).await;
        (p["publish_attempts"].as_u64() >= Some(1)).then_some(p)
    })
    .await
    .unwrap_or_else(|| panic!("{id} was never attempted"))
}

/// Attack 1: a hand-written `ProductRegistered` naming a folder outside the stage root.
/// Over HTTP it is refused (403, naming the command), with and without a token; written
/// into the ledger anyway (offline, as a bug might), the publisher still refuses to move
/// the folder, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_registered_outside_the_stage_root_is_never_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (outside, files) = outside_folder(dir.path());
    let ledger = dir.path().join("var");
    let sum = contimg::pipeline::moves::checksum_path(&outside).unwrap().0;
    let forged = serde_json::to_value(registered("x", &outside, None)).unwrap();
    let c = reqwest::Client::new();
    // A server without a token; one with a token, asked with it and without it (a raw
    // product append is refused before the token is looked at).
    for (server_token, sent) in [
        (None, None),
        (Some("secret"), Some("secret")),
        (Some("secret"), None),
    ] {
        let server = TestServer::start(&ledger, server_token).await;
        for stream in ["product-x", "scratch-x"] {
            if stream == "scratch-x" && server_token.is_some() && sent.is_none() {
                continue; // not a product stream: the token decides first (401)
            }
            let mut rb = c
                .post(server.url(&format!("/api/streams/{stream}")))
                .json(&json!([event("ProductRegistered", forged.clone())]));
            if let Some(t) = sent {
                rb = rb.bearer_auth(t);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(
                r.status().as_u16(),
                403,
                "{stream}, server token {server_token:?}, sent {sent:?}"
            );
            let body: Value = r.json().await.unwrap();
            assert!(
                body["detail"]
                    .as_str()
                    .unwrap()
                    .contains("POST /api/products"),
                "{body}"
            );
        }
        assert_eq!(server.store.event_count(), 0);
        server.stop().await;
    }

    // Defence in depth: the same event in the ledger, with and without the right checksum
    // (two outside folders, so that neither product holds the other's files).
    let other_outside = dir.path().join("outside2");
    std::fs::create_dir_all(&other_outside).unwrap();
    std::fs::write(other_outside.join("f"), b"also outside").unwrap();
    append_offline(
        &ledger,
        "product-x",
        ExpectedRevision::NoStream,
        &[registered("x", &other_outside, None)],
    );
    append_offline(
        &ledger,
        "product-y",
        ExpectedRevision::NoStream,
        &[registered("y", &outside, Some(sum))],
    );
    let server = TestServer::start(&ledger, None).await;
    let base = format!("http://{}", server.addr);
    let x = wait_failed(&c, &base, "x").await;
    let y = wait_failed(&c, &base, "y").await;
    assert_eq!(x["status"], json!("staging"));
    assert!(
        x["publish_error"]
            .as_str()
            .unwrap()
            .contains("without a checksum"),
        "{x}"
    );
    assert_eq!(y["status"], json!("staging"));
    assert!(
        y["publish_error"].as_str().unwrap().contains("outside"),
        "{y}"
    );
    // Not retryable: a path outside the root never becomes acceptable.
    assert_eq!(y["next_retry_at"], Value::Null, "{y}");
    still_there(&files);
    let products = ledger.join("products");
    assert!(!products.join("ms/precious.ms").exists());
    server.stop().await;
}

/// Attack 2: a forged `PublishStarted` naming `/dev/null`, and a staged empty file whose
/// checksum `/dev/null` matches. Recovery looks only where the rule puts the product, so
/// it finds no copy, deletes nothing, and records an interrupted failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_destination_makes_recovery_delete_nothing() {
    let (_dir, ledger, config, stage) = layout();
    std::fs::write(stage.join("empty.fits"), b"").unwrap();
    register_then_stop(&ledger, &config, "e", "empty.fits").await;
    let c = reqwest::Client::new();
    append_offline(
        &ledger,
        "product-e",
        ExpectedRevision::Exact(0),
        &[PublishStarted {
            attempt: 1,
            destination: "/dev/null".into(),
            trigger: "manual".into(),
        }],
    );
    let server = TestServer::start_with(&ledger, config).await;
    let base = format!("http://{}", server.addr);
    let p = eventually(10.0, || async {
        let p = product(&c, &base, "e").await;
        (p["status"] == "staging").then_some(p)
    })
    .await
    .expect("recovery settled the forged publish");
    assert_eq!(p["published_path"], Value::Null, "{p}");
    assert!(stage.join("empty.fits").exists(), "the staged file is kept");
    let history = get_json(&c, server.url("/api/products/e/history")).await;
    let last = history["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["eventType"], json!("PublishFailed"), "{last}");
    assert_eq!(last["data"]["interrupted"], json!(true), "{last}");
    server.stop().await;
}

/// Attack 3: a product whose name looks like a temporary copy is published, and a restart
/// (which cleans temporaries) leaves it alone: temporaries have a folder of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_named_like_a_temporary_survives_restarts() {
    let (_dir, ledger, config, stage) = layout();
    let name = ".contimg-tmp-0000-x.fits";
    let bytes = vec![5u8; 3000];
    std::fs::write(stage.join(name), &bytes).unwrap();
    let server = TestServer::start_with(&ledger, config.clone()).await;
    let c = reqwest::Client::new();
    assert_eq!(register(&c, &server, "t", name).await, 201);
    let r = c
        .post(server.url("/api/products/t/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    server.stop().await;
    let published = ledger.join("products/images").join(name);
    assert_eq!(std::fs::read(&published).unwrap(), bytes);
    for _ in 0..2 {
        let server = TestServer::start_with(&ledger, config.clone()).await;
        server.stop().await;
        assert_eq!(
            std::fs::read(&published).unwrap(),
            bytes,
            "the product survives"
        );
    }
}

/// Attack 4: a FIFO in the stage root. Registering it is refused; swapped in after the
/// registration, its publish fails at once, another product still publishes, and SIGTERM
/// ends the server.
#[test]
fn a_fifo_blocks_neither_the_publisher_nor_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let stage = data.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    let mkfifo = |p: &Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    mkfifo(&stage.join("pipe.fits"));
    std::fs::write(stage.join("swap.fits"), b"regular for now").unwrap();
    std::fs::write(stage.join("good.fits"), vec![1u8; 4096]).unwrap();
    let server = ChildServer::start(&data, &["--mode", "api", "--no-auto-publish"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let reg = |id: &str, file: &str| {
            c.post(server.url("/api/products"))
                .json(&json!({"data_id": id, "data_type": "image", "stage_path": file, "auto_publish": false}))
                .send()
        };
        let r = reg("pipe", "pipe.fits").await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let body: Value = r.json().await.unwrap();
        assert!(body["detail"].as_str().unwrap().contains("FIFO"), "{body}");
        assert_eq!(reg("swap", "swap.fits").await.unwrap().status().as_u16(), 201);
        assert_eq!(reg("good", "good.fits").await.unwrap().status().as_u16(), 201);
        std::fs::remove_file(stage.join("swap.fits")).unwrap();
        mkfifo(&stage.join("swap.fits"));
        let r = c
            .post(server.url("/api/products/swap/publish"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 500);
        let body: Value = r.json().await.unwrap();
        assert!(body["detail"].as_str().unwrap().contains("FIFO"), "{body}");
        let r = c
            .post(server.url("/api/products/good/publish"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    });
    assert!(server.sigterm().success());
    assert!(stage.join("swap.fits").exists(), "the FIFO is left alone");
}

/// A publish past its time limit is cut short, recorded as a retryable failure, and
/// leaves the staged file and no temporary behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_past_its_time_limit_is_cut_short() {
    let (_dir, ledger, mut config, stage) = layout();
    config.publish.timeout = Duration::from_nanos(1);
    let bytes = vec![3u8; 3 << 20];
    std::fs::write(stage.join("slow.fits"), &bytes).unwrap();
    let server = TestServer::start_with(&ledger, config).await;
    let c = reqwest::Client::new();
    assert_eq!(register(&c, &server, "slow", "slow.fits").await, 201);
    let r = c
        .post(server.url("/api/products/slow/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let p = product(&c, &format!("http://{}", server.addr), "slow").await;
    assert!(
        p["publish_error"].as_str().unwrap().contains("time limit"),
        "{p}"
    );
    assert!(p["next_retry_at"].is_string(), "retryable: {p}");
    assert_eq!(std::fs::read(stage.join("slow.fits")).unwrap(), bytes);
    // No temporary left, named (`.contimg-tmp`) or not (an unlinked copy vanishes): no
    // file anywhere below the products root.
    let mut files = Vec::new();
    let mut folders = vec![ledger.join("products")];
    while let Some(f) = folders.pop() {
        for e in std::fs::read_dir(&f).unwrap() {
            let e = e.unwrap();
            match e.file_type().unwrap().is_dir() {
                true => folders.push(e.path()),
                false => files.push(e.path()),
            }
        }
    }
    assert_eq!(files, Vec::<PathBuf>::new(), "no temporary left");
    server.stop().await;
}

fn config_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("contimg.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn connect(base: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Everything the server sends until it closes the connection (or 20 s pass: then the
/// read fails and so does the test).
fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server kept the connection open: {e}"),
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Attack 5: half a header and half a body are cut off by their time limits, and a
/// connection held open does not keep SIGTERM from completing.
#[test]
fn half_requests_time_out_and_do_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "[server]\nheader_timeout_s = 1.0\nbody_timeout_s = 1.0\nshutdown_deadline_s = 2.0\n",
    );
    let server = ChildServer::start(
        &dir.path().join("var"),
        &["--mode", "api", "--config", config.to_str().unwrap()],
    );
    let mut half_header = connect(&server.base);
    half_header
        .write_all(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    assert!(!read_to_close(&mut half_header).contains("200 OK"));

    let mut half_body = connect(&server.base);
    half_body
        .write_all(
            b"POST /api/products HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"data_id\"",
        )
        .unwrap();
    let answer = read_to_close_or_answer(&mut half_body);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"detail\""), "{answer}");

    // A third one holds a connection open while the server is asked to stop.
    let mut held = connect(&server.base);
    held.write_all(b"GET /api/status HTTP/1.1\r\nHost: 127")
        .unwrap();
    let status = server.sigterm();
    assert!(status.success(), "{status:?}");
}

/// Reads one response head and the body its content-length announces.
fn read_to_close_or_answer(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("an answer within 20 s");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Attack 6: a page of another origin, or a DNS-rebinding name, cannot drive the API; the
/// dashboard reads nothing from its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_and_foreign_hosts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let c = reqwest::Client::new();
    let body = json!([event("Noted", json!({}))]).to_string();
    let post = |headers: &[(&str, &str)]| {
        let mut rb = c
            .post(server.url("/api/streams/scratch-1"))
            .body(body.clone());
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        rb.send()
    };
    let host = server.addr.to_string();
    let same_origin = format!("http://{host}");
    let cases: Vec<(Vec<(&str, &str)>, u16)> = vec![
        (vec![("Content-Type", "text/plain")], 415),
        (vec![], 415),
        (
            vec![
                ("Content-Type", "application/json"),
                ("Origin", "http://evil.example"),
            ],
            403,
        ),
        (
            vec![("Content-Type", "application/json"), ("Origin", "null")],
            403,
        ),
        (
            vec![
                ("Content-Type", "application/json"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            403,
        ),
        (
            vec![
                ("Content-Type", "application/json"),
                ("Host", "rebind.evil.example:8000"),
            ],
            403,
        ),
        (
            vec![
                ("Content-Type", "application/json; charset=utf-8"),
                ("Origin", same_origin.as_str()),
                ("Sec-Fetch-Site", "same-origin"),
            ],
            201,
        ),
    ];
    for (headers, want) in cases {
        let r = post(&headers).await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, want, "{headers:?}: {v}");
        assert!(v.is_object(), "{v}");
        if want != 201 {
            assert!(v["detail"].is_string(), "{v}");
        }
    }
    assert_eq!(server.store.event_count(), 1, "only the same-origin append");
    // A foreign Host is refused for reads too (a rebinding page could read the API).
    let r = c
        .get(server.url("/api/status"))
        .header("Host", "rebind.evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    for ok_host in ["localhost:8000", "127.0.0.1:1234", "[::1]:80"] {
        let r = c
            .get(server.url("/api/status"))
            .header("Host", ok_host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{ok_host}");
    }
    // A bodiless POST without a Content-Type (the old monitor's retry) still works.
    let r = c
        .post(server.url("/api/monitoring/publish/retry-all"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let page = reqwest::get(server.url("/?autoretry=x&product=x"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for hook in [
        "location.search",
        "URLSearchParams",
        "autoretry",
        "location.hash",
    ] {
        assert!(!page.contains(hook), "the page reads its address ({hook})");
    }
    server.stop().await;

    // With a token, the token decides: a configured name is not needed.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Some("secret")).await;
    let r = c
        .get(server.url("/api/status"))
        .header("Host", "contimg.site.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    server.stop().await;
}

/// hyper's own refusals (before the router) answer JSON like every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_before_the_router_answer_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let base = server.url("");
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "a".repeat(70_000)
    );
    let big_header = format!(
        "GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(500_000)
    );
    let cases = [
        ("GARBAGE\r\n\r\n".to_string(), "400"),
        ("GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_string(), "400"),
        (
            "GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n".to_string(),
            "400",
        ),
        (long_uri, "414"),
        (big_header, "431"),
    ];
    for (request, code) in cases {
        let base = base.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = connect(&base);
            let _ = s.write_all(request.as_bytes());
            read_to_close_or_answer(&mut s)
        })
        .await
        .unwrap();
        assert!(answer.starts_with(&format!("HTTP/1.1 {code}")), "{answer}");
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert!(v["detail"].is_string(), "{v}");
    }
    // The server still answers.
    let r = reqwest::get(server.url("/api/status")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    server.stop().await;
}

/// Methods a client invents count as `other` in the metrics (labels are a bounded set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_are_counted_as_other() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let c = reqwest::Client::new();
    let m = reqwest::Method::from_bytes(b"FROBNICATE").unwrap();
    let r = c
        .request(m, server.url("/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let metrics = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("FROBNICATE"), "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    server.stop().await;
}

/// As-of replays are bounded: when every permit is taken, another answers 503 with
/// `Retry-After` instead of starting one more fold of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_replays_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::under(dir.path());
    config.http.max_as_of_replays = 1;
    let server = TestServer::start_with(dir.path(), config).await;
    let c = reqwest::Client::new();
    let r = c
        .post(server.url("/api/streams/scratch-1"))
        .json(&json!([event("Noted", json!({}))]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let url = server.url("/api/monitoring/publish/status?position=0");
    assert_eq!(c.get(&url).send().await.unwrap().status().as_u16(), 200);
    let held = server.state.replays.clone().try_acquire_owned().unwrap();
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("as-of"), "{v}");
    drop(held);
    assert_eq!(c.get(&url).send().await.unwrap().status().as_u16(), 200);
    server.stop().await;
}

/// A product stream longer than one read page is read to its end: the publisher's state
/// is the whole history's, so its `Exact` append lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_with_a_long_history_still_publishes() {
    let (_dir, ledger, config, stage) = layout();
    std::fs::write(stage.join("long.fits"), b"long history").unwrap();
    register_then_stop(&ledger, &config, "long", "long.fits").await;
    let c = reqwest::Client::new();
    let verdicts: Vec<ProductFinalized> = (0..2500)
        .map(|i| ProductFinalized {
            qa_status: Some(format!("review-{i}")),
            validation_status: None,
        })
        .collect();
    append_offline(
        &ledger,
        "product-long",
        ExpectedRevision::Exact(0),
        &verdicts,
    );
    let server = TestServer::start_with(&ledger, config).await;
    let r = c
        .post(server.url("/api/products/long/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    let p = get_json(&c, server.url("/api/products/long")).await;
    assert_eq!(p["status"], json!("published"));
    assert_eq!(p["revision"], json!(2502));
    server.stop().await;
}

/// `validate` and `serve` refuse roots that overlap (products inside the stage root would
/// let the publisher move what it did not stage).
#[test]
fn overlapping_roots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let stage = dir.path().join("stage");
    let products = stage.join("products");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--stage-root",
        stage.to_str().unwrap(),
        "--products-root",
        products.to_str().unwrap(),
    ];
    let mut v = vec!["validate", "--json"];
    v.extend_from_slice(&args);
    let out = common::contimg(&v);
    assert_eq!(out.status.code(), Some(1));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let roots = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "roots")
        .expect("a roots finding")
        .clone();
    assert_eq!(roots["level"], json!("error"), "{roots}");
    assert!(
        roots["message"].as_str().unwrap().contains("overlap"),
        "{roots}"
    );
    let mut s = vec!["serve", "--listen", "127.0.0.1:0"];
    s.extend_from_slice(&args);
    let out = common::contimg(&s);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("overlap"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.exists(), "nothing was created");

    // A root inside the ledger's own files.
    let inside_log = data.join("log");
    let out = common::contimg(&[
        "validate",
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
        "--stage-root",
        inside_log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "roots" && f["level"] == "error"),
        "{doc}"
    );
}

/// A folder holding another product's staged file cannot be registered (it would carry
/// that file away when published); nor can a second product at the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_cannot_hold_another_products_files() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("var");
    let config = ServerConfig::under(&ledger);
    let stage = config.publish.stage_root.clone();
    std::fs::create_dir_all(stage.join("batch")).unwrap();
    std::fs::write(stage.join("batch/victim.fits"), b"victim").unwrap();
    let server = TestServer::start_with(&ledger, config).await;
    let c = reqwest::Client::new();
    let reg = |id: &str, path: &str| {
        c.post(server.url("/api/products"))
            .json(&json!({"data_id": id, "data_type": "image", "stage_path": path, "auto_publish": false}))
            .send()
    };
    assert_eq!(
        reg("victim", "batch/victim.fits")
            .await
            .unwrap()
            .status()
            .as_u16(),
        201
    );
    // Every spelling of the same place is the same place.
    for (id, path) in [
        ("grab", "batch"),
        ("grab2", "batch/"),
        ("grab3", "./batch"),
        ("grab4", "batch/."),
        ("grab5", "batch//"),
        ("twin", "batch/victim.fits"),
        ("twin2", "./batch/victim.fits"),
    ] {
        let r = reg(id, path).await.unwrap();
        assert_eq!(r.status().as_u16(), 409, "{id}");
        let v: Value = r.json().await.unwrap();
        assert!(v["detail"].as_str().unwrap().contains("victim"), "{v}");
    }
    assert_eq!(
        std::fs::read(stage.join("batch/victim.fits")).unwrap(),
        b"victim"
    );
    server.stop().await;
}

/// A client that never reads its answers loses its connection after the write timeout,
/// so it cannot hold a slot: with one slot, the next client is served.
#[test]
fn a_client_that_never_reads_cannot_hold_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "[server]\nmax_connections = 1\nwrite_timeout_s = 1.0\n",
    );
    let server = ChildServer::start(
        &dir.path().join("var"),
        &["--mode", "api", "--config", config.to_str().unwrap()],
    );
    let mut hog = connect(&server.base);
    let one = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    // Far more answer than the socket buffers hold, and never a byte read.
    let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4000).collect();
    hog.set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = hog.write_all(&many);
    let mut next = connect(&server.base);
    next.write_all(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_to_close_or_answer(&mut next);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(hog);
    assert!(server.sigterm().success());
}

/// Recovery's `recovered` branch, driven on purpose: a crash after the rename and before
/// `PublishSucceeded` leaves a complete copy where the rule puts the product; recovery
/// records the success and removes the staged copy, which still has the checksum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_records_a_complete_copy_as_published() {
    let (_dir, ledger, mut config, stage) = layout();
    config.auto_publish = false;
    std::fs::write(stage.join("done.fits"), b"complete").unwrap();
    register_then_stop(&ledger, &config, "done", "done.fits").await;
    let c = reqwest::Client::new();
    // The crash's leftovers: the copy in place, its PublishStarted, no outcome.
    let dest = ledger.join("products/images/done.fits");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, b"complete").unwrap();
    append_offline(
        &ledger,
        "product-done",
        ExpectedRevision::Exact(0),
        &[PublishStarted {
            attempt: 1,
            destination: dest.display().to_string(),
            trigger: "manual".into(),
        }],
    );
    let server = TestServer::start_with(&ledger, config).await;
    let history = get_json(&c, server.url("/api/products/done/history")).await;
    let last = history["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["eventType"], json!("PublishSucceeded"), "{last}");
    assert_eq!(last["data"]["recovered"], json!(true), "{last}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"complete");
    assert!(!stage.join("done.fits").exists(), "the staged copy went");
    server.stop().await;
}

/// A stop asked for while start-up recovery reads a large staged file ends the process
/// promptly; the publish it was settling is settled at the next start.
#[test]
fn a_stop_during_start_up_recovery_is_honoured() {
    let (_dir, ledger, _config, stage) = layout();
    // A sparse 64 GiB staged file: reading it for its checksum takes far longer than the
    // test waits, and costs no disk.
    let big = stage.join("huge.fits");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(64 << 30).unwrap();
    drop(f);
    append_offline(
        &ledger,
        "product-huge",
        ExpectedRevision::NoStream,
        &[registered_image("huge", &big)],
    );
    append_offline(
        &ledger,
        "product-huge",
        ExpectedRevision::Exact(0),
        &[PublishStarted {
            attempt: 1,
            destination: "/nowhere".into(),
            trigger: "manual".into(),
        }],
    );
    let mut child = std::process::Command::new(common::bin())
        .args([
            "serve",
            "--mode",
            "api",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&ledger)
        .env("CONTIMG_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until recovery is reading the file (the process holds it open), then stop it.
    let reading = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::read_dir(format!("/proc/{}/fd", child.id()))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == big))
    });
    assert!(reading, "recovery never opened the staged file");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exited = (0..200).find_map(|_| {
        std::thread::sleep(Duration::from_millis(50));
        child.try_wait().unwrap()
    });
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = exited.expect("the process did not stop within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    // Nothing was settled or removed: the next start settles it.
    assert!(big.exists());
}
