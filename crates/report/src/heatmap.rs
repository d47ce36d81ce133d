//! Heatmaps: a matrix of values as colored cells, with row and column
//! labels, a color bar, and several panels in one figure (one per layer).
//!
//! Drawn in pixel coordinates (no chart mesh), in the house style of
//! [`crate::plot`]: embedded DejaVu fonts, PNG and SVG side by side.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, FontTransform, RGBColor};

use crate::plot::{save, text_width, Plot};
use crate::util::tick;

const FONT: &str = "sans-serif";
const TITLE_SIZE: u32 = 26;
const PANEL_TITLE_SIZE: u32 = 20;
const DESC_SIZE: u32 = 18;
const TICK_SIZE: u32 = 14;
/// Color of a NaN (or infinite) cell.
const MISSING: RGBColor = RGBColor(160, 160, 160);
const BAR_W: i32 = 18;

/// A color map: low to high.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmap {
    /// matplotlib's viridis (perceptually uniform; for importances 0..1).
    Viridis,
    /// ColorBrewer red-yellow-green (red low, green high).
    RdYlGn,
    /// ColorBrewer red-blue, diverging (red low, white middle, blue high);
    /// an automatic range is centered on 0.
    RdBu,
}

/// Anchor colors, evenly spaced over [0, 1]; colors between are linear.
const VIRIDIS: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
];
const RDYLGN: [(u8, u8, u8); 11] = [
    (165, 0, 38),
    (215, 48, 39),
    (244, 109, 67),
    (253, 174, 97),
    (254, 224, 139),
    (255, 255, 191),
    (217, 239, 139),
    (166, 217, 106),
    (102, 189, 99),
    (26, 152, 80),
    (0, 104, 55),
];
const RDBU: [(u8, u8, u8); 11] = [
    (103, 0, 31),
    (178, 24, 43),
    (214, 96, 77),
    (244, 165, 130),
    (253, 219, 199),
    (247, 247, 247),
    (209, 229, 240),
    (146, 197, 222),
    (67, 147, 195),
    (33, 102, 172),
    (5, 48, 97),
];

impl Cmap {
    fn anchors(self) -> &'static [(u8, u8, u8)] {
        match self {
            Cmap::Viridis => &VIRIDIS,
            Cmap::RdYlGn => &RDYLGN,
            Cmap::RdBu => &RDBU,
        }
    }

    /// The color at `t` in [0, 1] (clamped).
    pub fn at(self, t: f64) -> RGBColor {
        let a = self.anchors();
        let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
        let x = t * (a.len() - 1) as f64;
        let i = (x.floor() as usize).min(a.len() - 2);
        let f = x - i as f64;
        let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
        let (p, q) = (a[i], a[i + 1]);
        RGBColor(mix(p.0, q.0), mix(p.1, q.1), mix(p.2, q.2))
    }
}

/// One heatmap: `values[row][col]`.
#[derive(Clone, Debug)]
pub struct Heatmap {
    pub title: String,
    /// Rows of equal length; NaN cells are drawn grey.
    pub values: Vec<Vec<f64>>,
    /// One per row, or empty for row numbers.
    pub row_labels: Vec<String>,
    /// One per column, or empty for column numbers.
    pub col_labels: Vec<String>,
    pub x_label: String,
    pub y_label: String,
    /// Color range; `None`: the data's min..max (RdBu: symmetric about 0).
    pub range: Option<(f64, f64)>,
    pub cmap: Cmap,
}

/// Checked shape and resolved range of a heatmap.
struct Layout {
    rows: usize,
    cols: usize,
    lo: f64,
    hi: f64,
}

