//! The plot of the documentation: drain throughput of the relay next to its baselines, and
//! the commit-to-ack latency distribution of the relay and of the hand relay, as one SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::Scenario;
use crate::latency::QUANTILES;
use crate::report::Report;

const BAR_COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];
const SERIES: [(&str, &str); 5] = [
    ("relay", "relay_msgs_per_s"),
    ("raw publish", "raw_publish_msgs_per_s"),
    ("raw drain", "raw_drain_msgs_per_s"),
    ("hand, 1 worker", "hand1_msgs_per_s"),
    ("hand, 2 workers", "hand2_msgs_per_s"),
];
/// Width of one bar, in pair widths.
const BAR: f64 = 0.76 / SERIES.len() as f64;

/// Draws the plot to `path` (SVG).
pub(crate) fn draw(report: &Report, path: &Path) -> crate::Res<()> {
    let root = SVGBackend::new(path, (1280, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(760);
    throughput(report, &left)?;
    latency(report, &right)?;
    root.present()?;
    Ok(())
}

fn throughput<DB: DrawingBackend>(
    report: &Report,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> crate::Res<()>
where
    DB::ErrorType: 'static,
{
    let drains: Vec<(&str, [f64; SERIES.len()])> = report
        .entries
        .iter()
        .filter(|e| e.scenario == Scenario::Drain && e.value.get("ratio").is_some())
        .map(|e| {
            let values = SERIES.map(|(_, key)| e.value[key].as_f64().unwrap_or(0.0));
            (e.label.as_str(), values)
        })
        .collect();
    let top = drains
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0f64, f64::max)
        * 1.15;
    let labels: Vec<String> = drains.iter().map(|(l, _)| (*l).to_owned()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("Drain throughput (msg/s)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..drains.len().max(1) as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(drains.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let centre = x - x.floor();
            if (centre - 0.5).abs() < 0.01 {
                labels.get(x.floor() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()?;
    for (series, (name, _)) in SERIES.iter().enumerate() {
        let color = BAR_COLORS[series];
        chart
            .draw_series(drains.iter().enumerate().map(|(i, (_, values))| {
                let x0 = i as f64 + 0.12 + series as f64 * BAR;
                Rectangle::new(
                    [(x0, 0.0), (x0 + BAR * 0.92, values[series])],
                    color.filled(),
                )
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn latency<DB: DrawingBackend>(
    report: &Report,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> crate::Res<()>
where
    DB::ErrorType: 'static,
{
    let quantiles = |value: &serde_json::Value| -> Option<Vec<f64>> {
        let points = value.get("quantiles_ms")?.as_array()?;
        Some(
            points
                .iter()
                .filter_map(|p| p.get(1)?.as_f64())
                .map(|v| v.max(0.01))
                .collect(),
        )
    };
    let lines: Vec<(String, Vec<f64>)> = report
        .entries
        .iter()
        .filter(|e| e.scenario == Scenario::Latency)
        .flat_map(|e| {
            let relay = quantiles(&e.value).map(|v| (e.label.clone(), v));
            let hand = e
                .value
                .get("hand")
                .and_then(quantiles)
                .map(|v| (format!("{} (hand)", e.label), v));
            relay.into_iter().chain(hand)
        })
        .collect();
    let top = lines
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0f64, f64::max)
        * 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption("Commit-to-ack latency (ms)", ("sans-serif", 22))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0f64..(QUANTILES.len() - 1) as f64,
            (0.05f64..top).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_labels(QUANTILES.len())
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            QUANTILES
                .get(i)
                .map(|q| format!("p{}", q * 100.0))
                .unwrap_or_default()
        })
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    for (i, (label, values)) in lines.iter().enumerate() {
        let color = BAR_COLORS[i % BAR_COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                values.iter().enumerate().map(|(x, y)| (x as f64, *y)),
                color.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}
