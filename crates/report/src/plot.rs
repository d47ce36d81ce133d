//! Drawing with plotters in one house style: line charts, grouped bar
//! charts and horizontal bar charts, to PNG or SVG by the file's extension.
//!
//! Text uses DejaVu Sans embedded in the crate (no system fonts). Legends sit
//! in their own area right of the plot, in as many columns as they need;
//! tick labels are thinned to the space they have; colors come from a
//! 10-color palette, and past 10 series lines also change dash and marker.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::chart::MeshStyle;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, FontTransform, RGBColor};

use crate::util::{general, tick};

const FONT: &str = "sans-serif";
const TITLE_SIZE: u32 = 26;
const DESC_SIZE: u32 = 19;
const TICK_SIZE: u32 = 16;
const LEGEND_SIZE: u32 = 16;
const VALUE_SIZE: u32 = 14;
const ROW_H: u32 = 24;
const TITLE_H: u32 = 56;
const LEGEND_MAX_CHARS: usize = 44;

static REGULAR: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static BOLD: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-Bold.ttf");

/// Register the embedded fonts once (plotters' bitmap backend needs them).
pub fn init_fonts() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, REGULAR).is_ok()
            && register_font(FONT, FontStyle::Bold, BOLD).is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the embedded DejaVu Sans font could not be loaded")
    }
}

/// matplotlib's tab10: distinct, readable on white.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dash {
    Solid,
    Dashed,
    Dotted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    None,
    Circle,
    Triangle,
    Square,
    Cross,
    Diamond,
}

/// How series number `i` is drawn; the same `i` gives the same look in
/// every graph, which keeps a run's color across a report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Style {
    pub color: RGBColor,
    pub dash: Dash,
    pub marker: Marker,
    /// Color for bars (darker or lighter past the first 10).
    pub fill: RGBColor,
}

impl Style {
    pub fn nth(i: usize) -> Style {
        let base = PALETTE[i % PALETTE.len()];
        let k = i / PALETTE.len();
        let (dash, marker) = match k % 6 {
            0 => (Dash::Solid, Marker::None),
            1 => (Dash::Dashed, Marker::Circle),
            2 => (Dash::Dotted, Marker::Triangle),
            3 => (Dash::Solid, Marker::Square),
            4 => (Dash::Dashed, Marker::Cross),
            _ => (Dash::Dotted, Marker::Diamond),
        };
        let shade = |c: RGBColor, f: f64, toward: u8| {
            let m = |x: u8| (x as f64 + (toward as f64 - x as f64) * f).round() as u8;
            RGBColor(m(c.0), m(c.1), m(c.2))
        };
        let fill = match k % 4 {
            0 => base,
            1 => shade(base, 0.4, 0),
            2 => shade(base, 0.45, 255),
            _ => shade(base, 0.65, 0),
        };
        Style { color: base, dash, marker, fill }
    }
}

/// One line of a line chart.
#[derive(Clone, Debug)]
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

/// A line chart: lines over a numeric x axis, with optional horizontal
/// reference lines (dashed, in the legend).
#[derive(Clone, Debug, Default)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    /// `(name, y, style)`: a dashed horizontal line across the plot.
    pub hlines: Vec<(String, f64, Style)>,
    /// Logarithmic y axis (values <= 0 are left out).
    pub log_y: bool,
    /// Markers at every point (else only on short lines and past 10 series).
    pub markers: bool,
    /// Heading over the legend (`cell`, `method`).
    pub legend_title: Option<String>,
    /// Canvas size in pixels; `None`: sized to fit the legend.
    pub size: Option<(u32, u32)>,
}

/// One series of a grouped bar chart: a value (or none) per group.
#[derive(Clone, Debug)]
pub struct Bars {
    pub name: String,
    pub values: Vec<Option<f64>>,
    /// Optional `(low, high)` whiskers per group (e.g. min and max of repeats).
    pub ranges: Vec<Option<(f64, f64)>>,
    pub style: Style,
}

/// Grouped vertical bars: for each group, one bar per series that has a value.
#[derive(Clone, Debug, Default)]
pub struct BarPlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub groups: Vec<String>,
    pub bars: Vec<Bars>,
    pub hlines: Vec<(String, f64, Style)>,
    /// Text over each bar; `None`: no value labels.
    pub value_fmt: Option<fn(f64) -> String>,
    pub legend_title: Option<String>,
    pub size: Option<(u32, u32)>,
}

