//! A project's graphs (PNG and SVG) and `report.md` in `<project>/graphs/`.
//!
//! - `curve_<metric>`: training curves, one line per run, against the step.
//! - `final_<metric>_by_sparsity`: the final metric of each method, grouped
//!   by target sparsity (mean of repeats, min-max whiskers), dense baselines dashed.
//! - `<metric>_vs_sparsity`: the final metric against achieved sparsity, one
//!   line per method, dense baselines dashed.
//! - `time`, `memory`, `throughput_<unit>`: one bar per run.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::load::{Project, RunInfo, GRAPHS_DIR};
use crate::plot::{save, BarPlot, Bars, HBarPlot, Line, LinePlot, Plot, Style};
use crate::table::{render_markdown, results_table, status_line, TableOptions};
use crate::util::{compact, human_time, natural_cmp, now_iso, trim_float};

/// What `write_graphs` produced.
#[derive(Clone, Debug, Default)]
pub struct GraphSet {
    pub dir: PathBuf,
    /// Every file written (PNG, SVG, then report.md).
    pub files: Vec<PathBuf>,
    pub report: PathBuf,
    /// Graphs not drawn, with the reason (no data).
    pub skipped: Vec<String>,
    /// Graphs that failed to draw.
    pub warnings: Vec<String>,
    /// Graphs of an earlier pass that this one did not draw (deleted, so
    /// the folder never shows a graph that disagrees with the data).
    pub removed: Vec<PathBuf>,
}

/// Whether a file stem is one of the graphs this module draws.
fn is_graph_stem(stem: &str) -> bool {
    stem.starts_with("curve_")
        || stem.starts_with("final_")
        || stem.starts_with("throughput_")
        || stem.ends_with("_vs_sparsity")
        || stem == "time"
        || stem == "memory"
}

/// Delete the PNG and SVG graphs in `dir` that are not in `kept`.
fn remove_stale(dir: &Path, kept: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for p in entries.flatten().map(|e| e.path()) {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if matches!(ext, "png" | "svg")
            && is_graph_stem(stem)
            && !kept.contains(&p)
            && std::fs::remove_file(&p).is_ok()
        {
            removed.push(p);
        }
    }
    removed.sort();
    removed
}

/// One drawn graph, for report.md.
struct Drawn {
    section: &'static str,
    stem: String,
    title: String,
    caption: String,
}

struct Writer<'a> {
    dir: &'a Path,
    set: GraphSet,
    drawn: Vec<Drawn>,
}

impl Writer<'_> {
    fn emit<P: Plot>(&mut self, plot: &P, section: &'static str, stem: &str, title: &str, caption: String) {
        let mut ok = true;
        for ext in ["png", "svg"] {
            let path = self.dir.join(format!("{stem}.{ext}"));
            match save(plot, &path) {
                Ok(()) => self.set.files.push(path),
                Err(e) => {
                    ok = false;
                    self.set.warnings.push(format!("{e:#}"));
                }
            }
        }
        if ok {
            self.drawn.push(Drawn { section, stem: stem.into(), title: title.into(), caption });
        }
    }
}

/// The metrics a project's runs can be compared on.
struct Metric {
    column: &'static str,
    key: &'static str,
    name: &'static str,
    axis: &'static str,
    scale: f64,
    fmt: fn(f64) -> String,
    higher_is_better: bool,
}

fn fmt_pct(v: f64) -> String {
    format!("{v:.1}")
}

fn fmt_2(v: f64) -> String {
    format!("{v:.2}")
}

const METRICS: &[Metric] = &[
    Metric {
        column: "final_acc",
        key: "test_acc",
        name: "test accuracy",
        axis: "final test accuracy (%)",
        scale: 100.0,
        fmt: fmt_pct,
        higher_is_better: true,
    },
    Metric {
        column: "final_ppl",
        key: "val_ppl",
        name: "validation perplexity",
        axis: "final validation perplexity",
        scale: 1.0,
        fmt: fmt_2,
        higher_is_better: false,
    },
];

