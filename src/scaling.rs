//! Scaling-curve reports (knlp-spec.md 14). The seed's
//! `lib/scaling_curves.py` printed two ASCII U-curves, `(x − x_opt)²` with
//! no data behind them: validation loss against the MLP:attention ratio
//! (optimum 1.4 over 0.5–3.0) and latency against depth (optimum 28 layers
//! over 8–64). Here each curve is drawn from measured GPT-2 runs wherever
//! the projects given hold at least two distinct x values, and is the
//! seed's analytic parabola otherwise; the title, legend and `scaling.md`
//! say which (docs/scaling.md).
//!
//! - ratio: x = parameters of one block's MLP / of its attention (GPT-2:
//!   2.0; `golden_ratio`: 2.5; `mlp_hidden` sets it), y = the run's final
//!   validation loss.
//! - depth: x = n_layer, y = training time per token in µs (1e6 / the
//!   run's tokens/s), the latency every run records.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use report::plot::{save, Dash, Line, LinePlot, Marker, Style};
use report::{load_project, RunInfo};
use serde::Serialize;
use serde_json::Value;

use crate::models::gpt2;

/// One scaling curve: what x and y are, and the seed's analytic stand-in.
pub struct Curve {
    pub key: &'static str,
    pub title: &'static str,
    pub x_label: &'static str,
    pub y_label: &'static str,
    /// The seed's claimed optimum and the range it drew.
    pub x_opt: f64,
    pub range: (f64, f64),
    /// (x, y) of one finished GPT-2 run, if it has what this curve needs.
    measure: fn(&gpt2::Config, &RunInfo) -> Option<(f64, f64)>,
    /// x of a model, for marking it on the analytic curve.
    position: fn(&gpt2::Config) -> Option<f64>,
}

fn ratio_of(m: &gpt2::Config) -> Option<f64> {
    let (attn, mlp) = m.block_params().ok()?;
    (attn > 0).then(|| mlp as f64 / attn as f64)
}

fn depth_of(m: &gpt2::Config) -> Option<f64> {
    m.resolve().ok()?.n_layer.map(|l| l as f64)
}

fn ratio_point(m: &gpt2::Config, r: &RunInfo) -> Option<(f64, f64)> {
    Some((ratio_of(m)?, r.final_loss.filter(|l| l.is_finite())?))
}

fn depth_point(m: &gpt2::Config, r: &RunInfo) -> Option<(f64, f64)> {
    let tps = r.throughput.filter(|t| *t > 0.0 && r.throughput_unit.as_deref() == Some("tokens_per_s"))?;
    Some((depth_of(m)?, 1e6 / tps))
}

pub const CURVES: [Curve; 2] = [
    Curve {
        key: "ratio",
        title: "Validation loss against the MLP:attention ratio",
        x_label: "MLP:attention parameters per block",
        y_label: "final validation loss",
        x_opt: 1.4,
        range: (0.5, 3.0),
        measure: ratio_point,
        position: ratio_of,
    },
    Curve {
        key: "depth",
        title: "Latency against depth",
        x_label: "layers (n_layer)",
        y_label: "training time per token (µs)",
        x_opt: 28.0,
        range: (8.0, 64.0),
        measure: depth_point,
        position: depth_of,
    },
];

/// The seed's analytic curve, `(x − x_opt)²` in arbitrary units.
pub fn analytic(c: &Curve, x: f64) -> f64 {
    (x - c.x_opt).powi(2)
}

/// One measured run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Point {
    pub project: String,
    pub run: String,
    pub x: f64,
    pub y: f64,
    /// Standard error of a validation loss (`val_loss_se`), where logged.
    pub se: Option<f64>,
}

/// Least-squares parabola `y = a (x − x_min)² + y_min` through every run
/// of one project (three or more distinct x); `extrapolated` when its
/// minimum lies outside the measured x.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Fit {
    pub a: f64,
    pub x_min: f64,
    pub y_min: f64,
    pub extrapolated: bool,
}