/// Horizontal bars, one per labelled item (runs), labels left of the axis.
#[derive(Clone, Debug, Default)]
pub struct HBarPlot {
    pub title: String,
    pub x_label: String,
    pub labels: Vec<String>,
    pub values: Vec<Option<f64>>,
    pub styles: Vec<Style>,
    pub value_fmt: Option<fn(f64) -> String>,
    pub size: Option<(u32, u32)>,
}

/// A drawable figure.
pub trait Plot {
    /// Canvas size in pixels.
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

fn de<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// Pixel width of `text` at `size`.
pub fn text_width(text: &str, size: u32) -> u32 {
    let _ = init_fonts();
    (FONT, size)
        .into_font()
        .box_size(text)
        .map(|(w, _)| w)
        .unwrap_or((text.chars().count() as u32) * size * 6 / 10)
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max - 1).collect::<String>())
    }
}

/// Save `plot` to `path`: PNG or SVG by the extension.
pub fn save<P: Plot>(plot: &P, path: &Path) -> Result<()> {
    init_fonts()?;
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if ext != "png" && ext != "svg" {
        bail!("{}: graphs are written as .png or .svg", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let (w, h) = plot.size();
    let (w, h) = (w.clamp(200, 8000), h.clamp(150, 8000));
    let run = || -> Result<()> {
        if ext == "png" {
            let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
            root.fill(&WHITE).map_err(de)?;
            plot.draw(&root)?;
            root.present().map_err(de)
        } else {
            let root = SVGBackend::new(path, (w, h)).into_drawing_area();
            root.fill(&WHITE).map_err(de)?;
            plot.draw(&root)?;
            root.present().map_err(de)
        }
    };
    let res = match catch_unwind(AssertUnwindSafe(run)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow!("the plotting library failed: {msg}"))
        }
    };
    if let Err(e) = res {
        let _ = std::fs::remove_file(path);
        return Err(e.context(format!("{}", path.display())));
    }
    Ok(())
}

/// A square logo (the Jupyter kernelspec's `logo-SIZExSIZE.png`): "knlp"
/// in white on the house blue.
pub fn logo(path: &Path, size: u32) -> Result<()> {
    init_fonts()?;
    let run = || -> Result<()> {
        let root = BitMapBackend::new(path, (size, size)).into_drawing_area();
        root.fill(&RGBColor(31, 119, 180)).map_err(de)?;
        let font = ("sans-serif", (size as f64 * 0.36).max(6.0)).into_font().color(&WHITE);
        let style = font.pos(Pos::new(HPos::Center, VPos::Center));
        root.draw_text("knlp", &style, (size as i32 / 2, size as i32 / 2)).map_err(de)?;
        root.present().map_err(de)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(r) => r.with_context(|| format!("{}", path.display())),
        Err(_) => Err(anyhow!("{}: the plotting library failed", path.display())),
    }
}

/// What a legend entry shows next to its name.
#[derive(Clone, Copy, PartialEq)]
enum Sample {
    Line(Style, bool),
    HLine(Style),
    Box(Style),
}

struct Legend {
    entries: Vec<(String, Sample)>,
    title: Option<String>,
    rows: usize,
    col_w: u32,
    width: u32,
}

impl Legend {
    /// Lay out entries in columns that fit `avail_h`; at most 3 columns,
    /// beyond that the canvas must grow (`height_for`).
    fn new(entries: Vec<(String, Sample)>, title: Option<String>, avail_h: u32) -> Legend {
        let entries: Vec<(String, Sample)> = entries
            .into_iter()
            .filter(|(n, _)| !n.is_empty())
            .map(|(n, s)| (clip(&n, LEGEND_MAX_CHARS), s))
            .collect();
        if entries.is_empty() {
            return Legend { entries, title, rows: 0, col_w: 0, width: 0 };
        }
        let title_rows = u32::from(title.is_some());
        let fit = (avail_h.saturating_sub(24) / ROW_H).saturating_sub(title_rows).max(1) as usize;
        let n = entries.len();
        let cols = n.div_ceil(fit).clamp(1, 3);
        let rows = n.div_ceil(cols);
        let text_w = entries.iter().map(|(n, _)| text_width(n, LEGEND_SIZE)).max().unwrap_or(0);
        let title_w = title.as_deref().map(|t| text_width(t, LEGEND_SIZE)).unwrap_or(0);
        let col_w = (44 + text_w + 18).max(title_w + 24);
        Legend { entries, title, rows, col_w, width: col_w * cols as u32 + 16 }
    }

