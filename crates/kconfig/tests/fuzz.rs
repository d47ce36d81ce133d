//! Robustness: mutated corpus files (byte flips, truncations, token
//! shuffles, inserted and deleted lines) go through the Kconfig parser and
//! the `.config` reader. Nothing may panic, and every error must name
//! `file:line`. Deterministic (fixed-seed PRNG); set `KCONFIG_FUZZ_ITERS` to
//! run more inputs.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kconfig::{Env, ErrorKind, Kconfig, KconfigError, LoadOptions};

/// xorshift64*: small, fast and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Lines and fragments spliced into inputs.
const SNIPPETS: &[&str] = &[
    "config FUZZ\n",
    "menuconfig FUZZ_MENU\n",
    "\tbool \"fuzz\"\n",
    "\ttristate \"fuzz\" if FOO && !BAR\n",
    "\tint \"n\"\n",
    "\thex\n",
    "\tstring \"s\"\n",
    "\tdefault y if MODULES\n",
    "\tdefault 0x10\n",
    "\tdefault \"str\\\"ing\"\n",
    "\tdef_bool m\n",
    "\tdef_tristate FOO || BAR\n",
    "\tdepends on (A = B) || !C && D != \"x\"\n",
    "\tdepends on A < 3 && B >= 0x4\n",
    "\tselect FUZZ_SEL if X\n",
    "\timply FUZZ_IMP\n",
    "\trange 1 10 if Y\n",
    "\tvisible if FOO\n",
    "\toption modules\n",
    "\toption env=\"KC_ARCH\"\n",
    "\toption defconfig_list\n",
    "\toption allnoconfig_y\n",
    "\toptional\n",
    "\tprompt \"p\"\n",
    "\thelp\n\t  some help\n\n\t  more\n",
    "help\n",
    "choice\n",
    "choice NAMED\n",
    "endchoice\n",
    "menu \"m\"\n",
    "endmenu\n",
    "if FOO\n",
    "endif\n",
    "comment \"c\"\n",
    "mainmenu \"mm\"\n",
    "source \"sub/Kconfig\"\n",
    "rsource \"Kconfig\"\n",
    "osource \"nope/*\"\n",
    "orsource \"glob/*/Kconfig\"\n",
    "VAR := $(KC_ARCH)\n",
    "VAR2 = $(VAR2)\n",
    "$(VAR)\n",
    "config $(KC_PREFIX)_X\n",
    "\tdefault \"$(shell,echo hi)\"\n",
    "\tdefault \"$(info,x)\"\n",
    "x = $(",
    "\\\n",
    "\"",
    "'",
    "(",
    ")",
    "&&",
    "||",
    "!",
    "=",
    "#",
    "$(",
    "\t",
    "\u{fe}",
    "CONFIG_FOO=y\n",
    "# CONFIG_BAR is not set\n",
    "CONFIG_S=\"a\\\"b\"\n",
    "CONFIG_H=0x\n",
    "CONFIG_=\n",
];

fn mutate(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    let n = if rng.below(2) == 0 { 1 } else { 1 + rng.below(4) };
    for _ in 0..n {
        match rng.below(10) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = rng.below(256) as u8;
            }
            2 => {
                let i = rng.below(d.len() + 1);
                d.truncate(i);
            }
            3 if !d.is_empty() => {
                let a = rng.below(d.len());
                let b = (a + rng.below(64)).min(d.len());
                d.drain(a..b);
            }
            4 => {
                let s = SNIPPETS[rng.below(SNIPPETS.len())].as_bytes();
                let at = line_start(&d, rng);
                d.splice(at..at, s.iter().copied());
            }
            5 => {
                let s = SNIPPETS[rng.below(SNIPPETS.len())].as_bytes();
                let at = rng.below(d.len() + 1);
                d.splice(at..at, s.iter().copied());
            }
            6 => swap_tokens(rng, &mut d),
            7 => {
                // Duplicate or delete a line.
                let lines = split_lines(&d);
                if !lines.is_empty() {
                    let k = rng.below(lines.len());
                    let mut out: Vec<Vec<u8>> = lines.clone();
                    if rng.below(2) == 0 {
                        out.insert(rng.below(lines.len() + 1), lines[k].clone());
                    } else {
                        out.remove(k);
                    }
                    d = out.concat();
                }
            }
            8 => {
                // Splice lines from another file.
                let ol = split_lines(other);
                if !ol.is_empty() {
                    let k = rng.below(ol.len());
                    let cnt = 1 + rng.below(5);
                    let chunk: Vec<u8> = ol[k..(k + cnt).min(ol.len())].concat();
                    let at = line_start(&d, rng);
                    d.splice(at..at, chunk);
                }
            }
            _ => {
                // Shuffle the tokens of one line.
                let mut lines = split_lines(&d);
                if !lines.is_empty() {
                    let k = rng.below(lines.len());
                    let mut toks: Vec<Vec<u8>> =
                        lines[k].split(|b| *b == b' ' || *b == b'\t').map(|t| t.to_vec()).collect();
                    for i in (1..toks.len()).rev() {
                        let j = rng.below(i + 1);
                        toks.swap(i, j);
                    }
                    let mut l = toks.join(&b' ');
                    if !l.ends_with(b"\n") {
                        l.push(b'\n');
                    }
                    lines[k] = l;
                    d = lines.concat();
                }
            }
        }
    }
    d
}

