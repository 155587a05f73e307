//! `contimg monitor`: the old monitor script, ported, talking to a server over HTTP.
//!
//! Exit codes: status checks 0 without alerts, 1 with alerts; `--retry-failed` 0 on
//! success or when already published, 1 otherwise; `--retry-all` 0 only when none failed;
//! 2 when the server cannot be reached or the arguments are wrong. With `--json` standard
//! output holds exactly one JSON document, whatever happens (one per line per check with
//! `--daemon`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::projections::alerts::{self, AlertInputs, AlertThresholds};

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "CONTIMG_URL")]
    pub url: String,
    /// Bearer token for retries.
    #[arg(long, env = "CONTIMG_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// One JSON document on standard output.
    #[arg(long)]
    pub json: bool,
    /// Retry one failed product.
    #[arg(long, value_name = "ID", conflicts_with_all = ["retry_all", "daemon"])]
    pub retry_failed: Option<String>,
    /// Retry failed products.
    #[arg(long, conflicts_with = "daemon")]
    pub retry_all: bool,
    /// With --retry-all: how many at most.
    #[arg(long, default_value_t = 10, requires = "retry_all", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// With --retry-all: only products with fewer attempts than this.
    #[arg(long, requires = "retry_all")]
    pub max_attempts: Option<u32>,
    /// Check repeatedly until SIGINT or SIGTERM.
    #[arg(long)]
    pub daemon: bool,
    /// Seconds between checks with --daemon.
    #[arg(long, default_value_t = 60.0, requires = "daemon")]
    pub interval: f64,
    /// With --daemon: POST each alert as JSON to this URL when it starts and when it
    /// clears, retried with backoff, in order, without holding the checks up.
    #[arg(long, value_name = "URL", requires = "daemon")]
    pub webhook: Option<String>,
    /// JSON file of alert thresholds.
    #[arg(long, value_name = "FILE")]
    pub alert_thresholds: Option<PathBuf>,
}

pub fn read_thresholds(path: &Path) -> anyhow::Result<AlertThresholds> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a thresholds file", path.display()))
}

/// Why the monitor could not do its job: exit 2.
struct Unreachable(String);

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    async fn call(&self, method: reqwest::Method, path: &str) -> Result<(u16, Value), Unreachable> {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| Unreachable(format!("cannot reach {}: {}", self.base, root_cause(&e))))?;
        let code = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((code, body))
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn emit(json_mode: bool, doc: &Value, human: impl FnOnce() -> String) {
    if json_mode {
        println!("{doc}");
    } else {
        println!("{}", human());
    }
}

fn fail(json_mode: bool, reason: &str) -> ExitCode {
    if json_mode {
        println!("{}", json!({"error": reason, "exit_code": 2}));
    } else {
        eprintln!("contimg monitor: {reason}");
    }
    ExitCode::from(2)
}

pub fn run(args: MonitorArgs) -> ExitCode {
    let json_mode = args.json;
    let thresholds = match &args.alert_thresholds {
        Some(f) => match read_thresholds(f) {
            Ok(t) => t,
            Err(e) => return fail(json_mode, &format!("{e:#}")),
        },
        None => AlertThresholds::default(),
    };
    if args.daemon && !(args.interval.is_finite() && args.interval > 0.0) {
        return fail(json_mode, "--interval must be a positive number of seconds");
    }
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
    {
        Ok(h) => h,
        Err(e) => return fail(json_mode, &e.to_string()),
    };
    let client = Client {
        http,
        base: args.url.trim_end_matches('/').to_string(),
        token: args.token.clone(),
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(json_mode, &format!("{e:#}")),
    };
    let result = rt.block_on(async {
        if let Some(id) = &args.retry_failed {
            retry_one(&client, id, json_mode).await
        } else if args.retry_all {
            retry_all(&client, args.limit, args.max_attempts, json_mode).await
        } else if args.daemon {
            let webhook = args
                .webhook
                .as_deref()
                .map(|u| Webhook::start(u, &client.base));
            daemon(&client, &thresholds, args.interval, json_mode, webhook).await
        } else {
            check(&client, &thresholds, json_mode).await
        }
    });
    match result {
        Ok(code) => code,
        Err(Unreachable(reason)) => fail(json_mode, &reason),
    }
}