    fn height(&self) -> u32 {
        (self.rows as u32 + u32::from(self.title.is_some())) * ROW_H + 16
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, top: i32) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let x0 = 4;
        let box_w = self.width as i32 - 12;
        area.draw(&Rectangle::new(
            [(x0, top), (x0 + box_w, top + self.height() as i32)],
            ShapeStyle { color: RGBColor(200, 200, 200).to_rgba(), filled: false, stroke_width: 1 },
        ))
        .map_err(de)?;
        let text = |bold: bool| {
            let f = (FONT, LEGEND_SIZE).into_font();
            let f = if bold { f.style(FontStyle::Bold) } else { f };
            f.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center))
        };
        let mut y_start = top + 8 + ROW_H as i32 / 2;
        if let Some(t) = &self.title {
            area.draw(&Text::new(t.clone(), (x0 + 10, y_start), text(true))).map_err(de)?;
            y_start += ROW_H as i32;
        }
        for (k, (name, sample)) in self.entries.iter().enumerate() {
            let (c, r) = (k / self.rows, k % self.rows);
            let x = x0 + 10 + (c as u32 * self.col_w) as i32;
            let y = y_start + (r as u32 * ROW_H) as i32;
            match *sample {
                Sample::Line(st, marker) => {
                    draw_sample_line(area, (x, y), 34, st.color, st.dash)?;
                    if marker || st.marker != Marker::None {
                        let m = if st.marker == Marker::None { Marker::Circle } else { st.marker };
                        draw_marker_px(area, (x + 17, y), m, st.color)?;
                    }
                }
                Sample::HLine(st) => draw_sample_line(area, (x, y), 34, st.color, Dash::Dashed)?,
                Sample::Box(st) => {
                    area.draw(&Rectangle::new([(x + 6, y - 8), (x + 28, y + 8)], st.fill.filled()))
                        .map_err(de)?;
                }
            }
            area.draw(&Text::new(name.clone(), (x + 44, y), text(false))).map_err(de)?;
        }
        Ok(())
    }
}

fn line_style(c: RGBColor, w: u32) -> ShapeStyle {
    ShapeStyle { color: c.to_rgba(), filled: false, stroke_width: w }
}

fn draw_sample_line<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    len: i32,
    color: RGBColor,
    dash: Dash,
) -> Result<()> {
    let segs: Vec<(i32, i32)> = match dash {
        Dash::Solid => vec![(0, len)],
        Dash::Dashed => (0..len).step_by(12).map(|s| (s, (s + 8).min(len))).collect(),
        Dash::Dotted => (0..len).step_by(6).map(|s| (s, (s + 2).min(len))).collect(),
    };
    for (a, b) in segs {
        area.draw(&PathElement::new(vec![(x + a, y), (x + b, y)], line_style(color, 3))).map_err(de)?;
    }
    Ok(())
}

/// A marker at a pixel position of `area`.
fn draw_marker_px<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: (i32, i32),
    m: Marker,
    c: RGBColor,
) -> Result<()> {
    let r = match m {
        Marker::None => Ok(()),
        Marker::Circle => area.draw(&Circle::new(p, 4, c.filled())),
        Marker::Triangle => area.draw(&TriangleMarker::new(p, 6, c.filled())),
        Marker::Square => area.draw(&Rectangle::new([(p.0 - 4, p.1 - 4), (p.0 + 4, p.1 + 4)], c.filled())),
        Marker::Cross => area.draw(&Cross::new(p, 5, line_style(c, 2))),
        Marker::Diamond => area.draw(&Polygon::new(
            vec![(p.0, p.1 - 6), (p.0 + 6, p.1), (p.0, p.1 + 6), (p.0 - 6, p.1)],
            c.filled(),
        )),
    };
    r.map_err(de)
}

/// Title centered at the top; returns the area below it.
fn titled<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str) -> Result<DrawingArea<DB, Shift>> {
    let (top, body) = root.split_vertically(TITLE_H);
    let (w, _) = top.dim_in_pixel();
    let style = (FONT, TITLE_SIZE)
        .into_font()
        .style(FontStyle::Bold)
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    top.draw(&Text::new(clip(title, 90), (w as i32 / 2, TITLE_H as i32 / 2 + 2), style)).map_err(de)?;
    Ok(body)
}

/// `[lo, hi]` padded by 5% (never empty).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() < 1e-12 {
        let d = if lo.abs() > 1e-12 { lo.abs() * 0.1 } else { 1.0 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * 0.05;
    (lo - d, hi + d)
}

fn bounds(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    vals.filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((a, b)) => Some((a.min(v), b.max(v))),
    })
}

