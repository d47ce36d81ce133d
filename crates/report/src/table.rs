//! The results table: one row per run, sorted and filtered with polars,
//! printed with readable formatting, exported to CSV and Parquet.
use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use polars::prelude::*;

use crate::frame::{self, Cell, Filter};
use crate::load::{Project, RunInfo};
use crate::util::{compact, general, human_time, trim_float};

/// Every column of the runs frame, in order.
pub const ALL_COLUMNS: &[&str] = &[
    "cell",
    "status",
    "model",
    "optimizer",
    "pruning",
    "variant",
    "target_sparsity",
    "sparsity",
    "best_acc",
    "final_acc",
    "best_ppl",
    "final_ppl",
    "final_loss",
    "train_loss",
    "steps",
    "epochs",
    "time_s",
    "peak_mem_mb",
    "throughput",
    "throughput_unit",
    "infer_ms",
    "infer_per_s",
    "kv_keep",
    "kv_ppl",
    "kv_ppl_dense",
    "kv_ppl_recon",
    "gpu_util",
    "gpu_power_w",
    "lr",
    "seed",
    "reason",
    "updated",
    "run",
    "notes",
];

/// Columns shown by default; those with no value in any row are left out.
pub const DEFAULT_COLUMNS: &[&str] = &[
    "cell",
    "status",
    "model",
    "optimizer",
    "pruning",
    "variant",
    "target_sparsity",
    "sparsity",
    "best_acc",
    "final_acc",
    "best_ppl",
    "final_ppl",
    "time_s",
    "peak_mem_mb",
    "throughput",
    "throughput_unit",
    "infer_ms",
    "infer_per_s",
    "kv_keep",
    "kv_ppl",
    "kv_ppl_dense",
    "kv_ppl_recon",
    "gpu_util",
    "gpu_power_w",
    "notes",
];

/// Always shown by default, even when empty.
const KEEP: &[&str] = &["cell", "status"];

/// How `results_table` shapes the table.
#[derive(Clone, Debug, Default)]
pub struct TableOptions {
    /// Sort keys in order: a column name, `-name` for descending.
    pub sort: Vec<String>,
    /// `COL=VALUE` (also `!=`, `<`, `<=`, `>`, `>=`); all must hold.
    pub filters: Vec<String>,
    /// Exactly these columns (default: [`DEFAULT_COLUMNS`] that have values).
    pub columns: Option<Vec<String>>,
    /// Every column of [`ALL_COLUMNS`].
    pub all_columns: bool,
}

/// The runs as a DataFrame with [`ALL_COLUMNS`].
pub fn runs_frame(runs: &[RunInfo]) -> Result<DataFrame> {
    let s = |f: &dyn Fn(&RunInfo) -> Option<String>| -> Vec<Option<String>> { runs.iter().map(f).collect() };
    let x = |f: &dyn Fn(&RunInfo) -> Option<f64>| -> Vec<Option<f64>> { runs.iter().map(f).collect() };
    let n = |name: &str| PlSmallStr::from(name);
    let cols: Vec<Column> = vec![
        Column::new(n("cell"), s(&|r| Some(r.cell.clone()))),
        Column::new(n("status"), s(&|r| Some(r.status.clone()))),
        Column::new(n("model"), s(&|r| r.model.clone())),
        Column::new(n("optimizer"), s(&|r| r.optimizer.clone())),
        Column::new(n("pruning"), s(&|r| Some(r.pruning.clone()))),
        Column::new(n("variant"), s(&|r| r.variant.clone())),
        Column::new(n("target_sparsity"), x(&|r| r.target_sparsity)),
        Column::new(n("sparsity"), x(&|r| r.sparsity)),
        Column::new(n("best_acc"), x(&|r| r.best_acc)),
        Column::new(n("final_acc"), x(&|r| r.final_acc)),
        Column::new(n("best_ppl"), x(&|r| r.best_ppl)),
        Column::new(n("final_ppl"), x(&|r| r.final_ppl)),
        Column::new(n("final_loss"), x(&|r| r.final_loss)),
        Column::new(n("train_loss"), x(&|r| r.train_loss)),
        Column::new(n("steps"), runs.iter().map(|r| r.steps).collect::<Vec<Option<i64>>>()),
        Column::new(n("epochs"), x(&|r| r.epochs)),
        Column::new(n("time_s"), x(&|r| r.time_s)),
        Column::new(n("peak_mem_mb"), x(&|r| r.peak_mem_mb)),
        Column::new(n("throughput"), x(&|r| r.throughput)),
        Column::new(n("throughput_unit"), s(&|r| r.throughput_unit.clone())),
        Column::new(n("infer_ms"), x(&|r| r.infer_ms)),
        Column::new(n("infer_per_s"), x(&|r| r.infer_per_s)),
        Column::new(n("kv_keep"), x(&|r| r.kv_keep)),
        Column::new(n("kv_ppl"), x(&|r| r.kv_ppl)),
        Column::new(n("kv_ppl_dense"), x(&|r| r.kv_ppl_dense)),
        Column::new(n("kv_ppl_recon"), x(&|r| r.kv_ppl_recon)),
        Column::new(n("gpu_util"), x(&|r| r.gpu_util)),
        Column::new(n("gpu_power_w"), x(&|r| r.gpu_power_w)),
        Column::new(n("lr"), x(&|r| r.lr)),
        Column::new(n("seed"), runs.iter().map(|r| r.seed).collect::<Vec<Option<i64>>>()),
        Column::new(n("reason"), s(&|r| r.reason.clone())),
        Column::new(n("updated"), s(&|r| r.updated.clone())),
        Column::new(n("run"), s(&|r| Some(r.run.clone()))),
        Column::new(n("notes"), s(&|r| (!r.notes.is_empty()).then(|| r.notes.join("; ")))),
    ];
    debug_assert_eq!(cols.len(), ALL_COLUMNS.len());
    DataFrame::new(runs.len(), cols).map_err(|e| anyhow!("building the runs table: {e}"))
}