impl Heatmap {
    fn check(&self) -> Result<Layout> {
        let rows = self.values.len();
        let cols = self.values.first().map(Vec::len).unwrap_or(0);
        if rows == 0 || cols == 0 {
            bail!("heatmap '{}': no values (rows {rows}, columns {cols})", self.title);
        }
        if let Some((i, r)) = self.values.iter().enumerate().find(|(_, r)| r.len() != cols) {
            bail!(
                "heatmap '{}': row {i} has {} values, row 0 has {cols} (rows must be equal)",
                self.title,
                r.len()
            );
        }
        let labels = |n: usize, want: usize, what: &str| -> Result<()> {
            if n != 0 && n != want {
                bail!("heatmap '{}': {n} {what} labels for {want} {what}s", self.title);
            }
            Ok(())
        };
        labels(self.row_labels.len(), rows, "row")?;
        labels(self.col_labels.len(), cols, "column")?;
        let (lo, hi) = match self.range {
            Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
            Some((lo, hi)) => {
                bail!("heatmap '{}': range {lo}..{hi} is not an increasing finite range", self.title)
            }
            None => self.auto_range(),
        };
        Ok(Layout { rows, cols, lo, hi })
    }

    fn auto_range(&self) -> (f64, f64) {
        let finite = self.values.iter().flatten().copied().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if lo > hi {
            return (0.0, 1.0); // every cell is NaN
        }
        let (lo, hi) = if self.cmap == Cmap::RdBu {
            let m = lo.abs().max(hi.abs());
            (-m, m)
        } else {
            (lo, hi)
        };
        if hi - lo < 1e-12 {
            let d = if lo.abs() > 1e-12 { lo.abs() * 0.1 } else { 1.0 };
            (lo - d, hi + d)
        } else {
            (lo, hi)
        }
    }

    fn row_label(&self, i: usize) -> String {
        self.row_labels.get(i).cloned().unwrap_or_else(|| i.to_string())
    }

    fn col_label(&self, j: usize) -> String {
        self.col_labels.get(j).cloned().unwrap_or_else(|| j.to_string())
    }
}

fn de<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

fn font(size: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    (FONT, size).into_font().color(&BLACK).pos(Pos::new(h, v))
}

/// Show every k-th of `n` labels so that each gets `need` pixels of `avail`.
fn label_stride(n: usize, need: u32, avail: u32) -> usize {
    let fit = (avail / need.max(1)).max(1) as usize;
    n.div_ceil(fit).max(1)
}

/// Pixel margins around the cells of one panel.
struct Margins {
    top: u32,
    left: u32,
    bottom: u32,
    right: u32,
}

fn margins(h: &Heatmap, l: &Layout, title_size: u32) -> Margins {
    let row_w = (0..l.rows).map(|i| text_width(&h.row_label(i), TICK_SIZE)).max().unwrap_or(0);
    let bar_text = bar_ticks(l.lo, l.hi).iter().map(|(_, s)| text_width(s, TICK_SIZE)).max().unwrap_or(40);
    Margins {
        top: title_size + 24,
        left: row_w + 14 + if h.y_label.is_empty() { 0 } else { DESC_SIZE + 12 },
        bottom: TICK_SIZE + 16 + if h.x_label.is_empty() { 0 } else { DESC_SIZE + 12 },
        right: 24 + BAR_W as u32 + 8 + bar_text + 12,
    }
}

/// Cell size for a cell area of about `target` pixels.
fn cell_px(l: &Layout, target: (u32, u32)) -> (u32, u32) {
    let cw = (target.0 / l.cols as u32).clamp(3, 56);
    let ch = (target.1 / l.rows as u32).clamp(3, 56);
    (cw, ch)
}

fn panel_size(h: &Heatmap, l: &Layout, title_size: u32, target: (u32, u32)) -> (u32, u32) {
    let m = margins(h, l, title_size);
    let (cw, ch) = cell_px(l, target);
    (m.left + cw * l.cols as u32 + m.right, m.top + ch * l.rows as u32 + m.bottom)
}