/// What one curve's report holds.
#[derive(Clone, Debug, Serialize)]
pub struct CurveReport {
    pub key: String,
    /// `measured` (from runs) or `analytic` (the seed's parabola).
    pub source: String,
    pub points: Vec<Point>,
    /// Mean y per distinct x, per project: what the measured lines join.
    pub means: BTreeMap<String, Vec<(f64, f64)>>,
    /// One parabola per project, where it has one.
    pub fits: BTreeMap<String, Fit>,
    /// GPT-2 runs seen whose position is marked on the analytic curve.
    pub positions: Vec<Point>,
    /// Runs left out of a measured curve (their project has one x only).
    pub left_out: Vec<String>,
    /// The files written, relative to the output folder.
    pub files: Vec<PathBuf>,
}

/// Everything one `knlp scaling` call wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub out: PathBuf,
    pub curves: Vec<CurveReport>,
    pub markdown: PathBuf,
    /// Runs skipped, with the reason.
    pub skipped: Vec<String>,
}

/// Fit a parabola to (x, y) by least squares; None with fewer than three
/// distinct x or when the fit opens downwards (no minimum).
pub fn fit_parabola(pts: &[(f64, f64)]) -> Option<Fit> {
    if distinct(pts.iter().map(|p| p.0)) < 3 {
        return None;
    }
    // Normal equations of y = c0 + c1 x + c2 x², centred for conditioning.
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / pts.len() as f64;
    let mut s = [0.0f64; 5];
    let mut t = [0.0f64; 3];
    for &(x, y) in pts {
        let u = x - mx;
        let mut p = 1.0;
        for k in s.iter_mut() {
            *k += p;
            p *= u;
        }
        t[0] += y;
        t[1] += u * y;
        t[2] += u * u * y;
    }
    let m = [[s[0], s[1], s[2]], [s[1], s[2], s[3]], [s[2], s[3], s[4]]];
    let c = solve3(m, t)?;
    if c[2] <= 0.0 {
        return None;
    }
    let u_min = -c[1] / (2.0 * c[2]);
    let x_min = u_min + mx;
    let (lo, hi) = span(pts.iter().map(|p| p.0));
    Some(Fit {
        a: c[2],
        x_min,
        y_min: c[0] - c[1] * c[1] / (4.0 * c[2]),
        extrapolated: x_min < lo || x_min > hi,
    })
}

/// Cramer's rule for a 3x3 system.
fn solve3(m: [[f64; 3]; 3], t: [f64; 3]) -> Option<[f64; 3]> {
    let det = |a: [[f64; 3]; 3]| {
        a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
    };
    let d = det(m);
    if d.abs() < 1e-12 * (1.0 + m[0][0].abs() * m[2][2].abs()) {
        return None;
    }
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut a = m;
        for r in 0..3 {
            a[r][k] = t[r];
        }
        *o = det(a) / d;
    }
    Some(out)
}

/// The GPT-2 model configuration a run was trained with (`config.json`).
fn run_model(dir: &Path) -> Result<gpt2::Config> {
    let path = dir.join(crate::runs::CONFIG);
    let text = fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    if v.get("arch").and_then(Value::as_str) != Some("gpt2") {
        bail!("not a GPT-2 run");
    }
    let m = v.get("model").cloned().unwrap_or(Value::Null);
    serde_json::from_value(m).with_context(|| format!("{}: model", path.display()))
}

/// A finished GPT-2 run: project, files, model.
type Run = (String, RunInfo, gpt2::Config);