/// Width of the y tick labels area for values in `[lo, hi]`.
fn y_label_width(lo: f64, hi: f64, fmt: &dyn Fn(f64) -> String) -> u32 {
    let w = (0..=10)
        .map(|i| fmt(lo + (hi - lo) * i as f64 / 10.0))
        .map(|s| text_width(&s, TICK_SIZE))
        .max()
        .unwrap_or(40);
    w + 16 + DESC_SIZE + 16
}

impl LinePlot {
    fn legend(&self, avail_h: u32) -> Legend {
        let mut entries: Vec<(String, Sample)> = self
            .lines
            .iter()
            .filter(|l| !l.points.is_empty())
            .map(|l| (l.name.clone(), Sample::Line(l.style, self.markers || l.points.len() <= 30)))
            .collect();
        entries.extend(self.hlines.iter().map(|(n, _, s)| (n.clone(), Sample::HLine(*s))));
        Legend::new(entries, self.legend_title.clone(), avail_h)
    }

    fn visible(&self, p: &(f64, f64)) -> bool {
        p.0.is_finite() && p.1.is_finite() && (!self.log_y || p.1 > 0.0)
    }
}

/// Canvas for a plot area of about 920 x 600 plus its legend.
fn auto_size(size: Option<(u32, u32)>, legend_of: &dyn Fn(u32) -> Legend) -> (u32, u32) {
    if let Some(s) = size {
        return s;
    }
    let h = 660;
    let legend = legend_of(h - TITLE_H);
    let h = h.max(legend.height() + TITLE_H + 40);
    (920 + legend.width, h)
}

/// Round values (1, 2 or 5 times a power of ten apart) in `[lo, hi]`:
/// the most of them up to `max_n`, and at least 3.
fn even_ticks(lo: f64, hi: f64, max_n: usize) -> Option<Vec<f64>> {
    let base = 10f64.powf((hi - lo).log10().floor() - 2.0);
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0].iter().map(|m| m * base).find_map(|step| {
        let first = (lo / step).ceil() as i64;
        let last = (hi / step).floor() as i64;
        let n = (last - first + 1).max(0) as usize;
        (3..=max_n.max(3)).contains(&n).then(|| (first..=last).map(|i| i as f64 * step).collect())
    })
}

/// The house style of every chart's axes, ticks and grid.
fn house_mesh<X: Ranged, Y: Ranged, DB: DrawingBackend>(m: &mut MeshStyle<'_, '_, X, Y, DB>) {
    m.label_style((FONT, TICK_SIZE))
        .axis_desc_style((FONT, DESC_SIZE))
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(RGBColor(245, 245, 245))
        .max_light_lines(1)
        .axis_style(RGBColor(90, 90, 90));
}

/// Tick values for a log axis over `[lo, hi]`: 1-2-5 steps, fewer when
/// crowded, every digit when the range is narrow.
pub fn log_ticks(lo: f64, hi: f64, max_n: usize) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let (k0, k1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let make = |mults: &[f64], every: i32| -> Vec<f64> {
        (k0..=k1)
            .filter(|k| (k - k0) % every == 0)
            .flat_map(|k| mults.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|v| *v >= lo * (1.0 - 1e-9) && *v <= hi * (1.0 + 1e-9))
            .collect()
    };
    let digits: Vec<f64> = (1..10).map(f64::from).collect();
    for mults in [&digits[..], &[1.0, 2.0, 5.0], &[1.0, 3.0], &[1.0]] {
        let t = make(mults, 1);
        if t.len() <= max_n && (t.len() >= 3 || mults.len() == 1) {
            return t;
        }
        if t.len() < 3 && mults.len() == 9 {
            // Too narrow for whole digits (900 to 1900, say): evenly
            // spaced round values read better than two ticks.
            return even_ticks(lo, hi, max_n).filter(|e| e.len() > t.len()).unwrap_or(t);
        }
    }
    let mut every = 2;
    loop {
        let t = make(&[1.0], every);
        if t.len() <= max_n || every > 100 {
            return t;
        }
        every += 1;
    }
}

