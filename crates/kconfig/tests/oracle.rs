//! Oracle comparison: every corpus tree x input configuration x command runs
//! through Python kconfiglib 14.1 (all cases in one Python process, see
//! `oracle_driver.py`) and through `kconfig-tool`, in separate temporary
//! directories. The resulting files, stdout, stderr and exit statuses must be
//! identical.
//!
//! Corpus layout (`tests/corpus/<tree>/`):
//! - `Kconfig` and whatever it sources;
//! - `configs/*.config`: input configurations;
//! - `oracle.env` (optional): `NAME=value` environment lines (`@TREE@` is the
//!   tree's absolute path); a line `@copy` runs the tree copied into the
//!   working directory without `$srctree`;
//! - `oracle.set` (optional): `NAME=value` assignments for `setconfig` /
//!   `config set`;
//! - `oracle.get` (optional): symbol names for `config get`.
//!
//! The Python virtual environment comes from `$KNLP_VENV`, else
//! `<crate>/../../.venv`. Without it (or without kconfiglib 14.1.0) the test
//! fails: the Makefile installs it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

struct Case {
    id: String,
    tree: PathBuf,
    copy_tree: bool,
    /// Input copied to `.config` (or `$KCONFIG_CONFIG`) before the run.
    dotconfig: Option<PathBuf>,
    dotconfig_name: String,
    py_tool: String,
    py_args: Vec<String>,
    rs_args: Vec<String>,
    env: Vec<(String, String)>,
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_dir() -> PathBuf {
    match std::env::var_os("KNLP_VENV") {
        Some(v) => PathBuf::from(v),
        None => crate_dir().join("../../.venv"),
    }
}

/// The venv's python, after checking that kconfiglib 14.1.0 and its tools
/// are installed. Panics with instructions otherwise.
fn python() -> PathBuf {
    let venv = venv_dir();
    let py = venv.join("bin/python");
    let hint = format!(
        "the kconfiglib oracle is missing: install it with `{} -m pip install kconfiglib==14.1.0` \
         (the Makefile does this; set KNLP_VENV to use another virtual environment)",
        py.display()
    );
    assert!(py.exists(), "{} not found; {}", py.display(), hint);
    for tool in
        ["olddefconfig", "alldefconfig", "allnoconfig", "allyesconfig", "listnewconfig", "savedefconfig"]
    {
        let t = venv.join("bin").join(tool);
        assert!(t.exists(), "{} not found; {}", t.display(), hint);
    }
    for tool in ["defconfig", "setconfig"] {
        let t = venv.join("bin").join(tool);
        assert!(t.exists(), "{} not found; {}", t.display(), hint);
    }
    let out = Command::new(&py)
        .args(["-c", "import kconfiglib, sys; sys.exit(0 if kconfiglib.VERSION == (14, 1, 0) else 3)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {}; {}", py.display(), e, hint));
    assert!(out.status.success(), "kconfiglib 14.1.0 is not importable from {}; {}", py.display(), hint);
    py
}

/// Where the (many small) case directories go: `$KCONFIG_ORACLE_TMP`, else
/// tmpfs (`/dev/shm`) when available, else the system temp directory.
fn scratch_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KCONFIG_ORACLE_TMP") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    let probe = shm.join(format!(".kconfig-probe-{}", std::process::id()));
    if std::fs::create_dir(&probe).is_ok() {
        let _ = std::fs::remove_dir(&probe);
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

fn read_lines(p: &Path) -> Vec<String> {
    match std::fs::read_to_string(p) {
        Ok(s) => s
            .lines()
            .map(|l| l.trim_end().to_string())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn s(x: &str) -> String {
    x.to_string()
}

fn build_cases() -> Vec<Case> {
    let corpus = crate_dir().join("tests/corpus");
    let mut trees: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .expect("tests/corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Kconfig").exists())
        .collect();
    trees.sort();
    assert!(trees.len() >= 6, "expected at least 6 corpus trees, found {}", trees.len());
    let mut cases = Vec::new();
    for tree in trees {
        let tname = tree.file_name().unwrap().to_string_lossy().into_owned();
        let tree_abs = std::fs::canonicalize(&tree).unwrap();
        let mut copy_tree = false;
        let mut env: Vec<(String, String)> = vec![(s("KCONFIG_WARN_UNDEF_ASSIGN"), s("y"))];
        for line in read_lines(&tree.join("oracle.env")) {
            if line == "@copy" {
                copy_tree = true;
                continue;
            }
            let (k, v) = line.split_once('=').expect("oracle.env: NAME=value");
            env.push((k.to_string(), v.replace("@TREE@", &tree_abs.to_string_lossy())));
        }
        if !copy_tree {
            env.push((s("srctree"), tree_abs.to_string_lossy().into_owned()));
        }
        let mut configs: Vec<PathBuf> = std::fs::read_dir(tree.join("configs"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "config"))
                    .collect()
            })
            .unwrap_or_default();
        configs.sort();
        let sets = read_lines(&tree.join("oracle.set"));
        let gets = read_lines(&tree.join("oracle.get"));

        let mut add = |id: String,
                       dotconfig: Option<&PathBuf>,
                       py_tool: &str,
                       py_args: Vec<String>,
                       rs_args: Vec<String>,
                       extra_env: Vec<(String, String)>| {
            let mut e = env.clone();
            e.extend(extra_env.iter().cloned());
            let dotconfig_name = extra_env
                .iter()
                .find(|(k, _)| k == "KCONFIG_CONFIG")
                .map(|(_, v)| v.clone())
                .unwrap_or(s(".config"));
            cases.push(Case {
                id: format!("{}/{}", tname, id),
                tree: tree_abs.clone(),
                copy_tree,
                dotconfig: dotconfig.cloned(),
                dotconfig_name,
                py_tool: py_tool.to_string(),
                py_args,
                rs_args,
                env: e,
            });
        };

        // Without any input configuration.
        add(s("none-olddefconfig"), None, "olddefconfig", vec![], vec![s("olddefconfig")], vec![]);
        add(s("none-listnewconfig"), None, "listnewconfig", vec![], vec![s("listnewconfig")], vec![]);
        for tool in ["alldefconfig", "allnoconfig", "allyesconfig", "allmodconfig"] {
            add(format!("none-{}", tool), None, tool, vec![], vec![s(tool)], vec![]);
        }
        for cfg in &configs {
            let cname = cfg.file_stem().unwrap().to_string_lossy().into_owned();
            let cabs = std::fs::canonicalize(cfg).unwrap().to_string_lossy().into_owned();
            let c = Some(cfg);
            add(
                format!("{}-olddefconfig", cname),
                c,
                "olddefconfig",
                vec![],
                vec![s("olddefconfig")],
                vec![],
            );
            add(
                format!("{}-listnewconfig", cname),
                c,
                "listnewconfig",
                vec![],
                vec![s("listnewconfig")],
                vec![],
            );
            add(
                format!("{}-listnewconfig-l", cname),
                c,
                "listnewconfig",
                vec![s("--show-help")],
                vec![s("listnewconfig"), s("-l")],
                vec![],
            );
            add(
                format!("{}-savedefconfig", cname),
                c,
                "savedefconfig",
                vec![],
                vec![s("savedefconfig")],
                vec![],
            );
            add(
                format!("{}-savedefconfig-out", cname),
                c,
                "savedefconfig",
                vec![s("--kconfig"), s("Kconfig"), s("--out"), s("min.config")],
                vec![s("savedefconfig"), s("--kconfig"), s("Kconfig"), s("--out"), s("min.config")],
                vec![],
            );
            add(
                format!("{}-defconfig", cname),
                None,
                "defconfig",
                vec![cabs.clone()],
                vec![s("defconfig"), cabs.clone()],
                vec![],
            );
            add(
                format!("{}-defconfig-over", cname),
                configs.first(),
                "defconfig",
                vec![cabs.clone()],
                vec![s("defconfig"), cabs.clone()],
                vec![],
            );
            add(
                format!("{}-olddefconfig-kconfig-config", cname),
                c,
                "olddefconfig",
                vec![s("Kconfig")],
                vec![s("olddefconfig"), s("Kconfig")],
                vec![(s("KCONFIG_CONFIG"), s("custom.config"))],
            );
            for tool in ["allnoconfig", "allyesconfig", "alldefconfig", "allmodconfig"] {
                add(
                    format!("{}-{}-allconfig", cname, tool),
                    None,
                    tool,
                    vec![],
                    vec![s(tool)],
                    vec![(s("KCONFIG_ALLCONFIG"), cabs.clone())],
                );
            }
            for (i, a) in sets.iter().enumerate() {
                let (name, value) = a.split_once('=').expect("oracle.set: NAME=value");
                add(
                    format!("{}-set{}", cname, i),
                    c,
                    "setconfig",
                    vec![a.clone()],
                    vec![s("config"), s("set"), name.to_string(), value.to_string()],
                    vec![],
                );
            }
            if !sets.is_empty() {
                // All assignments at once, setconfig style.
                let mut rs = vec![s("setconfig"), s("--no-check-value"), s("--no-check-exists")];
                rs.extend(sets.iter().cloned());
                let mut py = vec![s("--no-check-value"), s("--no-check-exists")];
                py.extend(sets.iter().cloned());
                add(format!("{}-setall", cname), c, "setconfig", py, rs, vec![]);
            }
            for (i, name) in gets.iter().enumerate() {
                add(
                    format!("{}-get{}", cname, i),
                    c,
                    "get",
                    vec![name.clone()],
                    vec![s("config"), s("get"), name.clone()],
                    vec![],
                );
            }
        }
    }
    cases
}

/// `tests/corpus/errors/<name>/`: broken trees. kconfiglib and we must
/// fail with the same message (these are errors kconfiglib locates).
fn build_error_cases() -> Vec<Case> {
    let dir = crate_dir().join("tests/corpus/errors");
    let mut trees: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/corpus/errors")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Kconfig").exists())
        .collect();
    trees.sort();
    trees
        .into_iter()
        .map(|t| {
            let abs = std::fs::canonicalize(&t).unwrap();
            Case {
                id: format!("errors/{}", t.file_name().unwrap().to_string_lossy()),
                tree: abs.clone(),
                copy_tree: false,
                dotconfig: None,
                dotconfig_name: s(".config"),
                py_tool: s("olddefconfig"),
                py_args: vec![],
                rs_args: vec![s("olddefconfig")],
                env: vec![(s("srctree"), abs.to_string_lossy().into_owned())],
            }
        })
        .collect()
}

