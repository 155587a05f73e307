//! The ledger on PostgreSQL, end to end with real processes: a throwaway cluster of the
//! test's own, `contimg serve --ledger postgres://...` children, SIGKILL, and the database
//! itself stopped with `pg_ctl stop -m immediate`. Not run without the PostgreSQL binaries
//! (ignored, with the reason); `.ci/run` runs them.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::PgCluster;
use common::{ChildServer, contimg, eventually, get_json};
use serde_json::{Value, json};

const NEEDS: &str = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored";

/// A server on the shared ledger, with the shared stage and products roots.
fn server(root: &Path, name: &str, url: &str, extra: &[&str]) -> ChildServer {
    let (stage, products) = (root.join("stage"), root.join("products"));
    let mut args = vec![
        "--mode",
        "api",
        "--ledger",
        url,
        "--stage-root",
        stage.to_str().unwrap(),
        "--products-root",
        products.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ChildServer::start(&root.join(name), &args)
}

fn event(i: usize) -> Value {
    json!([{"eventId": uuid::Uuid::new_v4().to_string(), "eventType": "Noted", "data": {"i": i}}])
}

/// 16 appenders, round-robin over `bases`, until `stop`; every acknowledged event id, and
/// the statuses of the refusals.
async fn appenders(
    bases: Vec<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<String>, HashMap<u16, usize>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(HashMap::new()));
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let (bases, stop, acked, refused) =
                (bases.clone(), stop.clone(), acked.clone(), refused.clone());
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = event(i);
                    let id = body[0]["eventId"].as_str().unwrap().to_string();
                    let base = &bases[(w + i) % bases.len()];
                    i += 1;
                    match c
                        .post(format!("{base}/api/streams/load-{w}"))
                        .json(&body)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 201 => acked.lock().unwrap().push(id),
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            assert!(
                                v["detail"].is_string(),
                                "a refusal without a JSON detail: {status} {v}"
                            );
                            *refused.lock().unwrap().entry(status).or_insert(0) += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        // A server being killed: the append was not acknowledged.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let a = acked.lock().unwrap().clone();
    let r = refused.lock().unwrap().clone();
    (a, r)
}

/// Every event id in the log, read over HTTP page by page.
async fn all_ids(c: &reqwest::Client, base: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut from = 0u64;
    loop {
        let page = get_json(c, format!("{base}/api/events?from={from}&limit=10000")).await;
        for e in page["events"].as_array().unwrap() {
            ids.insert(e["eventId"].as_str().unwrap().to_string());
        }
        match page["next"].as_u64() {
            Some(n) => from = n,
            None => return ids,
        }
    }
}

/// Runs `contimg` and requires success, showing its stderr otherwise.
fn contimg_ok(args: &[&str]) -> std::process::Output {
    let out = contimg(args);
    assert!(
        out.status.success(),
        "contimg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn verify(url: &str) {
    let out = contimg(&["verify", "--ledger", url]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));
}

async fn status(c: &reqwest::Client, base: &str) -> Value {
    get_json(c, format!("{base}/api/status")).await
}

/// The publish figures without the clock's own (timestamp, ages).
fn figures(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("timestamp");
    v.as_object_mut().unwrap().remove("oldest_staging_hours");
    v
}