impl Plot for LinePlot {
    fn size(&self) -> (u32, u32) {
        auto_size(self.size, &|h| self.legend(h))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let body = titled(root, &self.title)?;
        let (bw, bh) = body.dim_in_pixel();
        let legend = self.legend(bh);
        let plot_w = bw.saturating_sub(legend.width).max(bw / 2);
        let (plot_area, legend_area) = body.split_horizontally(plot_w);
        let pts = self.lines.iter().flat_map(|l| l.points.iter()).filter(|p| self.visible(p));
        let (xb, yb) = (bounds(pts.clone().map(|p| p.0)), bounds(pts.map(|p| p.1)));
        let hl = self.hlines.iter().map(|h| h.1).filter(|y| !self.log_y || *y > 0.0);
        let yb = bounds(yb.into_iter().flat_map(|(a, b)| [a, b]).chain(hl));
        let Some(((x0, x1), (ylo, yhi))) = xb.zip(yb) else {
            return no_data(&plot_area);
        };
        let (x0, x1) = if (x1 - x0).abs() < 1e-12 {
            padded(x0, x1)
        } else {
            let d = (x1 - x0) * 0.02;
            (x0 - d, x1 + d)
        };
        let n_x = (plot_w / 110).clamp(2, 12) as usize;
        let n_y = (bh / 60).clamp(3, 12) as usize;
        let x_step = (x1 - x0) / n_x as f64;
        // A log axis is drawn as log10 of the values on a linear axis, with
        // ticks placed here (1-2-5) rather than by plotters.
        let (y0, y1, ticks) = if self.log_y {
            let (a, b) = (ylo.log10(), yhi.log10());
            let pad = if (b - a).abs() < 1e-9 { 0.1 } else { (b - a) * 0.05 };
            let t = log_ticks(10f64.powf(a - pad), 10f64.powf(b + pad), n_y);
            (a - pad, b + pad, t)
        } else {
            let (a, b) = padded(ylo, yhi);
            (a, b, Vec::new())
        };
        let y_step = (y1 - y0) / n_y as f64;
        let y_fmt = move |v: &f64| tick(*v, y_step);
        let ylab = if self.log_y {
            ticks.iter().map(|t| text_width(&general(*t), TICK_SIZE)).max().unwrap_or(30)
                + 16
                + DESC_SIZE
                + 16
        } else {
            y_label_width(y0, y1, &|v| tick(v, y_step))
        };
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(12)
            .margin_right(24)
            .x_label_area_size(64)
            .y_label_area_size(ylab)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(de)?;
        {
            let x_fmt = |v: &f64| tick(*v, x_step);
            let mut mesh = chart.configure_mesh();
            mesh.x_desc(self.x_label.as_str())
                .y_desc(self.y_label.as_str())
                .x_labels(n_x)
                .x_label_formatter(&x_fmt);
            house_mesh(&mut mesh);
            if self.log_y {
                mesh.disable_y_mesh().y_labels(0);
            } else {
                mesh.y_labels(n_y).y_label_formatter(&y_fmt);
            }
            mesh.draw().map_err(de)?;
        }
        if self.log_y {
            let grid = line_style(RGBColor(218, 218, 218), 1);
            let st = (FONT, TICK_SIZE).into_font().color(&BLACK).pos(Pos::new(HPos::Right, VPos::Center));
            for t in &ticks {
                let ly = t.log10();
                chart.draw_series([PathElement::new(vec![(x0, ly), (x1, ly)], grid)]).map_err(de)?;
                let p = chart.backend_coord(&(x0, ly));
                root.draw(&PathElement::new(
                    vec![(p.0 - 5, p.1), (p.0, p.1)],
                    line_style(RGBColor(90, 90, 90), 1),
                ))
                .map_err(de)?;
                root.draw(&Text::new(general(*t), (p.0 - 9, p.1), st.clone())).map_err(de)?;
            }
        }
        self.series(&mut chart, x0, x1)?;
        legend.draw(&legend_area, 10)
    }
}

fn no_data<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let style = (FONT, DESC_SIZE)
        .into_font()
        .color(&RGBColor(120, 120, 120))
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), style)).map_err(de)
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

