//! The weekly report's charts, drawn with `plotters` into inline SVG: real axes with
//! ticks and units, a legend, a title. Text stays SVG `<text>` (no font is read here; the
//! browser draws it). A day without data is left out of a line, never drawn as a value.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const W: u32 = 720;
const H: u32 = 260;

pub const GREEN: RGBColor = RGBColor(0x22, 0xaa, 0x66);
pub const RED: RGBColor = RGBColor(0xcc, 0x33, 0x33);
pub const BLUE: RGBColor = RGBColor(0x33, 0x66, 0xcc);
pub const ORANGE: RGBColor = RGBColor(0xcc, 0x66, 0x33);

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Draws with `draw` onto a fresh SVG and gives it the page's id, class and title (the
/// backend's own opening tag, with its namespace address, is replaced: inline SVG in HTML
/// needs none).
fn svg(
    id: &str,
    title: &str,
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
) -> String {
    let mut out = String::new();
    let drawn = {
        let root = SVGBackend::with_string(&mut out, (W, height)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|_| draw(&root))
            .and_then(|_| root.present().map_err(|e| e.to_string()))
    };
    let body = match drawn {
        Ok(()) => out
            .find('>')
            .map(|i| out[i + 1..].to_string())
            .unwrap_or_default(),
        Err(e) => format!(
            r#"<text x="10" y="20" font-size="12">chart not drawn: {}</text></svg>"#,
            esc(&e)
        ),
    };
    format!(
        r#"<svg id="{id}" class="chart" viewBox="0 0 {W} {height}" role="img" aria-label="{t}"><title>{t}</title>{body}"#,
        t = esc(title)
    )
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Category labels under the x axis, centred on `x_of(i)` (every label while they fit,
/// else every few).
fn category_labels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    labels: &[String],
    at: impl Fn(usize) -> (i32, i32),
) -> Result<(), String> {
    let step = labels.len().div_ceil(14).max(1);
    for (i, l) in labels.iter().enumerate().filter(|(i, _)| i % step == 0) {
        let (x, y) = at(i);
        root.draw(&Text::new(
            short(l).to_string(),
            (x, y + 6),
            TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// A legend row under a chart: a swatch (a box, or a line for a line series) and a name
/// per series, left to right.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    items: &[(&str, RGBColor, bool)],
) -> Result<(), String> {
    let mut x = 60;
    let y = 8;
    for (name, color, line) in items {
        if *line {
            area.draw(&PathElement::new(
                vec![(x, y + 5), (x + 14, y + 5)],
                color.stroke_width(2),
            ))
            .map_err(err)?;
        } else {
            area.draw(&Rectangle::new([(x, y), (x + 12, y + 10)], color.filled()))
                .map_err(err)?;
        }
        area.draw(&Text::new(
            name.to_string(),
            (x + 18, y),
            ("sans-serif", 11).into_font(),
        ))
        .map_err(err)?;
        x += 40 + 7 * name.chars().count() as i32;
    }
    Ok(())
}

/// The top of a value axis: a little above the largest value, 1 for none, and always a
/// finite number (plotters' tick search never ends on an infinite range).
fn axis_top(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        (max * 1.1).min(f64::MAX / 4.0)
    } else {
        1.0
    }
}

/// Tick labels of a count (whole numbers) or of a measure.
fn tick(v: &f64, whole: bool) -> String {
    if whole || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Grouped bars, one group per label, with a y axis in `unit`.
pub fn bars(
    id: &str,
    title: &str,
    unit: &str,
    labels: &[String],
    series: &[(&str, RGBColor, Vec<f64>)],
) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = axis_top(max);
    let n = labels.len().max(1);
    let k = series.len().max(1) as f64;
    svg(id, title, H + 24, |root| {
        let (upper, lower) = root.split_vertically(H);
        let root = &upper;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)
            .map_err(err)?;
        let whole = unit != "seconds";
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| tick(v, whole))
            .y_desc(unit)
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        category_labels(root, labels, |i| {
            chart.backend_coord(&(i as f64 + 0.5, 0.0))
        })?;
        for (j, (_, color, values)) in series.iter().enumerate() {
            chart
                .draw_series(values.iter().enumerate().map(|(i, v)| {
                    let x0 = i as f64 + 0.1 + j as f64 * 0.8 / k;
                    let v = if v.is_finite() {
                        v.clamp(0.0, top)
                    } else {
                        0.0
                    };
                    Rectangle::new([(x0, 0.0), (x0 + 0.8 / k, v)], color.filled())
                }))
                .map_err(err)?;
        }
        let items: Vec<(&str, RGBColor, bool)> =
            series.iter().map(|(n, c, _)| (*n, *c, false)).collect();
        legend(&lower, &items)
    })
}

/// A percentage per day against a reference line; days without data (`None`) break the
/// line and say so.
pub fn rate_line(
    id: &str,
    title: &str,
    labels: &[String],
    values: &[Option<f64>],
    reference: f64,
    lo: f64,
) -> String {
    let n = labels.len().max(1);
    svg(id, title, H + 24, |root| {
        let (upper, lower) = root.split_vertically(H);
        let root = &upper;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, lo..100.5f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("success rate (%)")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        category_labels(root, labels, |i| chart.backend_coord(&(i as f64, lo)))?;
        chart
            .draw_series(DashedLineSeries::new(
                [(-0.5, reference), (n as f64 - 0.5, reference)],
                6,
                4,
                RED.stroke_width(1),
            ))
            .map_err(err)?;
        let points: Vec<(usize, Option<f64>)> = values.iter().copied().enumerate().collect();
        for run in points.split(|(_, v)| v.is_none()).filter(|r| !r.is_empty()) {
            chart
                .draw_series(LineSeries::new(
                    run.iter().filter_map(|(i, v)| {
                        v.filter(|v| v.is_finite()).map(|v| (*i as f64, v.max(lo)))
                    }),
                    GREEN.stroke_width(2),
                ))
                .map_err(err)?;
        }
        chart
            .draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                v.filter(|v| v.is_finite())
                    .map(|v| Circle::new((i as f64, v.max(lo)), 3, GREEN.filled()))
            }))
            .map_err(err)?;
        // Above the target line, below the usual rates.
        let mid = lo + (100.0 - lo) * 0.75;
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_none())
                    .map(|(i, _)| {
                        Text::new(
                            "no data",
                            (i as f64, mid),
                            ("sans-serif", 10)
                                .into_font()
                                .color(&BLACK.mix(0.5))
                                .pos(Pos::new(HPos::Center, VPos::Center)),
                        )
                    }),
            )
            .map_err(err)?;
        let target = format!("{reference}% target");
        legend(
            &lower,
            &[
                ("published / (published + failed)", GREEN, true),
                (&target, RED, true),
            ],
        )
    })
}