/// Draw one heatmap filling `area`.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    h: &Heatmap,
    l: &Layout,
    title_size: u32,
) -> Result<()> {
    let (w, ht) = area.dim_in_pixel();
    let m = margins(h, l, title_size);
    let cell_w = (w.saturating_sub(m.left + m.right) as f64 / l.cols as f64).max(1.0);
    let cell_h = (ht.saturating_sub(m.top + m.bottom) as f64 / l.rows as f64).max(1.0);
    let (x0, y0) = (m.left as i32, m.top as i32);
    let x_at = |j: usize| x0 + (j as f64 * cell_w).round() as i32;
    let y_at = |i: usize| y0 + (i as f64 * cell_h).round() as i32;
    let title = (FONT, title_size).into_font().style(FontStyle::Bold).color(&BLACK);
    let title = title.pos(Pos::new(HPos::Center, VPos::Center));
    let mid = (x0 + x_at(l.cols)) / 2;
    area.draw(&Text::new(h.title.clone(), (mid, (title_size as i32 + 24) / 2), title)).map_err(de)?;
    let span = l.hi - l.lo;
    for (i, row) in h.values.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let c = if v.is_finite() { h.cmap.at((v - l.lo) / span) } else { MISSING };
            area.draw(&Rectangle::new([(x_at(j), y_at(i)), (x_at(j + 1), y_at(i + 1))], c.filled()))
                .map_err(de)?;
        }
    }
    let frame = ShapeStyle { color: RGBColor(90, 90, 90).to_rgba(), filled: false, stroke_width: 1 };
    area.draw(&Rectangle::new([(x0, y0), (x_at(l.cols), y_at(l.rows))], frame)).map_err(de)?;
    // Row labels, thinned to one per label height.
    let stride = label_stride(l.rows, TICK_SIZE + 4, (cell_h * l.rows as f64) as u32);
    for i in (0..l.rows).step_by(stride) {
        let y = (y_at(i) + y_at(i + 1)) / 2;
        let st = font(TICK_SIZE, HPos::Right, VPos::Center);
        area.draw(&Text::new(h.row_label(i), (x0 - 6, y), st)).map_err(de)?;
    }
    // Column labels, thinned to the widest label.
    let widest = (0..l.cols).map(|j| text_width(&h.col_label(j), TICK_SIZE)).max().unwrap_or(10);
    let stride = label_stride(l.cols, widest + 8, (cell_w * l.cols as f64) as u32);
    let y_cols = y_at(l.rows) + 4;
    for j in (0..l.cols).step_by(stride) {
        let x = (x_at(j) + x_at(j + 1)) / 2;
        area.draw(&Text::new(h.col_label(j), (x, y_cols), font(TICK_SIZE, HPos::Center, VPos::Top)))
            .map_err(de)?;
    }
    if !h.x_label.is_empty() {
        let y = y_cols + TICK_SIZE as i32 + 10;
        area.draw(&Text::new(h.x_label.clone(), (mid, y), font(DESC_SIZE, HPos::Center, VPos::Top)))
            .map_err(de)?;
    }
    if !h.y_label.is_empty() {
        let st = (FONT, DESC_SIZE)
            .into_font()
            .transform(FontTransform::Rotate270)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let y = (y0 + y_at(l.rows)) / 2;
        area.draw(&Text::new(h.y_label.clone(), (4, y), st)).map_err(de)?;
    }
    draw_colorbar(area, h.cmap, l, (x_at(l.cols) + 24, y0, y_at(l.rows)))
}

/// A vertical color bar (high at the top) with ticks at round values.
fn draw_colorbar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    cmap: Cmap,
    l: &Layout,
    (x, top, bottom): (i32, i32, i32),
) -> Result<()> {
    let hpx = (bottom - top).max(1);
    for k in 0..hpx {
        let t = 1.0 - (k as f64 + 0.5) / hpx as f64;
        area.draw(&Rectangle::new([(x, top + k), (x + BAR_W, top + k + 1)], cmap.at(t).filled()))
            .map_err(de)?;
    }
    let frame = ShapeStyle { color: RGBColor(90, 90, 90).to_rgba(), filled: false, stroke_width: 1 };
    area.draw(&Rectangle::new([(x, top), (x + BAR_W, bottom)], frame)).map_err(de)?;
    for (v, text) in bar_ticks(l.lo, l.hi) {
        let y = bottom - ((v - l.lo) / (l.hi - l.lo) * hpx as f64).round() as i32;
        area.draw(&PathElement::new(vec![(x + BAR_W, y), (x + BAR_W + 4, y)], frame)).map_err(de)?;
        let st = font(TICK_SIZE, HPos::Left, VPos::Center);
        area.draw(&Text::new(text, (x + BAR_W + 7, y), st)).map_err(de)?;
    }
    Ok(())
}