impl LinePlot {
    fn series<DB: DrawingBackend>(&self, chart: &mut Chart<DB>, x0: f64, x1: f64) -> Result<()> {
        let ty = |y: f64| if self.log_y { y.log10() } else { y };
        for (_, y, st) in &self.hlines {
            if self.log_y && *y <= 0.0 {
                continue;
            }
            let y = ty(*y);
            chart
                .draw_series(DashedLineSeries::new(vec![(x0, y), (x1, y)], 10, 7, line_style(st.color, 2)))
                .map_err(de)?;
        }
        let n_lines = self.lines.len().max(1);
        for (li, l) in self.lines.iter().enumerate() {
            let pts: Vec<(f64, f64)> =
                l.points.iter().copied().filter(|p| self.visible(p)).map(|(x, y)| (x, ty(y))).collect();
            if pts.is_empty() {
                continue;
            }
            let ss = line_style(l.style.color, 2);
            match l.style.dash {
                Dash::Solid => chart.draw_series(LineSeries::new(pts.clone(), ss)).map(|_| ()),
                Dash::Dashed => chart.draw_series(DashedLineSeries::new(pts.clone(), 10, 6, ss)).map(|_| ()),
                Dash::Dotted => chart.draw_series(DashedLineSeries::new(pts.clone(), 3, 5, ss)).map(|_| ()),
            }
            .map_err(de)?;
            let all = self.markers || pts.len() <= 30;
            let marker = match l.style.marker {
                Marker::None if all => Marker::Circle,
                m => m,
            };
            if marker == Marker::None {
                continue;
            }
            // Sparse markers on long lines, staggered so lines do not hide each other's.
            let every = if all { 1 } else { (pts.len() / 8).max(1) };
            let offset = if all { 0 } else { (li * every / n_lines) % every };
            let chosen: Vec<(f64, f64)> = pts.iter().copied().skip(offset).step_by(every).collect();
            chart_markers(chart, chosen, marker, l.style.color)?;
        }
        Ok(())
    }
}

/// Markers at data points of a chart.
fn chart_markers<DB: DrawingBackend>(
    chart: &mut Chart<DB>,
    pts: Vec<(f64, f64)>,
    m: Marker,
    c: RGBColor,
) -> Result<()> {
    let it = pts.into_iter();
    let r = match m {
        Marker::None => return Ok(()),
        Marker::Circle => chart
            .draw_series(it.map(|p| EmptyElement::at(p) + Circle::new((0, 0), 5, c.filled())))
            .map(|_| ()),
        Marker::Triangle => chart
            .draw_series(it.map(|p| EmptyElement::at(p) + TriangleMarker::new((0, 0), 6, c.filled())))
            .map(|_| ()),
        Marker::Square => chart
            .draw_series(it.map(|p| EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], c.filled())))
            .map(|_| ()),
        Marker::Cross => chart
            .draw_series(it.map(|p| EmptyElement::at(p) + Cross::new((0, 0), 5, line_style(c, 2))))
            .map(|_| ()),
        Marker::Diamond => chart
            .draw_series(it.map(|p| {
                EmptyElement::at(p) + Polygon::new(vec![(0, -6), (6, 0), (0, 6), (-6, 0)], c.filled())
            }))
            .map(|_| ()),
    };
    r.map_err(de)
}

impl BarPlot {
    fn legend(&self, avail_h: u32) -> Legend {
        let mut entries: Vec<(String, Sample)> = self
            .bars
            .iter()
            .filter(|b| b.values.iter().any(Option::is_some))
            .map(|b| (b.name.clone(), Sample::Box(b.style)))
            .collect();
        entries.extend(self.hlines.iter().map(|(n, _, s)| (n.clone(), Sample::HLine(*s))));
        Legend::new(entries, self.legend_title.clone(), avail_h)
    }
}

/// Group label font and whether labels must be rotated to fit `group_px`.
fn group_labels_rotated(groups: &[String], group_px: f64) -> (bool, u32) {
    let w = groups.iter().map(|g| text_width(&clip(g, 40), TICK_SIZE)).max().unwrap_or(0);
    (w as f64 > group_px - 6.0, w)
}

