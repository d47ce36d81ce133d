//! Results and graphs in scripts: a project's runs as a `Frame` (a polars
//! data frame from the knlp-report crate) to filter, sort, group and export,
//! and `plot_lines` / `plot_bars` in the style of `knlp graphs`.
use std::path::{Path, PathBuf};

use report::frame::{self, Agg, Cell, Filter, Op};
use report::polars::prelude::DataFrame;
use report::{BarPlot, Bars, Line, LinePlot, Style};
use rhai::{Array, Dynamic, Engine, FnPtr, ImmutableString, Map, NativeCallContext, FLOAT, INT};

use super::api::{Api, DocEntry};
use super::value::*;

/// Where `runs("name")` looks for projects.
const RUNS_ROOT: &str = "runs";

/// A table held by a script. Cloning is cheap (columns are shared).
#[derive(Clone)]
pub struct RFrame(pub DataFrame);

/// `frame.group_by([...])`, waiting for `.agg(...)`.
#[derive(Clone)]
pub struct RGroupBy {
    df: DataFrame,
    keys: Vec<String>,
}

fn to_cell(v: &Dynamic, what: &str) -> RResult<Cell> {
    if v.is_unit() {
        return Ok(Cell::Null);
    }
    if let Ok(b) = v.as_bool() {
        return Ok(Cell::Bool(b));
    }
    if let Ok(i) = v.as_int() {
        return Ok(Cell::Int(i));
    }
    if let Ok(f) = v.as_float() {
        return Ok(Cell::Float(f));
    }
    if let Some(s) = v.read_lock::<ImmutableString>() {
        return Ok(Cell::Str(s.to_string()));
    }
    Err(rerr(format!("{what}: expected a string, number, bool or (), got {}", v.type_name())))
}

fn from_cell(c: &Cell) -> Dynamic {
    match c {
        Cell::Null => Dynamic::UNIT,
        Cell::Bool(b) => Dynamic::from_bool(*b),
        Cell::Int(i) => Dynamic::from_int(*i as INT),
        Cell::Float(f) => Dynamic::from_float(*f as FLOAT),
        Cell::Str(s) => Dynamic::from(s.clone()),
    }
}

fn row_map(row: &[(String, Cell)]) -> Map {
    row.iter().map(|(k, v)| (k.as_str().into(), from_cell(v))).collect()
}

/// Column names from an array of strings (or one string, comma separated).
fn names_arg(v: &Dynamic, what: &str) -> RResult<Vec<String>> {
    if let Some(s) = v.read_lock::<ImmutableString>() {
        return Ok(s.split(',').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect());
    }
    let Some(a) = v.read_lock::<Array>() else {
        return Err(rerr(format!("{what}: expected an array of column names, got {}", v.type_name())));
    };
    a.iter().map(|c| expect_str(c, what)).collect()
}

fn load(project: &str) -> RResult<report::Project> {
    let dir = report::resolve_project((!project.is_empty()).then_some(project), Path::new(RUNS_ROOT)).rt()?;
    let p = report::load_project(&dir).rt()?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    Ok(p)
}

fn describe(f: &RFrame) -> String {
    report::render_text(&f.0)
}

/// A frame from an array of maps.
fn frame_from_rows(rows: &Array) -> RResult<RFrame> {
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let Some(m) = r.read_lock::<Map>() else {
            return Err(rerr(format!("frame(): row {i} is a {}, expected a map", r.type_name())));
        };
        let row = m
            .iter()
            .map(|(k, v)| Ok((k.to_string(), to_cell(v, &format!("frame(): row {i}, key '{k}'"))?)))
            .collect::<RResult<Vec<_>>>()?;
        out.push(row);
    }
    frame::from_rows(&out).map(RFrame).rt()
}