/// The smallest and largest of `v`.
fn span(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// Whether two x are the same point of a curve (one rule for the means
/// and the fit).
fn same_x(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

/// How many distinct x (by [`same_x`]).
fn distinct(xs: impl Iterator<Item = f64>) -> usize {
    let mut seen: Vec<f64> = Vec::new();
    for x in xs {
        if !seen.iter().any(|&s| same_x(s, x)) {
            seen.push(x);
        }
    }
    seen.len()
}

/// Mean y per distinct x, sorted by x.
fn means(pts: &[&Point]) -> Vec<(f64, f64)> {
    let mut by: Vec<(f64, Vec<f64>)> = Vec::new();
    for p in pts {
        match by.iter_mut().find(|(x, _)| same_x(*x, p.x)) {
            Some((_, ys)) => ys.push(p.y),
            None => by.push((p.x, vec![p.y])),
        }
    }
    by.sort_by(|a, b| a.0.total_cmp(&b.0));
    by.into_iter().map(|(x, ys)| (x, ys.iter().sum::<f64>() / ys.len() as f64)).collect()
}

/// One entry per project and x (a sweep over another axis puts all its
/// runs at the same place): name, x, number of runs.
fn position_groups(seen: &[Point]) -> Vec<(String, f64, usize)> {
    let mut groups: Vec<(String, f64, usize)> = Vec::new();
    for p in seen {
        let name = if p.project.is_empty() { p.run.clone() } else { p.project.clone() };
        match groups.iter_mut().find(|(n, x, _)| *n == name && same_x(*x, p.x)) {
            Some(g) => g.2 += 1,
            None => groups.push((name, p.x, 1)),
        }
    }
    groups
}

/// A number without trailing zeros (4, 2.5, 1.994).
fn trim(x: f64) -> String {
    report::util::trim_float(x, 3)
}

fn style(i: usize, dash: Dash, marker: Marker) -> Style {
    Style { dash, marker, ..Style::nth(i) }
}

/// Draw each curve for the runs of `projects` into `out`
/// (`scaling_<key>.png/.svg`, `scaling.md`, `scaling.json`).
pub fn report(projects: &[PathBuf], out: &Path) -> Result<Report> {
    let mut runs: Vec<Run> = Vec::new();
    let mut skipped = Vec::new();
    for dir in projects {
        let p = load_project(dir)?;
        for r in p.runs {
            let rd = dir.join(&r.run);
            if r.status != "done" {
                skipped.push(format!("{}/{}: {}", p.name, r.run, r.status));
                continue;
            }
            match run_model(&rd) {
                Ok(m) => runs.push((p.name.clone(), r, m)),
                Err(e) => skipped.push(format!("{}/{}: {e:#}", p.name, r.run)),
            }
        }
    }
    fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut curves = Vec::new();
    for c in &CURVES {
        curves.push(draw_curve(c, &runs, out)?);
    }
    let markdown = out.join("scaling.md");
    let rep = Report { out: out.to_path_buf(), curves, markdown: PathBuf::from("scaling.md"), skipped };
    fs::write(&markdown, markdown_of(&rep))
        .with_context(|| format!("{}: cannot write", markdown.display()))?;
    let json = serde_json::to_string_pretty(&rep)?;
    fs::write(out.join("scaling.json"), json + "\n")
        .with_context(|| format!("{}: cannot write", out.join("scaling.json").display()))?;
    Ok(rep)
}

fn draw_curve(c: &Curve, runs: &[Run], out: &Path) -> Result<CurveReport> {
    let points: Vec<Point> = runs
        .iter()
        .filter_map(|(p, r, m)| {
            let se = if c.key == "ratio" { r.final_loss_se.filter(|e| e.is_finite()) } else { None };
            (c.measure)(m, r).map(|(x, y)| Point { project: p.clone(), run: r.run.clone(), x, y, se })
        })
        .collect();
    let mut by_project: BTreeMap<String, Vec<&Point>> = BTreeMap::new();
    for p in &points {
        by_project.entry(p.project.clone()).or_default().push(p);
    }
    // Only a project that varies x measures the curve.
    let means: BTreeMap<String, Vec<(f64, f64)>> =
        by_project.iter().map(|(k, v)| (k.clone(), means(v))).filter(|(_, m)| m.len() >= 2).collect();
    let left_out: Vec<String> = points
        .iter()
        .filter(|p| !means.contains_key(&p.project))
        .map(|p| format!("{}/{}: its project has one x ({})", p.project, p.run, trim(p.x)))
        .collect();
    let points: Vec<Point> = points.iter().filter(|p| means.contains_key(&p.project)).cloned().collect();
    let measured = !means.is_empty();
    let mut plot = LinePlot { x_label: c.x_label.into(), ..LinePlot::default() };
    let mut rep = CurveReport {
        key: c.key.into(),
        source: if measured { "measured" } else { "analytic" }.into(),
        points: Vec::new(),
        means: BTreeMap::new(),
        fits: BTreeMap::new(),
        positions: Vec::new(),
        left_out: if measured { left_out } else { Vec::new() },
        files: Vec::new(),
    };
    if measured {
        plot.title = format!("{} (measured)", c.title);
        plot.y_label = c.y_label.into();
        let mut i = 0;
        for (proj, m) in &means {
            plot.lines.push(Line {
                name: format!("measured: {proj} (mean per x)"),
                points: m.clone(),
                style: style(i, Dash::Solid, Marker::Circle),
            });
            // Projects may differ in everything but x: one fit each.
            let mine: Vec<(f64, f64)> =
                points.iter().filter(|p| p.project == *proj).map(|p| (p.x, p.y)).collect();
            if let Some(f) = fit_parabola(&mine) {
                let (lo, hi) = span(mine.iter().map(|p| p.0));
                let pts = (0..=100)
                    .map(|k| lo + (hi - lo) * k as f64 / 100.0)
                    .map(|x| (x, f.a * (x - f.x_min).powi(2) + f.y_min));
                let ext = if f.extrapolated { " (extrapolated)" } else { "" };
                plot.lines.push(Line {
                    name: format!("{proj} fit: min at {:.2}{ext}", f.x_min),
                    points: pts.collect(),
                    style: style(i, Dash::Dashed, Marker::None),
                });
                rep.fits.insert(proj.clone(), f);
            }
            i += 1;
        }
        let (ylo, yhi) = span(means.values().flatten().map(|p| p.1));
        plot.lines.push(Line {
            name: format!("the seed's claimed optimum x = {}", c.x_opt),
            points: vec![(c.x_opt, ylo), (c.x_opt, yhi)],
            style: style(i, Dash::Dotted, Marker::None),
        });
        rep.points = points;
        rep.means = means;
    } else {
        plot.title = format!("{} (analytic, no runs measured)", c.title);
        plot.y_label = "(x − x_opt)², arbitrary units".into();
        let (lo, hi) = c.range;
        let curve = (0..=200).map(|k| lo + (hi - lo) * k as f64 / 200.0).map(|x| (x, analytic(c, x)));
        plot.lines.push(Line {
            name: format!("analytic: the seed's (x − {})², not a measurement", c.x_opt),
            points: curve.collect(),
            style: style(0, Dash::Solid, Marker::None),
        });
        // Where the runs found (or GPT-2 124M) sit on it.
        let mut seen: Vec<Point> = runs
            .iter()
            .filter_map(|(p, r, m)| {
                (c.position)(m).map(|x| Point {
                    project: p.clone(),
                    run: r.run.clone(),
                    x,
                    y: analytic(c, x),
                    se: None,
                })
            })
            .collect();
        if seen.is_empty() {
            let m = gpt2::Config { preset: Some("124M".into()), ..gpt2::Config::default() };
            if let Some(x) = (c.position)(&m) {
                seen.push(Point {
                    project: String::new(),
                    run: "GPT-2 124M".into(),
                    x,
                    y: analytic(c, x),
                    se: None,
                });
            }
        }
        let groups = position_groups(&seen);
        for (i, (name, x, n)) in groups.iter().enumerate().take(9) {
            let runs = if *n > 1 { format!(" ({n} runs)") } else { String::new() };
            plot.lines.push(Line {
                name: format!("{name}{runs} at x = {}", trim(*x)),
                points: vec![(*x, analytic(c, *x))],
                style: style(i + 1, Dash::Solid, Marker::Diamond),
            });
        }
        rep.positions = seen;
    }
    for ext in ["png", "svg"] {
        let path = out.join(format!("scaling_{}.{ext}", c.key));
        save(&plot, &path)?;
        rep.files.push(PathBuf::from(path.file_name().unwrap_or_default()));
    }
    Ok(rep)
}

fn markdown_of(r: &Report) -> String {
    let mut s = String::from("# Scaling curves\n\n");
    s.push_str(
        "Written by `knlp scaling` (docs/scaling.md). A curve is **measured** when a project \
         holds finished GPT-2 runs at two or more distinct x; otherwise it is the seed's \
         **analytic** parabola `(x − x_opt)²`, which is not a measurement.\n",
    );
    for (c, cr) in CURVES.iter().zip(&r.curves) {
        s.push_str(&format!("\n## {} ({})\n\n![{}](scaling_{}.png)\n\n", c.title, cr.source, c.key, c.key));
        if cr.source == "measured" {
            s.push_str(&format!(
                "| project | run | x ({}) | y ({}) |\n|---|---|---|---|\n",
                c.x_label, c.y_label
            ));
            for p in &cr.points {
                let se = p.se.map(|e| format!(" ± {e:.4}")).unwrap_or_default();
                s.push_str(&format!("| {} | {} | {:.4} | {:.4}{se} |\n", p.project, p.run, p.x, p.y));
            }
            s.push('\n');
            for proj in cr.means.keys() {
                match cr.fits.get(proj) {
                    Some(f) => s.push_str(&format!(
                        "- {proj}: least-squares parabola, minimum {:.4} at x = {:.3}{} (the seed claims x = {}).\n",
                        f.y_min,
                        f.x_min,
                        if f.extrapolated { ", extrapolated: outside the measured x" } else { "" },
                        c.x_opt
                    )),
                    None => s.push_str(&format!(
                        "- {proj}: no parabola fitted (fewer than three distinct x, or no minimum).\n"
                    )),
                }
            }
            for l in &cr.left_out {
                s.push_str(&format!("- left out: {l}\n"));
            }
        } else {
            s.push_str(&format!(
                "Analytic: `(x − {})²` over {}–{}, the seed's placeholder. Positions marked:\n\n",
                c.x_opt, c.range.0, c.range.1
            ));
            for (name, x, n) in position_groups(&cr.positions) {
                let runs = if n > 1 { format!(" ({n} runs)") } else { String::new() };
                s.push_str(&format!("- {name}{runs}: x = {}\n", trim(x)));
            }
        }
    }
    if !r.skipped.is_empty() {
        s.push_str("\n## Runs left out\n\n");
        for k in &r.skipped {
            s.push_str(&format!("- {k}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parabola_fit_recovers_a_known_minimum() {
        let pts: Vec<(f64, f64)> =
            [0.5, 1.0, 1.5, 2.0, 3.0].iter().map(|&x| (x, 2.0 * (x - 1.4f64).powi(2) + 3.0)).collect();
        let f = fit_parabola(&pts).unwrap();
        assert!(
            (f.a - 2.0).abs() < 1e-9 && (f.x_min - 1.4).abs() < 1e-9 && (f.y_min - 3.0).abs() < 1e-9,
            "{f:?}"
        );
        assert!(fit_parabola(&pts[..2]).is_none());
        let down: Vec<(f64, f64)> = pts.iter().map(|&(x, y)| (x, -y)).collect();
        assert!(fit_parabola(&down).is_none());
    }

    #[test]
    fn gpt2_ratio_is_two_and_golden_ratio_is_near_two_and_a_half() {
        let base = gpt2::Config { preset: Some("124M".into()), ..gpt2::Config::default() };
        let r = ratio_of(&base).unwrap();
        // 2·(768·3072 + 3072) + 768 ... over 4·768² + 4·768: exactly 2 minus the bias terms' difference.
        assert!((r - 2.0).abs() < 2e-3, "{r}");
        let g = gpt2::Config { golden_ratio: true, ..base.clone() };
        assert!((ratio_of(&g).unwrap() - 2.5).abs() < 0.05);
        let h = gpt2::Config { mlp_hidden: Some(768), ..base };
        assert!((ratio_of(&h).unwrap() - 0.5).abs() < 1e-3);
    }
}