impl Plot for BarPlot {
    fn size(&self) -> (u32, u32) {
        let (w, h) = auto_size(self.size, &|h| self.legend(h));
        if self.size.is_some() {
            return (w, h);
        }
        // Rotated group labels need more height.
        let group_px = 800.0 / self.groups.len().max(1) as f64;
        let (rot, lw) = group_labels_rotated(&self.groups, group_px);
        (w, if rot { h + lw.min(300) } else { h })
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let body = titled(root, &self.title)?;
        let (bw, bh) = body.dim_in_pixel();
        let legend = self.legend(bh);
        let plot_w = bw.saturating_sub(legend.width).max(bw / 2);
        let (plot_area, legend_area) = body.split_horizontally(plot_w);
        let n = self.groups.len();
        let vals = self.bars.iter().flat_map(|b| {
            b.values.iter().flatten().copied().chain(b.ranges.iter().flatten().flat_map(|(a, c)| [*a, *c]))
        });
        let Some((lo, hi)) = bounds(vals.chain(self.hlines.iter().map(|h| h.1))) else {
            return no_data(&plot_area);
        };
        if n == 0 {
            return no_data(&plot_area);
        }
        let y0 = lo.min(0.0);
        let y1 = if hi > 0.0 { hi * 1.12 } else { 1.0 };
        let y0 = if y0 < 0.0 { y0 * 1.25 } else { 0.0 };
        let n_y = (bh / 60).clamp(3, 12) as usize;
        let y_step = (y1 - y0) / n_y as f64;
        let ylab = y_label_width(y0, y1, &|v| tick(v, y_step));
        let group_px = (plot_w.saturating_sub(ylab + 40)) as f64 / n as f64;
        let (rotate, label_w) = group_labels_rotated(&self.groups, group_px);
        let x_area = if rotate { label_w.min(300) + 24 + DESC_SIZE + 12 } else { 32 + DESC_SIZE + 12 };
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(12)
            .margin_right(24)
            .x_label_area_size(x_area)
            .y_label_area_size(ylab)
            .build_cartesian_2d(0f64..n as f64, y0..y1)
            .map_err(de)?;
        let fmt = |v: &f64| tick(*v, y_step);
        let mut mesh = chart.configure_mesh();
        mesh.disable_x_mesh()
            .x_labels(0)
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .y_labels(n_y)
            .y_label_formatter(&fmt);
        house_mesh(&mut mesh);
        mesh.draw().map_err(de)?;
        let max_k = (0..n)
            .map(|g| self.bars.iter().filter(|b| b.values.get(g).copied().flatten().is_some()).count())
            .max()
            .unwrap_or(1)
            .max(1);
        let bar_w = (0.8 / max_k as f64).min(0.3);
        let value_style = (FONT, VALUE_SIZE)
            .into_font()
            .color(&RGBColor(40, 40, 40))
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        let mut value_labels: Vec<(String, (i32, i32), bool)> = Vec::new();
        for g in 0..n {
            let present: Vec<(&Bars, f64)> =
                self.bars.iter().filter_map(|b| b.values.get(g).copied().flatten().map(|v| (b, v))).collect();
            let start = g as f64 + 0.5 - present.len() as f64 * bar_w / 2.0;
            for (j, (b, v)) in present.iter().enumerate() {
                let (a, c) = (start + j as f64 * bar_w, start + (j + 1) as f64 * bar_w);
                let gap = bar_w * 0.08;
                chart
                    .draw_series([Rectangle::new([(a + gap, 0.0), (c - gap, *v)], b.style.fill.filled())])
                    .map_err(de)?;
                let mid = (a + c) / 2.0;
                let mut top = *v;
                if let Some(Some((lo, hi))) = b.ranges.get(g) {
                    let cap = bar_w * 0.18;
                    let ws = line_style(RGBColor(30, 30, 30), 2);
                    chart
                        .draw_series([
                            PathElement::new(vec![(mid, *lo), (mid, *hi)], ws),
                            PathElement::new(vec![(mid - cap, *lo), (mid + cap, *lo)], ws),
                            PathElement::new(vec![(mid - cap, *hi), (mid + cap, *hi)], ws),
                        ])
                        .map_err(de)?;
                    top = top.max(*hi);
                }
                if let Some(f) = self.value_fmt {
                    let text = f(*v);
                    let pitch = chart.backend_coord(&(c, 0.0)).0 - chart.backend_coord(&(a, 0.0)).0;
                    // Horizontal when it fits the bar's width, else upright;
                    // under the end of a negative bar.
                    let upright = text_width(&text, VALUE_SIZE) as i32 + 8 > pitch;
                    let below = *v < 0.0 && b.ranges.get(g).copied().flatten().is_none();
                    let p = chart.backend_coord(&(mid, if below { *v } else { top.max(0.0) }));
                    let h = if upright { text_width(&text, VALUE_SIZE) as i32 } else { VALUE_SIZE as i32 };
                    let y = if below { p.1 + 5 + h } else { p.1 - 5 };
                    if !upright || pitch >= VALUE_SIZE as i32 + 2 {
                        value_labels.push((text, (p.0, y), upright));
                    }
                }
            }
        }
        // Baselines over the bars, value labels over both (on a white box).
        for (_, y, st) in &self.hlines {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, *y), (n as f64, *y)],
                    10,
                    7,
                    line_style(st.color, 2),
                ))
                .map_err(de)?;
        }
        for (text, (x, y), upright) in value_labels {
            let w = text_width(&text, VALUE_SIZE) as i32;
            let h = VALUE_SIZE as i32;
            if upright {
                // Glyphs sit about 3 px left of the anchor's center when rotated.
                root.draw(&Rectangle::new(
                    [(x - h / 2 + 1, y - w - 2), (x + h / 2 + 1, y + 1)],
                    WHITE.filled(),
                ))
                .map_err(de)?;
                let st = (FONT, VALUE_SIZE)
                    .into_font()
                    .transform(FontTransform::Rotate270)
                    .color(&RGBColor(40, 40, 40))
                    .pos(Pos::new(HPos::Left, VPos::Center));
                root.draw(&Text::new(text, (x + 3, y), st)).map_err(de)?;
            } else {
                root.draw(&Rectangle::new(
                    [(x - w / 2 - 2, y - h - 1), (x + w / 2 + 2, y + 1)],
                    WHITE.filled(),
                ))
                .map_err(de)?;
                root.draw(&Text::new(text, (x, y), value_style.clone())).map_err(de)?;
            }
        }
        for g in 0..n {
            // The group's label under the axis.
            let p = chart.backend_coord(&(g as f64 + 0.5, y0));
            let label = clip(&self.groups[g], 40);
            if rotate {
                let st = (FONT, TICK_SIZE)
                    .into_font()
                    .transform(FontTransform::Rotate90)
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Left, VPos::Center));
                root.draw(&Text::new(label, (p.0, p.1 + 8), st)).map_err(de)?;
            } else {
                let st = (FONT, TICK_SIZE).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
                root.draw(&Text::new(label, (p.0, p.1 + 8), st)).map_err(de)?;
            }
        }
        legend.draw(&legend_area, 10)
    }
}

