//! `/metrics` in the Prometheus ecosystem: `promtool check metrics` passes on what a live
//! server exports; the alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`); and every metric the rules and the Grafana board query is one
//! the server exports.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use common::TestServer;
use serde_json::{Value, json};

const PROMTOOL: &str = "/usr/bin/promtool";
const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tools/prometheus/contimg.rules.yml"
);
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tools/prometheus/contimg.rules.test.yml"
);
const BOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/grafana/contimg.json");

/// A server with some history: a product registered, published, and some requests.
async fn exposition(accept: Option<&str>) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    std::fs::create_dir_all(dir.path().join("stage")).unwrap();
    std::fs::write(dir.path().join("stage/a.fits"), b"SIMPLE").unwrap();
    let c = reqwest::Client::new();
    let r = c
        .post(server.url("/api/products"))
        .json(&json!({"data_id": "a", "data_type": "image", "stage_path": "a.fits", "auto_publish": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .post(server.url("/api/products/a/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // The activity counters follow the log.
    let counted = common::eventually(10.0, || {
        let c = c.clone();
        let u = server.url("/metrics");
        async move {
            let t = c.get(u).send().await.ok()?.text().await.ok()?;
            t.contains("contimg_publishes_succeeded_total 1")
                .then_some(())
        }
    })
    .await;
    assert!(counted.is_some(), "the counters never counted the publish");
    let mut req = c.get(server.url("/metrics"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    let text = resp.text().await.unwrap();
    server.stop().await;
    (ct, text)
}

/// Metric names an expression refers to (`contimg_...` tokens).
fn names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("contimg_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every series name a Prometheus text exposition can answer to.
fn exported(text: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            set.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    set.insert(format!("{name}{s}"));
                }
            }
        }
    }
    set
}

#[tokio::test]
async fn the_rules_and_the_board_query_only_metrics_the_server_exports() {
    let (ct, text) = exposition(None).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let have = exported(&text);
    for wanted in [
        "contimg_events_appended_total",
        "contimg_subband_files_accepted_total",
        "contimg_subband_files_refused_total",
        "contimg_groups_formed_total",
        "contimg_groups_timed_out_total",
        "contimg_stage_runs_total",
        "contimg_stage_failures_total",
        "contimg_stage_duration_seconds",
        "contimg_mosaics_created_total",
        "contimg_mosaics_refused_total",
        "contimg_publishes_attempted_total",
        "contimg_publishes_succeeded_total",
        "contimg_publishes_failed_total",
        "contimg_append_duration_seconds",
        "contimg_sync_duration_seconds",
        "contimg_projection_lag_events",
    ] {
        assert!(have.contains(wanted), "{wanted} is not exported");
    }
    assert!(
        text.contains("contimg_publishes_attempted_total 1"),
        "{text}"
    );
    assert!(
        text.contains("contimg_events_appended_total{category=\"product\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("contimg_append_duration_seconds_count "),
        "{text}"
    );

    let rules = std::fs::read_to_string(RULES).unwrap();
    let exprs: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
        .collect();
    assert!(exprs.len() >= 7, "{} alert expressions", exprs.len());
    let board: Value = serde_json::from_str(&std::fs::read_to_string(BOARD).unwrap()).unwrap();
    let mut board_exprs = Vec::new();
    for p in board["panels"].as_array().unwrap() {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            board_exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    let mut checked = 0;
    for e in exprs
        .iter()
        .copied()
        .chain(board_exprs.iter().map(String::as_str))
    {
        let ns = names(e);
        assert!(!ns.is_empty(), "{e:?} queries no contimg metric");
        for n in ns {
            assert!(
                have.contains(&n),
                "{e:?} queries {n}, which /metrics does not export"
            );
            checked += 1;
        }
    }
    assert!(checked > 25);
}

#[tokio::test]
async fn openmetrics_is_served_to_who_asks_for_it() {
    let (ct, text) = exposition(Some("application/openmetrics-text; version=1.0.0")).await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(text.ends_with("# EOF\n"));
    assert!(text.contains("# TYPE contimg_publishes_succeeded counter"));
}

#[tokio::test]
#[ignore = "needs promtool (apt-get install prometheus); run with --ignored"]
async fn promtool_checks_the_metrics_and_the_rules() {
    let promtool = common::require_tool(&[PROMTOOL], "apt-get install prometheus");
    let (_, text) = exposition(None).await;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let out = Command::new(&promtool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
