//! The ledger's HTTP face against a real server on a loopback port.

mod common;

use common::{ChildServer, TestServer, contimg};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

fn event(kind: &str, data: Value) -> Value {
    json!({"eventId": Uuid::new_v4().to_string(), "eventType": kind, "data": data, "metadata": {"actor": "test"}})
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    expected: Option<&str>,
    body: &Value,
) -> (StatusCode, Value, Option<String>) {
    let mut rb = client.post(url).json(body);
    if let Some(e) = expected {
        rb = rb.header("ES-ExpectedVersion", e);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status();
    let current = resp
        .headers()
        .get("ES-CurrentVersion")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, current)
}

#[tokio::test]
async fn append_read_and_conflicts_follow_eventstoredb_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let c = reqwest::Client::new();
    let url = server.url("/api/streams/scratch-1");

    let batch = json!([
        event("Noted", json!({"n": 1})),
        event("Noted", json!({"n": 2}))
    ]);
    let (s, body, _) = post(&c, &url, Some("-1"), &batch).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(body, json!({"nextExpectedVersion": 1, "position": 1}));

    // The same batch again: idempotent, nothing new written.
    let (s, body, _) = post(&c, &url, Some("-1"), &batch).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body, json!({"nextExpectedVersion": 1, "position": 1}));

    // A stale exact revision: 409 with the current one, nothing written.
    let (s, body, current) = post(&c, &url, Some("0"), &json!([event("Noted", json!({}))])).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(current.as_deref(), Some("1"));
    assert_eq!(body["expected"], json!(0));
    assert_eq!(body["current"], json!(1));
    assert!(body["detail"].as_str().unwrap().contains("scratch-1"));

    let (s, _, _) = post(
        &c,
        &url,
        Some("-4"),
        &json!([event("Noted", json!({"n": 3}))]),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, current) = post(
        &c,
        &server.url("/api/streams/scratch-2"),
        Some("-4"),
        &json!([event("Noted", json!({}))]),
    )
    .await;
    assert_eq!((s, current.as_deref()), (StatusCode::CONFLICT, Some("-1")));
    // Absent header means any.
    let (s, body, _) = post(&c, &url, None, &json!([event("Noted", json!({"n": 4}))])).await;
    assert_eq!(
        (s, body["nextExpectedVersion"].clone()),
        (StatusCode::CREATED, json!(3))
    );

    // Stream reads, both directions.
    let r: Value = c
        .get(format!("{url}?from=1&limit=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = r["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["eventNumber"], json!(1));
    assert_eq!(events[0]["data"], json!({"n": 2}));
    assert_eq!(events[0]["metadata"], json!({"actor": "test"}));
    for field in [
        "eventId",
        "eventType",
        "eventVersion",
        "streamId",
        "eventNumber",
        "position",
        "created",
        "data",
        "metadata",
    ] {
        assert!(events[0].get(field).is_some(), "missing {field}");
    }
    assert!(events[0]["created"].as_str().unwrap().ends_with('Z'));
    let r: Value = c
        .get(format!("{url}?direction=backward&limit=10"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let numbers: Vec<_> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventNumber"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![3, 2, 1, 0]);

    let resp = c
        .get(server.url("/api/streams/scratch-none"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.json::<Value>().await.unwrap()["detail"].is_string());

    // $all pages with `next`.
    let r: Value = c
        .get(server.url("/api/events?from=0&limit=3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["events"].as_array().unwrap().len(), 3);
    assert_eq!(r["next"], json!(3));
    let r: Value = c
        .get(server.url("/api/events?from=3&limit=3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["events"].as_array().unwrap().len(), 1);
    assert_eq!(r["next"], Value::Null);
    let r: Value = c
        .get(server.url("/api/events?direction=backward&limit=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let positions: Vec<_> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!((positions, r["next"].clone()), (vec![3, 2], json!(1)));

    let status: Value = c
        .get(server.url("/api/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["ledger"], json!({"events": 4, "position": 3}));
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_detail_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let c = reqwest::Client::new();
    let long_name = "x".repeat(201);
    let ok_publish = json!({"attempt": 1, "destination": "/p/x.fits", "trigger": "auto"});
    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("scratch-1", None, "{not json".into(), 400),
        ("scratch-1", None, "{}".into(), 400),
        ("scratch-1", None, "[]".into(), 400),
        (
            "scratch-1",
            None,
            json!([{"eventId": "not-a-uuid", "eventType": "X", "data": {}}]).to_string(),
            400,
        ),
        (
            "scratch-1",
            None,
            json!([{"eventType": "X", "data": {}}]).to_string(),
            400,
        ),
        (
            "scratch-1",
            Some("abc"),
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            "scratch-1",
            Some("-3"),
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            "%24all",
            None,
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            "a%2Fb",
            None,
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            "a%0Ab",
            None,
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            &long_name,
            None,
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            "group-g1",
            None,
            json!([event("Nonsense", json!({}))]).to_string(),
            422,
        ),
        (
            "group-g1",
            None,
            json!([event("StageStarted", json!({"stage": 7}))]).to_string(),
            422,
        ),
        // One bad event spoils the batch.
        (
            "group-g1",
            None,
            json!([
                event("StageStarted", json!({"stage": "convert", "attempt": 1})),
                event("StageStarted", json!({}))
            ])
            .to_string(),
            422,
        ),
        // The publish lifecycle takes no raw appends, well-formed or not (403).
        (
            "product-p1",
            None,
            json!([event("Nonsense", json!({}))]).to_string(),
            403,
        ),
        (
            "product-p1",
            None,
            json!([event("PublishStarted", ok_publish.clone())]).to_string(),
            403,
        ),
        (
            "scratch-1",
            None,
            json!([event("PublishSucceeded", json!({}))]).to_string(),
            403,
        ),
        // Event types and stream names people could misread.
        (
            "scratch-1",
            None,
            json!([event("No\u{7}ted", json!({}))]).to_string(),
            400,
        ),
        (
            "scratch-1",
            None,
            json!([event(" Noted", json!({}))]).to_string(),
            400,
        ),
        (
            "scratch-%E2%80%AE1",
            None,
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            "scratch-%E2%80%8B1",
            None,
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        (
            "%20scratch-1",
            None,
            json!([event("X", json!({}))]).to_string(),
            400,
        ),
        // JSON nested deeper than 128 levels in data or metadata.
        (
            "scratch-1",
            None,
            format!(
                r#"[{{"eventId":"{}","eventType":"X","data":{}1{},"metadata":{{}}}}]"#,
                uuid::Uuid::new_v4(),
                "[".repeat(129),
                "]".repeat(129)
            ),
            400,
        ),
        (
            "scratch-1",
            None,
            format!(
                r#"[{{"eventId":"{}","eventType":"X","data":{{}},"metadata":{{"a":{}1{}}}}}]"#,
                uuid::Uuid::new_v4(),
                "[".repeat(200),
                "]".repeat(200)
            ),
            400,
        ),
    ];
    for (stream, expected, body, want) in cases {
        let mut rb = c
            .post(server.url(&format!("/api/streams/{stream}")))
            .header("Content-Type", "application/json")
            .body(body.clone());
        if let Some(e) = expected {
            rb = rb.header("ES-ExpectedVersion", e);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let detail = resp.json::<Value>().await.unwrap();
        assert_eq!(status, want, "{stream} {body}: {detail}");
        assert!(detail["detail"].is_string(), "{detail}");
    }
    for query in [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=99999999",
        "from=-5",
        "direction=sideways",
    ] {
        let resp = c
            .get(server.url(&format!("/api/events?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{query}");
        assert!(resp.json::<Value>().await.unwrap()["detail"].is_string());
    }
    let huge = format!(
        "[{}]",
        vec![event("X", json!({"pad": "y".repeat(1000)})).to_string(); 5000].join(",")
    );
    let resp = c
        .post(server.url("/api/streams/scratch-1"))
        .header("Content-Type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        resp.json::<Value>().await.unwrap()["detail"].is_string(),
        "413 has a JSON detail"
    );
    let resp = c.delete(server.url("/api/events")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        resp.json::<Value>().await.unwrap()["detail"].is_string(),
        "405 has a JSON detail"
    );

    assert_eq!(server.store.event_count(), 0);
    // And the server still serves.
    let (s, _, _) = post(
        &c,
        &server.url("/api/streams/group-g1"),
        Some("-1"),
        &json!([event(
            "StageStarted",
            json!({"stage": "convert", "attempt": 1})
        )]),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test]
async fn mutating_requests_need_the_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Some("s3cret")).await;
    let c = reqwest::Client::new();
    let body = json!([event("Noted", json!({}))]);
    let resp = c
        .post(server.url("/api/streams/scratch-t"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = c
        .post(server.url("/api/streams/scratch-t"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = c
        .post(server.url("/api/streams/scratch-t"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // Reads stay open.
    assert!(
        c.get(server.url("/api/events"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    server.stop().await;
}

/// Export from the running server and from the stopped folder, import into a new folder,
/// and get the same log: ids, revisions, positions and times.
#[test]
fn export_import_round_trip_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = ChildServer::start(&ledger, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        for i in 0..30 {
            let stream = format!("scratch-{}", i % 4);
            let (s, _, _) = post(
                &c,
                &server.url(&format!("/api/streams/{stream}")),
                None,
                &json!([event("Noted", json!({"i": i, "text": "a \"quoted\" ✓"}))]),
            )
            .await;
            assert_eq!(s, StatusCode::CREATED);
        }
    });
    let live = dir.path().join("live.jsonl");
    let out = contimg(&[
        "export",
        "--url",
        &server.base,
        "--out",
        live.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // While the server owns the folder, local tools are refused at once.
    let out = contimg(&["verify", "--data-dir", ledger.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(ledger.to_str().unwrap()) && err.contains("pid"),
        "{err}"
    );

    assert!(server.sigterm().success());
    let stopped = dir.path().join("stopped.jsonl");
    let out = contimg(&[
        "export",
        "--data-dir",
        ledger.to_str().unwrap(),
        "--out",
        stopped.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let live_text = std::fs::read_to_string(&live).unwrap();
    assert_eq!(live_text, std::fs::read_to_string(&stopped).unwrap());
    assert_eq!(live_text.lines().count(), 30);

    let copy = dir.path().join("copy");
    let out = contimg(&[
        "import",
        "--data-dir",
        copy.to_str().unwrap(),
        live.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = dir.path().join("again.jsonl");
    assert!(
        contimg(&[
            "export",
            "--data-dir",
            copy.to_str().unwrap(),
            "--out",
            again.to_str().unwrap()
        ])
        .status
        .success()
    );
    assert_eq!(live_text, std::fs::read_to_string(&again).unwrap());
    let out = contimg(&["verify", "--data-dir", copy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Importing into a ledger that holds events is refused.
    let out = contimg(&[
        "import",
        "--data-dir",
        copy.to_str().unwrap(),
        live.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    // A file with a gap in positions is refused before anything is written.
    let gappy: String = live_text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let gappy_path = dir.path().join("gappy.jsonl");
    std::fs::write(&gappy_path, gappy).unwrap();
    let fresh = dir.path().join("fresh");
    let out = contimg(&[
        "import",
        "--data-dir",
        fresh.to_str().unwrap(),
        gappy_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 6"));
    // Nothing of it was written: the ledger is empty, if it exists at all.
    if fresh.exists() {
        let store = contimg::events::Store::open(&fresh).unwrap();
        assert_eq!(store.event_count(), 0);
        store.close();
    }
}
