//! The results table, exports and graphs over a synthetic project.
mod common;

use std::fs;
use std::path::Path;

use polars::prelude::*;
use report::frame::{self, Agg, Cell};
use report::table::{self, TableOptions};
use report::{load_project, results_table, BarPlot, Bars, Line, LinePlot, Style};

fn cell_str(df: &DataFrame, col: &str, row: usize) -> String {
    match &frame::column_cells(df, col).unwrap()[row] {
        Cell::Str(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cell_f64(df: &DataFrame, col: &str, row: usize) -> Option<f64> {
    frame::column_cells(df, col).unwrap()[row].as_f64()
}

fn row_of(df: &DataFrame, cell: &str) -> usize {
    let cells = frame::column_cells(df, "cell").unwrap();
    cells.iter().position(|c| *c == Cell::Str(cell.into())).unwrap_or_else(|| panic!("no row {cell}"))
}

/// PNG signature and IHDR width/height.
fn png_size(path: &Path) -> (u32, u32) {
    let b = fs::read(path).unwrap();
    assert!(b.len() > 1000, "{} is tiny", path.display());
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert_eq!(&b[12..16], b"IHDR");
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    (w, h)
}

fn check_svg(path: &Path) {
    let t = fs::read_to_string(path).unwrap();
    assert!(t.contains("<svg") && t.trim_end().ends_with("</svg>"), "{} is not an SVG", path.display());
    assert!(t.contains("<text"), "{} has no text", path.display());
}

#[test]
fn table_rows_columns_and_values() {
    let root = common::temp_dir("table");
    let dir = common::build(&root, "proj");
    let p = load_project(&dir).unwrap();
    // 10 matrix cells with folders, 1 without, the plain run; graphs/ and notes/ are not runs.
    assert_eq!(p.runs.len(), 12, "{:?}", p.runs.iter().map(|r| &r.cell).collect::<Vec<_>>());
    assert_eq!(p.frame.height(), 12);
    assert_eq!(frame::column_names(&p.frame), report::ALL_COLUMNS);

    let df = results_table(&p, &TableOptions::default()).unwrap();
    let cols = frame::column_names(&df);
    for c in ["cell", "status", "model", "optimizer", "pruning", "variant", "target_sparsity", "sparsity"] {
        assert!(cols.contains(&c.to_string()), "missing {c} in {cols:?}");
    }
    for c in
        ["best_acc", "final_acc", "best_ppl", "final_ppl", "time_s", "peak_mem_mb", "throughput", "notes"]
    {
        assert!(cols.contains(&c.to_string()), "missing {c} in {cols:?}");
    }
    assert!(!cols.contains(&"reason".to_string()), "reason is not a default column");

    let r = row_of(&df, "lenet5_adamwprune_state-bitter7_70");
    assert_eq!(cell_str(&df, "status", r), "done");
    assert_eq!(cell_str(&df, "model", r), "lenet5");
    assert_eq!(cell_str(&df, "optimizer", r), "adamwprune");
    assert_eq!(cell_str(&df, "pruning", r), "state");
    assert_eq!(cell_str(&df, "variant", r), "bitter7");
    assert_eq!(cell_f64(&df, "target_sparsity", r), Some(0.7));
    assert!((cell_f64(&df, "sparsity", r).unwrap() - 0.701).abs() < 1e-9);
    assert!((cell_f64(&df, "final_acc", r).unwrap() - 0.885).abs() < 1e-9);
    assert_eq!(cell_f64(&df, "final_ppl", r), None);
    assert!(cell_f64(&df, "time_s", r).unwrap() > 0.0);

    // Language model: perplexity, tokens per second, memory.
    let r = row_of(&df, "gpt2_adamwprune_state-bitter7_50");
    assert!((cell_f64(&df, "final_ppl", r).unwrap() - 45.25).abs() < 1e-9);
    assert_eq!(cell_f64(&df, "final_acc", r), None);
    assert_eq!(cell_str(&df, "throughput_unit", r), "tokens_per_s");
    assert!(cell_f64(&df, "peak_mem_mb", r).is_some());

    // Failed: status and reason (in the full frame).
    let r = row_of(&p.frame, "lenet5_sgd_magnitude_70");
    assert_eq!(cell_str(&p.frame, "status", r), "failed");
    assert!(cell_str(&p.frame, "reason", r).contains("NaN"));

    // Running: no summary; metrics from the log, torn last line ignored.
    let r = row_of(&df, "lenet5_adamw_movement-knlp_70");
    assert_eq!(cell_str(&df, "status", r), "running");
    assert_eq!(cell_str(&df, "variant", r), "knlp");
    assert!(cell_f64(&df, "final_acc", r).is_some(), "metrics of a running run come from metrics.jsonl");
    let i = p.runs.iter().position(|x| x.cell == "lenet5_adamw_movement-knlp_70").unwrap();
    assert_eq!(p.histories[i].records.last().unwrap()["step"], 300);
    assert!(p.runs[i].notes.is_empty(), "a torn last line is not a problem: {:?}", p.runs[i].notes);

    // Listed in matrix.json, no folder: pending, with the cell's fields.
    let r = row_of(&df, "gpt2_adamw_magnitude_50");
    assert_eq!(cell_str(&df, "status", r), "pending");
    assert_eq!(cell_str(&df, "pruning", r), "magnitude");
    assert_eq!(cell_f64(&df, "target_sparsity", r), Some(0.5));

    // Pending: config only.
    let r = row_of(&df, "lenet5_adamw_magnitude_95");
    assert_eq!(cell_str(&df, "status", r), "pending");
    assert_eq!(cell_f64(&df, "final_acc", r), None);

    // Malformed summary: a note and a warning naming the file; metrics from the log.
    let r = row_of(&df, "lenet5_adamw_magnitude_90");
    assert!(cell_str(&df, "notes", r).contains("summary.json malformed"));
    assert!(p.warnings.iter().any(|w| w.contains("lenet5_adamw_magnitude_90/summary.json")));
    assert!(cell_f64(&df, "final_acc", r).is_some());
    assert_eq!(cell_str(&df, "status", r), "done");

    // A bad line in the middle: skipped, warned with its line number.
    assert!(
        p.warnings.iter().any(|w| w.contains("lenet5_sgd_magnitude_50/metrics.jsonl:3:")),
        "{:?}",
        p.warnings
    );
    let r = row_of(&df, "lenet5_sgd_magnitude_50");
    assert!(cell_str(&df, "notes", r).contains("1 bad line"));

    // Not a matrix cell: fields from arch, optimizer.kind and pruning.
    let r = row_of(&df, "lenet5-adamw-seed0");
    assert_eq!(cell_str(&df, "model", r), "lenet5");
    assert_eq!(cell_str(&df, "optimizer", r), "adamw");
    assert_eq!(cell_str(&df, "pruning", r), "none");
    assert!((cell_f64(&df, "best_acc", r).unwrap() - 0.8917).abs() < 1e-9);

    // Formatting: percent, perplexity, time, throughput with its unit.
    let text = table::render_text(&df);
    assert!(text.contains("88.50%"), "{text}");
    assert!(text.contains("45.25"), "{text}");
    assert!(text.contains("70%"), "{text}");
    assert!(text.contains("samples/s") && text.contains("tokens/s"), "{text}");
    assert!(!text.contains("throughput_unit"), "the unit is folded into throughput");
    let md = table::render_markdown(&df);
    assert_eq!(md.lines().count(), 2 + 12);
    assert!(md.starts_with("| cell | status |"));
    common::cleanup(&root);
}

#[test]
fn sort_filter_and_columns() {
    let root = common::temp_dir("sort");
    let dir = common::build(&root, "proj");
    let p = load_project(&dir).unwrap();
    let opts = |sort: &[&str], filters: &[&str], cols: Option<&[&str]>| TableOptions {
        sort: sort.iter().map(|s| s.to_string()).collect(),
        filters: filters.iter().map(|s| s.to_string()).collect(),
        columns: cols.map(|c| c.iter().map(|s| s.to_string()).collect()),
        all_columns: false,
    };
    // Descending accuracy; runs without one go last.
    let df = results_table(&p, &opts(&["-final_acc"], &[], Some(&["cell", "final_acc"]))).unwrap();
    assert_eq!(frame::column_names(&df), ["cell", "final_acc"]);
    assert_eq!(cell_str(&df, "cell", 0), "lenet5_adamw_none");
    let accs: Vec<Option<f64>> = (0..df.height()).map(|i| cell_f64(&df, "final_acc", i)).collect();
    let known: Vec<f64> = accs.iter().flatten().copied().collect();
    assert!(known.windows(2).all(|w| w[0] >= w[1]), "{accs:?}");
    assert!(accs[known.len()..].iter().all(Option::is_none), "nulls last: {accs:?}");

    // Ascending, two keys, comma form.
    let df = results_table(&p, &opts(&["model,-target_sparsity"], &[], None)).unwrap();
    assert_eq!(cell_str(&df, "model", 0), "gpt2");
    assert_eq!(cell_f64(&df, "target_sparsity", 0), Some(0.5));

    // Filters: equality on text, percent on numbers, comparisons, several at once.
    let df = results_table(&p, &opts(&[], &["pruning=magnitude"], None)).unwrap();
    assert_eq!(df.height(), 5);
    let df = results_table(&p, &opts(&[], &["target_sparsity=70%"], None)).unwrap();
    assert_eq!(df.height(), 3);
    let df = results_table(&p, &opts(&[], &["target_sparsity=0.7", "status=done"], None)).unwrap();
    assert_eq!(df.height(), 1);
    let df = results_table(&p, &opts(&[], &["final_acc>=0.885"], None)).unwrap();
    assert_eq!(df.height(), 4, "0.9, 0.8917, 0.895, 0.885");
    let df = results_table(&p, &opts(&[], &["status!=done"], None)).unwrap();
    assert_eq!(df.height(), 4);
    let df = results_table(&p, &opts(&[], &["variant=null", "model=lenet5"], None)).unwrap();
    assert_eq!(df.height(), 6);

    // Errors name the column and list the valid ones; bad values are clear.
    let e = results_table(&p, &opts(&["-nope"], &[], None)).unwrap_err().to_string();
    assert!(e.contains("unknown column 'nope'") && e.contains("final_acc"), "{e}");
    let e = results_table(&p, &opts(&[], &["acc=1"], None)).unwrap_err().to_string();
    assert!(e.contains("unknown column 'acc'"), "{e}");
    let e = results_table(&p, &opts(&[], &["final_acc=high"], None)).unwrap_err().to_string();
    assert!(e.contains("not a number"), "{e}");
    let e = results_table(&p, &opts(&[], &["final_acc"], None)).unwrap_err().to_string();
    assert!(e.contains("COL=VALUE"), "{e}");
    let e = results_table(&p, &opts(&[], &[], Some(&["cell", "x"]))).unwrap_err().to_string();
    assert!(e.contains("unknown column 'x'"), "{e}");

    // Every column.
    let df = results_table(&p, &TableOptions { all_columns: true, ..Default::default() }).unwrap();
    assert_eq!(df.width(), report::ALL_COLUMNS.len());
    common::cleanup(&root);
}

#[test]
fn csv_and_parquet_round_trip() {
    let root = common::temp_dir("export");
    let dir = common::build(&root, "proj");
    let p = load_project(&dir).unwrap();
    let df = results_table(&p, &TableOptions { all_columns: true, ..Default::default() }).unwrap();
    let pq = root.join("out/table.parquet");
    table::write_parquet(&df, &pq).unwrap();
    let back = table::read_parquet(&pq).unwrap();
    assert!(back.equals_missing(&df), "parquet round trip differs:\n{back}\n{df}");

    let csv = root.join("out/table.csv");
    table::write_csv(&df, &csv).unwrap();
    let back = table::read_csv(&csv).unwrap();
    assert_eq!(back.shape(), df.shape());
    assert_eq!(frame::column_names(&back), frame::column_names(&df));
    for col in ["cell", "status", "pruning", "notes"] {
        assert_eq!(frame::column_cells(&back, col).unwrap(), frame::column_cells(&df, col).unwrap(), "{col}");
    }
    for col in ["final_acc", "final_ppl", "target_sparsity", "time_s"] {
        let (a, b) = (frame::column_cells(&back, col).unwrap(), frame::column_cells(&df, col).unwrap());
        for (x, y) in a.iter().zip(&b) {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "{col}: {x} vs {y}"),
                (None, None) => {}
                other => panic!("{col}: {other:?}"),
            }
        }
    }

    // results(): prints the table and warnings, writes both exports.
    let mut out = Vec::new();
    let args = report::ResultsArgs {
        project: Some("proj".into()),
        root: root.clone(),
        table: TableOptions { filters: vec!["model=gpt2".into()], ..Default::default() },
        csv: Some(root.join("r.csv")),
        parquet: Some(root.join("r.parquet")),
    };
    let df = report::results(&args, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(df.height(), 3, "two runs and the pending matrix cell");
    assert!(text.contains("3 of 12 runs shown"), "{text}");
    assert!(text.contains("warning: ") && text.contains("summary.json"), "{text}");
    assert_eq!(table::read_parquet(&root.join("r.parquet")).unwrap().height(), 3);
    assert_eq!(table::read_csv(&root.join("r.csv")).unwrap().height(), 3);
    common::cleanup(&root);
}

#[test]
fn project_resolution() {
    let root = common::temp_dir("resolve");
    common::write_run(
        &root.join("older"),
        &common::spec("lenet5", "adamw", "none", None, 0.0, "done", 0.9),
        100,
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    common::write_run(
        &root.join("newer"),
        &common::spec("lenet5", "sgd", "none", None, 0.0, "done", 0.8),
        100,
    );
    assert_eq!(report::resolve_project(None, &root).unwrap(), root.join("newer"));
    assert_eq!(report::resolve_project(Some("older"), &root).unwrap(), root.join("older"));
    let e = report::resolve_project(Some("nope"), &root).unwrap_err().to_string();
    assert!(e.contains("newer") && e.contains("older"), "{e}");
    // A runs/ folder holding runs directly is itself the project.
    let flat = root.join("flat");
    common::write_run(&flat, &common::spec("lenet5", "adamw", "none", None, 0.0, "done", 0.9), 100);
    assert_eq!(report::resolve_project(None, &flat).unwrap(), flat);
    // A run directory loads as a project of one run.
    let one = load_project(&flat.join("lenet5_adamw_none")).unwrap();
    assert_eq!(one.runs.len(), 1);
    assert!(load_project(&root.join("missing")).is_err());
    let empty = root.join("empty");
    fs::create_dir_all(&empty).unwrap();
    assert!(report::resolve_project(None, &empty).is_err());
    assert_eq!(load_project(&empty).unwrap().runs.len(), 0);
    common::cleanup(&root);
}

#[test]
fn frames_group_and_rows() {
    let root = common::temp_dir("frames");
    let dir = common::build(&root, "proj");
    let p = load_project(&dir).unwrap();
    let g = frame::group_agg(
        &p.frame,
        &["model".into()],
        &[
            ("n".into(), Agg::Count, "cell".into()),
            ("mean_acc".into(), Agg::Mean, "final_acc".into()),
            ("best".into(), Agg::Max, "final_acc".into()),
        ],
    )
    .unwrap();
    assert_eq!(frame::column_names(&g), ["model", "n", "mean_acc", "best"]);
    // Group order follows first appearance (gpt2 sorts first).
    assert_eq!(cell_str(&g, "model", 0), "gpt2");
    assert_eq!(frame::column_cells(&g, "n").unwrap()[1], Cell::Int(9));
    assert!((cell_f64(&g, "best", 1).unwrap() - 0.9).abs() < 1e-12);
    let e = frame::group_agg(&p.frame, &["model".into()], &[("x".into(), Agg::Mean, "cell".into())]);
    assert!(e.unwrap_err().to_string().contains("cannot take the mean"));
    let all = frame::group_agg(&p.frame, &[], &[("n".into(), Agg::Count, "cell".into())]).unwrap();
    assert_eq!(frame::column_cells(&all, "n").unwrap(), [Cell::Int(12)]);

    let rows = vec![
        vec![("a".to_string(), Cell::Int(1)), ("b".to_string(), Cell::Str("x".into()))],
        vec![("a".to_string(), Cell::Float(2.5)), ("c".to_string(), Cell::Bool(true))],
    ];
    let df = frame::from_rows(&rows).unwrap();
    assert_eq!(frame::column_names(&df), ["a", "b", "c"]);
    assert_eq!(df.column("a").unwrap().dtype(), &DataType::Float64);
    let back = frame::to_rows(&df);
    assert_eq!(back[1][0].1, Cell::Float(2.5));
    assert_eq!(back[1][1].1, Cell::Null);
    let masked = frame::filter_mask(&df, &[false, true]).unwrap();
    assert_eq!(masked.height(), 1);

    // The long metrics frame.
    let m = p.metrics_frame().unwrap();
    assert!(frame::column_names(&m).starts_with(&["cell".to_string(), "step".into(), "epoch".into()]));
    assert!(m.height() > 50);
    common::cleanup(&root);
}

#[test]
fn graphs_and_report() {
    let root = common::temp_dir("graphs");
    let dir = common::build(&root, "proj");
    let p = load_project(&dir).unwrap();
    let set = report::write_graphs(&p).unwrap();
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let stems = [
        "curve_train_loss",
        "curve_test_acc",
        "curve_val_ppl",
        "curve_lr",
        "curve_sparsity",
        "final_test_acc_by_sparsity",
        "test_acc_vs_sparsity",
        "final_val_ppl_by_sparsity",
        "val_ppl_vs_sparsity",
        "time",
        "memory",
        "throughput_samples_per_s",
        "throughput_tokens_per_s",
    ];
    let report_md = fs::read_to_string(&set.report).unwrap();
    for s in stems {
        let png = dir.join("graphs").join(format!("{s}.png"));
        let (w, h) = png_size(&png);
        assert!(w >= 600 && h >= 300, "{s}: {w}x{h}");
        check_svg(&dir.join("graphs").join(format!("{s}.svg")));
        assert!(report_md.contains(&format!("({s}.png)")), "report.md lacks {s}.png");
        assert!(report_md.contains(&format!("({s}.svg)")), "report.md lacks {s}.svg");
    }
    // Every PNG written is embedded.
    for f in &set.files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".png") {
            assert!(report_md.contains(&format!("]({name})")), "{name} not embedded");
        }
    }
    // The table (every run) and the warnings are in the report.
    assert!(report_md.contains("| cell | status |"));
    for r in &p.runs {
        assert!(report_md.contains(&format!("| {} |", r.cell)), "{} missing from report.md", r.cell);
    }
    assert!(report_md.contains("summary.json"));
    // A second pass deletes a graph the data no longer supports, never a
    // user's own file.
    let g = dir.join("graphs");
    fs::write(g.join("curve_gone.png"), b"old").unwrap();
    fs::write(g.join("my_notes.png"), b"mine").unwrap();
    let again = report::write_graphs(&p).unwrap();
    assert_eq!(again.removed, vec![g.join("curve_gone.png")]);
    assert!(!g.join("curve_gone.png").exists() && g.join("my_notes.png").exists());
    assert!(g.join("curve_train_loss.png").exists());
    common::cleanup(&root);
}

#[test]
fn plot_lines_and_bars() {
    let root = common::temp_dir("plots");
    // Many series: legend in columns, dashes and markers past 10.
    let lines: Vec<Line> = (0..40)
        .map(|i| Line {
            name: format!("series number {i}"),
            points: (0..200)
                .map(|s| (s as f64 * 10.0, (i as f64 + 1.0) * (1.0 + (s as f64 / 20.0).sin())))
                .collect(),
            style: Style::nth(i),
        })
        .collect();
    let plot = LinePlot {
        title: "Forty series".into(),
        x_label: "step".into(),
        y_label: "value".into(),
        lines,
        ..Default::default()
    };
    for ext in ["png", "svg"] {
        let path = root.join(format!("lines.{ext}"));
        report::plot::save(&plot, &path).unwrap();
        if ext == "png" {
            let (w, h) = png_size(&path);
            assert!(w > 920 && h >= 660, "{w}x{h}");
        } else {
            check_svg(&path);
        }
    }
    let bars = BarPlot {
        title: "Bars".into(),
        x_label: "group".into(),
        y_label: "value".into(),
        groups: vec!["a".into(), "b".into(), "a rather long group name".into()],
        bars: vec![
            Bars {
                name: "one".into(),
                values: vec![Some(1.0), None, Some(3.0)],
                ranges: vec![],
                style: Style::nth(0),
            },
            Bars {
                name: "two".into(),
                values: vec![Some(2.0), Some(2.5), Some(-1.0)],
                ranges: vec![Some((1.5, 2.5)), None, None],
                style: Style::nth(1),
            },
        ],
        value_fmt: Some(report::util::general),
        ..Default::default()
    };
    report::plot::save(&bars, &root.join("bars.png")).unwrap();
    png_size(&root.join("bars.png"));
    report::plot::save(&bars, &root.join("bars.svg")).unwrap();
    check_svg(&root.join("bars.svg"));
    // Empty data draws "no data"; a bad extension is an error naming the file.
    report::plot::save(&LinePlot { title: "Empty".into(), ..Default::default() }, &root.join("empty.png"))
        .unwrap();
    let e = report::plot::save(&plot, &root.join("x.jpg")).unwrap_err().to_string();
    assert!(e.contains("x.jpg") && e.contains(".png or .svg"), "{e}");
    // Log axis with values <= 0 left out.
    let log = LinePlot {
        title: "Log".into(),
        lines: vec![Line {
            name: "l".into(),
            points: vec![(0.0, 0.0), (1.0, 10.0), (2.0, 1000.0)],
            style: Style::nth(0),
        }],
        log_y: true,
        ..Default::default()
    };
    report::plot::save(&log, &root.join("log.png")).unwrap();
    assert_eq!(report::plot::log_ticks(10.0, 1000.0, 8), vec![10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
    assert_eq!(report::plot::log_ticks(3.0, 6.0, 8), vec![3.0, 4.0, 5.0, 6.0]);
    // Within one decade and too narrow for digits: round, evenly spaced.
    assert_eq!(report::plot::log_ticks(870.0, 1950.0, 9), vec![1000.0, 1200.0, 1400.0, 1600.0, 1800.0]);
    common::cleanup(&root);
}

#[test]
fn a_running_run_whose_process_died_reads_as_interrupted() {
    let root = common::temp_dir("stale");
    let proj = root.join("p");
    let alive =
        common::write_run(&proj, &common::spec("lenet5", "adamw", "none", None, 0.0, "running", 0.9), 100);
    let dead =
        common::write_run(&proj, &common::spec("lenet5", "sgd", "none", None, 0.0, "running", 0.8), 100);
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    // A child that has exited and been reaped: its pid is free.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let gone = child.id();
    child.wait().unwrap();
    for (dir, pid) in [(&alive, std::process::id()), (&dead, gone)] {
        let st = serde_json::json!({"status": "running", "updated": "2026-11-26T10:00:00Z", "pid": pid, "host": host});
        fs::write(dir.join("status.json"), st.to_string()).unwrap();
    }
    let p = load_project(&proj).unwrap();
    let get = |id: &str| p.runs.iter().find(|r| r.cell == id).unwrap().clone();
    assert_eq!(get("lenet5_adamw_none").status, "running");
    let d = get("lenet5_sgd_none");
    assert_eq!(d.status, "interrupted");
    assert!(d.notes.iter().any(|n| n.contains("process is gone")), "{:?}", d.notes);
    common::cleanup(&root);
}

#[test]
fn aggregations_skip_missing_values() {
    let row = |g: &str, x: Cell, s: Cell| {
        vec![("g".to_string(), Cell::Str(g.into())), ("x".to_string(), x), ("s".to_string(), s)]
    };
    let df = frame::from_rows(&[
        row("a", Cell::Int(3), Cell::Str("pear".into())),
        row("b", Cell::Null, Cell::Null),
        row("a", Cell::Int(1), Cell::Null),
        row("a", Cell::Int(8), Cell::Str("apple".into())),
        row("b", Cell::Int(5), Cell::Str("fig".into())),
    ])
    .unwrap();
    let aggs: Vec<(String, Agg, String)> = [
        ("median", Agg::Median, "x"),
        ("sum", Agg::Sum, "x"),
        ("n", Agg::Count, "x"),
        ("lo", Agg::Min, "s"),
        ("hi", Agg::Max, "x"),
        ("first", Agg::First, "x"),
        ("last", Agg::Last, "s"),
    ]
    .iter()
    .map(|(o, a, c)| (o.to_string(), *a, c.to_string()))
    .collect();
    let g = frame::group_agg(&df, &["g".into()], &aggs).unwrap();
    let rows = frame::to_rows(&g);
    let get = |r: usize, c: &str| rows[r].iter().find(|(k, _)| k == c).unwrap().1.clone();
    // Groups in order of first appearance.
    assert_eq!(get(0, "g"), Cell::Str("a".into()));
    assert_eq!(get(0, "median"), Cell::Float(3.0));
    assert_eq!(get(0, "sum"), Cell::Int(12));
    assert_eq!(get(0, "n"), Cell::Int(3));
    assert_eq!(get(0, "lo"), Cell::Str("apple".into()));
    assert_eq!(get(0, "hi"), Cell::Int(8));
    assert_eq!(get(0, "last"), Cell::Str("apple".into()));
    // A missing value is skipped, except by first/last.
    assert_eq!(get(1, "median"), Cell::Float(5.0));
    assert_eq!(get(1, "n"), Cell::Int(1));
    assert_eq!(get(1, "first"), Cell::Null);
    // Filters: a missing value passes only !=.
    let f = |s: &str| frame::filter(&df, &[frame::Filter::parse(s).unwrap()]).unwrap().height();
    assert_eq!((f("x>=3"), f("x<3"), f("x!=3"), f("x=null"), f("s>fig")), (3, 1, 4, 1, 1));
}

/// `knlp archive`: results, graphs, report and an index, no weights, no
/// links out, never over an existing archive, nothing left on failure.
#[test]
fn archives_keep_results_not_weights() {
    let root = common::temp_dir("archive");
    let p = common::build(&root, "proj");
    let run = fs::read_dir(&p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| d.join("status.json").exists())
        .unwrap();
    fs::create_dir_all(run.join("checkpoints")).unwrap();
    fs::write(run.join("checkpoints/last.safetensors"), vec![0u8; 4096]).unwrap();
    fs::write(p.join(".lock"), "pid 1 start 1 host h\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", run.join("leak")).unwrap();
    let src = load_project(&p).unwrap();
    let (runs, done) = (src.runs.len(), src.runs.iter().filter(|r| r.status == "done").count());
    assert!(runs > done && done > 0);
    fn listing(d: &Path, out: &mut Vec<(String, u64)>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            out.push((e.path().display().to_string(), md.len()));
            if md.is_dir() {
                listing(&e.path(), out);
            }
        }
        out.sort();
    }
    let mut before = Vec::new();
    listing(&p, &mut before);
    let out = root.join("key_results");
    let a = report::archive("first", std::slice::from_ref(&p), &out).unwrap();
    let kept = out.join("first/proj");
    let index = fs::read_to_string(out.join("first/index.md")).unwrap();
    assert!(
        index.contains("## proj")
            && index.contains(&format!("{runs} run(s), {done} done"))
            && index.contains("| cell"),
        "{index}"
    );
    assert!(kept.join("graphs/report.md").is_file());
    assert_eq!(a.projects, vec![("proj".to_string(), runs, done)]);
    let name = run.file_name().unwrap();
    assert!(kept.join(name).join("metrics.jsonl").is_file() && kept.join(name).join("status.json").is_file());
    assert!(!kept.join(name).join("checkpoints").exists() && !kept.join(".lock").exists());
    assert!(fs::symlink_metadata(kept.join(name).join("leak")).is_err(), "a link was archived");
    // The source is untouched (no graphs drawn into it).
    let mut after = Vec::new();
    listing(&p, &mut after);
    assert_eq!(before, after);
    let e = report::archive("first", std::slice::from_ref(&p), &out).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    for bad in ["", "../x", "a/b", ".hidden"] {
        assert!(report::archive(bad, std::slice::from_ref(&p), &out).is_err(), "{bad}");
    }
    let e = report::archive("second", &[root.join("missing")], &out).unwrap_err();
    assert!(format!("{e:#}").contains("missing"), "{e:#}");
    let left: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("first")], "a failed archive left {left:?}");
    common::cleanup(&root);
}