fn metric_of(r: &RunInfo, column: &str) -> Option<f64> {
    match column {
        "final_acc" => r.final_acc,
        "final_ppl" => r.final_ppl,
        _ => None,
    }
}

/// Training curves: `(metric key, title, y axis, scale, may use a log axis)`.
const CURVES: &[(&str, &str, &str, f64, bool)] = &[
    ("train_loss", "Training loss", "training loss", 1.0, true),
    ("test_acc", "Test accuracy during training", "test accuracy (%)", 100.0, false),
    ("test_loss", "Test loss during training", "test loss", 1.0, true),
    ("val_ppl", "Validation perplexity during training", "validation perplexity (log scale)", 1.0, true),
    ("lr", "Learning rate", "learning rate", 1.0, false),
    ("sparsity", "Sparsity during training", "sparsity of prunable weights (%)", 100.0, false),
    ("gpu_util", "GPU utilisation", "GPU utilisation (%, mean per logging window)", 1.0, false),
    ("gpu_mem_mb", "GPU memory used", "GPU memory used (MiB, NVML, max per window)", 1.0, false),
    ("gpu_power_w", "GPU power", "GPU power (W, mean per logging window)", 1.0, false),
];

/// The sparsity group of a pruned run: its target, else what it reached.
fn sparsity_key(r: &RunInfo) -> Option<i64> {
    r.target_sparsity.or(r.sparsity).map(|s| (s * 1000.0).round() as i64)
}

fn pct_label(key: i64) -> String {
    format!("{}%", trim_float(key as f64 / 10.0, 1))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(*x), b.max(*x)))
}

fn fmt_secs(v: f64) -> String {
    human_time(v)
}
fn fmt_mins(v: f64) -> String {
    human_time(v * 60.0)
}
fn fmt_hours(v: f64) -> String {
    human_time(v * 3600.0)
}
fn fmt_mib(v: f64) -> String {
    format!("{v:.0} MiB")
}
fn fmt_gib(v: f64) -> String {
    format!("{v:.2} GiB")
}

/// Per sparsity group (target in tenths of a percent): `(metric, achieved sparsity)` of each run.
type BySparsity = BTreeMap<i64, Vec<(f64, Option<f64>)>>;

