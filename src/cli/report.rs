//! `contimg report`: the weekly review, rebuilt offline from a copy of the log (a stopped
//! folder, an export, or a running server). Writes `report.json`, `report.md` and a
//! self-contained `report.html` whose charts are inline SVG (nothing fetched to view it).
//! Every figure comes from the projections' own folds.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::json;

use super::audit::Source;
use super::charts;
use crate::projections::metrics::{Metrics, MetricsReport};
use crate::projections::publish::{MICROS_PER_HOUR, PublishModel};
use crate::projections::status::{self, PublishStatus, StuckRow, StuckRule, publish_status};

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("source").args(["data_dir", "ledger", "export", "url"]))]
#[command(group = clap::ArgGroup::new("window").args(["from", "last"]).required(true))]
pub struct ReportArgs {
    /// A ledger folder no server holds.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A PostgreSQL ledger (`postgres://USER@HOST/DB`), read directly; `CONTIMG_LEDGER`
    /// when no other source is given.
    #[arg(long)]
    pub ledger: Option<String>,
    /// A JSON Lines export (`contimg export`).
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// A running server, read page by page over /api/events.
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long, env = "CONTIMG_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Start of the window (RFC 3339).
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// End of the window (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
    /// A window ending now: `7d`, `24h`, `90m`.
    #[arg(long)]
    pub last: Option<String>,
    /// Folder for report.json, report.md and report.html (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Automatic attempts before a product needs an operator (as the server was run).
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Staging older than this at the end of the window counts as stuck.
    #[arg(long, default_value_t = crate::projections::status::DEFAULT_STUCK_STAGING_HOURS)]
    pub stuck_hours: f64,
    /// Publishing older than this (minutes) at the end of the window counts as stuck
    /// (the server's `[publish] stuck_publishing_min`).
    #[arg(long, default_value_t = crate::projections::status::DEFAULT_STUCK_PUBLISHING_MIN)]
    pub stuck_publishing_min: f64,
}

fn parse_time(t: &str) -> anyhow::Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(t)
        .with_context(|| format!("{t:?} is not an RFC 3339 time"))?
        .timestamp_micros())
}

fn parse_span(s: &str) -> anyhow::Result<i64> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: f64 = n
        .parse()
        .with_context(|| format!("--last takes 7d, 24h or 90m, not {s:?}"))?;
    let unit_micros = match unit {
        "d" => 24 * MICROS_PER_HOUR,
        "h" => MICROS_PER_HOUR,
        "m" => 60_000_000,
        _ => bail!("--last takes 7d, 24h or 90m, not {s:?}"),
    };
    if !(n.is_finite() && n > 0.0 && n <= 3660.0) {
        bail!("--last must be positive and at most 3660 days");
    }
    Ok((n * unit_micros as f64) as i64)
}

pub fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let (from, to) = match (&args.from, &args.to, &args.last) {
        (Some(f), Some(t), _) => (parse_time(f)?, parse_time(t)?),
        (_, _, Some(span)) => {
            let now = chrono::Utc::now().timestamp_micros();
            (now - parse_span(span)?, now)
        }
        _ => bail!("give --from and --to, or --last"),
    };
    if to < from {
        bail!("the window ends before it starts");
    }
    let source = Source::open_any(
        args.data_dir.clone(),
        args.ledger.clone(),
        args.export.clone(),
        args.url.clone(),
        args.token.clone(),
    )?;
    let bar = super::logtools::progress(None, "reading events");
    let mut model = PublishModel::new(args.max_attempts);
    // The model's indexes are read only after the whole fold: built once, at its end.
    model.defer_indexes();
    let mut metrics = Metrics::new(from, to);
    let mut last_position = None;
    for (n, e) in source.events()?.enumerate() {
        let e = e?;
        if e.created_micros > to {
            break;
        }
        model.apply(&e);
        metrics.apply(&e);
        last_position = Some(e.position);
        if n % 65536 == 0 {
            bar.set_position(n as u64);
        }
    }
    bar.finish_and_clear();
    source.close();
    model.index_all();
    let status = publish_status(&model, to);
    let report = metrics.report();
    let rule = StuckRule {
        staging_hours: args.stuck_hours,
        publishing_min: args.stuck_publishing_min,
    };
    let (mut stuck, publishing) = status::stuck(&model, to, &rule, usize::MAX);
    stuck.extend(publishing);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let doc = json!({
        "window": {"from": report.from, "to": report.to},
        "ledger_position": last_position,
        "status_at_end": status,
        "metrics": report,
        "stuck_at_end": stuck,
    });
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    std::fs::write(
        args.out.join("report.md"),
        markdown(&report, &status, &stuck),
    )?;
    std::fs::write(args.out.join("report.html"), html(&report, &status, &stuck))?;
    eprintln!(
        "report for {} .. {} written to {} (ledger position {})",
        report.from,
        report.to,
        args.out.display(),
        last_position.map_or("none".into(), |p| p.to_string())
    );
    Ok(ExitCode::SUCCESS)
}