fn filter_fn(ctx: &NativeCallContext, f: &RFrame, func: &FnPtr) -> RResult<RFrame> {
    let mut mask = Vec::with_capacity(f.0.height());
    for row in frame::to_rows(&f.0) {
        let keep: Dynamic = func.call_within_context(ctx, (Dynamic::from_map(row_map(&row)),))?;
        mask.push(
            keep.as_bool()
                .map_err(|t| rerr(format!("filter(): the function must return a bool, got {t}")))?,
        );
    }
    frame::filter_mask(&f.0, &mask).map(RFrame).rt()
}

const AGG_HELP: &str =
    "`#{ new_column: [\"mean\"|\"median\"|\"min\"|\"max\"|\"sum\"|\"count\"|\"first\"|\"last\", column] }`";

fn agg(g: &RGroupBy, spec: &Map) -> RResult<RFrame> {
    if spec.is_empty() {
        return Err(rerr(format!("agg(): give at least one aggregation: {AGG_HELP}")));
    }
    let mut aggs = Vec::new();
    for (out, v) in spec {
        let pair = v.read_lock::<Array>().map(|a| a.clone()).unwrap_or_default();
        let (Some(op), Some(col), 2) = (pair.first(), pair.get(1), pair.len()) else {
            return Err(rerr(format!("agg(): '{out}' must be [aggregation, column], as in {AGG_HELP}")));
        };
        let op = Agg::parse(&expect_str(op, "aggregation")?).rt()?;
        aggs.push((out.to_string(), op, expect_str(col, "column")?));
    }
    frame::group_agg(&g.df, &g.keys, &aggs).map(RFrame).rt()
}

const LINE_KEYS: &[&str] =
    &["title", "x_label", "y_label", "series", "log_y", "markers", "legend_title", "width", "height"];
const BAR_KEYS: &[&str] =
    &["title", "x_label", "y_label", "groups", "series", "values", "legend_title", "width", "height"];

fn opt_str(o: &Map, k: &str) -> RResult<String> {
    o.get(k).map(|v| expect_str(v, k)).transpose().map(Option::unwrap_or_default)
}

fn opt_bool(o: &Map, k: &str, default: bool) -> RResult<bool> {
    match o.get(k) {
        Some(v) => v.as_bool().map_err(|t| rerr(format!("{k} must be a bool, got {t}"))),
        None => Ok(default),
    }
}

fn size(o: &Map) -> RResult<Option<(u32, u32)>> {
    let get = |k: &str| -> RResult<Option<u32>> {
        match o.get(k) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Ok(n) if (200..=8000).contains(&n) => Ok(Some(n as u32)),
                _ => Err(rerr(format!("{k} must be an int from 200 to 8000 (pixels)"))),
            },
        }
    };
    match (get("width")?, get("height")?) {
        (None, None) => Ok(None),
        (w, h) => Ok(Some((w.unwrap_or(1100), h.unwrap_or(660)))),
    }
}

fn series_map(o: &Map, what: &str) -> RResult<Map> {
    o.get("series")
        .and_then(|s| s.read_lock::<Map>().map(|m| m.clone()))
        .ok_or_else(|| rerr(format!("{what}: `series` must be a map of name to values")))
}

fn line_plot(o: &Map) -> RResult<LinePlot> {
    check_keys(o, LINE_KEYS, "plot_lines")?;
    let series = series_map(o, "plot_lines")?;
    let mut lines = Vec::new();
    for (i, (name, pts)) in series.iter().enumerate() {
        let Some(a) = pts.read_lock::<Array>() else {
            return Err(rerr(format!("plot_lines: series '{name}' must be an array of [x, y] pairs")));
        };
        let mut points = Vec::with_capacity(a.len());
        for (j, p) in a.iter().enumerate() {
            let pair = p.read_lock::<Array>().map(|x| x.clone()).unwrap_or_default();
            if pair.len() != 2 {
                return Err(rerr(format!("plot_lines: series '{name}' point {j} is not an [x, y] pair")));
            }
            points.push((as_number(&pair[0], "x")?, as_number(&pair[1], "y")?));
        }
        lines.push(Line { name: name.to_string(), points, style: Style::nth(i) });
    }
    Ok(LinePlot {
        title: opt_str(o, "title")?,
        x_label: opt_str(o, "x_label")?,
        y_label: opt_str(o, "y_label")?,
        lines,
        hlines: Vec::new(),
        log_y: opt_bool(o, "log_y", false)?,
        markers: opt_bool(o, "markers", false)?,
        legend_title: o.get("legend_title").map(|v| expect_str(v, "legend_title")).transpose()?,
        size: size(o)?,
    })
}

