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

/// Axis label: `MM-DD` for a date, the label itself otherwise.
fn short(label: &str) -> &str {
    if label.len() == 10 && label.as_bytes()[4] == b'-' {
        &label[5..]
    } else {
        label
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const W: f64 = 720.0;
const H: f64 = 240.0;
const PAD: f64 = 40.0;

/// Grouped bars, one group per label.
fn bars(id: &str, title: &str, labels: &[String], series: &[(&str, &str, Vec<f64>)]) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(1.0_f64, f64::max);
    let n = labels.len().max(1) as f64;
    let group = (W - 2.0 * PAD) / n;
    let bw = (group * 0.8) / series.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg id="{id}" class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{PAD}" y1="{y}" x2="{x2}" y2="{y}" stroke="#888"/>"##,
        y = H - PAD,
        x2 = W - PAD
    );
    let _ = write!(
        svg,
        r##"<text x="4" y="{}" font-size="11">{max:.0}</text>"##,
        PAD
    );
    for (i, label) in labels.iter().enumerate() {
        let x0 = PAD + i as f64 * group + group * 0.1;
        for (k, (_, color, values)) in series.iter().enumerate() {
            let v = values.get(i).copied().unwrap_or(0.0);
            let h = v / max * (H - 2.0 * PAD);
            let _ = write!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {v}</title></rect>"#,
                x0 + k as f64 * bw,
                H - PAD - h,
                bw.max(1.0),
                h,
                esc(label)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" font-size="10">{}</text>"#,
            x0,
            H - PAD + 14.0,
            esc(short(label))
        );
    }
    for (k, (name, color, _)) in series.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="14" font-size="12" fill="{color}">{}</text>"#,
            W - PAD - 160.0 + k as f64 * 80.0,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A line with a horizontal reference line.
fn line(
    id: &str,
    title: &str,
    labels: &[String],
    values: &[Option<f64>],
    reference: f64,
    lo: f64,
    hi: f64,
) -> String {
    let n = labels.len().max(2) as f64 - 1.0;
    let y = |v: f64| H - PAD - (v - lo) / (hi - lo) * (H - 2.0 * PAD);
    let x = |i: usize| PAD + i as f64 / n * (W - 2.0 * PAD);
    let mut svg = format!(
        r#"<svg id="{id}" class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    let _ = write!(
        svg,
        r#"<text x="4" y="{:.1}" font-size="11">{hi}%</text><text x="4" y="{:.1}" font-size="11">{lo}%</text>"#,
        y(hi) + 4.0,
        y(lo)
    );
    let _ = write!(
        svg,
        r##"<line x1="{PAD}" y1="{r:.1}" x2="{x2}" y2="{r:.1}" stroke="#c33" stroke-dasharray="4 3"/><text x="{x2}" y="{r:.1}" font-size="11" fill="#c33">{reference}%</text>"##,
        r = y(reference),
        x2 = W - PAD
    );
    // A day without data breaks the line: it is drawn as a gap, never as a value.
    for run in values
        .iter()
        .enumerate()
        .collect::<Vec<_>>()
        .split(|(_, v)| v.is_none())
        .filter(|run| !run.is_empty())
    {
        let points: Vec<String> = run
            .iter()
            .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(*i), y(v.clamp(lo, hi)))))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline points="{}" fill="none" stroke="#2a6" stroke-width="2"/>"##,
            points.join(" ")
        );
    }
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => {
                let _ = write!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#2a6"><title>{}: {v:.2}%</title></circle>"##,
                    x(i),
                    y(v.clamp(lo, hi)),
                    esc(&labels[i])
                );
            }
            None => {
                let _ = write!(
                    svg,
                    r##"<text class="no-data" x="{:.1}" y="{:.1}" font-size="10" fill="#888"><title>{}: no publish outcome</title>no data</text>"##,
                    x(i) - 12.0,
                    H / 2.0,
                    esc(&labels[i])
                );
            }
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" font-size="10">{}</text>"#,
            x(i) - 12.0,
            H - PAD + 14.0,
            esc(short(&labels[i]))
        );
    }
    svg.push_str("</svg>");
    svg
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
    bars(id, title, &labels, &[("products", "#36c", counts)])
}

fn hbars(id: &str, title: &str, items: &[(String, f64)]) -> String {
    let row = 22.0;
    let h = PAD + row * items.len().max(1) as f64 + 10.0;
    let max = items.iter().map(|i| i.1).fold(1.0_f64, f64::max);
    let mut svg = format!(
        r#"<svg id="{id}" class="chart" viewBox="0 0 {W} {h}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    if items.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{PAD}" y="{}" font-size="12">none in this window</text>"#,
            PAD
        );
    }
    for (i, (label, v)) in items.iter().enumerate() {
        let y = PAD / 2.0 + i as f64 * row;
        let w = v / max * (W * 0.45);
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="#c63"/><text x="{:.1}" y="{:.1}" font-size="11">{} ({v})</text>"##,
            W * 0.5,
            row * 0.7,
            4.0,
            y + row * 0.55,
            esc(&label.chars().take(70).collect::<String>())
        );
    }
    svg.push_str("</svg>");
    svg
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
        bars(
            "published-failed",
            "Published and failed per day",
            &labels,
            &[("published", "#2a6", published), ("failed", "#c33", failed)]
        )
    );
    let _ = write!(
        page,
        "<h2>Success rate per day</h2>{}",
        line(
            "success-rate",
            "Success rate per day against 95%",
            &labels,
            &rates,
            95.0,
            lo,
            100.0
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
        hbars("failure-reasons", "Top failure reasons", &reasons)
    );
    let _ = write!(
        page,
        "<h2>Stages</h2>{}{}",
        bars(
            "stage-durations",
            "Mean stage duration (s)",
            &stage_labels,
            &[(
                "mean s",
                "#36c",
                r.stages
                    .iter()
                    .map(|st| st.mean_duration_s.unwrap_or(0.0))
                    .collect()
            )]
        ),
        bars(
            "stage-failures",
            "Stage runs and failures",
            &stage_labels,
            &[
                (
                    "runs",
                    "#2a6",
                    r.stages.iter().map(|st| st.runs as f64).collect()
                ),
                (
                    "failures",
                    "#c33",
                    r.stages.iter().map(|st| st.failures as f64).collect()
                )
            ]
        )
    );
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
