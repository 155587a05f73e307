//! The dashboard at `GET /` in headless Chromium driven by ChromeDriver (Debian's packages,
//! installed by `.ci/run`) against a real server holding a failed publish: the figures
//! appear, the console stays silent, a real click on Retry publishes the product and the
//! page shows it. A screenshot is kept in `target/test-artifacts/dashboard.png`. The page
//! reads nothing from its address, so a link can open it but never press its buttons.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::webdriver::{Browser, require_webdriver};
use common::{TestServer, get_json};
use contimg::api::ServerConfig;
use reqwest::StatusCode;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

/// The text of the element carrying `attr="value"` (a `<dd data-figure=…>` here).
fn figure(dom: &str, name: &str) -> String {
    let tag = format!("data-figure=\"{name}\">");
    let start = dom
        .find(&tag)
        .unwrap_or_else(|| panic!("{name} not in page"))
        + tag.len();
    dom[start..].split('<').next().unwrap().to_string()
}

fn artifacts() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A server on a ledger under `dir`, and its (created) stage root.
async fn server_with_stage(dir: &Path) -> (TestServer, PathBuf) {
    let ledger = dir.join("var");
    let config = ServerConfig::under(&ledger);
    let stage = config.publish.stage_root.clone();
    std::fs::create_dir_all(&stage).unwrap();
    (TestServer::start_with(&ledger, config).await, stage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium and chromium-driver; .ci/run runs it"]
async fn dashboard_shows_a_failed_publish_and_its_retry_publishes_it() {
    require_webdriver();
    // Given a server with one published product and one whose staged file vanished.
    let dir = tempfile::tempdir().unwrap();
    let (server, stage) = server_with_stage(dir.path()).await;
    let c = reqwest::Client::new();
    let register = |id: &'static str| {
        let c = c.clone();
        let url = server.url("/api/products");
        async move {
            let r = c
                .post(url)
                .json(&json!({"data_id": id, "data_type": "image", "stage_path": format!("{id}.fits"),
                              "qa_status": "passed", "validation_status": "validated", "auto_publish": false}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
    };
    std::fs::write(stage.join("good_1.fits"), vec![7u8; 2048]).unwrap();
    register("good_1").await;
    let r = c
        .post(server.url("/api/products/good_1/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bad = "img_2026-11-30T10:00:00";
    std::fs::write(stage.join(format!("{bad}.fits")), vec![9u8; 2048]).unwrap();
    register(bad).await;
    std::fs::remove_file(stage.join(format!("{bad}.fits"))).unwrap();
    let r = c
        .post(server.url(&format!("/api/products/{bad}/publish")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let status = get_json(&c, server.url("/api/monitoring/publish/status")).await;
    assert_eq!(status["failed_publishes"], json!(1));

    // When the page loads: the server's figures, the failed row, a silent console.
    let browser = Browser::start((1200, 900)).await;
    browser.goto(&server.url("/")).await;
    assert!(
        browser.wait_for("[data-refreshes=\"1\"]", WAIT).await,
        "the page loaded its data:\n{}",
        browser.source().await
    );
    let dom = browser.source().await;
    assert_eq!(figure(&dom, "total_published"), "1");
    assert_eq!(figure(&dom, "failed_publishes"), "1");
    assert_eq!(figure(&dom, "success_rate_percent"), "50");
    assert!(dom.contains(&format!("data-retry=\"{bad}\"")), "{dom}");
    assert!(
        dom.contains("low_success_rate"),
        "the alert is shown:\n{dom}"
    );

    // The screenshot, for people: the failed row and its Retry button.
    let shot = artifacts().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    browser.screenshot(&shot).await;
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot with content"
    );

    // When the file is back and an operator clicks Retry.
    std::fs::write(stage.join(format!("{bad}.fits")), vec![9u8; 2048]).unwrap();
    browser
        .click(&format!("button[data-retry=\"{bad}\"]"))
        .await;

    // Then the product is published, and the page says so after its refresh.
    assert!(
        browser
            .wait_for(&format!("[data-last-retry=\"{bad}:published\"]"), WAIT)
            .await,
        "{}",
        browser.source().await
    );
    assert!(
        browser.wait_for("[data-refreshes=\"2\"]", WAIT).await,
        "{}",
        browser.source().await
    );
    let dom = browser.source().await;
    assert_eq!(figure(&dom, "total_published"), "2");
    assert_eq!(figure(&dom, "failed_publishes"), "0");
    assert!(!dom.contains("data-retry="), "no failed row left:\n{dom}");
    assert_eq!(browser.console().await, Vec::<String>::new());
    let p = get_json(&c, server.url(&format!("/api/products/{bad}"))).await;
    assert_eq!(p["status"], json!("published"));
    server.stop().await;
}

/// Markup in the data appears as text, never as elements; a click on a product opens its
/// timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium and chromium-driver; .ci/run runs it"]
async fn dashboard_escapes_data_and_shows_a_timeline() {
    require_webdriver();
    let dir = tempfile::tempdir().unwrap();
    let (server, stage) = server_with_stage(dir.path()).await;
    let c = reqwest::Client::new();
    // Ids are restricted; stage paths, and so failure messages, may hold markup.
    let evil = "<img src=x onerror=alert(1)>.fits";
    std::fs::write(stage.join(evil), b"x").unwrap();
    let r = c
        .post(server.url("/api/products"))
        .json(&json!({"data_id": "x1", "data_type": "image", "stage_path": evil, "auto_publish": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    std::fs::remove_file(stage.join(evil)).unwrap();
    let r = c
        .post(server.url("/api/products/x1/publish"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);

    let browser = Browser::start((1200, 900)).await;
    browser.goto(&server.url("/")).await;
    assert!(browser.wait_for("[data-failed=\"x1\"]", WAIT).await);
    browser.click("button[data-product=\"x1\"]").await;
    assert!(browser.wait_for("[data-timeline=\"x1\"]", WAIT).await);
    let dom = browser.source().await;
    assert_eq!(browser.console().await, Vec::<String>::new());
    assert!(
        !dom.contains("<img"),
        "markup from the data became an element:\n{dom}"
    );
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    // The timeline: the product's events in order.
    let timeline = &dom[dom.find("data-timeline=\"x1\"").expect("timeline shown")..];
    let (a, b, f) = (
        timeline.find(">ProductRegistered<").expect("registered"),
        timeline.find(">PublishStarted<").expect("started"),
        timeline.find(">PublishFailed<").expect("failed"),
    );
    assert!(a < b && b < f, "{timeline}");
    server.stop().await;
}

/// With a token on the server and none in the tab, a Retry is refused with 401: the page
/// opens its token form, says why, and nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium and chromium-driver; .ci/run runs it"]
async fn a_retry_without_the_token_is_refused_and_shown() {
    require_webdriver();
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("var");
    let mut config = ServerConfig::under(&ledger);
    config.token = Some("secret".into());
    let stage = config.publish.stage_root.clone();
    std::fs::create_dir_all(&stage).unwrap();
    let server = TestServer::start_with(&ledger, config).await;
    let c = reqwest::Client::new();
    std::fs::write(stage.join("t1.fits"), b"x").unwrap();
    let r = c
        .post(server.url("/api/products"))
        .bearer_auth("secret")
        .json(&json!({"data_id": "t1", "data_type": "image", "stage_path": "t1.fits", "auto_publish": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    std::fs::remove_file(stage.join("t1.fits")).unwrap();
    let r = c
        .post(server.url("/api/products/t1/publish"))
        .bearer_auth("secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    std::fs::write(stage.join("t1.fits"), b"x").unwrap();

    let browser = Browser::start((1200, 900)).await;
    browser.goto(&server.url("/")).await;
    browser.click("button[data-retry=\"t1\"]").await;
    assert!(
        browser
            .wait_for("[data-last-retry=\"t1:failed\"]", WAIT)
            .await
    );
    let dom = browser.source().await;
    // The refused POST is logged by the browser as a failed load; nothing else may be.
    let console: Vec<String> = browser
        .console()
        .await
        .into_iter()
        .filter(|l| !l.contains("401"))
        .collect();
    assert_eq!(console, Vec::<String>::new());
    assert!(dom.contains("HTTP 401"), "{dom}");
    assert!(
        dom.contains("data-needs-token=\"1\""),
        "the token form is open:\n{dom}"
    );
    assert!(dom.contains("This server needs a bearer token."), "{dom}");
    assert_eq!(figure(&dom, "failed_publishes"), "1");
    let p = get_json(&c, server.url("/api/products/t1")).await;
    assert_eq!(p["status"], json!("staging"));
    server.stop().await;
}

/// The page is served by every server, needs no other origin, and says so in its policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_self_contained() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Some("secret")).await;
    // GET needs no token, even when the server has one.
    let r = reqwest::get(server.url("/")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let headers = r.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let page = r.text().await.unwrap();
    assert!(page.starts_with("<!doctype html>"));
    for external in ["http://", "https://", "//cdn", "src=\""] {
        assert!(!page.contains(external), "the page refers to {external}");
    }
    assert!(!page.contains(".innerHTML"), "data goes in as text only");
    server.stop().await;
}

/// The pipeline beside the publisher: observations collecting subbands, groups by stage
/// with the running one, the last stage failure, the mosaic windows decided and the files
/// refused, each group and mosaic opening its timeline. Screenshots at a desktop and a
/// laptop width; at neither does the page need a horizontal scroll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium and chromium-driver; .ci/run runs it"]
async fn dashboard_shows_the_pipeline_and_opens_a_groups_timeline() {
    use contimg::events::ExpectedRevision::{Any, NoStream};
    use contimg::events::catalogue::*;
    require_webdriver();
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("var");
    // A history written as the worker writes it, before the server starts.
    common::append_offline(
        &ledger,
        "ingest-2026-11-30",
        NoStream,
        &[SubbandFileAccepted {
            path: "/in/2026-11-30T10:05:00_sb00.hdf5".into(),
            obs_time: "2026-11-30T10:05:00".into(),
            subband: 0,
            size_bytes: 1000,
            group_obs_time: Some("2026-11-30T10:05:00".into()),
            header: None,
        }],
    );
    common::append_offline(
        &ledger,
        "ingest-2026-11-30",
        Any,
        &[SubbandFileRejected {
            path: "/in/2026-11-30T10:00:00_sb07.hdf5".into(),
            reason: "no HDF5 signature (first bytes [00]): corrupt or not HDF5".into(),
        }],
    );
    for (group, failed) in [
        ("2026-11-30T09:55:00", true),
        ("2026-11-30T10:00:00", false),
    ] {
        let stream = format!("group-{group}");
        common::append_offline(
            &ledger,
            &stream,
            NoStream,
            &[GroupFormed {
                group_id: group.into(),
                obs_time: group.into(),
                files: vec![],
                dec_deg: Some(71.6),
            }],
        );
        common::append_offline(
            &ledger,
            &stream,
            Any,
            &[StageStarted {
                stage: "convert".into(),
                attempt: 1,
                command: None,
                worker: Some("host:1:a".into()),
            }],
        );
        // The first group's convert failed (a retry pending); the second's runs.
        if failed {
            common::append_offline(
                &ledger,
                &stream,
                Any,
                &[StageFailed {
                    stage: "convert".into(),
                    attempt: 1,
                    duration_s: 2.0,
                    exit_status: Some(1),
                    timed_out: false,
                    stderr_tail: "Traceback: bad visibilities".into(),
                    error: "convert exited 1: Traceback: bad visibilities".into(),
                    next_retry_at: Some("2026-11-30T10:10:00Z".into()),
                }],
            );
        }
    }
    common::append_offline(
        &ledger,
        "mosaic-m1",
        NoStream,
        &[MosaicGroupRejected {
            mosaic_id: "m1".into(),
            safeguard: "time_span".into(),
            member: Some("2026-11-30T09:55:00".into()),
            reason: "a gap of 11 minutes".into(),
            members: vec!["2026-11-30T09:55:00".into(), "2026-11-30T10:00:00".into()],
        }],
    );
    let config = ServerConfig::under(&ledger);
    let server = TestServer::start_with(&ledger, config).await;
    // The pipeline view follows the log behind the server's readiness: wait until it has
    // folded the last of the eight events (position 7).
    let c = reqwest::Client::new();
    let view = common::eventually(15.0, || async {
        let v = get_json(&c, server.url("/api/pipeline")).await;
        (v["position"] == 7).then_some(v)
    })
    .await
    .expect("the pipeline view never reached position 7");
    assert_eq!(view["groups"], 2);
    assert_eq!(view["collecting"][0]["subbands"], 1);
    assert_eq!(
        view["stages"][0]["running"][0]["group"],
        "2026-11-30T10:00:00"
    );
    assert_eq!(view["recent_failures"][0]["stage"], "convert");
    assert_eq!(view["mosaics"][0]["refused_by"], "time_span");
    assert_eq!(view["mosaics"][0]["member_at_fault"], "2026-11-30T09:55:00");
    assert_eq!(
        view["recent_failures"][0]["stderr_tail"],
        "Traceback: bad visibilities"
    );
    assert_eq!(view["refused_files"].as_array().unwrap().len(), 1);
    // The last 24 hours: only the current one holds a stage run (convert, 2 s); no hour
    // holds a publish, and empty hours are zeros and nulls, not invented values.
    let hourly = view["hourly"].as_array().unwrap();
    assert_eq!(hourly.len(), 24);
    assert_eq!(hourly[23]["stage_mean_s"]["convert"], json!(2.0));
    assert!(
        hourly[..23]
            .iter()
            .all(|h| h["stage_mean_s"]["convert"].is_null())
    );
    assert!(
        hourly
            .iter()
            .all(|h| h["published"] == 0 && h["failed"] == 0)
    );

    let browser = Browser::start((1280, 900)).await;
    browser.goto(&server.url("/")).await;
    assert!(browser.wait_for("[data-stage=\"convert\"]", WAIT).await);
    let dom = browser.source().await;
    for text in [
        "1 of 16",
        "refused: time_span (member 2026-11-30T09:55:00): a gap of 11 minutes",
        "--- stderr ---",
        "Traceback: bad visibilities",
        "no HDF5 signature",
        "2 groups: 0 imaged",
    ] {
        assert!(dom.contains(text), "{text} not on the page");
    }
    assert_eq!(browser.console().await, Vec::<String>::new());
    // The charts: no bar where no publish happened; one point for the one stage run.
    assert!(browser.wait_for("svg#hourly-stages", WAIT).await);
    let counts = browser
        .execute(
            "return [document.querySelectorAll('#hourly-publishes rect[data-hour]').length, \
                     document.querySelectorAll('#hourly-stages circle').length, \
                     (document.querySelector('#hourly-publishes text.empty') || {}).textContent || '', \
                     document.querySelectorAll('#hourly-stages text.empty').length];",
            &[],
        )
        .await;
    assert_eq!(counts, json!([0, 1, "nothing in the last 24 hours", 0]));
    let shots = artifacts();
    for (name, (w, h)) in [("desktop", (1440, 1400)), ("laptop", (1024, 1400))] {
        browser.set_window(w, h).await;
        let overflow = browser
            .execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
                &[],
            )
            .await;
        assert!(
            overflow.as_i64().unwrap_or(1) <= 0,
            "at {w} px the page scrolls sideways by {overflow}"
        );
        browser
            .screenshot(shots.join(format!("dashboard-pipeline-{name}.png")))
            .await;
    }
    // A group opens its timeline.
    browser
        .click("button[data-stream=\"group-2026-11-30T09:55:00\"]")
        .await;
    assert!(
        browser
            .wait_for("[data-timeline=\"group-2026-11-30T09:55:00\"]", WAIT)
            .await
    );
    let dom = browser.source().await;
    let timeline = &dom[dom
        .find("data-timeline=\"group-2026-11-30T09:55:00\"")
        .unwrap()..];
    assert!(timeline.contains(">GroupFormed<") && timeline.contains(">StageFailed<"));
    server.stop().await;
}
