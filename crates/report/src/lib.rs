//! knlp-report: results tables and graphs over knlp run directories.
//!
//! A project is `runs/<project>/`, one folder per run (a matrix "cell") with
//! `config.json`, `status.json`, `metrics.jsonl` and `summary.json`. This
//! crate reads them without knowing the trainer (no tch, no knlp), builds a
//! polars table of the runs ([`load_project`], [`results_table`]), prints and
//! exports it ([`results`]), and draws graphs with plotters into
//! `runs/<project>/graphs/` with a `report.md` ([`graphs`]).
//!
//! Nothing here panics on bad input: a missing or malformed file becomes a
//! warning naming it (and the line, for `metrics.jsonl`) and a note on its run.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use polars::prelude::DataFrame;

pub mod archive;
pub mod frame;
pub mod graphs;
pub mod heatmap;
pub mod load;
pub mod plot;
pub mod table;
pub mod util;

pub use polars;

pub use archive::{archive, Archived};
pub use frame::{Agg, Cell, Filter, Op};
pub use graphs::{write_graphs, GraphSet};
pub use load::{list_projects, load_project, resolve_project, History, Project, RunInfo};
pub use plot::{BarPlot, Bars, HBarPlot, Line, LinePlot, Style};
pub use table::{
    format_cell, render_html, render_markdown, render_text, results_table, TableOptions, ALL_COLUMNS,
};

/// What `knlp results` was asked for.
#[derive(Clone, Debug, Default)]
pub struct ResultsArgs {
    /// A project name under `root` or a path; `None`: the most recently
    /// modified project under `root`.
    pub project: Option<String>,
    /// Where projects live (`runs`).
    pub root: PathBuf,
    pub table: TableOptions,
    /// Also write the table (raw values) to this CSV file.
    pub csv: Option<PathBuf>,
    /// Also write the table (raw values) to this Parquet file.
    pub parquet: Option<PathBuf>,
}

/// `knlp results`: load the project, print its table to `out` with a status
/// line and the warnings, and write the exports. Returns the table.
pub fn results(args: &ResultsArgs, out: &mut dyn Write) -> Result<DataFrame> {
    let dir = resolve_project(args.project.as_deref(), &args.root)?;
    let project = load_project(&dir)?;
    let df = results_table(&project, &args.table)?;
    writeln!(out, "project {} ({})", dir.display(), table::status_line(&project))?;
    if df.height() < project.runs.len() {
        writeln!(out, "{} of {} runs shown (filtered)", df.height(), project.runs.len())?;
    }
    writeln!(out)?;
    write!(out, "{}", render_text(&df))?;
    for w in &project.warnings {
        writeln!(out, "warning: {w}")?;
    }
    if let Some(p) = &args.csv {
        table::write_csv(&df, p)?;
        writeln!(out, "wrote {}", p.display())?;
    }
    if let Some(p) = &args.parquet {
        table::write_parquet(&df, p)?;
        writeln!(out, "wrote {}", p.display())?;
    }
    Ok(df)
}

/// `knlp graphs` (`make update-graphs`): draw every graph of the project into
/// `<project>/graphs/` (PNG and SVG) with `report.md`, and list them on `out`.
pub fn graphs(project: Option<&str>, root: &Path, out: &mut dyn Write) -> Result<GraphSet> {
    let dir = resolve_project(project, root)?;
    let project = load_project(&dir)?;
    let set = write_graphs(&project)?;
    writeln!(out, "project {} ({})", dir.display(), table::status_line(&project))?;
    for f in &set.files {
        writeln!(out, "wrote {}", f.display())?;
    }
    for s in &set.skipped {
        writeln!(out, "skipped: {s}")?;
    }
    for f in &set.removed {
        writeln!(out, "removed {} (no longer supported by the data)", f.display())?;
    }
    for w in &project.warnings {
        writeln!(out, "warning: {w}")?;
    }
    for w in &set.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(set)
}
