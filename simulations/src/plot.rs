//! The two figures of a run, as SVG (plotters' SVG backend: no font or system library needed):
//! the latency distribution (a CDF per delivery path, log scale) and the delivery ratio over
//! time (with the share of nodes running, and the scenario's marks). See
//! `docs/performance.md`, "Simulations".

use std::{path::Path as FsPath, time::Duration};

use plotters::prelude::*;

use crate::journal::{MessageRecord, NodeChange, Path};

/// A figure could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("drawing {file}: {reason}")]
pub struct PlotError {
    file: String,
    reason: String,
}

fn err(file: &FsPath) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |e| PlotError {
        file: file.display().to_string(),
        reason: e.to_string(),
    }
}

const SIZE: (u32, u32) = (960, 560);
/// At most this many points per CDF line (quantiles of the sorted latencies).
const CDF_POINTS: usize = 2000;

fn color(p: Path) -> RGBColor {
    match p {
        Path::Direct => RGBColor(31, 119, 180),
        Path::Relayed => RGBColor(44, 160, 44),
        Path::Mailbox => RGBColor(214, 39, 40),
        Path::Group => RGBColor(148, 103, 189),
    }
}

/// The latency CDF of the delivered measured messages, one line per path and one for all.
pub fn latency_cdf(records: &[MessageRecord], title: &str, file: &FsPath) -> Result<(), PlotError> {
    let e = err(file);
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0).max(0.01);
    let mut lines: Vec<(String, RGBColor, Vec<f64>)> = Vec::new();
    let mut all: Vec<f64> = Vec::new();
    for p in [Path::Direct, Path::Relayed, Path::Mailbox, Path::Group] {
        let mut l: Vec<f64> = records
            .iter()
            .filter(|r| r.send.measured && r.path == Some(p))
            .filter_map(|r| r.latency.map(ms))
            .collect();
        if l.is_empty() {
            continue;
        }
        l.sort_by(f64::total_cmp);
        all.extend(&l);
        lines.push((format!("{} (n = {})", p.name(), l.len()), color(p), l));
    }
    all.sort_by(f64::total_cmp);
    if lines.len() > 1 {
        lines.push((format!("all (n = {})", all.len()), BLACK, all.clone()));
    }
    let lo = all.first().copied().unwrap_or(0.1).max(0.01) / 1.5;
    let hi = all.last().copied().unwrap_or(1000.0).max(lo * 10.0) * 1.5;

    let root = SVGBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("latency from send to durable at the recipient (ms, log scale)")
        .y_desc("share of delivered messages")
        .draw()
        .map_err(|x| e(&x))?;
    for (label, c, l) in lines {
        let n = l.len();
        let step = (n / CDF_POINTS).max(1);
        let points: Vec<(f64, f64)> = l
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i == n - 1)
            .map(|(i, v)| (*v, (i + 1) as f64 / n as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// The delivery ratio over time: per time bucket (`bucket`) the share of the messages sent in
/// it that were delivered by the end, the share of all messages sent so far that had arrived
/// by then, and the share of nodes running; the scenario's marks as vertical lines.
pub fn delivery_over_time(
    records: &[MessageRecord],
    changes: &[(Duration, usize, NodeChange)],
    nodes: usize,
    marks: &[(Duration, String)],
    bucket: Duration,
    title: &str,
    file: &FsPath,
) -> Result<(), PlotError> {
    let e = err(file);
    let measured: Vec<&MessageRecord> = records.iter().filter(|r| r.send.measured).collect();
    let start = measured
        .iter()
        .map(|r| r.send.sent)
        .min()
        .unwrap_or_default();
    let end = measured
        .iter()
        .map(|r| r.delivered.unwrap_or(r.send.returned).max(r.send.returned))
        .max()
        .unwrap_or(start + bucket)
        .max(start + bucket);
    let b = bucket.as_secs_f64().max(0.001);
    let x0 = start.as_secs_f64();
    let x1 = end.as_secs_f64() + b;
    let buckets = ((x1 - x0) / b).ceil() as usize;

    let mut eventually = Vec::new();
    let mut so_far = Vec::new();
    for k in 0..buckets {
        let lo = x0 + k as f64 * b;
        let hi = lo + b;
        let in_bucket: Vec<&&MessageRecord> = measured
            .iter()
            .filter(|r| (lo..hi).contains(&r.send.sent.as_secs_f64()))
            .collect();
        if !in_bucket.is_empty() {
            let ok = in_bucket.iter().filter(|r| r.delivered.is_some()).count();
            eventually.push((lo + b / 2.0, ok as f64 / in_bucket.len() as f64));
        }
        let sent = measured
            .iter()
            .filter(|r| r.send.sent.as_secs_f64() < hi)
            .count();
        if sent > 0 {
            let arrived = measured
                .iter()
                .filter(|r| r.send.sent.as_secs_f64() < hi)
                .filter(|r| r.delivered.is_some_and(|d| d.as_secs_f64() < hi))
                .count();
            so_far.push((hi, arrived as f64 / sent as f64));
        }
    }
    // Share of nodes running, as a step function.
    let mut running = Vec::new();
    let mut up = vec![false; nodes];
    let mut count = 0usize;
    for (at, node, change) in changes {
        if *node >= nodes {
            continue;
        }
        let now_up = matches!(change, NodeChange::Up);
        if up[*node] != now_up {
            up[*node] = now_up;
            if now_up {
                count += 1;
            } else {
                count -= 1;
            }
        }
        let t = at.as_secs_f64();
        if (x0..=x1).contains(&t) {
            if let Some(&(_, prev)) = running.last() {
                running.push((t, prev));
            }
            running.push((t, count as f64 / nodes.max(1) as f64));
        } else if t < x0 {
            running.clear();
            running.push((x0, count as f64 / nodes.max(1) as f64));
        }
    }
    if let Some(&(_, last)) = running.last() {
        running.push((x1, last));
    }
    let y_lo = eventually
        .iter()
        .chain(&so_far)
        .chain(&running)
        .map(|(_, y)| *y)
        .fold(1.0f64, f64::min);
    let y_lo = if y_lo > 0.9 { 0.9 } else { 0.0 };

    let root = SVGBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y_lo..1.005)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("time since the run started (s)")
        .y_desc("share")
        .draw()
        .map_err(|x| e(&x))?;
    #[allow(clippy::type_complexity)]
    let series: [(&str, RGBColor, &Vec<(f64, f64)>); 3] = [
        (
            "delivered by the end, of the messages sent in each interval",
            RGBColor(31, 119, 180),
            &eventually,
        ),
        (
            "arrived so far, of all messages sent so far",
            RGBColor(214, 39, 40),
            &so_far,
        ),
        ("nodes running", RGBColor(120, 120, 120), &running),
    ];
    for (label, c, points) in series {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    for (at, what) in marks {
        let t = at.as_secs_f64();
        if !(x0..=x1).contains(&t) {
            continue;
        }
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(t, y_lo), (t, 1.005)],
                BLACK.mix(0.4),
            )))
            .map_err(|x| e(&x))?;
        chart
            .draw_series(std::iter::once(Text::new(
                what.clone(),
                (t, y_lo + (1.0 - y_lo) * 0.03),
                ("sans-serif", 12),
            )))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