/// Color bar ticks: round values (1, 2 or 5 times a power of ten apart),
/// about five of them, inside `[lo, hi]`.
fn bar_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw * 0.999).unwrap_or(raw);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|k| k as f64 * step).map(|v| (v, tick(v, step))).collect()
}

struct Single<'a> {
    h: &'a Heatmap,
    l: Layout,
}

impl Plot for Single<'_> {
    fn size(&self) -> (u32, u32) {
        panel_size(self.h, &self.l, TITLE_SIZE, (900, 560))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        draw_panel(root, self.h, &self.l, TITLE_SIZE)
    }
}

struct Grid<'a> {
    panels: Vec<(&'a Heatmap, Layout)>,
    cols: usize,
    title: &'a str,
}

impl Grid<'_> {
    fn cell(&self) -> (u32, u32) {
        let sizes = self.panels.iter().map(|(h, l)| panel_size(h, l, PANEL_TITLE_SIZE, (440, 240)));
        sizes.fold((0, 0), |(w, h), (a, b)| (w.max(a), h.max(b)))
    }

    fn rows(&self) -> usize {
        self.panels.len().div_ceil(self.cols)
    }
}

impl Plot for Grid<'_> {
    fn size(&self) -> (u32, u32) {
        let (w, h) = self.cell();
        (w * self.cols.min(self.panels.len()) as u32, TITLE_SIZE + 30 + h * self.rows() as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let (top, body) = root.split_vertically(TITLE_SIZE + 30);
        let (w, _) = top.dim_in_pixel();
        let st = (FONT, TITLE_SIZE).into_font().style(FontStyle::Bold).color(&BLACK);
        let st = st.pos(Pos::new(HPos::Center, VPos::Center));
        top.draw(&Text::new(self.title.to_string(), (w as i32 / 2, (TITLE_SIZE as i32 + 30) / 2), st))
            .map_err(de)?;
        let cells = body.split_evenly((self.rows(), self.cols.min(self.panels.len())));
        for ((h, l), area) in self.panels.iter().zip(cells.iter()) {
            draw_panel(area, h, l, PANEL_TITLE_SIZE)?;
        }
        Ok(())
    }
}

/// `<stem>.png` and `<stem>.svg` for a figure.
fn save_both<P: Plot>(plot: &P, out_stem: &Path) -> Result<Vec<PathBuf>> {
    let name = out_stem
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name for a graph", out_stem.display()))?
        .to_string_lossy()
        .into_owned();
    let paths: Vec<PathBuf> =
        ["png", "svg"].iter().map(|e| out_stem.with_file_name(format!("{name}.{e}"))).collect();
    for p in &paths {
        save(plot, p)?;
    }
    Ok(paths)
}

/// Draw `h` to `<out_stem>.png` and `<out_stem>.svg`; returns both paths.
/// Empty or ragged values, mismatched labels, or a bad range are errors.
pub fn draw_heatmap(h: &Heatmap, out_stem: &Path) -> Result<Vec<PathBuf>> {
    let l = h.check()?;
    save_both(&Single { h, l }, out_stem)
}