/// A rate for people: `97.50%`, or `no data`.
fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "no data".to_string(), |v| format!("{v:.2}%"))
}

/// A rate in a table cell: `97.50`, or `no data`.
fn rate_cell(v: Option<f64>) -> String {
    v.map_or_else(|| "no data".to_string(), |v| format!("{v:.2}"))
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

/// The pipeline's week as (what, count) rows, for the page and the Markdown.
fn pipeline_rows(p: &crate::projections::metrics::PipelineWeek) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "subband files accepted".to_string(),
        p.files_accepted.to_string(),
    ]];
    for (reason, n) in &p.files_refused {
        rows.push(vec![
            format!("subband files refused: {reason}"),
            n.to_string(),
        ]);
    }
    rows.push(vec!["groups formed".into(), p.groups_formed.to_string()]);
    rows.push(vec![
        "observations timed out (subbands missing)".into(),
        p.groups_timed_out.to_string(),
    ]);
    rows.push(vec![
        "groups refused at formation".into(),
        p.groups_refused.to_string(),
    ]);
    rows.push(vec![
        "mosaics created".into(),
        p.mosaics_created.to_string(),
    ]);
    for (safeguard, n) in &p.mosaics_refused {
        rows.push(vec![format!("mosaics refused: {safeguard}"), n.to_string()]);
    }
    rows
}

fn stage_failure_rows(p: &crate::projections::metrics::PipelineWeek) -> Vec<Vec<String>> {
    p.stage_failures
        .iter()
        .flat_map(|(stage, reasons)| {
            reasons
                .iter()
                .map(move |(reason, n)| vec![stage.clone(), reason.clone(), n.to_string()])
        })
        .collect()
}

/// A titled Markdown table: a blank line, `## title`, the header, one line per row.
fn md_table(m: &mut String, title: &str, header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let _ = writeln!(
        m,
        "\n## {title}\n\n| {} |\n|{}",
        header.join(" | "),
        " --- |".repeat(header.len())
    );
    for row in rows {
        let _ = writeln!(m, "| {} |", row.join(" | "));
    }
}