fn bar_plot(o: &Map) -> RResult<BarPlot> {
    check_keys(o, BAR_KEYS, "plot_bars")?;
    let groups: Vec<String> = match o.get("groups").and_then(|g| g.read_lock::<Array>().map(|a| a.clone())) {
        Some(a) => a.iter().map(|g| g.to_string()).collect(),
        None => return Err(rerr("plot_bars: `groups` must be an array of group names")),
    };
    let series = series_map(o, "plot_bars")?;
    let mut bars = Vec::new();
    for (i, (name, vals)) in series.iter().enumerate() {
        let Some(a) = vals.read_lock::<Array>() else {
            return Err(rerr(format!("plot_bars: series '{name}' must be an array with a value per group")));
        };
        if a.len() != groups.len() {
            return Err(rerr(format!(
                "plot_bars: series '{name}' has {} values for {} groups",
                a.len(),
                groups.len()
            )));
        }
        let values = a
            .iter()
            .map(|v| if v.is_unit() { Ok(None) } else { as_number(v, "bar value").map(Some) })
            .collect::<RResult<Vec<_>>>()?;
        bars.push(Bars { name: name.to_string(), values, ranges: Vec::new(), style: Style::nth(i) });
    }
    Ok(BarPlot {
        title: opt_str(o, "title")?,
        x_label: opt_str(o, "x_label")?,
        y_label: opt_str(o, "y_label")?,
        groups,
        bars,
        hlines: Vec::new(),
        value_fmt: opt_bool(o, "values", true)?.then_some(report::util::general as fn(f64) -> String),
        legend_title: o.get("legend_title").map(|v| expect_str(v, "legend_title")).transpose()?,
        size: size(o)?,
    })
}