/// Several heatmaps as panels of one figure, `cols` per row, under `title`.
pub fn draw_heatmap_grid(hs: &[Heatmap], cols: usize, title: &str, out_stem: &Path) -> Result<Vec<PathBuf>> {
    if hs.is_empty() {
        bail!("heatmap grid '{title}': no panels");
    }
    if cols == 0 {
        bail!("heatmap grid '{title}': cols must be at least 1");
    }
    let panels = hs.iter().map(|h| h.check().map(|l| (h, l))).collect::<Result<Vec<_>>>()?;
    save_both(&Grid { panels, cols, title }, out_stem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("knlp-heatmap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Width and height from a PNG's IHDR chunk.
    fn png_size(p: &Path) -> (u32, u32) {
        let b = std::fs::read(p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", p.display());
        assert_eq!(&b[12..16], b"IHDR");
        let be = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
        (be(&b[16..20]), be(&b[20..24]))
    }

    fn sample(rows: usize, cols: usize, cmap: Cmap) -> Heatmap {
        Heatmap {
            title: "layer 0".into(),
            values: (0..rows).map(|i| (0..cols).map(|j| ((i * cols + j) as f64).sin()).collect()).collect(),
            row_labels: (0..rows).map(|i| format!("h{i}")).collect(),
            col_labels: Vec::new(),
            x_label: "channel".into(),
            y_label: "head".into(),
            range: None,
            cmap,
        }
    }

    #[test]
    fn writes_png_and_svg() {
        let d = temp_dir("single");
        let mut h = sample(12, 64, Cmap::Viridis);
        h.values[3][5] = f64::NAN;
        let files = draw_heatmap(&h, &d.join("imp")).unwrap();
        assert_eq!(files, vec![d.join("imp.png"), d.join("imp.svg")]);
        let l = h.check().unwrap();
        assert_eq!(png_size(&files[0]), Single { h: &h, l }.size());
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("layer 0"));
        // The NaN cell is grey.
        assert!(svg.contains("#A0A0A0") || svg.contains("#a0a0a0") || svg.contains("160,160,160"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn grid_of_panels() {
        let d = temp_dir("grid");
        let hs: Vec<Heatmap> = [Cmap::Viridis, Cmap::RdYlGn, Cmap::RdBu]
            .iter()
            .enumerate()
            .map(|(k, c)| Heatmap { title: format!("layer {k}"), ..sample(4, 200, *c) })
            .collect();
        let files = draw_heatmap_grid(&hs, 2, "importance", &d.join("grid")).unwrap();
        let (w, h) = png_size(&files[0]);
        assert!(w > 400 && h > 300, "{w}x{h}");
        assert!(std::fs::metadata(&files[1]).unwrap().len() > 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_input_is_an_error() {
        let d = temp_dir("bad");
        let mut h = sample(3, 4, Cmap::RdBu);
        h.values[1].pop();
        let e = draw_heatmap(&h, &d.join("x")).unwrap_err().to_string();
        assert!(e.contains("row 1 has 3 values"), "{e}");
        let e = draw_heatmap(&Heatmap { values: vec![], ..sample(1, 1, Cmap::Viridis) }, &d.join("x"));
        assert!(e.unwrap_err().to_string().contains("no values"));
        let e =
            draw_heatmap(&Heatmap { range: Some((1.0, 1.0)), ..sample(2, 2, Cmap::Viridis) }, &d.join("x"));
        assert!(e.unwrap_err().to_string().contains("range"));
        let e = draw_heatmap(
            &Heatmap { row_labels: vec!["a".into()], ..sample(2, 2, Cmap::Viridis) },
            &d.join("x"),
        );
        assert!(e.unwrap_err().to_string().contains("1 row labels for 2 rows"));
        assert!(draw_heatmap_grid(&[], 2, "t", &d.join("g")).is_err());
        assert!(draw_heatmap_grid(&[sample(2, 2, Cmap::RdBu)], 0, "t", &d.join("g")).is_err());
        assert!(!d.join("x.png").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn colormaps_and_ranges() {
        assert_eq!(Cmap::Viridis.at(0.0), RGBColor(68, 1, 84));
        assert_eq!(Cmap::Viridis.at(1.0), RGBColor(253, 231, 37));
        assert_eq!(Cmap::RdBu.at(0.5), RGBColor(247, 247, 247));
        assert_eq!(Cmap::RdYlGn.at(2.0), RGBColor(0, 104, 55));
        let h = Heatmap { values: vec![vec![-0.5, 2.0]], ..sample(1, 2, Cmap::RdBu) };
        let l = h.check().unwrap();
        assert_eq!((l.lo, l.hi), (-2.0, 2.0));
        let h = Heatmap { values: vec![vec![f64::NAN]], row_labels: vec![], ..sample(1, 1, Cmap::Viridis) };
        assert!(h.check().is_ok());
        assert_eq!(label_stride(64, 20, 640), 2);
        assert_eq!(label_stride(10, 20, 640), 1);
        let t: Vec<String> = bar_ticks(0.0, 1.0).into_iter().map(|(_, s)| s).collect();
        assert_eq!(t, ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        assert_eq!(bar_ticks(-0.03, 0.07).len(), 5);
    }
}