/// Fetches the status and evaluates the alerts: (document, alert count).
async fn status_doc(client: &Client, t: &AlertThresholds) -> Result<(Value, usize), Unreachable> {
    let (code, status) = client
        .call(reqwest::Method::GET, "/api/monitoring/publish/status")
        .await?;
    if code != 200 {
        return Err(Unreachable(format!(
            "status endpoint answered {code}: {status}"
        )));
    }
    let num = |k: &str| status.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let inputs = AlertInputs {
        success_rate_percent: status
            .get("success_rate_percent")
            .and_then(Value::as_f64)
            .unwrap_or(100.0),
        failed_publishes: num("failed_publishes") as u64,
        recent_failures_1h: num("recent_failures_1h") as u64,
        oldest_staging_hours: status.get("oldest_staging_hours").and_then(Value::as_f64),
        max_attempts_exceeded: num("max_attempts_exceeded") as u64,
    };
    let alerts = alerts::evaluate(&inputs, t);
    let n = alerts.len();
    Ok((
        json!({"status": status, "alerts": alerts, "alert_count": n}),
        n,
    ))
}

fn human_status(doc: &Value) -> String {
    let s = &doc["status"];
    let mut out = format!(
        "published {}  staging {}  publishing {}  failed {}  max-attempts-exceeded {}\n\
         success rate {}%  failures: {} in 24 h, {} in 1 h  (ledger position {}, {})",
        s["total_published"],
        s["total_staging"],
        s["total_publishing"],
        s["failed_publishes"],
        s["max_attempts_exceeded"],
        s["success_rate_percent"],
        s["recent_failures_24h"],
        s["recent_failures_1h"],
        s["ledger_position"],
        s["timestamp"].as_str().unwrap_or("?"),
    );
    match doc["alerts"].as_array() {
        Some(a) if !a.is_empty() => {
            out.push_str(&format!("\nALERTS ({}):", a.len()));
            for alert in a {
                out.push_str(&format!(
                    "\n  [{}] {}: {}",
                    alert["severity"].as_str().unwrap_or("?"),
                    alert["name"].as_str().unwrap_or("?"),
                    alert["message"].as_str().unwrap_or("?")
                ));
            }
        }
        _ => out.push_str("\nno alerts"),
    }
    out
}

async fn check(
    client: &Client,
    t: &AlertThresholds,
    json_mode: bool,
) -> Result<ExitCode, Unreachable> {
    let (doc, n) = status_doc(client, t).await?;
    emit(json_mode, &doc, || human_status(&doc));
    Ok(if n == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn daemon(
    client: &Client,
    t: &AlertThresholds,
    interval: f64,
    json_mode: bool,
    webhook: Option<Webhook>,
) -> Result<ExitCode, Unreachable> {
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    let mut firing: std::collections::BTreeMap<String, Value> = Default::default();
    loop {
        match status_doc(client, t).await {
            Ok((doc, _)) => {
                emit(json_mode, &doc, || human_status(&doc));
                let now: std::collections::BTreeMap<String, Value> = doc["alerts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| Some((a["name"].as_str()?.to_string(), a.clone())))
                    .collect();
                if let Some(w) = &webhook {
                    for (event, alert) in transitions(&firing, &now) {
                        w.send(event, alert);
                    }
                }
                firing = now;
            }
            // A daemon outlives a restart of the server: report and keep going. An
            // unreachable server is itself an alert for the webhook (the others are
            // unknown meanwhile and stay as they were).
            Err(Unreachable(reason)) => {
                emit(json_mode, &json!({"error": reason, "exit_code": 2}), || {
                    format!("unreachable: {reason}")
                });
                let mut now = firing.clone();
                now.insert(
                    "server_unreachable".into(),
                    json!({"name": "server_unreachable", "severity": "critical", "message": reason}),
                );
                if let Some(w) = &webhook {
                    for (event, alert) in transitions(&firing, &now) {
                        w.send(event, alert);
                    }
                }
                firing = now;
            }
        }
        tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(Duration::from_secs_f64(interval)) => {}
        }
    }
}

/// What changed between two checks: alerts that started (in `now`, not in `before`) and
/// alerts that cleared (the other way round), each with the alert as last seen.
fn transitions<'a>(
    before: &'a std::collections::BTreeMap<String, Value>,
    now: &'a std::collections::BTreeMap<String, Value>,
) -> Vec<(&'static str, &'a Value)> {
    let started = now
        .iter()
        .filter(|(k, _)| !before.contains_key(*k))
        .map(|(_, a)| ("started", a));
    let cleared = before
        .iter()
        .filter(|(k, _)| !now.contains_key(*k))
        .map(|(_, a)| ("cleared", a));
    started.chain(cleared).collect()
}

/// Delivers alert notifications in order from a task of its own: a slow or failing
/// receiver delays the notifications, never the checks. Each is retried with backoff
/// (1 s doubling to 60 s) for up to 10 attempts. With 1,000 already waiting, a new one is
/// dropped, with a log line; those still waiting when the daemon stops are not sent.
struct Webhook {
    tx: tokio::sync::mpsc::Sender<Value>,
}

impl Webhook {
    fn start(url: &str, source: &str) -> Webhook {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(1000);
        let url = url.to_string();
        // The server's address without any `user:password@` it was given.
        let source = match reqwest::Url::parse(source) {
            Ok(mut u) => {
                let _ = u.set_username("");
                let _ = u.set_password(None);
                u.to_string().trim_end_matches('/').to_string()
            }
            Err(_) => source.to_string(),
        };
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default();
            while let Some(mut body) = rx.recv().await {
                body["source"] = json!(source);
                let mut wait = Duration::from_secs(1);
                for attempt in 1..=10u32 {
                    let sent = http.post(&url).json(&body).send().await;
                    match sent {
                        Ok(r) if r.status().is_success() => break,
                        // Refused as such: sending it again would be refused again.
                        Ok(r)
                            if r.status().is_client_error()
                                && r.status() != reqwest::StatusCode::REQUEST_TIMEOUT
                                && r.status() != reqwest::StatusCode::TOO_MANY_REQUESTS =>
                        {
                            eprintln!(
                                "contimg monitor: the webhook refused a notification ({}); not retried",
                                r.status()
                            );
                            break;
                        }
                        other => {
                            let why = match other {
                                Ok(r) => format!("answered {}", r.status()),
                                Err(e) => root_cause(&e),
                            };
                            if attempt == 10 {
                                eprintln!(
                                    "contimg monitor: webhook gave up on a notification after 10 attempts: {why}"
                                );
                                break;
                            }
                            eprintln!(
                                "contimg monitor: webhook attempt {attempt} failed ({why}); retrying in {} s",
                                wait.as_secs()
                            );
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(60));
                        }
                    }
                }
            }
        });
        Webhook { tx }
    }

    fn send(&self, event: &str, alert: &Value) {
        let body = json!({
            "event": event,
            "alert": alert,
            "at": crate::events::record::format_time(chrono::Utc::now()),
        });
        if self.tx.try_send(body).is_err() {
            eprintln!("contimg monitor: webhook queue full; a notification was dropped");
        }
    }
}

fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn retry_one(client: &Client, id: &str, json_mode: bool) -> Result<ExitCode, Unreachable> {
    let (code, body) = client
        .call(
            reqwest::Method::POST,
            &format!("/api/monitoring/publish/retry/{}", percent_encode(id)),
        )
        .await?;
    let detail = body["detail"].as_str().unwrap_or("").to_string();
    let already = code == 400 && detail.contains("already published");
    let ok = code == 200 || already;
    let doc = json!({"data_id": id, "http_status": code, "success": ok, "already_published": already, "response": body});
    emit(json_mode, &doc, || {
        if code == 200 {
            format!(
                "retried {id}: published at {}",
                body["published_path"].as_str().unwrap_or("?")
            )
        } else if already {
            format!("{id} is already published")
        } else {
            format!("retry of {id} failed ({code}): {detail}")
        }
    });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn retry_all(
    client: &Client,
    limit: u32,
    max_attempts: Option<u32>,
    json_mode: bool,
) -> Result<ExitCode, Unreachable> {
    let mut path = format!("/api/monitoring/publish/retry-all?limit={limit}");
    if let Some(m) = max_attempts {
        path.push_str(&format!("&max_attempts={m}"));
    }
    let (code, body) = client.call(reqwest::Method::POST, &path).await?;
    if code != 200 {
        let doc = json!({"http_status": code, "response": body, "success": false});
        emit(json_mode, &doc, || {
            format!(
                "retry-all refused ({code}): {}",
                body["detail"].as_str().unwrap_or("")
            )
        });
        return Ok(ExitCode::from(1));
    }
    let failed = body["failed"].as_u64().unwrap_or(0);
    emit(json_mode, &body, || {
        let mut out = format!(
            "retried {}: {} published, {} failed",
            body["total_attempted"], body["successful"], body["failed"]
        );
        for r in body["results"].as_array().into_iter().flatten() {
            if r["success"] != Value::Bool(true) {
                out.push_str(&format!(
                    "\n  {}: {}",
                    r["data_id"].as_str().unwrap_or("?"),
                    r["error"].as_str().unwrap_or("?")
                ));
            }
        }
        out
    });
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
