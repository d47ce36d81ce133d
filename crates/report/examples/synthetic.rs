//! Build a synthetic project and draw its graphs, to look at them:
//! `cargo run --example synthetic -- DIR [small|large]`.
#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let root = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("/tmp/knlp-report-demo"));
    let _ = std::fs::remove_dir_all(&root);
    let dir = match args.get(2).map(String::as_str) {
        Some("large") => common::build_large(&root, "large"),
        _ => common::build(&root, "small"),
    };
    let mut out = std::io::stdout();
    report::results(
        &report::ResultsArgs {
            project: Some(dir.display().to_string()),
            root: root.clone(),
            ..Default::default()
        },
        &mut out,
    )?;
    report::graphs(Some(&dir.display().to_string()), &root, &mut out)?;
    Ok(())
}