fn split_lines(d: &[u8]) -> Vec<Vec<u8>> {
    d.split_inclusive(|b| *b == b'\n').map(|l| l.to_vec()).collect()
}

fn line_start(d: &[u8], rng: &mut Rng) -> usize {
    let starts: Vec<usize> = std::iter::once(0)
        .chain(d.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1))
        .collect();
    starts[rng.below(starts.len())].min(d.len())
}

fn swap_tokens(rng: &mut Rng, d: &mut Vec<u8>) {
    let spans: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < d.len() {
            if d[i].is_ascii_whitespace() {
                i += 1;
                continue;
            }
            let s = i;
            while i < d.len() && !d[i].is_ascii_whitespace() {
                i += 1;
            }
            v.push((s, i));
        }
        v
    };
    if spans.len() < 2 {
        return;
    }
    let (a, b) = (rng.below(spans.len()), rng.below(spans.len()));
    let (x, y) = if a < b { (spans[a], spans[b]) } else { (spans[b], spans[a]) };
    if x == y {
        return;
    }
    let mut out = Vec::with_capacity(d.len());
    out.extend_from_slice(&d[..x.0]);
    out.extend_from_slice(&d[y.0..y.1]);
    out.extend_from_slice(&d[x.1..y.0]);
    out.extend_from_slice(&d[x.0..x.1]);
    out.extend_from_slice(&d[y.1..]);
    *d = out;
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
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

fn env() -> Env {
    let vars = [
        ("KC_ARCH", "x86"),
        ("KC_VERSION", "5.4"),
        ("KC_PREFIX", "ARCH"),
        ("KC_EMPTY", ""),
        ("KC_DIR", "archdir"),
        ("KC_NUM", "12"),
        ("KC_MAX", "100"),
    ];
    Env::fixed(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>())
}

/// Every error must say where: `file:line: ` with a non-empty file, and a
/// real line for syntax-level errors.
fn check_error(e: &KconfigError, input: &str) {
    let shown = e.to_string();
    let prefix = format!("{}:{}: ", e.file, e.line);
    assert!(shown.starts_with(&prefix), "error without location prefix for {}: {}", input, shown);
    assert!(!e.file.is_empty(), "error without a file name for {}: {}", input, shown);
    if matches!(e.kind, ErrorKind::Parse | ErrorKind::Preprocessor | ErrorKind::Encoding) {
        assert!(e.line > 0, "{:?} error without a line for {}: {}", e.kind, input, shown);
    }
}

fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let probe = shm.join(format!(".kconfig-fuzz-probe-{}", std::process::id()));
    if std::fs::create_dir(&probe).is_ok() {
        let _ = std::fs::remove_dir(&probe);
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

fn run_fuzz() {
    let iters: usize =
        std::env::var("KCONFIG_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(11_000);
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut trees: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Kconfig").exists())
        .collect();
    trees.sort();
    let work = scratch_root().join(format!("kconfig-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);

    struct Tree {
        dir: PathBuf,
        kconfig_files: Vec<(PathBuf, Vec<u8>)>,
        configs: Vec<Vec<u8>>,
        kc: Kconfig,
    }
    let opts =
        |dir: &Path| LoadOptions { srctree: Some(dir.to_path_buf()), env: env(), ..Default::default() };
    let mut ts = Vec::new();
    for (i, t) in trees.iter().enumerate() {
        let dir = work.join(format!("t{}", i));
        copy_dir(t, &dir);
        let mut files = Vec::new();
        files_under(&dir, &mut files);
        let mut kconfig_files = Vec::new();
        let mut configs = Vec::new();
        for f in files {
            let rel = f.strip_prefix(&dir).unwrap().to_path_buf();
            let data = std::fs::read(&f).unwrap();
            let name = rel.to_string_lossy();
            if name.starts_with("configs/") {
                configs.push(data);
            } else if !name.starts_with("oracle.") {
                kconfig_files.push((rel, data));
            }
        }
        // The top-level Kconfig first: it is picked most often.
        kconfig_files.sort_by_key(|(p, _)| p != Path::new("Kconfig"));
        let kc = Kconfig::load_with(Path::new("Kconfig"), &opts(&dir)).expect("corpus tree loads");
        ts.push(Tree { dir, kconfig_files, configs, kc });
    }

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let (mut parsed_ok, mut parse_err, mut conf_ok, mut conf_err) = (0usize, 0usize, 0usize, 0usize);

    // Kconfig inputs: mutate one file of a tree, parse, and if it loads,
    // exercise the evaluation paths too.
    for n in 0..iters {
        let t = &ts[rng.below(ts.len())];
        let fi = if rng.below(3) == 0 { rng.below(t.kconfig_files.len()) } else { 0 };
        let (rel, orig) = &t.kconfig_files[fi];
        let other = &ts[rng.below(ts.len())].kconfig_files[0].1;
        let data = mutate(&mut rng, orig, other);
        let path = t.dir.join(rel);
        std::fs::write(&path, &data).unwrap();
        let label = format!("kconfig input #{} ({})", n, rel.display());
        let r = catch_unwind(AssertUnwindSafe(|| {
            match Kconfig::load_with(Path::new("Kconfig"), &opts(&t.dir)) {
                Ok(mut kc) => {
                    let _ = kc.config_text();
                    let _ = kc.min_config_text();
                    let _ = kc.list_new_config();
                    kc.all_yes();
                    let _ = kc.config_text();
                    kc.all_no();
                    let _ = kc.min_config_text();
                    for s in kc.symbols().map(|s| s.name().to_string()).collect::<Vec<_>>().iter().take(5) {
                        let _ = kc.set_value(s, "y");
                    }
                    let _ = kc.take_warnings();
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }));
        std::fs::write(&path, orig).unwrap();
        match r {
            Ok(Ok(())) => parsed_ok += 1,
            Ok(Err(e)) => {
                check_error(&e, &label);
                parse_err += 1;
            }
            Err(_) => {
                let keep = work.with_file_name(format!("kconfig-fuzz-crash-{}", n));
                let _ = std::fs::write(&keep, &data);
                panic!("panic on {} (input saved to {})", label, keep.display());
            }
        }
    }

    // .config inputs against the unmodified trees.
    for n in 0..iters {
        let ti = rng.below(ts.len());
        let ci = rng.below(ts[ti].configs.len().max(1));
        let orig = ts[ti].configs.get(ci).cloned().unwrap_or_default();
        let oi = rng.below(ts.len());
        let other = ts[oi].configs.first().cloned().unwrap_or_default();
        let data = mutate(&mut rng, &orig, &other);
        let path = ts[ti].dir.join("fuzz.config");
        std::fs::write(&path, &data).unwrap();
        let label = format!(".config input #{}", n);
        let kc = &mut ts[ti].kc;
        let r = catch_unwind(AssertUnwindSafe(|| {
            let r = kc.load_config(&path);
            if r.is_ok() {
                let _ = kc.config_text();
                let _ = kc.min_config_text();
                let _ = kc.list_new_config();
            }
            let _ = kc.take_warnings();
            r
        }));
        match r {
            Ok(Ok(load)) => {
                for w in &load.warnings {
                    if let Some((f, l)) = &w.location {
                        assert!(
                            *l > 0 && f.ends_with("fuzz.config"),
                            "bad warning location in {}: {}",
                            label,
                            w
                        );
                    }
                }
                conf_ok += 1;
            }
            Ok(Err(e)) => {
                check_error(&e, &label);
                conf_err += 1;
            }
            Err(_) => {
                let keep = work.with_file_name(format!("kconfig-fuzz-crash-config-{}", n));
                let _ = std::fs::write(&keep, &data);
                panic!("panic on {} (input saved to {})", label, keep.display());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "fuzz: {} inputs without a panic in {:.1}s: {} Kconfig trees ({} loaded, {} rejected with file:line), \
         {} .config files ({} read, {} rejected)",
        2 * iters,
        started.elapsed().as_secs_f64(),
        iters,
        parsed_ok,
        parse_err,
        iters,
        conf_ok,
        conf_err
    );
}

#[test]
fn mutated_inputs_never_panic() {
    // Silence the default hook: panics are caught and reported above.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // A large stack: hostile nesting must be refused, not overflow.
    let r = std::thread::Builder::new().stack_size(256 << 20).spawn(run_fuzz).unwrap().join();
    std::panic::set_hook(hook);
    if let Err(e) = r {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{}", msg);
    }
}