/// Draw every graph that the project's data supports, then `report.md`.
pub fn write_graphs(project: &Project) -> Result<GraphSet> {
    let dir = project.dir.join(GRAPHS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut w =
        Writer { dir: &dir, set: GraphSet { dir: dir.clone(), ..Default::default() }, drawn: Vec::new() };
    let runs = &project.runs;

    // Training curves, one line per run; a run keeps its color in every graph.
    for &(key, title, axis, scale, may_log) in CURVES {
        let lines: Vec<Line> = project
            .histories
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let pts: Vec<(f64, f64)> = h.series(key).into_iter().map(|(s, v)| (s, v * scale)).collect();
                (!pts.is_empty()).then(|| Line { name: h.cell.clone(), points: pts, style: Style::nth(i) })
            })
            .collect();
        if lines.is_empty() {
            w.set.skipped.push(format!("curve_{key}: no run logged {key}"));
            continue;
        }
        let vals: Vec<f64> = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).collect();
        let (lo, hi) = min_max(&vals);
        let log_y = (may_log && lo > 0.0 && hi / lo > 20.0) || (key == "val_ppl" && lo > 0.0);
        let axis =
            if log_y && !axis.contains("log") { format!("{axis} (log scale)") } else { axis.to_string() };
        let plot = LinePlot {
            title: title.into(),
            x_label: "step".into(),
            y_label: axis,
            lines,
            log_y,
            legend_title: Some("cell".into()),
            ..Default::default()
        };
        let caption =
            format!("`{key}` from each run's metrics.jsonl against the optimizer step; one line per cell.");
        w.emit(&plot, "Training curves", &format!("curve_{key}"), title, caption);
    }

    // Methods (optimizer + pruning method and variant), in a stable order.
    let mut methods: Vec<String> = runs.iter().map(RunInfo::method).collect();
    methods.sort_by(|a, b| natural_cmp(a, b));
    methods.dedup();
    let method_style = |m: &str| Style::nth(methods.iter().position(|x| x == m).unwrap_or(0));
    for m in METRICS {
        let with: Vec<&RunInfo> = runs.iter().filter(|r| metric_of(r, m.column).is_some()).collect();
        if with.is_empty() {
            continue;
        }
        // Name methods with their model when runs of several models compare.
        let multi_model = {
            let mut ms: Vec<&str> = with.iter().filter_map(|r| r.model.as_deref()).collect();
            ms.sort();
            ms.dedup();
            ms.len() > 1
        };
        let label = |r: &RunInfo| {
            if multi_model {
                format!("{} {}", r.model.as_deref().unwrap_or("?"), r.method())
            } else {
                r.method()
            }
        };
        let mut labels: Vec<String> = with.iter().map(|r| label(r)).collect();
        labels.sort_by(|a, b| natural_cmp(a, b));
        labels.dedup();
        let label_style = |l: &str| {
            if multi_model {
                Style::nth(labels.iter().position(|x| x == l).unwrap_or(0))
            } else {
                method_style(l)
            }
        };
        let value = |r: &RunInfo| metric_of(r, m.column).unwrap_or(f64::NAN) * m.scale;
        // Dense baselines: mean per method.
        let mut dense: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        // Pruned: per method, per sparsity group, the values (and achieved sparsity).
        let mut pruned: BTreeMap<String, BySparsity> = BTreeMap::new();
        for r in &with {
            if r.is_dense() {
                dense.entry(label(r)).or_default().push(value(r));
            } else if let Some(k) = sparsity_key(r) {
                pruned.entry(label(r)).or_default().entry(k).or_default().push((value(r), r.sparsity));
            }
        }
        let mut group_keys: Vec<i64> = pruned.values().flat_map(|g| g.keys().copied()).collect();
        group_keys.sort();
        group_keys.dedup();
        let repeats = pruned.values().flat_map(|g| g.values()).any(|v| v.len() > 1)
            || dense.values().any(|v| v.len() > 1);
        let mut names: Vec<&String> = pruned.keys().collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        let hlines: Vec<(String, f64, Style)> =
            dense.iter().map(|(l, v)| (format!("{l} (baseline)"), mean(v), label_style(l))).collect();

        let stem = format!("final_{}_by_sparsity", m.key);
        let title = format!("Final {} by method and sparsity", m.name);
        let better = if m.higher_is_better { "higher is better" } else { "lower is better" };
        if group_keys.is_empty() {
            // Only dense runs: one group, a bar per method.
            let bars: Vec<Bars> = dense
                .iter()
                .map(|(l, v)| {
                    let (lo, hi) = min_max(v);
                    Bars {
                        name: l.clone(),
                        values: vec![Some(mean(v))],
                        ranges: vec![(v.len() > 1).then_some((lo, hi))],
                        style: label_style(l),
                    }
                })
                .collect();
            let plot = BarPlot {
                title: title.clone(),
                x_label: "no pruning".into(),
                y_label: m.axis.into(),
                groups: vec!["dense".into()],
                bars,
                value_fmt: Some(m.fmt),
                legend_title: Some("method".into()),
                ..Default::default()
            };
            let caption = format!(
                "Final {} of each method ({better}){}. No run is pruned, so there is one group.",
                m.name,
                if repeats { "; bars are means over repeats, whiskers min to max" } else { "" }
            );
            w.emit(&plot, "Final metric by method and sparsity", &stem, &title, caption);
            w.set.skipped.push(format!("{}_vs_sparsity: no pruned run has {}", m.key, m.column));
            continue;
        }
        let bars: Vec<Bars> = names
            .iter()
            .map(|l| {
                let g = &pruned[*l];
                let vals: Vec<Option<Vec<f64>>> =
                    group_keys.iter().map(|k| g.get(k).map(|v| v.iter().map(|x| x.0).collect())).collect();
                Bars {
                    name: (*l).clone(),
                    values: vals.iter().map(|v| v.as_ref().map(|v| mean(v))).collect(),
                    ranges: vals
                        .iter()
                        .map(|v| v.as_ref().filter(|v| v.len() > 1).map(|v| min_max(v)))
                        .collect(),
                    style: label_style(l),
                }
            })
            .collect();
        let plot = BarPlot {
            title: title.clone(),
            x_label: "target sparsity".into(),
            y_label: m.axis.into(),
            groups: group_keys.iter().map(|k| pct_label(*k)).collect(),
            bars,
            hlines: hlines.clone(),
            value_fmt: Some(m.fmt),
            legend_title: Some("method".into()),
            ..Default::default()
        };
        let caption = format!(
            "Final {} ({better}) of each pruning method, grouped by target sparsity{}; dashed lines: dense runs.",
            m.name,
            if repeats { "; bars are means over repeats, whiskers min to max" } else { "" }
        );
        w.emit(&plot, "Final metric by method and sparsity", &stem, &title, caption);

        // The metric against achieved sparsity, a line per method.
        let lines: Vec<Line> = names
            .iter()
            .map(|l| {
                let mut pts: Vec<(f64, f64)> = pruned[*l]
                    .iter()
                    .map(|(k, v)| {
                        let achieved: Vec<f64> = v.iter().filter_map(|x| x.1).collect();
                        let x = if achieved.is_empty() { *k as f64 / 10.0 } else { mean(&achieved) * 100.0 };
                        (x, mean(&v.iter().map(|x| x.0).collect::<Vec<_>>()))
                    })
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Line { name: (*l).clone(), points: pts, style: label_style(l) }
            })
            .collect();
        let title2 = format!("Final {} against sparsity", m.name);
        let plot = LinePlot {
            title: title2.clone(),
            x_label: "achieved sparsity (%)".into(),
            y_label: m.axis.into(),
            lines,
            hlines,
            markers: true,
            log_y: false,
            legend_title: Some("method".into()),
            ..Default::default()
        };
        let caption = format!(
            "Final {} ({better}) against the sparsity each run reached (its target where not recorded); one line per method, dashed lines: dense runs.",
            m.name
        );
        w.emit(&plot, "Metric against sparsity", &format!("{}_vs_sparsity", m.key), &title2, caption);
    }

    // Cost per run: time, memory, throughput.
    let cells: Vec<String> = runs.iter().map(|r| r.cell.clone()).collect();
    let styles: Vec<Style> = (0..runs.len()).map(Style::nth).collect();
    let times: Vec<Option<f64>> = runs.iter().map(|r| r.time_s).collect();
    if let Some(max) = times.iter().flatten().copied().reduce(f64::max) {
        let (div, unit, fmt): (f64, &str, fn(f64) -> String) = if max >= 7200.0 {
            (3600.0, "h", fmt_hours)
        } else if max >= 120.0 {
            (60.0, "min", fmt_mins)
        } else {
            (1.0, "s", fmt_secs)
        };
        let plot = HBarPlot {
            title: "Wall-clock time per run".into(),
            x_label: format!("training time ({unit})"),
            labels: cells.clone(),
            values: times.iter().map(|t| t.map(|t| t / div)).collect(),
            styles: styles.clone(),
            value_fmt: Some(fmt),
            size: None,
        };
        let caption = "Elapsed training time of each run (summary.json, or the last logged `elapsed_s` of a run still going).".into();
        w.emit(&plot, "Time, memory and throughput", "time", "Wall-clock time per run", caption);
    } else {
        w.set.skipped.push("time: no run recorded its elapsed time".into());
    }
    let (idx, mem): (Vec<usize>, Vec<f64>) =
        runs.iter().enumerate().filter_map(|(i, r)| r.peak_mem_mb.map(|m| (i, m))).unzip();
    if let Some(max) = mem.iter().copied().reduce(f64::max) {
        let (div, unit, fmt): (f64, &str, fn(f64) -> String) =
            if max >= 10_240.0 { (1024.0, "GiB", fmt_gib) } else { (1.0, "MiB", fmt_mib) };
        let plot = HBarPlot {
            title: "Peak GPU memory per run".into(),
            x_label: format!("peak allocated CUDA memory ({unit})"),
            labels: idx.iter().map(|&i| cells[i].clone()).collect(),
            values: mem.iter().map(|m| Some(m / div)).collect(),
            styles: idx.iter().map(|&i| styles[i]).collect(),
            value_fmt: Some(fmt),
            size: None,
        };
        let caption = "Peak CUDA memory allocated by each run (`peak_mem_mb`); runs without it (on the CPU) are left out.".into();
        w.emit(&plot, "Time, memory and throughput", "memory", "Peak GPU memory per run", caption);
    } else {
        w.set.skipped.push("memory: no run recorded peak GPU memory (CPU runs)".into());
    }
    let mut units: Vec<String> = runs.iter().filter_map(|r| r.throughput_unit.clone()).collect();
    units.sort();
    units.dedup();
    for unit in units {
        let vals: Vec<Option<f64>> = runs
            .iter()
            .map(|r| r.throughput.filter(|_| r.throughput_unit.as_deref() == Some(unit.as_str())))
            .collect();
        if vals.iter().all(Option::is_none) {
            continue;
        }
        let (idx, vals): (Vec<usize>, Vec<f64>) =
            vals.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).unzip();
        let shown = unit.replace("_per_s", "/s");
        let title = format!("Throughput per run ({shown})");
        let plot = HBarPlot {
            title: title.clone(),
            x_label: format!("throughput ({shown})"),
            labels: idx.iter().map(|&i| cells[i].clone()).collect(),
            values: vals.into_iter().map(Some).collect(),
            styles: idx.iter().map(|&i| styles[i]).collect(),
            value_fmt: Some(compact),
            size: None,
        };
        let caption = format!("Training throughput of each run in {shown} over the whole run.");
        w.emit(&plot, "Time, memory and throughput", &format!("throughput_{unit}"), &title, caption);
    }

    w.set.removed = remove_stale(&dir, &w.set.files);
    let report = dir.join("report.md");
    let text = report_markdown(project, &w.drawn, &w.set)?;
    let tmp = dir.join(".report.md.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &report).with_context(|| format!("{}: cannot write", report.display()))?;
    w.set.files.push(report.clone());
    w.set.report = report;
    Ok(w.set)
}