/// Horizontal bars, one per item (the longest labels cut at 60 characters).
pub fn hbars(id: &str, title: &str, unit: &str, items: &[(String, f64)]) -> String {
    let n = items.len().max(1);
    let height = 70 + 24 * n as u32;
    let max = items
        .iter()
        .map(|i| i.1)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = axis_top(max);
    svg(id, title, height, |root| {
        if items.is_empty() {
            root.draw(&Text::new(
                "none in this window",
                (20, 40),
                ("sans-serif", 12).into_font(),
            ))
            .map_err(err)?;
            return Ok(());
        }
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(330)
            .build_cartesian_2d(0f64..top, 0f64..n as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|y| {
                let i = y.floor() as usize;
                if (y - y.floor()).abs() > 1e-9 {
                    return String::new();
                }
                items
                    .get(n.saturating_sub(1).saturating_sub(i))
                    .map(|(l, _)| l.chars().take(60).collect())
                    .unwrap_or_default()
            })
            .x_desc(unit)
            .x_label_formatter(&|v| tick(v, true))
            .label_style(("sans-serif", 10))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
                let y = (n - 1 - i) as f64;
                let v = if v.is_finite() {
                    v.clamp(0.0, top)
                } else {
                    0.0
                };
                Rectangle::new([(0.0, y + 0.15), (v, y + 0.85)], ORANGE.filled())
            }))
            .map_err(err)?;
        Ok(())
    })
}

/// `2026-11-30` as `11-30`.
fn short(label: &str) -> &str {
    if label.len() == 10 && label.as_bytes()[4] == b'-' {
        &label[5..]
    } else {
        label
    }
}