fn markdown(r: &MetricsReport, s: &PublishStatus, stuck: &[StuckRow]) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "# contimg weekly report\n\nWindow: {} to {}\n",
        r.from, r.to
    );
    let _ = writeln!(
        m,
        "Totals: {} staged, {} published, {} failed attempts, success rate {}.",
        r.totals.staged,
        r.totals.published,
        r.totals.failed,
        pct(r.success_rate_percent)
    );
    md_table(
        &mut m,
        "Per day",
        &[
            "date",
            "staged",
            "published",
            "failed",
            "success %",
            "time to publish p50 / p90 / p99 (s)",
        ],
        r.days.iter().map(|d| {
            vec![
                d.date.clone(),
                d.staged.to_string(),
                d.published.to_string(),
                d.failed.to_string(),
                rate_cell(d.success_rate_percent),
                format!(
                    "{} / {} / {}",
                    opt(d.time_to_publish_p50_s),
                    opt(d.time_to_publish_p90_s),
                    opt(d.time_to_publish_p99_s)
                ),
            ]
        }),
    );
    md_table(
        &mut m,
        "Top failure reasons",
        &["reason", "count"],
        r.top_failure_reasons
            .iter()
            .map(|(reason, n)| vec![reason.replace('|', "\\|"), n.to_string()]),
    );
    md_table(
        &mut m,
        "Stages",
        &[
            "stage",
            "runs",
            "failures",
            "mean / p50 / p90 / max duration (s)",
        ],
        r.stages.iter().map(|st| {
            vec![
                st.stage.clone(),
                st.runs.to_string(),
                st.failures.to_string(),
                format!(
                    "{} / {} / {} / {}",
                    opt(st.mean_duration_s),
                    opt(st.p50_duration_s),
                    opt(st.p90_duration_s),
                    opt(st.max_duration_s)
                ),
            ]
        }),
    );
    md_table(
        &mut m,
        "The pipeline",
        &["what", "count"],
        pipeline_rows(&r.pipeline).into_iter(),
    );
    md_table(
        &mut m,
        "Stage failures by reason",
        &["stage", "reason", "failures"],
        stage_failure_rows(&r.pipeline)
            .into_iter()
            .map(|row| row.into_iter().map(|c| c.replace('|', "\\|")).collect()),
    );
    let _ = writeln!(
        m,
        "\n## Status at the end of the window\n\n{} published, {} staging, {} publishing, {} failed, {} past their attempts, success rate {:.2}%.\n",
        s.total_published,
        s.total_staging,
        s.total_publishing,
        s.failed_publishes,
        s.max_attempts_exceeded,
        s.success_rate_percent
    );
    let _ = writeln!(m, "## Stuck at the end of the window ({})\n", stuck.len());
    for p in stuck {
        let _ = writeln!(
            m,
            "- {} ({}, {}) for {:.1} h",
            p.data_id, p.data_type, p.status, p.hours
        );
    }
    m
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A histogram of values on log-spaced bins.
fn histogram(id: &str, title: &str, values: &[f64]) -> String {
    let edges = [
        0.0,
        1.0,
        10.0,
        60.0,
        300.0,
        900.0,
        3600.0,
        4.0 * 3600.0,
        24.0 * 3600.0,
        f64::INFINITY,
    ];
    let names = [
        "<1s", "1-10s", "10s-1m", "1-5m", "5-15m", "15m-1h", "1-4h", "4-24h", ">1d",
    ];
    let counts: Vec<f64> = edges
        .windows(2)
        .map(|w| values.iter().filter(|v| **v >= w[0] && **v < w[1]).count() as f64)
        .collect();
    let labels: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    charts::bars(
        id,
        title,
        "products",
        &labels,
        &[("products", charts::BLUE, counts)],
    )
}

