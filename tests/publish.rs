//! Publishing, the read model and the monitoring endpoints, against a real server with real
//! files in temporary stage and products roots.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestServer, eventually};
use contimg::api::ServerConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Fixture {
    _dir: tempfile::TempDir,
    server: TestServer,
    stage: PathBuf,
    products: PathBuf,
    c: reqwest::Client,
}

async fn fixture(max_attempts: u32, backoff: f64, token: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::under(dir.path());
    config.publish.max_attempts = max_attempts;
    config.publish.backoff = contimg::config::Backoff::new(vec![Duration::from_secs_f64(backoff)]);
    config.token = token.map(String::from);
    let stage = config.publish.stage_root.clone();
    let products = config.publish.products_root.clone();
    let server = TestServer::start_with(dir.path(), config).await;
    Fixture {
        _dir: dir,
        server,
        stage,
        products,
        c: reqwest::Client::new(),
    }
}

impl Fixture {
    fn stage_file(&self, name: &str, bytes: usize) -> PathBuf {
        let p = self.stage.join(name);
        std::fs::write(
            &p,
            (0..bytes).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>(),
        )
        .unwrap();
        p
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.c.get(self.server.url(path)).send().await.unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut rb = self.c.post(self.server.url(path));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    async fn register(
        &self,
        id: &str,
        file: &str,
        data_type: &str,
        auto: bool,
    ) -> (StatusCode, Value) {
        self.post(
            "/api/products",
            Some(json!({"data_id": id, "data_type": data_type, "stage_path": file,
                        "qa_status": "passed", "validation_status": "validated", "auto_publish": auto})),
        )
        .await
    }

    async fn status(&self) -> Value {
        self.get("/api/monitoring/publish/status").await.1
    }

    async fn wait_status(&self, id: &str, want: &str) -> Value {
        eventually(10.0, || async {
            let (_, p) = self.get(&format!("/api/products/{id}")).await;
            (p["status"] == want).then_some(p)
        })
        .await
        .unwrap_or_else(|| panic!("{id} never reached {want}"))
    }
}

fn checksum(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap())
        .to_hex()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_publish_failure_retry_and_counters() {
    let f = fixture(3, 3600.0, None).await;
    // A validated, QA-passed image publishes by itself.
    let src = f.stage_file("img1.fits", 4096);
    let sum = checksum(&src);
    let (s, body) = f.register("img1", "img1.fits", "image", true).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let p = f.wait_status("img1", "published").await;
    let dest = f.products.join("images/img1.fits");
    assert_eq!(p["published_path"], json!(dest.display().to_string()));
    assert_eq!(checksum(&dest), sum);
    assert!(!src.exists(), "the staged copy is removed");

    // A product whose staged file vanished fails, and shows up everywhere it should.
    f.stage_file("img2.fits", 2048);
    f.register("img2", "img2.fits", "image", false).await;
    std::fs::remove_file(f.stage.join("img2.fits")).unwrap();
    let (s, body) = f.post("/api/products/img2/publish", None).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body["detail"].as_str().unwrap().contains("img2.fits"),
        "{body}"
    );
    let (_, failed) = f.get("/api/monitoring/publish/failed").await;
    assert_eq!(failed["count"], json!(1));
    let row = &failed["failed_publishes"][0];
    assert_eq!(row["data_id"], json!("img2"));
    assert_eq!(row["data_type"], json!("image"));
    assert_eq!(row["publish_attempts"], json!(1));
    assert!(
        row["publish_error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{row}"
    );
    assert!(row["staged_at"].is_f64() && row["created_at"].is_f64());
    let status = f.status().await;
    assert_eq!(status["total_published"], json!(1));
    assert_eq!(status["total_staging"], json!(1));
    assert_eq!(status["total_publishing"], json!(0));
    assert_eq!(status["failed_publishes"], json!(1));
    assert_eq!(status["max_attempts_exceeded"], json!(0));
    assert_eq!(status["success_rate_percent"], json!(50.0));
    assert_eq!(status["recent_failures_24h"], json!(1));
    assert!(status["timestamp"].as_str().unwrap().ends_with('Z'));

    // The file is back: an operator retry publishes it.
    f.stage_file("img2.fits", 2048);
    let (s, body) = f.post("/api/monitoring/publish/retry/img2", None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["retried"], json!(true));
    assert_eq!(body["published"], json!(true));
    assert_eq!(body["status"], json!("published"));
    assert!(
        body["published_path"]
            .as_str()
            .unwrap()
            .ends_with("images/img2.fits")
    );
    let (s, _) = f.post("/api/monitoring/publish/retry/img2", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "already published");
    let status = f.status().await;
    assert_eq!(
        (
            status["failed_publishes"].clone(),
            status["success_rate_percent"].clone()
        ),
        (json!(0), json!(100.0))
    );
    // History kept: the failure is still in the product's timeline, counted by total_attempts.
    let (_, p) = f.get("/api/products/img2").await;
    assert_eq!(p["total_attempts"], json!(2));
    let (_, h) = f.get("/api/products/img2/history").await;
    let types: Vec<&str> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "ProductRegistered",
            "PublishStarted",
            "PublishFailed",
            "RetryRequested",
            "PublishStarted",
            "PublishSucceeded"
        ]
    );
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_retries_stop_at_max_attempts_and_need_an_operator() {
    let f = fixture(2, 0.05, None).await;
    f.stage_file("m.fits", 1000);
    // Registered without auto-publish so we can take the file away first.
    f.register("m1", "m.fits", "mosaic", false).await;
    std::fs::remove_file(f.stage.join("m.fits")).unwrap();
    let (s, _) = f
        .post(
            "/api/products/m1/finalize",
            Some(json!({"qa_status": "passed"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // A manual publish fails; the failure is retryable, so it has a next retry time (but
    // with auto-publish off nobody acts on it).
    let (s, _) = f.post("/api/products/m1/publish", None).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let (_, p) = f.get("/api/products/m1").await;
    assert_eq!(p["publish_attempts"], json!(1));
    assert_eq!(p["auto_publish"], json!(false));
    assert!(
        p["next_retry_at"].is_string(),
        "a retryable failure has a next retry time: {p}"
    );

    // A type without a QA gate publishes once validated.
    f.stage_file("n2.fits", 10);
    let (s, _) = f.register("n2", "n2.fits", "qa", true).await;
    assert_eq!(s, StatusCode::CREATED);
    f.wait_status("n2", "published").await;
    // A product that keeps failing on its own: auto-publish on, file gone before its turn.
    f.stage_file("k.fits", 10);
    let (s, body) = f
        .post("/api/products", Some(json!({"data_id": "k1", "data_type": "qa", "stage_path": "k.fits", "validation_status": "pending"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    std::fs::remove_file(f.stage.join("k.fits")).unwrap();
    let (s, _) = f
        .post(
            "/api/products/k1/finalize",
            Some(json!({"validation_status": "validated"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let p = eventually(10.0, || async {
        let (_, p) = f.get("/api/products/k1").await;
        (p["publish_attempts"] == json!(2)).then_some(p)
    })
    .await
    .expect("two automatic attempts");
    assert_eq!(p["max_attempts_exceeded"], json!(true));
    assert_eq!(p["next_retry_at"], Value::Null);
    let status = f.status().await;
    assert_eq!(status["max_attempts_exceeded"], json!(1));
    let (_, alerts) = f.get("/api/monitoring/alerts").await;
    let names: Vec<&str> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"max_attempts_exceeded"), "{alerts}");
    // No third automatic attempt is ever due: the automatic publisher has nothing to take.
    let due_ever = f.server.state.projections.read(|m| m.due(i64::MAX, 1000));
    assert!(!due_ever.contains(&"k1".to_string()), "{due_ever:?}");
    let (_, p) = f.get("/api/products/k1").await;
    assert_eq!(p["total_attempts"], json!(2));
    // The operator's retry starts the count again (and the file is still gone).
    let (s, _) = f.post("/api/monitoring/publish/retry/k1", None).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let (_, p) = f.get("/api/products/k1").await;
    assert_eq!(
        (p["publish_attempts"].clone(), p["total_attempts"].clone()),
        (json!(1), json!(3))
    );
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_all_respects_limit_and_max_attempts() {
    let f = fixture(3, 3600.0, None).await;
    for i in 0..4 {
        f.stage_file(&format!("f{i}.fits"), 100 + i);
        f.register(&format!("f{i}"), &format!("f{i}.fits"), "image", false)
            .await;
        std::fs::remove_file(f.stage.join(format!("f{i}.fits"))).unwrap();
        let (s, _) = f.post(&format!("/api/products/f{i}/publish"), None).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    }
    // f0 has failed twice.
    let (s, _) = f.post("/api/products/f0/publish", None).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    for i in 0..3 {
        f.stage_file(&format!("f{i}.fits"), 100 + i);
    }
    // Failed list: most attempts first.
    let (_, failed) = f.get("/api/monitoring/publish/failed?limit=10").await;
    assert_eq!(failed["count"], json!(4));
    assert_eq!(failed["failed_publishes"][0]["data_id"], json!("f0"));
    let (_, only_once) = f.get("/api/monitoring/publish/failed?max_attempts=2").await;
    assert_eq!(only_once["count"], json!(3));

    let (s, r) = f
        .post(
            "/api/monitoring/publish/retry-all?limit=2&max_attempts=2",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["total_attempted"], json!(2));
    assert_eq!(r["successful"], json!(2));
    assert_eq!(r["failed"], json!(0));
    let ids: Vec<&str> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["data_id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&"f0"), "f0 has 2 attempts, not fewer than 2");
    // The page as served (rows and page kept between requests) is byte for byte the
    // serialization of the list the model holds now, after the retries changed it.
    let served = |f: &Fixture| {
        let (c, url) = (
            f.c.clone(),
            f.server.url("/api/monitoring/publish/failed?limit=10"),
        );
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let expected = |f: &Fixture| {
        f.server.state.projections.read(|m| {
            let rows: Vec<_> = m
                .failed(None, 10)
                .into_iter()
                .map(contimg::api::monitoring::FailedRow::new)
                .collect();
            serde_json::to_string(&contimg::api::monitoring::FailedList {
                count: rows.len(),
                failed_publishes: rows,
            })
            .unwrap()
        })
    };
    assert_eq!(served(&f).await, expected(&f));
    assert_eq!(served(&f).await, expected(&f), "again, from what was kept");

    let (_, r) = f.post("/api/monitoring/publish/retry-all", None).await;
    assert_eq!(r["total_attempted"], json!(2));
    assert_eq!(r["successful"], json!(1));
    assert_eq!(r["failed"], json!(1));
    let failure = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["success"] == json!(false))
        .unwrap();
    assert_eq!(failure["data_id"], json!("f3"));
    assert!(failure["error"].is_string());
    assert_eq!(served(&f).await, expected(&f), "after the model moved on");
    let status = f.status().await;
    assert_eq!(
        (
            status["total_published"].clone(),
            status["failed_publishes"].clone()
        ),
        (json!(3), json!(1))
    );
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_retries_move_the_file_once() {
    let f = fixture(3, 3600.0, None).await;
    f.stage_file("race.fits", 256 * 1024);
    f.register("race", "race.fits", "image", false).await;
    std::fs::rename(f.stage.join("race.fits"), f.stage.join("away")).unwrap();
    f.post("/api/products/race/publish", None).await;
    std::fs::rename(f.stage.join("away"), f.stage.join("race.fits")).unwrap();
    let moves_before = f.server.state.publisher.moves();
    let url = f.server.url("/api/monitoring/publish/retry/race");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (c, url, barrier) = (f.c.clone(), url.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                c.post(url).send().await.unwrap().status().as_u16()
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 1, "{codes:?}");
    assert!(
        codes.iter().all(|c| [200, 400, 409].contains(c)),
        "{codes:?}"
    );
    assert_eq!(f.server.state.publisher.moves() - moves_before, 1);
    let (_, h) = f.get("/api/products/race/history").await;
    let successes = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["eventType"] == "PublishSucceeded")
        .count();
    assert_eq!(successes, 1);
    let published: Vec<_> = std::fs::read_dir(f.products.join("images"))
        .unwrap()
        .collect();
    assert_eq!(published.len(), 1);
    f.server.stop().await;
}

/// Registrations run side by side, yet of products sharing files only one is taken: for
/// each of twelve folders, the folder and two files inside it are registered at once
/// (under other ids): either the folder alone is accepted or both files without it, the
/// others refused with 409. A later registration of a file inside is still refused, and once the
/// folder is published a new product may use the path again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_registrations_of_shared_files_take_exactly_one() {
    let f = fixture(3, 3600.0, None).await;
    let folders = 12;
    for k in 0..folders {
        std::fs::create_dir_all(f.stage.join(format!("d{k}"))).unwrap();
        f.stage_file(&format!("d{k}/a.fits"), 4096);
        f.stage_file(&format!("d{k}/b.fits"), 4096);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(folders * 3));
    let mut tasks = Vec::new();
    for k in 0..folders {
        for (id, path) in [
            (format!("dir{k}"), format!("d{k}")),
            (format!("a{k}"), format!("d{k}/a.fits")),
            (format!("b{k}"), format!("d{k}/b.fits")),
        ] {
            let (c, url, barrier) = (f.c.clone(), f.server.url("/api/products"), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let r = c
                    .post(url)
                    .json(&json!({"data_id": id, "data_type": "image", "stage_path": path}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                (
                    k,
                    id,
                    status,
                    r.json::<Value>().await.unwrap_or(Value::Null),
                )
            }));
        }
    }
    let mut taken = vec![Vec::new(); folders];
    for t in tasks {
        let (k, id, status, body) = t.await.unwrap();
        match status {
            201 => taken[k].push(id),
            409 => assert!(
                body["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("shares files with product")
                    || body.to_string().contains("shares files with product"),
                "{id}: {body}"
            ),
            other => panic!("{id}: {other} {body}"),
        }
    }
    for (k, ids) in taken.iter().enumerate() {
        // The folder alone, or both its files (which share nothing) without it.
        let mut ids = ids.clone();
        ids.sort();
        assert!(
            ids == vec![format!("dir{k}")] || ids == vec![format!("a{k}"), format!("b{k}")],
            "folder d{k}: accepted {ids:?}"
        );
    }
    // Afterwards, one at a time: still refused while a holder is unpublished.
    // d0/a.fits is held by the folder or by a0, whichever side was taken.
    let holder = if taken[0] == ["dir0"] { "dir0" } else { "a0" };
    let (status, body) = f.register("late", "d0/a.fits", "image", false).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains(holder), "{body}");
    // Published, the holder no longer holds anything.
    let (status, body) = f
        .post(&format!("/api/products/{holder}/publish"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    std::fs::create_dir_all(f.stage.join("d0")).unwrap();
    f.stage_file("d0/a.fits", 4096);
    let (status, body) = f.register("late", "d0/a.fits", "image", false).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_gives_the_live_model_back() {
    let f = fixture(2, 3600.0, None).await;
    for i in 0..6 {
        f.stage_file(&format!("r{i}.ms"), 64);
        f.register(&format!("r{i}"), &format!("r{i}.ms"), "ms", i % 2 == 0)
            .await;
    }
    for i in [1, 3] {
        std::fs::remove_file(f.stage.join(format!("r{i}.ms"))).unwrap();
        f.post(&format!("/api/products/r{i}/publish"), None).await;
    }
    for i in [0, 2, 4] {
        f.wait_status(&format!("r{i}"), "published").await;
    }
    let before_status = f.status().await;
    let (_, before_failed) = f.get("/api/monitoring/publish/failed").await;
    let live = f.server.state.projections.read(|m| m.clone());
    let (replayed, _, _) = contimg::projections::fold_as_of(
        contimg::projections::FoldSource::Store(f.server.store.clone(), 0),
        live.last_position().map_or(
            contimg::projections::AsOf::End,
            contimg::projections::AsOf::Position,
        ),
        f.server.state.projections.max_attempts(),
    )
    .unwrap();
    // The whole model: every product, index, counter and parked event.
    assert_eq!(live, replayed, "replay from 0 equals the live model");
    let (s, r) = f.post("/api/projections/rebuild", None).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let mut after_status = f.status().await;
    let (_, after_failed) = f.get("/api/monitoring/publish/failed").await;
    after_status["timestamp"] = before_status["timestamp"].clone();
    assert_eq!(before_status, after_status);
    assert_eq!(before_failed, after_failed);
    assert_eq!(before_status["total_published"], json!(3));
    assert_eq!(before_status["failed_publishes"], json!(2));
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let f = fixture(3, 3600.0, Some("tok")).await;
    f.stage_file("ok.fits", 10);
    let unauth =
        f.c.post(f.server.url("/api/products"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
    assert_eq!(unauth.status(), StatusCode::UNAUTHORIZED);
    let c = &f.c;
    let post = |path: &str, body: &str| {
        c.post(f.server.url(path))
            .bearer_auth("tok")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let cases: Vec<(&str, String, u16)> = vec![
        ("/api/products", "{not json".into(), 422),
        ("/api/products", json!({"data_id": "x"}).to_string(), 422),
        (
            "/api/products",
            json!({"data_id": "a/b", "data_type": "image", "stage_path": "ok.fits"}).to_string(),
            400,
        ),
        (
            "/api/products",
            json!({"data_id": "x", "data_type": "image", "stage_path": "../ok.fits"}).to_string(),
            400,
        ),
        (
            "/api/products",
            json!({"data_id": "x", "data_type": "image", "stage_path": "/etc/passwd"}).to_string(),
            400,
        ),
        (
            "/api/products",
            json!({"data_id": "x", "data_type": "image", "stage_path": "missing.fits"}).to_string(),
            400,
        ),
        (
            "/api/products",
            json!({"data_id": "x", "data_type": "Bad Type", "stage_path": "ok.fits"}).to_string(),
            400,
        ),
        ("/api/monitoring/publish/retry/nope", String::new(), 404),
        (
            "/api/monitoring/publish/retry/..%2F..%2Fetc",
            String::new(),
            400,
        ),
        ("/api/monitoring/publish/retry/a%00b", String::new(), 400),
        (
            "/api/monitoring/publish/retry-all?limit=-1",
            String::new(),
            400,
        ),
        (
            "/api/monitoring/publish/retry-all?limit=1000000000",
            String::new(),
            400,
        ),
        ("/api/products/nope/publish", String::new(), 404),
    ];
    for (path, body, want) in cases {
        let r = post(path, &body).await.unwrap();
        let code = r.status().as_u16();
        let detail = r.json::<Value>().await.unwrap();
        assert_eq!(code, want, "{path} {body}: {detail}");
        assert!(detail["detail"].is_string(), "{path}: {detail}");
    }
    for path in [
        "/api/monitoring/publish/failed?limit=abc",
        "/api/monitoring/publish/failed?limit=-1",
        "/api/monitoring/publish/failed?limit=99999999999",
        "/api/monitoring/publish/stuck?older_than_hours=soon",
        "/api/products/a%2Fb",
    ] {
        let r = f.c.get(f.server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        assert!(r.json::<Value>().await.unwrap()["detail"].is_string());
    }
    assert_eq!(
        f.get("/api/products/unknown").await.0,
        StatusCode::NOT_FOUND
    );
    // Same registration twice is fine; other content under the same id is a conflict.
    let ok = json!({"data_id": "a..b.fits", "data_type": "image", "stage_path": "ok.fits", "auto_publish": false});
    assert_eq!(
        post("/api/products", &ok.to_string())
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        post("/api/products", &ok.to_string())
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let other = json!({"data_id": "a..b.fits", "data_type": "mosaic", "stage_path": "ok.fits", "auto_publish": false});
    assert_eq!(
        post("/api/products", &other.to_string())
            .await
            .unwrap()
            .status(),
        StatusCode::CONFLICT
    );
    // Still serving.
    assert_eq!(f.status().await["total_staging"], json!(1));
    let metrics =
        f.c.get(f.server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    assert!(metrics.contains("contimg_products_staging 1"));
    assert!(metrics.contains(
        "contimg_http_requests_total{method=\"POST\",route=\"/api/products\",status=\"401\"} 1"
    ));
    let (_, sys) = f.get("/api/metrics/system").await;
    assert_eq!(sys["projection"]["lag_events"], json!(0));
    assert!(sys["disk"]["products"]["free_bytes"].as_u64().unwrap() > 0);
    f.server.stop().await;
}

/// Imports a history whose times lie in the past, then fails a publish now: the 24 h count
/// follows failure times, not staging times (the old system's bug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_failures_are_counted_by_failure_time_not_staging_time() {
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    let now = chrono::Utc::now();
    let t = |hours: i64| contimg::events::record::format_time(now - chrono::Duration::hours(hours));
    let lines = [
        // old: staged 48 h ago, failed 30 h ago
        (
            "product-old",
            0,
            "ProductRegistered",
            json!({"data_id": "old", "data_type": "image", "stage_path": stage.join("old.fits"), "auto_publish": false}),
            t(48),
        ),
        (
            "product-new",
            0,
            "ProductRegistered",
            json!({"data_id": "new", "data_type": "image", "stage_path": stage.join("new.fits"), "auto_publish": false}),
            t(48),
        ),
        (
            "product-old",
            1,
            "PublishStarted",
            json!({"attempt": 1, "destination": "/nowhere", "trigger": "manual"}),
            t(30),
        ),
        (
            "product-old",
            2,
            "PublishFailed",
            json!({"attempt": 1, "error": "disk full", "retryable": false}),
            t(30),
        ),
    ];
    let export: String = lines
        .iter()
        .enumerate()
        .map(|(pos, (stream, rev, kind, data, created))| {
            common::export_line(stream, *rev, pos as u64, kind, data.clone(), created)
        })
        .collect();
    let file = dir.path().join("history.jsonl");
    std::fs::write(&file, export).unwrap();
    let ledger = dir.path().join("ledger");
    let out = common::contimg(&[
        "import",
        "--data-dir",
        ledger.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut config = ServerConfig::under(&ledger);
    config.publish.stage_root = stage.clone();
    let server = TestServer::start_with(&ledger, config).await;
    let c = reqwest::Client::new();
    let status: Value = common::get_json(&c, server.url("/api/monitoring/publish/status")).await;
    assert_eq!(status["failed_publishes"], json!(1));
    assert_eq!(
        status["recent_failures_24h"],
        json!(0),
        "a failure 30 h ago is not recent"
    );
    // "new" was staged 48 h ago and fails now: it counts.
    let r = c
        .post(server.url("/api/products/new/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let status: Value = common::get_json(&c, server.url("/api/monitoring/publish/status")).await;
    assert_eq!(status["recent_failures_24h"], json!(1));
    assert_eq!(status["recent_failures_1h"], json!(1));
    assert_eq!(status["failed_publishes"], json!(2));
    // Both have been in staging for 48 h: the stuck list and its alert see them.
    let stuck: Value = common::get_json(&c, server.url("/api/monitoring/publish/stuck")).await;
    assert_eq!(stuck["stuck_staging"].as_array().unwrap().len(), 2);
    let alerts: Value = common::get_json(&c, server.url("/api/monitoring/alerts")).await;
    assert!(
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "stuck_in_staging")
    );
    server.stop().await;
}

/// A product event whose payload does not decode (it can arrive through an import) is
/// parked and counted; the rest of the model is built as usual. A restart loads the
/// snapshot saved at shutdown and catches up from its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_parked_and_snapshots_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let now = contimg::events::record::format_time(chrono::Utc::now());
    let lines = [
        (
            "product-good",
            0,
            "ProductRegistered",
            json!({"data_id": "good", "data_type": "ms", "stage_path": "/s/good.ms", "auto_publish": false}),
        ),
        (
            "product-good",
            1,
            "PublishFailed",
            json!({"attempt": "first", "error": 7}),
        ),
        (
            "product-good",
            2,
            "PublishStarted",
            json!({"attempt": 1, "destination": "/p/good.ms", "trigger": "manual"}),
        ),
        (
            "product-good",
            3,
            "PublishSucceeded",
            json!({"published_path": "/p/good.ms"}),
        ),
    ];
    let export: String = lines
        .iter()
        .enumerate()
        .map(|(pos, (stream, rev, kind, data))| {
            common::export_line(stream, *rev, pos as u64, kind, data.clone(), &now)
        })
        .collect();
    let file = dir.path().join("poison.jsonl");
    std::fs::write(&file, export).unwrap();
    let ledger = dir.path().join("ledger");
    assert!(
        common::contimg(&[
            "import",
            "--data-dir",
            ledger.to_str().unwrap(),
            file.to_str().unwrap()
        ])
        .status
        .success()
    );
    let server = TestServer::start(&ledger, None).await;
    let c = reqwest::Client::new();
    let sys: Value = common::get_json(&c, server.url("/api/metrics/system")).await;
    assert_eq!(sys["projection"]["parked_events"], json!(1));
    let health: Value = common::get_json(&c, server.url("/api/status")).await;
    assert_eq!(health["projection"]["parked_events"], json!(1));
    assert_eq!(
        health["pipeline"]["parked_events"],
        Value::Null,
        "no pipeline here"
    );
    let metrics = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("contimg_projection_parked_events 1"),
        "{metrics}"
    );
    let status: Value = common::get_json(&c, server.url("/api/monitoring/publish/status")).await;
    assert_eq!(status["total_published"], json!(1));
    assert_eq!(status["ledger_position"], json!(3));
    server.stop().await;
    // The snapshot was saved at shutdown with its checkpoint.
    {
        let store = contimg::events::Store::open(&ledger).unwrap();
        let (checkpoint, bytes) = store
            .load_snapshot("publish-v1")
            .unwrap()
            .expect("a snapshot");
        assert_eq!(checkpoint, Some(3));
        assert!(!bytes.is_empty());
        store.close();
    }
    let server = TestServer::start(&ledger, None).await;
    let again: Value = common::get_json(&c, server.url("/api/monitoring/publish/status")).await;
    assert_eq!(again["total_published"], json!(1));
    assert_eq!(again["ledger_position"], json!(3));
    let sys: Value = common::get_json(&c, server.url("/api/metrics/system")).await;
    assert_eq!(
        sys["projection"]["parked_events"],
        json!(1),
        "parked events are part of the snapshot"
    );
    server.stop().await;
}

/// The server answers "what did the status say at position P (or time T)" by replaying,
/// and the answer is what it showed live at that position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_as_of_a_position_is_what_the_server_showed_then() {
    let f = fixture(3, 3600.0, None).await;
    let mut seen = Vec::new();
    let mut record = |s: Value| seen.push(s);
    for i in 0..4 {
        f.stage_file(&format!("h{i}.fits"), 50);
        f.register(&format!("h{i}"), &format!("h{i}.fits"), "image", false)
            .await;
        record(f.status().await);
    }
    std::fs::remove_file(f.stage.join("h1.fits")).unwrap();
    f.post("/api/products/h1/publish", None).await;
    record(f.status().await);
    f.post("/api/products/h0/publish", None).await;
    record(f.status().await);
    f.stage_file("h1.fits", 50);
    f.post("/api/monitoring/publish/retry/h1", None).await;
    record(f.status().await);
    for live in &seen {
        let p = live["ledger_position"].as_u64().unwrap();
        let (code, mut past) = f
            .get(&format!("/api/monitoring/publish/status?position={p}"))
            .await;
        assert_eq!(code, StatusCode::OK);
        past["timestamp"] = live["timestamp"].clone();
        assert_eq!(&past, live, "status at position {p}");
    }
    // By time: just after the failure of h1, one failed product.
    let (_, h) = f.get("/api/products/h1/history").await;
    let failed_at = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["eventType"] == "PublishFailed")
        .unwrap()["created"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, past) = f
        .get(&format!("/api/monitoring/publish/failed?as_of={failed_at}"))
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(past["count"], json!(1), "as of {failed_at}: {past}");
    assert_eq!(past["failed_publishes"][0]["data_id"], json!("h1"));
    let (_, now) = f.get("/api/monitoring/publish/failed").await;
    assert_eq!(now["count"], json!(0));
    for bad in [
        "position=999999",
        "as_of=yesterday",
        "position=1&as_of=2026-01-01T00:00:00Z",
    ] {
        let (code, body) = f
            .get(&format!("/api/monitoring/publish/status?{bad}"))
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    f.server.stop().await;
}