impl Plot for HBarPlot {
    fn size(&self) -> (u32, u32) {
        if let Some(s) = self.size {
            return s;
        }
        let label_w = self.labels.iter().map(|l| text_width(&clip(l, 48), TICK_SIZE)).max().unwrap_or(0);
        ((760 + label_w).max(900), (self.labels.len() as u32 * 30 + TITLE_H + 130).max(340))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let body = titled(root, &self.title)?;
        let n = self.labels.len();
        let Some((_, hi)) = bounds(self.values.iter().flatten().copied()) else {
            return no_data(&body);
        };
        let x1 = if hi > 0.0 { hi * 1.2 } else { 1.0 };
        let label_w = self.labels.iter().map(|l| text_width(&clip(l, 48), TICK_SIZE)).max().unwrap_or(0);
        let (bw, _) = body.dim_in_pixel();
        let n_x = (bw.saturating_sub(label_w) / 110).clamp(2, 10) as usize;
        let x_step = x1 / n_x as f64;
        let mut chart = ChartBuilder::on(&body)
            .margin(12)
            .margin_right(30)
            .x_label_area_size(30 + DESC_SIZE + 10)
            .y_label_area_size(label_w + 20)
            .build_cartesian_2d(0f64..x1, 0f64..n as f64)
            .map_err(de)?;
        let fmt = |v: &f64| tick(*v, x_step);
        let mut mesh = chart.configure_mesh();
        mesh.disable_y_mesh().y_labels(0).x_labels(n_x).x_desc(self.x_label.as_str()).x_label_formatter(&fmt);
        house_mesh(&mut mesh);
        mesh.draw().map_err(de)?;
        let label_style =
            (FONT, TICK_SIZE).into_font().color(&BLACK).pos(Pos::new(HPos::Right, VPos::Center));
        let value_style =
            (FONT, 14).into_font().color(&RGBColor(40, 40, 40)).pos(Pos::new(HPos::Left, VPos::Center));
        for (i, label) in self.labels.iter().enumerate() {
            let yc = n as f64 - i as f64 - 0.5;
            let st = self.styles.get(i).copied().unwrap_or_else(|| Style::nth(i));
            let p = chart.backend_coord(&(0.0, yc));
            root.draw(&Text::new(clip(label, 48), (p.0 - 8, p.1), label_style.clone())).map_err(de)?;
            match self.values.get(i).copied().flatten() {
                Some(v) => {
                    let v = v.max(0.0);
                    chart
                        .draw_series([Rectangle::new([(0.0, yc - 0.36), (v, yc + 0.36)], st.fill.filled())])
                        .map_err(de)?;
                    if let Some(f) = self.value_fmt {
                        let q = chart.backend_coord(&(v, yc));
                        root.draw(&Text::new(f(v), (q.0 + 6, q.1), value_style.clone())).map_err(de)?;
                    }
                }
                None => {
                    root.draw(&Text::new("n/a", (p.0 + 6, p.1), value_style.clone())).map_err(de)?;
                }
            }
        }
        Ok(())
    }
}