#[test]
#[ignore = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored"]
fn export_import_round_trip_is_byte_identical_and_the_tools_read_postgres() {
    let _ = NEEDS;
    let pg = PgCluster::start();
    let root = tempfile::tempdir().unwrap();
    // A sled ledger with a history of products, made by the demo.
    let demo = root.path().join("demo");
    contimg_ok(&[
        "demo",
        "--dir",
        demo.to_str().unwrap(),
        "--tiles",
        "12",
        "--cadence-ms",
        "50",
    ]);
    let sled_export = root.path().join("sled.jsonl");
    contimg_ok(&[
        "export",
        "--data-dir",
        demo.join("ledger").to_str().unwrap(),
        "--out",
        sled_export.to_str().unwrap(),
    ]);
    let url = pg.create_db();
    contimg_ok(&["import", "--ledger", &url, sled_export.to_str().unwrap()]);
    let pg_export = root.path().join("pg.jsonl");
    contimg_ok(&[
        "export",
        "--ledger",
        &url,
        "--out",
        pg_export.to_str().unwrap(),
    ]);
    let a = std::fs::read(&sled_export).unwrap();
    let b = std::fs::read(&pg_export).unwrap();
    assert!(a.len() > 1000, "the demo wrote a history");
    assert!(
        a == b,
        "the export from PostgreSQL differs from the sled export"
    );
    verify(&url);
    // A second import into the now full ledger is refused, and changes nothing.
    let out = contimg(&["import", "--ledger", &url, sled_export.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("import only into an empty ledger"));
    // audit and report read the same history from either backend.
    let sled_dir = demo.join("ledger");
    let some_product = String::from_utf8_lossy(&a)
        .lines()
        .find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            v["streamId"]
                .as_str()?
                .strip_prefix("product-")
                .map(String::from)
        })
        .expect("the demo registered a product");
    for args in [
        vec!["audit", "--json", "status"],
        vec!["audit", "--json", "failed"],
        vec!["audit", "--json", "product", some_product.as_str()],
    ] {
        let run = |source: &[&str]| {
            let mut a: Vec<&str> = args[..1].to_vec();
            a.extend_from_slice(source);
            a.extend_from_slice(&args[1..]);
            let out = contimg(&a);
            assert!(
                out.status.success(),
                "{a:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
            strip_clock(&mut v);
            v
        };
        let from_sled = run(&["--data-dir", sled_dir.to_str().unwrap()]);
        let from_pg = run(&["--ledger", &url]);
        assert_eq!(from_sled, from_pg, "{args:?}");
    }
    let day = chrono::Duration::days(1);
    let from = (chrono::Utc::now() - day).to_rfc3339();
    let to = (chrono::Utc::now() + day).to_rfc3339();
    let report = |source: &[&str], out: &Path| {
        let mut a = vec!["report"];
        a.extend_from_slice(source);
        a.extend_from_slice(&["--from", &from, "--to", &to, "--out", out.to_str().unwrap()]);
        let done = contimg(&a);
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        let mut v: Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        strip_clock(&mut v);
        v
    };
    let (r1, r2) = (
        report(
            &["--data-dir", sled_dir.to_str().unwrap()],
            &root.path().join("r1"),
        ),
        report(&["--ledger", &url], &root.path().join("r2")),
    );
    assert!(r1 == r2, "report.json differs between the backends");
}

/// Removes fields that depend on when a command ran.
fn strip_clock(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for k in [
                "timestamp",
                "generated_at",
                "as_of",
                "oldest_staging_hours",
                "seconds",
                "source",
            ] {
                m.remove(k);
            }
            m.values_mut().for_each(strip_clock);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_clock),
        _ => {}
    }
}