/// The project's table after filters, sort and column choice.
pub fn results_table(project: &Project, opts: &TableOptions) -> Result<DataFrame> {
    shape_table(&project.frame, opts)
}

/// [`results_table`] over any runs frame.
pub fn shape_table(df: &DataFrame, opts: &TableOptions) -> Result<DataFrame> {
    let filters = opts.filters.iter().map(|f| Filter::parse(f)).collect::<Result<Vec<_>>>()?;
    let df = frame::filter(df, &filters)?;
    let keys: Vec<(String, bool)> = opts.sort.iter().flat_map(|s| frame::parse_sort(s)).collect();
    let df = frame::sort(&df, &keys)?;
    if let Some(cols) = &opts.columns {
        let cols: Vec<String> = cols
            .iter()
            .flat_map(|c| c.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        return frame::select(&df, &cols);
    }
    if opts.all_columns {
        return Ok(df);
    }
    let have = frame::column_names(&df);
    let keep: Vec<&str> = DEFAULT_COLUMNS
        .iter()
        .copied()
        .filter(|c| have.iter().any(|h| h == c))
        .filter(|c| KEEP.contains(c) || df.column(c).map(|s| s.null_count() < s.len()).unwrap_or(false))
        .collect();
    frame::select(&df, &keep)
}

/// Counts by status: `5 runs: 3 done, 1 running, 1 failed`.
pub fn status_line(project: &Project) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for r in &project.runs {
        match counts.iter_mut().find(|(s, _)| *s == r.status) {
            Some((_, n)) => *n += 1,
            None => counts.push((r.status.clone(), 1)),
        }
    }
    let order = ["done", "running", "pending", "interrupted", "failed", "unknown"];
    counts.sort_by_key(|(s, _)| order.iter().position(|o| o == s).unwrap_or(order.len()));
    let n = project.runs.len();
    let parts: Vec<String> = counts.iter().map(|(s, c)| format!("{c} {s}")).collect();
    format!(
        "{n} run{}{}{}",
        if n == 1 { "" } else { "s" },
        if parts.is_empty() { "" } else { ": " },
        parts.join(", ")
    )
}

fn short_unit(unit: &str) -> &str {
    match unit {
        "samples_per_s" => "samples/s",
        "tokens_per_s" => "tokens/s",
        u => u,
    }
}

/// Readable text of one value of column `col`: percent for accuracy and
/// sparsity, 2 decimals for perplexity, human time, MiB, compact throughput.
pub fn format_cell(col: &str, v: &Cell, unit: Option<&str>) -> String {
    let x = match v {
        Cell::Null => return "-".into(),
        Cell::Str(s) => return s.clone(),
        Cell::Bool(b) => return b.to_string(),
        Cell::Int(i) if !is_float_col(col) => return i.to_string(),
        Cell::Int(i) => *i as f64,
        Cell::Float(f) => *f,
    };
    if !x.is_finite() {
        return x.to_string();
    }
    let c = col.to_ascii_lowercase();
    if c.ends_with("acc") || c.ends_with("accuracy") {
        format!("{:.2}%", x * 100.0)
    } else if c.contains("sparsity") {
        format!("{}%", trim_float(x * 100.0, 1))
    } else if c.ends_with("ppl") || c.contains("perplexity") {
        format!("{x:.2}")
    } else if c.contains("loss") {
        format!("{x:.4}")
    } else if c == "time_s" || c.ends_with("elapsed_s") || c == "time" {
        human_time(x)
    } else if c.ends_with("mem_mb") {
        if x >= 10_240.0 {
            format!("{:.1} GiB", x / 1024.0)
        } else {
            format!("{x:.0} MiB")
        }
    } else if c == "throughput" || c.ends_with("_per_s") {
        match unit {
            Some(u) => format!("{} {}", compact(x), short_unit(u)),
            None => compact(x),
        }
    } else if c.ends_with("_ms") {
        format!("{x:.2} ms")
    } else if c == "gpu_util" {
        format!("{x:.0}%")
    } else if c.ends_with("_w") {
        format!("{x:.0} W")
    } else if c == "epochs" || c == "epoch" {
        trim_float(x, 2)
    } else if c == "lr" {
        format!("{x:.1e}")
    } else {
        general(x)
    }
}