/// Command-line handling (usage errors, options, `KCONFIG_ALLCONFIG`
/// lookups) on the `types` tree.
fn build_cli_cases() -> Vec<Case> {
    let tree = std::fs::canonicalize(crate_dir().join("tests/corpus/types")).unwrap();
    let input = tree.join("configs/values.config");
    let env = vec![(s("srctree"), tree.to_string_lossy().into_owned())];
    let case = |id: &str, py_tool: &str, py_args: &[&str], rs_args: &[&str], extra: &[(&str, &str)]| {
        let mut e = env.clone();
        e.extend(extra.iter().map(|(k, v)| (s(k), s(v))));
        Case {
            id: format!("cli/{}", id),
            tree: tree.clone(),
            copy_tree: false,
            dotconfig: Some(input.clone()),
            dotconfig_name: s(".config"),
            py_tool: s(py_tool),
            py_args: py_args.iter().map(|a| s(a)).collect(),
            rs_args: rs_args.iter().map(|a| s(a)).collect(),
            env: e,
        }
    };
    vec![
        case(
            "extra-positional",
            "olddefconfig",
            &["Kconfig", "extra"],
            &["olddefconfig", "Kconfig", "extra"],
            &[],
        ),
        case("unknown-option", "allnoconfig", &["--bogus"], &["allnoconfig", "--bogus"], &[]),
        case("missing-config-arg", "defconfig", &[], &["defconfig"], &[]),
        case("out-without-value", "savedefconfig", &["--out"], &["savedefconfig", "--out"], &[]),
        case("out-equals", "savedefconfig", &["--out=x.config"], &["savedefconfig", "--out=x.config"], &[]),
        case(
            "abbreviated-option",
            "savedefconfig",
            &["--kconf", "Kconfig"],
            &["savedefconfig", "--kconf", "Kconfig"],
            &[],
        ),
        case("no-equals", "setconfig", &["INT_A"], &["setconfig", "INT_A"], &[]),
        case(
            "several",
            "setconfig",
            &["INT_A=3", "BOOL_B=n"],
            &["config", "set", "INT_A=3", "BOOL_B=n"],
            &[],
        ),
        case("allconfig-1-missing", "allnoconfig", &[], &["allnoconfig"], &[("KCONFIG_ALLCONFIG", "1")]),
        case("allconfig-empty-missing", "allyesconfig", &[], &["allyesconfig"], &[("KCONFIG_ALLCONFIG", "")]),
        case(
            "allconfig-bad-path",
            "alldefconfig",
            &[],
            &["alldefconfig"],
            &[("KCONFIG_ALLCONFIG", "nope.config")],
        ),
        // Not compared: a missing `defconfig` input gives a Python traceback,
        // and a missing top-level Kconfig has no `file:line` in kconfiglib.
    ]
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let t = dst.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

fn prepare(case: &Case, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    if case.copy_tree {
        copy_dir(&case.tree, dir);
    }
    if let Some(c) = &case.dotconfig {
        std::fs::copy(c, dir.join(&case.dotconfig_name)).unwrap();
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// All files under `dir` (relative path -> bytes).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn rec(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                rec(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    rec(dir, dir, &mut out);
    out
}

fn diff_text(what: &str, py: &str, rs: &str) -> String {
    let pl: Vec<&str> = py.lines().collect();
    let rl: Vec<&str> = rs.lines().collect();
    let mut out = format!("  {} differs (kconfiglib {} lines, ours {} lines):\n", what, pl.len(), rl.len());
    let mut shown = 0;
    for i in 0..pl.len().max(rl.len()) {
        let (a, b) = (pl.get(i), rl.get(i));
        if a != b {
            let _ =
                writeln!(out, "    line {}:\n      kconfiglib: {:?}\n      ours:       {:?}", i + 1, a, b);
            shown += 1;
            if shown >= 6 {
                break;
            }
        }
    }
    if shown == 0 {
        let _ = writeln!(out, "    (differs only in trailing newline)");
    }
    out
}

#[test]
fn oracle_matches_kconfiglib() {
    let py = python();
    let started = Instant::now();
    let mut cases = build_cases();
    let n_error_cases = {
        let mut e = build_error_cases();
        e.extend(build_cli_cases());
        let n = e.len();
        cases.extend(e);
        n
    };
    let work = scratch_root().join(format!("kconfig-oracle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    let mut manifest = String::new();
    for (i, c) in cases.iter().enumerate() {
        let base = work.join(format!("{:04}", i));
        prepare(c, &base.join("py"));
        prepare(c, &base.join("rs"));
        let env: Vec<String> =
            c.env.iter().map(|(k, v)| format!("{}: {}", json_str(k), json_str(v))).collect();
        let args: Vec<String> = c.py_args.iter().map(|a| json_str(a)).collect();
        let _ = writeln!(
            manifest,
            "{{\"cwd\": {}, \"result\": {}, \"tool\": {}, \"args\": [{}], \"env\": {{{}}}}}",
            json_str(&base.join("py").to_string_lossy()),
            json_str(&base.join("py-result").to_string_lossy()),
            json_str(&c.py_tool),
            args.join(", "),
            env.join(", ")
        );
    }
    let manifest_path = work.join("manifest.jsonl");
    std::fs::write(&manifest_path, manifest).unwrap();
    let driver = crate_dir().join("tests/oracle_driver.py");
    let t_py = Instant::now();
    let out = Command::new(&py).arg(&driver).arg(&manifest_path).output().expect("run the python driver");
    assert!(
        out.status.success(),
        "oracle driver failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let py_secs = t_py.elapsed().as_secs_f64();

    let tool = env!("CARGO_BIN_EXE_kconfig-tool");
    let t_rs = Instant::now();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let base = work.join(format!("{:04}", i));
        let rs_dir = base.join("rs");
        let o = Command::new(tool)
            .args(&c.rs_args)
            .current_dir(&rs_dir)
            .env_clear()
            .envs(c.env.iter().cloned())
            .output()
            .expect("run kconfig-tool");
        let py_res = base.join("py-result");
        let py_out = std::fs::read_to_string(py_res.join("stdout")).unwrap_or_default();
        let py_err = std::fs::read_to_string(py_res.join("stderr")).unwrap_or_default();
        let py_status: i32 =
            std::fs::read_to_string(py_res.join("status")).unwrap_or_default().trim().parse().unwrap_or(-1);
        let rs_out = String::from_utf8_lossy(&o.stdout).into_owned();
        let rs_err = String::from_utf8_lossy(&o.stderr).into_owned();
        let rs_status = o.status.code().unwrap_or(-1);

        let mut report = String::new();
        if py_status != rs_status {
            let _ = writeln!(report, "  exit status: kconfiglib {}, ours {}", py_status, rs_status);
        }
        if py_out != rs_out {
            report += &diff_text("stdout", &py_out, &rs_out);
        }
        if py_err != rs_err {
            report += &diff_text("stderr", &py_err, &rs_err);
        }
        let (ps, rsn) = (snapshot(&base.join("py")), snapshot(&rs_dir));
        let names: std::collections::BTreeSet<&String> = ps.keys().chain(rsn.keys()).collect();
        for n in names {
            match (ps.get(n), rsn.get(n)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => {
                    report += &diff_text(n, &String::from_utf8_lossy(a), &String::from_utf8_lossy(b));
                }
                (Some(_), None) => {
                    let _ = writeln!(report, "  file {} written by kconfiglib only", n);
                }
                (None, Some(_)) => {
                    let _ = writeln!(report, "  file {} written by us only", n);
                }
                (None, None) => {}
            }
        }
        if !report.is_empty() {
            failures.push(format!(
                "case {} ({}): py `{} {}` / rs `{}` in {}\n{}",
                i,
                c.id,
                c.py_tool,
                c.py_args.join(" "),
                c.rs_args.join(" "),
                base.display(),
                report
            ));
        }
    }
    let rs_secs = t_rs.elapsed().as_secs_f64();
    println!(
        "oracle: {} cases ({} of them broken trees and command-line errors), {} passed, {} failed (kconfiglib {:.1}s, kconfig-tool \
         {:.1}s, total {:.1}s)",
        cases.len(),
        n_error_cases,
        cases.len() - failures.len(),
        failures.len(),
        py_secs,
        rs_secs,
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() && std::env::var_os("KCONFIG_ORACLE_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        let shown: Vec<&String> = failures.iter().take(15).collect();
        panic!(
            "{} of {} oracle cases differ from kconfiglib (work dir kept: {}):\n\n{}",
            failures.len(),
            cases.len(),
            work.display(),
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
    }
}