fn html(r: &MetricsReport, s: &PublishStatus, stuck: &[StuckRow]) -> String {
    let labels: Vec<String> = r.days.iter().map(|d| d.date.clone()).collect();
    let published: Vec<f64> = r.days.iter().map(|d| d.published as f64).collect();
    let failed: Vec<f64> = r.days.iter().map(|d| d.failed as f64).collect();
    let rates: Vec<Option<f64>> = r.days.iter().map(|d| d.success_rate_percent).collect();
    let lo = rates
        .iter()
        .flatten()
        .copied()
        .fold(90.0_f64, f64::min)
        .floor()
        .max(0.0);
    let stage_labels: Vec<String> = r.stages.iter().map(|st| st.stage.clone()).collect();
    let mut page = String::new();
    let _ = write!(
        page,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>contimg weekly report {from} to {to}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:780px}} svg.chart{{width:100%;height:auto;border:1px solid #ddd;margin:.5em 0 1.5em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} th:first-child,td:first-child{{text-align:left}}</style></head><body>
<h1>contimg weekly report</h1><p>Window {from} to {to}. {staged} staged, {pubd} published, {fail} failed attempts, success rate {rate}.</p>
<p>At the end of the window: {sp} published, {ss} staging, {spub} publishing, {sf} failed, {sx} past their attempts.</p>"#,
        from = esc(&r.from),
        to = esc(&r.to),
        staged = r.totals.staged,
        pubd = r.totals.published,
        fail = r.totals.failed,
        rate = pct(r.success_rate_percent),
        sp = s.total_published,
        ss = s.total_staging,
        spub = s.total_publishing,
        sf = s.failed_publishes,
        sx = s.max_attempts_exceeded,
    );
    let _ = write!(
        page,
        "<h2>Published and failed per day</h2>{}",
        charts::bars(
            "published-failed",
            "Published and failed per day",
            "products",
            &labels,
            &[
                ("published", charts::GREEN, published),
                ("failed attempts", charts::RED, failed)
            ]
        )
    );
    let _ = write!(
        page,
        "<h2>Success rate per day</h2>{}",
        charts::rate_line(
            "success-rate",
            "Success rate per day against 95%",
            &labels,
            &rates,
            95.0,
            lo
        )
    );
    let _ = write!(
        page,
        "<h2>Time to publish</h2>{}",
        histogram(
            "time-to-publish",
            "Time from staging to publication",
            &r.time_to_publish_s
        )
    );
    let reasons: Vec<(String, f64)> = r
        .top_failure_reasons
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64))
        .collect();
    let _ = write!(
        page,
        "<h2>Top failure reasons</h2>{}",
        charts::hbars(
            "failure-reasons",
            "Top failure reasons",
            "failed attempts",
            &reasons
        )
    );
    let _ = write!(
        page,
        "<h2>Stages</h2>{}{}",
        charts::bars(
            "stage-durations",
            "Mean stage duration",
            "seconds",
            &stage_labels,
            &[(
                "mean duration",
                charts::BLUE,
                r.stages
                    .iter()
                    .map(|st| st.mean_duration_s.unwrap_or(0.0))
                    .collect()
            )]
        ),
        charts::bars(
            "stage-failures",
            "Stage runs and failures",
            "runs",
            &stage_labels,
            &[
                (
                    "runs",
                    charts::GREEN,
                    r.stages.iter().map(|st| st.runs as f64).collect()
                ),
                (
                    "failures",
                    charts::RED,
                    r.stages.iter().map(|st| st.failures as f64).collect()
                )
            ]
        )
    );
    page.push_str(
        r#"<h2>The pipeline</h2><table id="pipeline"><tr><th>what</th><th>count</th></tr>"#,
    );
    for row in pipeline_rows(&r.pipeline) {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&row[0]),
            esc(&row[1])
        );
    }
    page.push_str(r#"</table><h3>Stage failures by reason</h3><table id="stage-failure-reasons"><tr><th>stage</th><th>reason</th><th>failures</th></tr>"#);
    for row in stage_failure_rows(&r.pipeline) {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&row[0]),
            esc(&row[1]),
            esc(&row[2])
        );
    }
    page.push_str("</table>");
    let _ = write!(
        page,
        r#"<h2>Stuck at the end of the window ({})</h2><table id="stuck"><tr><th>product</th><th>type</th><th>status</th><th>hours</th></tr>"#,
        stuck.len()
    );
    for p in stuck {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
            esc(&p.data_id),
            esc(&p.data_type),
            p.status,
            p.hours
        );
    }
    page.push_str("</table><h2>Per day</h2><table><tr><th>date</th><th>staged</th><th>published</th><th>failed</th><th>success %</th><th>p50 s</th><th>p90 s</th><th>p99 s</th></tr>");
    for d in &r.days {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            d.date,
            d.staged,
            d.published,
            d.failed,
            rate_cell(d.success_rate_percent),
            opt(d.time_to_publish_p50_s),
            opt(d.time_to_publish_p90_s),
            opt(d.time_to_publish_p99_s)
        );
    }
    page.push_str("</table></body></html>\n");
    page
}
