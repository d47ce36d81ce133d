//! Results and graphs from scripts: `runs()` frames, filters, grouping,
//! exports and the plot functions, over a synthetic project (fast, CPU).
#[path = "../crates/report/tests/common/mod.rs"]
mod common;

use std::path::Path;

use knlp::script::{Limits, Runtime};
use rhai::Dynamic;

fn eval(code: &str) -> Result<Dynamic, String> {
    let mut rt = Runtime::new(std::env::temp_dir(), Limits::default());
    rt.eval_input(code).map_err(|e| e.rendered)
}

fn png_ok(path: &Path) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    assert!(w >= 200 && h >= 150, "{w}x{h}");
}

#[test]
fn frames_in_scripts() {
    let root = common::temp_dir("script-frames");
    let dir = common::build(&root, "proj");
    let d = dir.display().to_string();
    let out = root.join("out");
    let o = out.display().to_string();
    let code = format!(
        r#"
        let f = runs("{d}");
        assert_eq(f.len, 12);
        assert(f.columns.contains("final_acc"), "columns");
        let done = f.filter("status", "done");
        let lenet = done.filter("model", "lenet5").filter("target_sparsity", ">=", "50%");
        let best = lenet.sort("final_acc", true).rows()[0];
        assert_eq(best.cell, "lenet5_adamwprune_state-bitter7_50");
        let failed = f.filter(|r| r.status == "failed" || r.status == "running");
        assert_eq(failed.len(), 2);
        let g = f.filter("model", "lenet5").group_by(["pruning"]).agg(#{{ n: ["count", "cell"], acc: ["mean", "final_acc"] }});
        assert_eq(g.columns, ["pruning", "acc", "n"]);
        let by = g.sort("-n").rows();
        assert_eq(by[0].pruning, "magnitude");
        assert_eq(by[0].n, 4);
        let small = f.select(["cell", "final_ppl"]).filter("final_ppl", "!=", ()).sort("final_ppl");
        assert_eq(small.column("cell"), ["gpt2_adamw_none", "gpt2_adamwprune_state-bitter7_50"]);
        small.to_csv("{o}/small.csv");
        small.to_parquet("{o}/small.parquet");
        small.show();
        let md = small.to_markdown();
        assert(md.contains("| gpt2_adamw_none | 42.50 |"), md);
        let m = run_metrics("{d}");
        assert(m.columns.contains("train_loss"), "metrics columns");
        let fr = frame([#{{ a: 1, b: "x" }}, #{{ a: 2.5 }}]);
        assert(fr.rows()[1].b == (), "missing is ()");
        fr.head(1).len
        "#
    );
    let r = eval(&code).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.as_int().unwrap(), 1);
    let csv = std::fs::read_to_string(out.join("small.csv")).unwrap();
    assert!(csv.starts_with("cell,final_ppl\n"), "{csv}");
    assert!(std::fs::metadata(out.join("small.parquet")).unwrap().len() > 100);
    common::cleanup(&root);
}

#[test]
fn script_errors_are_clear() {
    let root = common::temp_dir("script-errors");
    let dir = common::build(&root, "proj");
    let d = dir.display().to_string();
    let cases = [
        (format!(r#"runs("{d}").sort("nope")"#), "unknown column 'nope'"),
        (format!(r#"runs("{d}").filter("final_acc", "high")"#), "not a number"),
        (format!(r#"runs("{d}").filter("final_acc", "~", 1)"#), "unknown comparison"),
        (format!(r#"runs("{d}").filter(|r| 1)"#), "must return a bool"),
        (
            format!(r#"runs("{d}").group_by("model").agg(#{{ x: ["avg", "final_acc"] }})"#),
            "unknown aggregation 'avg'",
        ),
        (format!(r#"runs("{d}").group_by("model").agg(#{{ x: "mean" }})"#), "[aggregation, column]"),
        (r#"runs("no/such/project")"#.to_string(), "no project"),
        (
            r#"plot_lines("x.png", #{ title: "t", colour: 1, series: #{} })"#.to_string(),
            "unknown plot_lines key 'colour'",
        ),
        (
            r#"plot_bars("x.png", #{ groups: ["a"], series: #{ s: [1, 2] } })"#.to_string(),
            "2 values for 1 groups",
        ),
        (r#"plot_lines("x.jpg", #{ series: #{ s: [[0, 1]] } })"#.to_string(), ".png or .svg"),
    ];
    for (code, want) in cases {
        let e = eval(&code).expect_err(&code);
        assert!(e.contains(want), "{code}: expected '{want}' in\n{e}");
    }
    common::cleanup(&root);
}

#[test]
fn plots_and_graphs_from_scripts() {
    let root = common::temp_dir("script-plots");
    let dir = common::build(&root, "proj");
    let (d, o) = (dir.display().to_string(), root.display().to_string());
    let code = format!(
        r#"
        let f = runs("{d}").filter("model", "lenet5");
        let series = #{{}};
        for r in f.filter("pruning", "!=", "none").rows() {{
            if r.final_acc != () {{
                let m = r.optimizer + " " + r.pruning;
                if !(m in series) {{ series[m] = []; }}
                series[m].push([r.target_sparsity * 100, r.final_acc * 100]);
            }}
        }}
        plot_lines("{o}/lines.png", #{{ title: "Accuracy against sparsity", x_label: "sparsity (%)",
            y_label: "accuracy (%)", series: series, markers: true, legend_title: "method" }});
        plot_lines("{o}/lines.svg", #{{ title: "t", series: series, width: 800, height: 500 }});
        plot_bars("{o}/bars.png", #{{ title: "Bars", y_label: "accuracy (%)", groups: ["50%", "70%"],
            series: #{{ a: [88.5, ()], b: [87.0, 75.0] }} }});
        plot_bars("{o}/bars.svg", #{{ groups: [50, 70], series: #{{ a: [1, 2] }}, values: false }});
        graphs("{d}").len
        "#
    );
    let n = eval(&code).unwrap_or_else(|e| panic!("{e}")).as_int().unwrap();
    assert!(n > 20, "{n} graph files");
    png_ok(&root.join("lines.png"));
    png_ok(&root.join("bars.png"));
    for f in ["lines.svg", "bars.svg"] {
        assert!(std::fs::read_to_string(root.join(f)).unwrap().contains("<svg"));
    }
    let report = std::fs::read_to_string(dir.join("graphs/report.md")).unwrap();
    assert!(report.contains("![Training loss](curve_train_loss.png)"));
    common::cleanup(&root);
}
