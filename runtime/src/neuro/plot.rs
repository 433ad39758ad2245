//! Pictures of a simulation: the event raster (which neuron sent an event in which frame) and
//! each layer's activity over time, as PNG (plotters, with the font shipped in the repo).

use super::report::SimReport;
use super::sim::Recording;
use plotters::prelude::*;
use plotters::style::register_font;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

fn ensure_font() {
    FONT.call_once(|| {
        // DejaVu Sans (Bitstream Vera license, assets/fonts/LICENSE-DejaVu.txt).
        let bytes: &'static [u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
        let _ = register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {msg}")]
pub struct PlotError {
    pub path: String,
    pub msg: String,
}

fn color(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    PALETTE[i % PALETTE.len()]
}

/// One dot per event of batch row 0: x is the frame, y the neuron (layers stacked).
pub fn raster(path: &Path, rec: &Recording) -> Result<(), PlotError> {
    ensure_font();
    let err = |e: &dyn std::fmt::Display| PlotError { path: path.display().to_string(), msg: e.to_string() };
    let frames = rec.events.iter().map(|e| e.0).max().unwrap_or(0) + 1;
    let rows = rec.rows.iter().map(|(r, n)| r + n).max().unwrap_or(1).max(1);
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Event raster (batch row 0, {} events)", rec.events.len()), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..frames as f64, 0f64..rows as f64)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("frame").y_desc("neuron (layers stacked)").disable_mesh().draw().map_err(|e| err(&e))?;
    // Layer bands, then the events.
    for (i, &(r0, n)) in rec.rows.iter().enumerate() {
        let c = color(i).mix(0.06);
        chart.draw_series(std::iter::once(Rectangle::new([(0.0, r0 as f64), (frames as f64, (r0 + n) as f64)], c.filled()))).map_err(|e| err(&e))?;
    }
    let h = (rows as f64 / 800.0).max(0.5);
    chart
        .draw_series(rec.events.iter().map(|&(f, row, g)| {
            Rectangle::new([(f as f64 + 0.1, row as f64), (f as f64 + 0.9, row as f64 + h)], color(g as usize).filled())
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Per layer: the fraction of neurons that sent an event, frame by frame (batch row 0), and
/// the mean over the whole run from the report.
pub fn activity(path: &Path, rec: &Recording, report: &SimReport) -> Result<(), PlotError> {
    ensure_font();
    let err = |e: &dyn std::fmt::Display| PlotError { path: path.display().to_string(), msg: e.to_string() };
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(450);
    let frames = rec.activity.iter().flat_map(|a| a.last()).map(|&(f, _)| f as usize + 1).max().unwrap_or(1).max(1);
    // Token-rate layers have a point per token, frame-rate layers one per frame.
    let series: Vec<Vec<(f64, f64)>> = rec
        .activity
        .iter()
        .zip(&rec.rows)
        .map(|(a, &(_, n))| a.iter().map(|&(f, k)| (f as f64, k as f64 / n.max(1) as f64)).collect())
        .collect();
    let ymax = series.iter().flatten().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let mut chart = ChartBuilder::on(&top)
        .caption("Activity per layer over time (events per neuron per frame, batch row 0)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..frames as f64, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("frame").y_desc("event rate").light_line_style(RGBColor(235, 235, 235)).draw().map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(rec.names[i].clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    if series.len() <= 12 {
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 11)).draw().map_err(|e| err(&e))?;
    }
    // Mean event rate per layer as bars.
    let n = report.layers.len().max(1);
    let bmax = report.layers.iter().map(|l| l.event_rate).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut bars = ChartBuilder::on(&bottom)
        .caption("Mean event rate per layer (1 - fraction of suppressed zero payloads)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..bmax)
        .map_err(|e| err(&e))?;
    bars.configure_mesh()
        .x_desc("layer (see the report for names)")
        .y_desc("events / payloads")
        .x_labels(n.min(40))
        .x_label_formatter(&|x| format!("{}", *x as usize))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    bars.draw_series(report.layers.iter().enumerate().map(|(i, l)| Rectangle::new([(i as f64 + 0.1, 0.0), (i as f64 + 0.9, l.event_rate)], color(i).filled())))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
