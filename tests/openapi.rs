//! The OpenAPI description: the copy in `docs/` is the one the server serves, and every
//! operation it describes is routed (and no route bypasses it).

mod common;

use common::TestServer;
use contimg::api::openapi::spec_json;

const DOCS_COPY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

#[test]
fn the_copy_in_docs_is_the_generated_description() {
    let kept = std::fs::read_to_string(DOCS_COPY).expect("docs/openapi.json");
    assert!(
        kept == spec_json(),
        "docs/openapi.json differs from the description the code generates; \
         refresh it with `cargo run -- openapi > docs/openapi.json`"
    );
}

#[test]
fn the_description_is_openapi_3_1_with_unique_operations() {
    let doc: serde_json::Value = serde_json::from_str(spec_json()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(
                ids.insert(id.to_string()),
                "{method} {path}: operationId {id} twice"
            );
            let codes = op["responses"].as_object().unwrap();
            assert!(
                codes.keys().any(|c| c.starts_with('2')),
                "{method} {path} documents no success"
            );
            for c in ["400", "403", "503"] {
                assert!(codes.contains_key(c), "{method} {path} lacks {c}");
            }
            if method == "post" {
                assert!(codes.contains_key("401"), "{method} {path} lacks 401");
                assert!(op["security"].is_array(), "{method} {path} lacks security");
            }
        }
    }
    assert!(ids.len() >= 19, "only {} operations", ids.len());
}

/// Routes are registered only through `utoipa_axum::routes!`, which describes them too: a
/// plain axum `.route(` in the API's source would serve an undescribed endpoint.
#[test]
fn no_route_bypasses_the_description() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, line) in text.lines().enumerate() {
                assert!(
                    !line.contains(".route(") && !line.contains(".nest("),
                    "{}:{}: a route outside routes!(): {line}",
                    path.display(),
                    i + 1
                );
            }
        }
    }
}

#[tokio::test]
async fn the_server_serves_the_description_and_routes_every_operation() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let client = reqwest::Client::new();

    let served = client
        .get(server.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(
        served.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert!(served.text().await.unwrap() == spec_json());

    // Each described operation reaches a handler: the fallback's "no such endpoint" (and
    // axum's 405) would mean a described route that is not served.
    let doc: serde_json::Value = serde_json::from_str(spec_json()).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{stream}", "openapi-probe")
            .replace("{id}", "no-such-product")
            .replace("{data_id}", "no-such-product");
        for method in item.as_object().unwrap().keys() {
            let req = match method.as_str() {
                "get" => client.get(server.url(&concrete)),
                "post" => client
                    .post(server.url(&concrete))
                    .header("content-type", "application/json")
                    .body("{}"),
                other => panic!("{other} {path}: a method this test does not know"),
            };
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let body = resp.text().await.unwrap();
            assert_ne!(status, 405, "{method} {path} is described but not routed");
            assert!(
                !body.contains("no such endpoint"),
                "{method} {path} is described but not routed: {status} {body}"
            );
            assert!(status.as_u16() < 500, "{method} {path}: {status} {body}");
            checked += 1;
        }
    }
    assert!(checked >= 19);
    server.stop().await;
}