fn is_float_col(col: &str) -> bool {
    let c = col.to_ascii_lowercase();
    c.ends_with("acc")
        || c.contains("sparsity")
        || c.ends_with("ppl")
        || c.ends_with("_s")
        || c.ends_with("mem_mb")
        || c.ends_with("_ms")
}

/// Rendered cells: headers and rows of text, and which columns are numbers.
/// `throughput_unit` is folded into `throughput` when both are present.
fn rendered(df: &DataFrame) -> (Vec<String>, Vec<Vec<String>>, Vec<bool>) {
    let names = frame::column_names(df);
    let fold_unit = names.iter().any(|n| n == "throughput") && names.iter().any(|n| n == "throughput_unit");
    let shown: Vec<usize> =
        (0..names.len()).filter(|&i| !(fold_unit && names[i] == "throughput_unit")).collect();
    let numeric: Vec<bool> = shown.iter().map(|&i| df.columns()[i].dtype().is_primitive_numeric()).collect();
    let unit_idx = names.iter().position(|n| n == "throughput_unit");
    let rows = frame::to_rows(df)
        .into_iter()
        .map(|row| {
            let unit = match (fold_unit, unit_idx) {
                (true, Some(u)) => match &row[u].1 {
                    Cell::Str(s) => Some(s.clone()),
                    _ => None,
                },
                _ => None,
            };
            shown.iter().map(|&i| format_cell(&names[i], &row[i].1, unit.as_deref())).collect()
        })
        .collect();
    (shown.iter().map(|&i| names[i].clone()).collect(), rows, numeric)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let t: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{t}…")
    }
}

/// An aligned text table (numbers right-aligned; long text cut at 48 characters).
pub fn render_text(df: &DataFrame) -> String {
    let (headers, rows, numeric) = rendered(df);
    let rows: Vec<Vec<String>> =
        rows.into_iter().map(|r| r.iter().map(|c| truncate(c, 48)).collect()).collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: &[String]| -> String {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i].saturating_sub(c.chars().count());
                if numeric[i] {
                    format!("{}{c}", " ".repeat(pad))
                } else {
                    format!("{c}{}", " ".repeat(pad))
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = line(&headers);
    out.push('\n');
    out.push_str(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no rows)\n");
    }
    out
}

/// A GitHub-flavoured markdown table with the same formatting.
pub fn render_markdown(df: &DataFrame) -> String {
    let (headers, rows, numeric) = rendered(df);
    let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = format!("| {} |\n", headers.iter().map(|h| esc(h)).collect::<Vec<_>>().join(" | "));
    let seps: Vec<&str> = numeric.iter().map(|n| if *n { "---:" } else { "---" }).collect();
    out.push_str(&format!("| {} |\n", seps.join(" | ")));
    for r in &rows {
        out.push_str(&format!("| {} |\n", r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")));
    }
    out
}

/// The table as an HTML `<table>`, formatted as `render_markdown` formats it
/// (notebooks show this for a Frame); `max_rows` rows at most, with a note
/// of how many were left out.
pub fn render_html(df: &DataFrame, max_rows: usize) -> String {
    let (headers, rows, numeric) = rendered(df);
    let esc = crate::util::html_escape;
    let align =
        |i: usize| if numeric.get(i).copied().unwrap_or(false) { " style=\"text-align:right\"" } else { "" };
    let mut out = String::from("<table>\n<thead><tr>");
    for (i, h) in headers.iter().enumerate() {
        out.push_str(&format!("<th{}>{}</th>", align(i), esc(h)));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for r in rows.iter().take(max_rows) {
        out.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            out.push_str(&format!("<td{}>{}</td>", align(i), esc(c)));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
    let shown = rows.len().min(max_rows);
    out.push_str(&format!("<p>{} rows × {} columns", rows.len(), headers.len()));
    if shown < rows.len() {
        out.push_str(&format!(" ({} rows not shown)", rows.len() - shown));
    }
    out.push_str("</p>\n");
    out
}

fn create(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    File::create(path).with_context(|| format!("{}: cannot create", path.display()))
}

/// Write `df` as CSV with a header (raw values, not the printed formatting).
pub fn write_csv(df: &DataFrame, path: &Path) -> Result<()> {
    let mut f = create(path)?;
    let mut df = df.clone();
    CsvWriter::new(&mut f)
        .include_header(true)
        .finish(&mut df)
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Write `df` as Parquet (raw values).
pub fn write_parquet(df: &DataFrame, path: &Path) -> Result<()> {
    let f = create(path)?;
    let mut df = df.clone();
    ParquetWriter::new(f).finish(&mut df).map(|_| ()).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Read a CSV file written by [`write_csv`] (or any CSV with a header).
pub fn read_csv(path: &Path) -> Result<DataFrame> {
    CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Read a Parquet file.
pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    ParquetReader::new(f).finish().map_err(|e| anyhow!("{}: {e}", path.display()))
}