fn report_markdown(project: &Project, drawn: &[Drawn], set: &GraphSet) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!("# Results: {}\n\n", project.name));
    out.push_str(&format!(
        "Generated by `knlp graphs` at {} from `{}`: {}.\n\n",
        now_iso(),
        project.dir.display(),
        status_line(project)
    ));
    out.push_str("## Runs\n\n");
    let table = results_table(project, &TableOptions::default())?;
    out.push_str(&render_markdown(&table));
    out.push('\n');
    if !project.warnings.is_empty() {
        out.push_str("Problems found while reading the runs:\n\n");
        for w in &project.warnings {
            out.push_str(&format!("- `{}`\n", w.replace('`', "'")));
        }
        out.push('\n');
    }
    let mut section = "";
    for d in drawn {
        if d.section != section {
            section = d.section;
            out.push_str(&format!("## {section}\n\n"));
        }
        out.push_str(&format!("### {}\n\n{}\n\n", d.title, d.caption));
        out.push_str(&format!("![{}]({}.png)\n\n[SVG]({}.svg)\n\n", d.title, d.stem, d.stem));
    }
    if !set.skipped.is_empty() || !set.warnings.is_empty() {
        out.push_str("## Not drawn\n\n");
        for s in set.skipped.iter().chain(&set.warnings) {
            out.push_str(&format!("- {s}\n"));
        }
        out.push('\n');
    }
    Ok(out)
}
