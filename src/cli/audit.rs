//! `contimg audit`: what the ledger knew, and when. Timelines of a product or a group, the
//! publish status and failed list as of any time or position, and what happened in a
//! window. Events come from a stopped ledger folder, an export file, or a running server.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::events::ledger::RemoteLedger;
use crate::events::record::{format_time, micros_to_datetime};
use crate::events::{Direction, RecordedEvent, Store, StoreError};
use crate::projections::status::{FailedRow, publish_status};
use crate::projections::{AsOf, fold_as_of};

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("source").args(["data_dir", "ledger", "export", "url"]))]
pub struct AuditArgs {
    /// A ledger folder no server holds.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// A PostgreSQL ledger (`postgres://USER@HOST/DB`), read directly; `CONTIMG_LEDGER`
    /// when no other source is given.
    #[arg(long, global = true)]
    pub ledger: Option<String>,
    /// A JSON Lines export (`contimg export`).
    #[arg(long, global = true)]
    pub export: Option<PathBuf>,
    /// A running server, read page by page over /api/events.
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Bearer token for --url.
    #[arg(long, env = "CONTIMG_API_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// One JSON document on standard output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Automatic attempts before a product needs an operator (as the server was run).
    #[arg(long, default_value_t = 3, global = true)]
    pub max_attempts: u32,
    #[command(subcommand)]
    pub what: AuditWhat,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditWhat {
    /// Every event of a product, in order.
    Product { id: String },
    /// Every event of an observation group (or, with `mosaic-`, a mosaic group).
    Group { id: String },
    /// The publish status as the server would have shown it then.
    Status(PointInTime),
    /// The failed list as the server would have shown it then.
    Failed {
        #[command(flatten)]
        at: PointInTime,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// What happened between two times (RFC 3339), counted by event type and listed.
    Between {
        from: String,
        to: String,
        /// Most events listed (all are counted).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct PointInTime {
    /// A time (RFC 3339): the state after the last event committed at or before it.
    #[arg(long, conflicts_with = "position")]
    pub as_of: Option<String>,
    /// A log position: the state after that event.
    #[arg(long)]
    pub position: Option<u64>,
}

fn parse_time(t: &str) -> anyhow::Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(t)
        .with_context(|| format!("{t:?} is not an RFC 3339 time (like 2026-11-30T10:00:00Z)"))?
        .timestamp_micros())
}

impl PointInTime {
    fn as_of(&self) -> anyhow::Result<AsOf> {
        Ok(match (&self.as_of, self.position) {
            (Some(t), _) => AsOf::Time(parse_time(t)?),
            (None, Some(p)) => AsOf::Position(p),
            (None, None) => AsOf::Time(chrono::Utc::now().timestamp_micros()),
        })
    }
}

/// Where events come from: shared by `audit` and `report`.
pub(crate) enum Source {
    Local(Store),
    Export(PathBuf),
    Remote(RemoteLedger, Arc<tokio::runtime::Runtime>),
}

type Events = Box<dyn Iterator<Item = Result<RecordedEvent, StoreError>> + Send>;

impl Source {
    fn open(args: &AuditArgs) -> anyhow::Result<Source> {
        Self::open_any(
            args.data_dir.clone(),
            args.ledger.clone(),
            args.export.clone(),
            args.url.clone(),
            args.token.clone(),
        )
    }

    /// A server when `url` is given, else an export file, else a ledger folder (`./var`).
    pub(crate) fn open_any(
        data_dir: Option<PathBuf>,
        ledger: Option<String>,
        export: Option<PathBuf>,
        url: Option<String>,
        token: Option<String>,
    ) -> anyhow::Result<Source> {
        if let Some(url) = &url {
            return Ok(Source::Remote(
                RemoteLedger::new(url, token)?,
                Arc::new(super::runtime()?),
            ));
        }
        if let Some(f) = &export {
            File::open(f).with_context(|| format!("opening {}", f.display()))?;
            return Ok(Source::Export(f.clone()));
        }
        let ledger = super::logtools::ledger_url(ledger, data_dir.is_some());
        match super::logtools::open_source(data_dir, ledger, None, None)? {
            crate::events::Ledger::Local(s) => Ok(Source::Local(s)),
            crate::events::Ledger::Remote(_) => unreachable!("no URL given"),
        }
    }

    /// Lets go of a ledger folder.
    pub(crate) fn close(&self) {
        if let Source::Local(s) = self {
            s.close();
        }
    }