#[test]
#[ignore = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored"]
fn bad_urls_foreign_databases_and_other_schema_versions_exit_1_changing_nothing() {
    let pg = PgCluster::start();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let serve = |url: &str| {
        contimg(&[
            "serve",
            "--mode",
            "api",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--ledger",
            url,
        ])
    };
    // Not a connection string at all.
    let out = serve("postgres://[::1");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connection string"), "{err}");
    // Nobody listens there.
    let out = serve("postgres://postgres@127.0.0.1:1/nothing");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to the ledger database"), "{err}");
    // A database with other tables: refused, its tables untouched.
    let url = pg.create_db();
    let db = url.rsplit('/').next().unwrap().to_string();
    pg.sql(
        &db,
        "CREATE TABLE observations (id int); INSERT INTO observations VALUES (1)",
    );
    let out = serve(&url);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a contimg ledger") && err.contains("observations"),
        "{err}"
    );
    assert_eq!(
        pg.sql(
            &db,
            "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'"
        ),
        "observations"
    );
    // A ledger of another schema version: refused, left as it is.
    let url = pg.create_db();
    let db = url.rsplit('/').next().unwrap().to_string();
    // verify (a reader) refuses an empty database and makes nothing there...
    let out = contimg(&["verify", "--ledger", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no contimg ledger"));
    assert_eq!(
        pg.sql(
            &db,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
    // ...which serve (here, the library) makes.
    contimg::events::Store::connect(&url, root.path())
        .unwrap()
        .close();
    pg.sql(
        &db,
        "UPDATE contimg_meta SET value = '2' WHERE key = 'schema_version'",
    );
    let out = serve(&url);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schema version is \"2\""), "{err}");
    assert_eq!(
        pg.sql(
            &db,
            "SELECT value FROM contimg_meta WHERE key = 'schema_version'"
        ),
        "2"
    );
    // validate says the same, changing nothing.
    let out = contimg(&[
        "validate",
        "--ledger",
        &url,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot be used"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored"]
async fn two_servers_share_a_ledger_and_a_sigkill_under_load_loses_no_acknowledged_event() {
    let pg = PgCluster::start();
    let url = pg.create_db();
    let root = tempfile::tempdir().unwrap();
    let a = server(root.path(), "a", &url, &[]);
    let b = server(root.path(), "b", &url, &[]);
    let c = reqwest::Client::new();
    // Exactly one leads.
    let leaders = eventually(10.0, || {
        let c = c.clone();
        let (ua, ub) = (a.base.clone(), b.base.clone());
        async move {
            let la = status(&c, &ua).await["leader"].as_bool().unwrap();
            let lb = status(&c, &ub).await["leader"].as_bool().unwrap();
            (la ^ lb).then_some((la, lb))
        }
    })
    .await
    .expect("one of the two servers leads within 10 s");
    eprintln!("leaders: a={} b={}", leaders.0, leaders.1);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(appenders(
        vec![a.base.clone(), b.base.clone()],
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // verify reads one snapshot: clean while both servers append.
    let url2 = url.clone();
    tokio::task::spawn_blocking(move || verify(&url2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_base = b.base.clone();
    b.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = load.await.unwrap();
    eprintln!("{} acknowledged appends; refusals {refused:?}", acked.len());
    assert!(acked.len() > 100, "the load ran");
    let _ = b_base;
    // A restarted b catches up; both read every acknowledged event.
    let b = server(root.path(), "b", &url, &[]);
    let ids = all_ids(&c, &a.base).await;
    let missing: Vec<_> = acked.iter().filter(|id| !ids.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing",
        missing.len()
    );
    let head = status(&c, &a.base).await["ledger"]["events"]
        .as_u64()
        .unwrap();
    eventually(10.0, || {
        let c = c.clone();
        let ub = b.base.clone();
        async move { (status(&c, &ub).await["ledger"]["events"].as_u64() == Some(head)).then_some(()) }
    })
    .await
    .expect("b follows the log");
    assert_eq!(all_ids(&c, &b.base).await, ids);
    assert_eq!(
        figures(get_json(&c, a.url("/api/monitoring/publish/status")).await),
        figures(get_json(&c, b.url("/api/monitoring/publish/status")).await)
    );
    a.sigterm();
    b.sigterm();
    verify(&url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored"]
async fn the_database_stopped_under_load_answers_503_and_the_servers_reconnect() {
    let pg = PgCluster::start();
    let url = pg.create_db();
    let root = tempfile::tempdir().unwrap();
    let a = server(root.path(), "a", &url, &[]);
    let b = server(root.path(), "b", &url, &[]);
    let c = reqwest::Client::new();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(appenders(
        vec![a.base.clone(), b.base.clone()],
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.stop_immediate();
    // While it is down: 503 with a JSON detail, never a 500.
    let r = c
        .post(a.url("/api/streams/probe"))
        .json(&event(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("database"), "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_server();
    // The servers reconnect by themselves.
    eventually(30.0, || {
        let c = c.clone();
        let (ua, ub) = (a.url("/api/streams/probe"), b.url("/api/streams/probe"));
        async move {
            let ra = c.post(ua).json(&event(1)).send().await.ok()?;
            let rb = c.post(ub).json(&event(2)).send().await.ok()?;
            (ra.status() == 201 && rb.status() == 201).then_some(())
        }
    })
    .await
    .expect("both servers append again within 30 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = load.await.unwrap();
    eprintln!("{} acknowledged appends; refusals {refused:?}", acked.len());
    assert!(refused.keys().all(|s| *s == 503), "only 503s: {refused:?}");
    assert!(refused.contains_key(&503), "the outage was seen");
    // Server a reads up to the head it has heard of: b's last commits reach it once its
    // listener, which reconnects on its own after the outage, reads the head row.
    let b_head = status(&c, &b.base).await["ledger"]["events"]
        .as_u64()
        .unwrap();
    eventually(30.0, || {
        let (c, base) = (c.clone(), a.base.clone());
        async move { (status(&c, &base).await["ledger"]["events"].as_u64()? >= b_head).then_some(()) }
    })
    .await
    .expect("server a hears of server b's commits within 30 s of the outage");
    let ids = all_ids(&c, &a.base).await;
    assert!(
        acked.iter().all(|id| ids.contains(id)),
        "an acknowledged event is missing"
    );
    // The read models agree with a rebuild, on both servers.
    for s in [&a, &b] {
        let head = status(&c, &a.base).await["ledger"]["events"]
            .as_u64()
            .unwrap();
        eventually(10.0, || {
            let c = c.clone();
            let u = s.url("/api/status");
            async move {
                let v = get_json(&c, u).await;
                (v["ledger"]["events"].as_u64() >= Some(head) && v["projection"]["lag_events"] == 0)
                    .then_some(())
            }
        })
        .await
        .expect("the read model catches up");
        let before = figures(get_json(&c, s.url("/api/monitoring/publish/status")).await);
        let r = c
            .post(s.url("/api/projections/rebuild"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let after = figures(get_json(&c, s.url("/api/monitoring/publish/status")).await);
        assert_eq!(before, after);
    }
    a.sigterm();
    b.sigterm();
    verify(&url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored"]
async fn the_leader_killed_mid_publish_is_succeeded_and_every_product_is_published_once() {
    let pg = PgCluster::start();
    let url = pg.create_db();
    let root = tempfile::tempdir().unwrap();
    let stage = root.path().join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    // 24 products of 32 MiB: publishing them all takes long enough to be caught midway.
    let block: Vec<u8> = (0..1024 * 1024u32).map(|j| (j % 251) as u8).collect();
    let mut sums = HashMap::new();
    for i in 0..24u8 {
        let name = format!("p{i:02}.fits");
        let mut f = std::fs::File::create(stage.join(&name)).unwrap();
        let mut h = blake3::Hasher::new();
        for k in 0..32u8 {
            let mut b = block.clone();
            b[0] = i;
            b[1] = k;
            std::io::Write::write_all(&mut f, &b).unwrap();
            h.update(&b);
        }
        sums.insert(format!("p{i:02}"), h.finalize().to_hex().to_string());
    }
    let fast_retry = ["--retry-backoff", "0.5"];
    let a = server(root.path(), "a", &url, &fast_retry);
    let c = reqwest::Client::new();
    eventually(10.0, || {
        let c = c.clone();
        let u = a.url("/api/status");
        async move { (get_json(&c, u).await["leader"] == true).then_some(()) }
    })
    .await
    .expect("a leads");
    let b = server(root.path(), "b", &url, &fast_retry);
    // Registered through b (any server takes registrations); a, the leader, publishes.
    for id in sums.keys() {
        let r = c
            .post(b.url("/api/products"))
            .json(&json!({
                "data_id": id,
                "data_type": "image",
                "stage_path": format!("{id}.fits"),
                "qa_status": "passed",
                "validation_status": "validated",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    // Kill the leader while a publish is in progress (PublishStarted, no outcome yet).
    let caught = eventually(60.0, || {
        let c = c.clone();
        let u = a.url("/api/monitoring/publish/status");
        async move {
            let v = get_json(&c, u).await;
            (v["total_publishing"].as_u64() > Some(0) && v["total_published"].as_u64() > Some(2))
                .then_some(())
        }
    })
    .await;
    if caught.is_none() {
        let sa = get_json(&c, a.url("/api/monitoring/publish/status")).await;
        let sb = get_json(&c, b.url("/api/status")).await;
        panic!("no publish seen in progress on the leader: {sa} / {sb}");
    }
    a.kill9();
    eventually(15.0, || {
        let c = c.clone();
        let u = b.url("/api/status");
        async move { (get_json(&c, u).await["leader"] == true).then_some(()) }
    })
    .await
    .expect("b takes the lead within 15 s");
    eventually(120.0, || {
        let c = c.clone();
        let u = b.url("/api/monitoring/publish/status");
        async move { (get_json(&c, u).await["total_published"].as_u64() == Some(24)).then_some(()) }
    })
    .await
    .expect("every product published");
    for (id, sum) in &sums {
        let history = get_json(&c, b.url(&format!("/api/products/{id}/history"))).await;
        let succeeded = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["eventType"] == "PublishSucceeded")
            .count();
        assert_eq!(succeeded, 1, "{id} published once: {history}");
        let dest = root
            .path()
            .join("products/images")
            .join(format!("{id}.fits"));
        let got = blake3::hash(&std::fs::read(&dest).unwrap())
            .to_hex()
            .to_string();
        assert_eq!(&got, sum, "{id}");
        assert!(
            !stage.join(format!("{id}.fits")).exists(),
            "{id} left in stage"
        );
    }
    let copies = std::fs::read_dir(root.path().join("products/images"))
        .unwrap()
        .count();
    assert_eq!(copies, 24, "one copy each");
    let tmp = std::fs::read_dir(root.path().join("products/.contimg-tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp, 0, "no temporary left");
    b.sigterm();
    verify(&url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored"]
async fn only_the_leader_may_record_a_move_and_a_new_lead_fences_the_old() {
    use contimg::events::{ExpectedRevision, ProposedEvent, Store, StoreError};
    let pg = PgCluster::start();
    let url = pg.create_db();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Store::connect(&url, dir.path()).unwrap(),
        Store::connect(&url, dir.path()).unwrap(),
    );
    let mut lead_a = a.leadership();
    tokio::time::timeout(Duration::from_secs(10), lead_a.wait_for(|l| *l))
        .await
        .expect("a leads")
        .unwrap();
    let mut lead_b = b.leadership();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!*lead_b.borrow(), "one leader at a time");
    let move_event = || vec![ProposedEvent::new("PublishStarted", 1, b"{}".to_vec())];
    a.append("product-fence", ExpectedRevision::Any, move_event())
        .await
        .expect("the leader records a move");
    let refused = b
        .append("product-fence", ExpectedRevision::Any, move_event())
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(m)) if m.contains("only the ledger's leader")),
        "{refused:?}"
    );
    // Anything else any server may append.
    b.append(
        "product-fence",
        ExpectedRevision::Any,
        vec![ProposedEvent::new("ProductFinalized", 1, b"{}".to_vec())],
    )
    .await
    .unwrap();
    // The leader's session ends (as when its host is cut off): b takes the lead with a new
    // epoch, and from then on a's moves are refused.
    pg.sql(
        url.rsplit('/').next().unwrap(),
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    );
    tokio::time::timeout(Duration::from_secs(10), lead_b.wait_for(|l| *l))
        .await
        .expect("b takes the lead")
        .unwrap();
    b.append("product-fence", ExpectedRevision::Any, move_event())
        .await
        .expect("the new leader records a move");
    let refused = a
        .append("product-fence", ExpectedRevision::Any, move_event())
        .await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert_eq!(b.event_count(), 3);
    a.close();
    b.close();
}