fn graph_files(project: &str) -> RResult<Array> {
    let p = load(project)?;
    let set = report::write_graphs(&p).rt()?;
    for w in &set.warnings {
        eprintln!("warning: {w}");
    }
    Ok(set.files.iter().map(|f| Dynamic::from(f.display().to_string())).collect())
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RFrame>("Frame");
    engine.register_type_with_name::<RGroupBy>("GroupBy");
    engine.register_fn("to_string", |f: &mut RFrame| describe(f));
    engine.register_fn("to_debug", |f: &mut RFrame| describe(f));
    engine.register_fn("to_string", |g: &mut RGroupBy| format!("GroupBy({})", g.keys.join(", ")));
    engine.register_fn("to_debug", |g: &mut RGroupBy| format!("GroupBy({})", g.keys.join(", ")));
    let mut api = Api::new(engine, docs);
    api.group("Results and graphs");
    api.f("runs", "project", "The results table of a project (a name under runs/, or a folder) as a Frame with every column of `knlp results --all`; problems reading it are printed as warnings.", |project: &str| -> RResult<RFrame> {
        Ok(RFrame(load(project)?.frame))
    });
    api.f(
        "runs",
        "",
        "The results table of the most recently modified project under runs/.",
        || -> RResult<RFrame> { Ok(RFrame(load("")?.frame)) },
    );
    api.f("run_metrics", "project", "Every metrics record of every run of a project as one Frame: `cell`, `step`, `epoch`, then each logged metric (null where a record lacks it).", |project: &str| -> RResult<RFrame> {
        load(project)?.metrics_frame().map(RFrame).rt()
    });
    api.f(
        "frame",
        "rows: array",
        "A Frame from an array of maps (one per row; keys are columns, missing keys are null).",
        |rows: Array| frame_from_rows(&rows),
    );
    api.get("len", "Number of rows.", |f: &mut RFrame| f.0.height() as INT);
    api.f("len", "self", "Number of rows.", |f: &mut RFrame| f.0.height() as INT);
    api.get("columns", "Column names, in order.", |f: &mut RFrame| -> Array {
        frame::column_names(&f.0).into_iter().map(Dynamic::from).collect()
    });
    api.f("filter", "self, column, value: any", "Rows where `column` equals `value` (text given for a number column is parsed, `\"70%\"` is 0.7; `()` matches missing values).", |f: &mut RFrame, col: &str, v: Dynamic| -> RResult<RFrame> {
        let flt = Filter { column: col.into(), op: Op::Eq, value: to_cell(&v, "filter value")? };
        frame::filter(&f.0, &[flt]).map(RFrame).rt()
    });
    api.f(
        "filter",
        "self, column, op, value: any",
        "Rows where `column op value`, `op` one of `==`, `!=`, `<`, `<=`, `>`, `>=`.",
        |f: &mut RFrame, col: &str, op: &str, v: Dynamic| -> RResult<RFrame> {
            let flt =
                Filter { column: col.into(), op: Op::parse(op).rt()?, value: to_cell(&v, "filter value")? };
            frame::filter(&f.0, &[flt]).map(RFrame).rt()
        },
    );
    api.f(
        "filter",
        "self, f: Fn",
        "Rows for which `f(row)` returns true; `row` is a map of column to value.",
        |ctx: NativeCallContext, f: &mut RFrame, func: FnPtr| filter_fn(&ctx, f, &func),
    );
    api.f("sort", "self, column", "Sorted by `column` ascending (`\"-col\"` descending; `\"a,-b\"` for several keys); missing values last.", |f: &mut RFrame, spec: &str| -> RResult<RFrame> {
        frame::sort(&f.0, &frame::parse_sort(spec)).map(RFrame).rt()
    });
    api.f(
        "sort",
        "self, column, descending",
        "Sorted by `column`, descending if `descending`; missing values last.",
        |f: &mut RFrame, col: &str, desc: bool| -> RResult<RFrame> {
            frame::sort(&f.0, &[(col.to_string(), desc)]).map(RFrame).rt()
        },
    );
    api.f(
        "select",
        "self, columns: array",
        "Only these columns, in this order.",
        |f: &mut RFrame, cols: Array| -> RResult<RFrame> {
            let cols = names_arg(&Dynamic::from_array(cols), "select")?;
            frame::select(&f.0, &cols).map(RFrame).rt()
        },
    );
    api.f("head", "self, n", "The first `n` rows.", |f: &mut RFrame, n: INT| -> RResult<RFrame> {
        Ok(RFrame(f.0.head(Some(n.max(0) as usize))))
    });
    api.f(
        "group_by",
        "self, columns: array|string",
        "Group rows by these columns (in order of first appearance), for `.agg(...)`.",
        |f: &mut RFrame, cols: Dynamic| -> RResult<RGroupBy> {
            let keys = names_arg(&cols, "group_by")?;
            frame::check_columns(&f.0, &keys).rt()?;
            Ok(RGroupBy { df: f.0.clone(), keys })
        },
    );
    api.f("agg", "self, aggregations: map", "One row per group with the key columns and `#{ new_column: [\"mean\"|\"median\"|\"min\"|\"max\"|\"sum\"|\"count\"|\"first\"|\"last\", column] }` (`count` counts non-missing values).", |g: &mut RGroupBy, spec: Map| agg(g, &spec));
    api.f(
        "show",
        "self",
        "Print the table as `knlp results` does (percent, perplexity, human time).",
        |f: &mut RFrame| {
            print!("{}", describe(f));
        },
    );
    api.f(
        "to_markdown",
        "self",
        "The table as markdown, formatted as `show()` prints it.",
        |f: &mut RFrame| report::render_markdown(&f.0),
    );
    api.f(
        "to_csv",
        "self, path",
        "Write the raw values as CSV with a header.",
        |f: &mut RFrame, path: &str| -> RResult<()> {
            report::table::write_csv(&f.0, &PathBuf::from(path)).rt()
        },
    );
    api.f(
        "to_parquet",
        "self, path",
        "Write the raw values as Parquet.",
        |f: &mut RFrame, path: &str| -> RResult<()> {
            report::table::write_parquet(&f.0, &PathBuf::from(path)).rt()
        },
    );
    api.f(
        "rows",
        "self",
        "Every row as a map of column to value (`()` where missing).",
        |f: &mut RFrame| -> Array {
            frame::to_rows(&f.0).iter().map(|r| Dynamic::from_map(row_map(r))).collect()
        },
    );
    api.f(
        "column",
        "self, name",
        "The values of one column as an array.",
        |f: &mut RFrame, name: &str| -> RResult<Array> {
            Ok(frame::column_cells(&f.0, name).rt()?.iter().map(from_cell).collect())
        },
    );
    api.f("plot_lines", "path, options: map", "Draw a line chart to a .png or .svg file (shown inline in a notebook): `#{ title, x_label, y_label, series: #{ name: [[x, y], ...] }, log_y, markers, legend_title, width, height }`; series are drawn in name order with the colors of `knlp graphs`.", |path: &str, o: Map| -> RResult<()> {
        report::plot::save(&line_plot(&o)?, Path::new(path)).rt()?;
        super::display::show_files(&[PathBuf::from(path)]);
        Ok(())
    });
    api.f("plot_bars", "path, options: map", "Draw grouped bars to a .png or .svg file (shown inline in a notebook): `#{ title, x_label, y_label, groups: [...], series: #{ name: [value per group, () for none] }, values (labels on bars, default true), legend_title, width, height }`.", |path: &str, o: Map| -> RResult<()> {
        report::plot::save(&bar_plot(&o)?, Path::new(path)).rt()?;
        super::display::show_files(&[PathBuf::from(path)]);
        Ok(())
    });
    api.f("scaling_report", "projects: array, out", "The scaling curves of the GPT-2 runs of `projects` (names under runs/ or folders) into folder `out`, as `knlp scaling` (docs/scaling.md): `#{ out, markdown, curves: [#{ key, source: \"measured\"|\"analytic\", points, means, fits: #{ project: #{ a, x_min, y_min, extrapolated } }, positions, left_out, files }], skipped }`; files are relative to `out`.", |projects: Array, out: &str| -> RResult<Dynamic> {
        let dirs = projects
            .iter()
            .map(|p| {
                let name = p.clone().into_string().map_err(|t| rerr(format!("scaling_report: projects must be strings, got {t}")))?;
                report::resolve_project(Some(&name), Path::new(RUNS_ROOT)).rt()
            })
            .collect::<RResult<Vec<PathBuf>>>()?;
        if dirs.is_empty() {
            return Err(rerr("scaling_report: give at least one project"));
        }
        let r = crate::scaling::report(&dirs, Path::new(out)).rt()?;
        super::display::show_files(&r.curves.iter().flat_map(|c| c.files.iter().filter(|f| f.extension().is_some_and(|e| e == "png")).map(|f| r.out.join(f))).collect::<Vec<_>>());
        rhai::serde::to_dynamic(&r).map_err(|e| rerr(e.to_string()))
    });
    api.f("graphs", "project", "Draw every graph of a project and its report.md into <project>/graphs/ (as `knlp graphs`); returns the files written.", |project: &str| graph_files(project));
    api.f("graphs", "", "`graphs(project)` for the most recently modified project under runs/.", || {
        graph_files("")
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_round_trip() {
        for c in [Cell::Null, Cell::Bool(true), Cell::Int(3), Cell::Float(0.5), Cell::Str("x".into())] {
            assert_eq!(to_cell(&from_cell(&c), "t").unwrap(), c);
        }
        assert!(to_cell(&Dynamic::from_array(vec![]), "t").is_err());
    }
}