    /// Events for the publish model's fold: a ledger folder's records are read in place.
    pub(crate) fn fold_events(&self) -> anyhow::Result<crate::projections::FoldSource> {
        Ok(match self {
            Source::Local(s) => crate::projections::FoldSource::Store(s.clone(), 0),
            _ => crate::projections::FoldSource::Records(self.events()?),
        })
    }

    /// The whole log, in position order, read lazily.
    pub(crate) fn events(&self) -> anyhow::Result<Events> {
        Ok(match self {
            Source::Local(s) => Box::new(s.events_from(0)),
            Source::Export(path) => Box::new(
                crate::events::jsonl::read_export(path)?.map(|r| r.map(|(_, record)| record)),
            ),
            Source::Remote(ledger, rt) => Box::new(RemotePages {
                ledger: ledger.clone(),
                rt: rt.clone(),
                next: Some(0),
                buf: VecDeque::new(),
            }),
        })
    }

    /// One stream's events.
    fn stream(&self, name: &str) -> anyhow::Result<Vec<RecordedEvent>> {
        let found = match self {
            Source::Local(s) => s.read_stream(name, None, Direction::Forward, usize::MAX),
            Source::Remote(r, rt) => {
                let mut out = Vec::new();
                loop {
                    let from = out.last().map(|e: &RecordedEvent| e.revision + 1);
                    let page = rt.block_on(r.read_stream(name, from, Direction::Forward, 1000));
                    match page {
                        Ok(p) if p.is_empty() => break Ok(out),
                        Ok(p) => {
                            let full = p.len() < 1000;
                            out.extend(p);
                            if full {
                                break Ok(out);
                            }
                        }
                        Err(e) => break Err(e),
                    }
                }
            }
            Source::Export(_) => {
                let mut out = Vec::new();
                for e in self.events()? {
                    let e = e?;
                    if e.stream_id == name {
                        out.push(e);
                    }
                }
                if out.is_empty() {
                    Err(StoreError::StreamNotFound(name.into()))
                } else {
                    Ok(out)
                }
            }
        };
        match found {
            Err(StoreError::StreamNotFound(_)) => bail!("no stream {name} in this ledger"),
            other => Ok(other?),
        }
    }
}

/// `$all` over HTTP, a page at a time.
struct RemotePages {
    ledger: RemoteLedger,
    rt: Arc<tokio::runtime::Runtime>,
    next: Option<u64>,
    buf: VecDeque<RecordedEvent>,
}

impl Iterator for RemotePages {
    type Item = Result<RecordedEvent, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            let from = self.next?;
            match self
                .rt
                .block_on(self.ledger.read_all(Some(from), Direction::Forward, 5000))
            {
                Ok((events, next)) => {
                    self.buf.extend(events);
                    self.next = next;
                }
                Err(e) => {
                    self.next = None;
                    return Some(Err(e));
                }
            }
        }
        self.buf.pop_front().map(Ok)
    }
}

/// One timeline row: the fields that matter for an operator.
fn row(e: &RecordedEvent) -> Value {
    let data: Value = serde_json::from_slice(&e.data).unwrap_or(Value::Null);
    let meta: Value = serde_json::from_slice(&e.metadata).unwrap_or(Value::Null);
    json!({
        "position": e.position,
        "revision": e.revision,
        "time": e.created_rfc3339(),
        "stream": e.stream_id,
        "type": e.event_type,
        "data": data,
        "actor": meta.get("actor").cloned().unwrap_or(Value::Null),
        "correlation_id": meta.get("correlationId").cloned().unwrap_or(Value::Null),
    })
}

/// The few fields of a payload worth a column.
fn summary(data: &Value) -> String {
    const KEYS: &[&str] = &[
        "attempt",
        "trigger",
        "stage",
        "error",
        "reason",
        "safeguard",
        "member",
        "retryable",
        "interrupted",
        "recovered",
        "published_path",
        "destination",
        "qa_status",
        "validation_status",
        "data_type",
        "stage_path",
        "duration_s",
        "exit_status",
        "obs_time",
        "subband",
        "path",
    ];
    let Some(obj) = data.as_object() else {
        return data.to_string();
    };
    let parts: Vec<String> = KEYS
        .iter()
        .filter_map(|k| {
            obj.get(*k)
                .filter(|v| !v.is_null())
                .map(|v| format!("{k}={v}"))
        })
        .collect();
    let text = parts.join(" ");
    if text.chars().count() > 160 {
        format!("{}…", text.chars().take(160).collect::<String>())
    } else {
        text
    }
}

fn print_rows(rows: &[Value]) {
    for r in rows {
        println!(
            "{:>8}  {}  {:<22} {}  [{}{}]",
            r["position"],
            r["time"].as_str().unwrap_or(""),
            r["type"].as_str().unwrap_or(""),
            summary(&r["data"]),
            r["actor"].as_str().unwrap_or("-"),
            r["correlation_id"]
                .as_str()
                .map(|c| format!(" {c}"))
                .unwrap_or_default(),
        );
    }
}

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let source = Source::open(&args)?;
    let json_mode = args.json;
    match &args.what {
        AuditWhat::Product { id } | AuditWhat::Group { id } => {
            let prefix = match args.what {
                AuditWhat::Product { .. } => "product-",
                _ if id.starts_with("mosaic-") || id.starts_with("group-") => "",
                _ => "group-",
            };
            let stream = format!("{prefix}{id}");
            let rows: Vec<Value> = source.stream(&stream)?.iter().map(row).collect();
            if json_mode {
                println!(
                    "{}",
                    json!({"stream": stream, "count": rows.len(), "events": rows})
                );
            } else {
                println!("{stream}: {} events", rows.len());
                print_rows(&rows);
            }
        }
        AuditWhat::Status(at) => {
            let (model, position, now) =
                fold_as_of(source.fold_events()?, at.as_of()?, args.max_attempts)?;
            let status = publish_status(&model, now);
            let_go(model);
            let evaluated_at = format_time(micros_to_datetime(now));
            if json_mode {
                println!(
                    "{}",
                    json!({"position": position, "as_of": evaluated_at, "status": status})
                );
            } else {
                println!("publish status as of {evaluated_at} (log position {position:?}):");
                let v = serde_json::to_value(&status)?;
                for (k, v) in v.as_object().into_iter().flatten() {
                    println!("  {k}: {v}");
                }
            }
        }
        AuditWhat::Failed { at, limit } => {
            let (model, position, now) =
                fold_as_of(source.fold_events()?, at.as_of()?, args.max_attempts)?;
            let rows: Vec<FailedRow> = model
                .failed(None, *limit)
                .into_iter()
                .map(FailedRow::new)
                .collect();
            let evaluated_at = format_time(micros_to_datetime(now));
            if json_mode {
                println!(
                    "{}",
                    json!({"position": position, "as_of": evaluated_at, "count": rows.len(), "failed_publishes": rows})
                );
            } else {
                println!(
                    "failed publishes as of {evaluated_at} (log position {position:?}): {}",
                    rows.len()
                );
                for r in &rows {
                    println!(
                        "  {}  attempts {}  {}",
                        r.data_id,
                        r.publish_attempts,
                        r.publish_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        AuditWhat::Between { from, to, limit } => {
            let (t1, t2) = (parse_time(from)?, parse_time(to)?);
            if t2 < t1 {
                bail!("the window ends before it starts");
            }
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            let mut rows = Vec::new();
            let mut total = 0u64;
            for e in source.events()? {
                let e = e?;
                if e.created_micros > t2 {
                    break;
                }
                if e.created_micros < t1 {
                    continue;
                }
                total += 1;
                *counts.entry(e.event_type.clone()).or_default() += 1;
                if rows.len() < *limit {
                    rows.push(row(&e));
                }
            }
            if json_mode {
                println!(
                    "{}",
                    json!({"from": from, "to": to, "total": total, "by_type": counts, "listed": rows.len(), "events": rows})
                );
            } else {
                println!("{total} events between {from} and {to}");
                for (t, n) in &counts {
                    println!("  {n:>8}  {t}");
                }
                print_rows(&rows);
                if (rows.len() as u64) < total {
                    println!(
                        "({} more not listed; raise --limit)",
                        total - rows.len() as u64
                    );
                }
            }
        }
    }
    source.close();
    Ok(ExitCode::SUCCESS)
}

/// Leaves a model of millions of products to the operating system instead of freeing it
/// string by string: this process ends right after its answer, and the drop alone took a
/// tenth of a 10-million-event audit (seen with perf).
fn let_go(model: crate::projections::publish::PublishModel) {
    std::mem::forget(model);
}
