//! The engine on the Linux kernel's own Kconfig tree (Linux 6.1, from
//! Debian's linux-source-6.1), against Linux's `scripts/kconfig/conf` built
//! from the same tree: `make test` extracts the tree, builds `conf` and sets
//! KNLP_LINUX_SRC and KNLP_LINUX_CONF. Without them these tests say so and
//! pass (plain `cargo test`); with KNLP_REQUIRE_LINUX=1 they fail instead.
//!
//! Both tools run as processes with the same environment (what the kernel's
//! top Makefile exports), in separate directories, and must write the same
//! bytes to `.config` and stdout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Linux {
    src: PathBuf,
    conf: PathBuf,
}

fn linux() -> Option<Linux> {
    let (src, conf) = match (std::env::var_os("KNLP_LINUX_SRC"), std::env::var_os("KNLP_LINUX_CONF")) {
        (Some(s), Some(c)) => (PathBuf::from(s), PathBuf::from(c)),
        _ => {
            assert!(
                std::env::var("KNLP_REQUIRE_LINUX").as_deref() != Ok("1"),
                "KNLP_REQUIRE_LINUX=1 but KNLP_LINUX_SRC/KNLP_LINUX_CONF are not set"
            );
            eprintln!("skipped: KNLP_LINUX_SRC and KNLP_LINUX_CONF are not set (make test sets them)");
            return None;
        }
    };
    assert!(src.join("Kconfig").is_file(), "no Kconfig in KNLP_LINUX_SRC={}", src.display());
    assert!(conf.is_file(), "KNLP_LINUX_CONF={} is not a file", conf.display());
    Some(Linux { src, conf })
}

/// What the kernel's top Makefile exports to `conf`, for one architecture.
fn kernel_env(l: &Linux, arch: &str) -> HashMap<String, String> {
    let srcarch = if arch == "x86_64" { "x86" } else { arch };
    let cc_version = Command::new("gcc").arg("--version").output().expect("gcc");
    let cc_version = String::from_utf8_lossy(&cc_version.stdout).lines().next().unwrap_or("").to_string();
    let mut env: HashMap<String, String> = [
        ("srctree", l.src.to_str().unwrap()),
        ("SRCARCH", srcarch),
        ("ARCH", arch),
        ("SUBARCH", "x86"),
        ("KERNELVERSION", "6.1"),
        ("CC", "gcc"),
        ("LD", "ld"),
        ("HOSTCC", "gcc"),
        ("HOSTCXX", "g++"),
        ("CC_VERSION_TEXT", &cc_version),
        ("CLANG_FLAGS", ""),
        ("NM", "nm"),
        ("OBJCOPY", "objcopy"),
        ("PAHOLE", "pahole"),
        ("RUSTC", "rustc"),
        ("BINDGEN", "bindgen"),
        ("USERCFLAGS", ""),
        ("USERLDFLAGS", ""),
        ("CROSS_COMPILE", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("PATH".into(), std::env::var("PATH").unwrap_or_default());
    env
}

fn scratch() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let d =
        base.join(format!("kconfig-linux-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The result of one tool run in its directory.
struct Out {
    dir: PathBuf,
    stdout: String,
    stderr: String,
    status: i32,
}

impl Out {
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {} ({})", self.dir.join(name).display(), e, self.stderr))
    }
}

fn command(l: &Linux, ours: bool, env: &HashMap<String, String>, args: &[&str], dir: &Path) -> Command {
    let mut c = if ours {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kconfig-tool"));
        c.args(["conf", "--allow-shell"]);
        c
    } else {
        Command::new(&l.conf)
    };
    c.args(args).arg("Kconfig").current_dir(dir).env_clear().envs(env);
    c
}

/// Runs `conf` and ours side by side, each in a fresh directory holding
/// `files` (name, contents).
fn both(l: &Linux, env: &HashMap<String, String>, args: &[&str], files: &[(&str, &str)]) -> (Out, Out) {
    let dirs = [scratch(), scratch()];
    for d in &dirs {
        for (n, t) in files {
            std::fs::write(d.join(n), t).unwrap();
        }
    }
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| command(l, i == 1, env, args, d).output().expect("spawn"))
        .collect();
    let mut outs = children.into_iter().zip(dirs).map(|(o, dir)| Out {
        dir,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        status: o.status.code().unwrap_or(-1),
    });
    let (c, k) = (outs.next().unwrap(), outs.next().unwrap());
    assert_eq!(c.status, 0, "conf {:?} failed: {}", args, c.stderr);
    assert_eq!(k.status, 0, "ours {:?} failed: {}", args, k.stderr);
    (c, k)
}

/// The first differing line of two texts, for the failure message.
fn first_diff(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}: conf {:?}, ours {:?}", i + 1, x, y);
        }
    }
    format!("lengths {} and {} lines", a.lines().count(), b.lines().count())
}

fn assert_same(what: &str, c: &str, k: &str) {
    assert!(c == k, "{}: differs from conf at {}", what, first_diff(c, k));
}

fn cleanup(outs: &[&Out]) {
    for o in outs {
        let _ = std::fs::remove_dir_all(&o.dir);
    }
}

/// The all*config modes and the architecture's defconfig: identical
/// `.config` and stdout.
fn all_modes(l: &Linux, arch: &str, defconfig: &str) {
    let env = kernel_env(l, arch);
    let defarg = format!("--defconfig={}", defconfig);
    for args in
        [["--alldefconfig"], ["--allnoconfig"], ["--allyesconfig"], ["--allmodconfig"], [defarg.as_str()]]
    {
        let (c, k) = both(l, &env, &args, &[]);
        let what = format!("{} {}", arch, args[0]);
        assert_same(&format!("{} .config", what), &c.file(".config"), &k.file(".config"));
        assert_same(&format!("{} stdout", what), &c.stdout, &k.stdout);
        assert!(c.file(".config").lines().count() > 1000, "{}: a short .config", what);
        eprintln!("{}: same .config ({} lines)", what, c.file(".config").lines().count());
        cleanup(&[&c, &k]);
    }
}

#[test]
fn x86_64_all_modes_match_conf() {
    let Some(l) = linux() else { return };
    all_modes(&l, "x86_64", "arch/x86/configs/x86_64_defconfig");
}

#[test]
fn arm64_all_modes_match_conf() {
    let Some(l) = linux() else { return };
    all_modes(&l, "arm64", "arch/arm64/configs/defconfig");
}

/// savedefconfig of x86_64_defconfig's result is conf's, and loading it
/// back gives the same `.config`; listnewconfig on a `.config` with lines
/// missing lists the same symbols; a second write reports no change.
#[test]
fn x86_64_savedefconfig_listnewconfig_round_trip() {
    let Some(l) = linux() else { return };
    let env = kernel_env(&l, "x86_64");
    let (c, k) = both(&l, &env, &["--defconfig=arch/x86/configs/x86_64_defconfig"], &[]);
    let full = c.file(".config");
    cleanup(&[&c, &k]);

    let (c, k) = both(&l, &env, &["--savedefconfig=defconfig"], &[(".config", &full)]);
    let min = c.file("defconfig");
    assert_same("savedefconfig", &min, &k.file("defconfig"));
    assert!(min.lines().count() > 100 && min.lines().count() < full.lines().count() / 4);
    cleanup(&[&c, &k]);

    let (c, k) = both(&l, &env, &["--defconfig=min"], &[("min", &min)]);
    assert_same("defconfig of the saved minimal config", &full, &k.file(".config"));
    cleanup(&[&c, &k]);

    let partial: String =
        full.lines().enumerate().filter(|(i, _)| i % 5 != 1).map(|(_, s)| format!("{}\n", s)).collect();
    let (c, k) = both(&l, &env, &["--listnewconfig"], &[(".config", &partial)]);
    assert!(c.stdout.lines().count() > 100, "listnewconfig listed {} lines", c.stdout.lines().count());
    assert_same("listnewconfig", &c.stdout, &k.stdout);
    cleanup(&[&c, &k]);

    let (c, k) = both(&l, &env, &["--olddefconfig"], &[(".config", &full)]);
    assert_same("olddefconfig stdout on an up-to-date .config", &c.stdout, &k.stdout);
    assert!(k.stdout.contains("No change to .config"), "{}", k.stdout);
    cleanup(&[&c, &k]);
}

/// conf's randconfig for several seeds, with every seventh line dropped so
/// that new symbols appear, then olddefconfig by conf and by us.
fn randconfig_property(l: &Linux, arch: &str, seeds: std::ops::Range<u32>) -> usize {
    let mut env = kernel_env(l, arch);
    let mut compared = 0;
    for seed in seeds {
        env.insert("KCONFIG_SEED".into(), seed.to_string());
        let dir = scratch();
        let o = command(l, false, &env, &["--randconfig"], &dir).output().expect("conf");
        assert!(
            o.status.success(),
            "conf --randconfig seed {}: {}",
            seed,
            String::from_utf8_lossy(&o.stderr)
        );
        let rand = std::fs::read_to_string(dir.join(".config")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let input: String =
            rand.lines().enumerate().filter(|(i, _)| i % 7 != 3).map(|(_, s)| format!("{}\n", s)).collect();
        env.remove("KCONFIG_SEED");
        let (c, k) = both(l, &env, &["--olddefconfig"], &[(".config", &input)]);
        assert_same(
            &format!("{} randconfig seed {} then olddefconfig", arch, seed),
            &c.file(".config"),
            &k.file(".config"),
        );
        assert_same("olddefconfig stdout", &c.stdout, &k.stdout);
        cleanup(&[&c, &k]);
        compared += 1;
    }
    compared
}

#[test]
fn randconfig_then_olddefconfig_matches_conf() {
    let Some(l) = linux() else { return };
    // Each comparison costs three loads of the tree (about 90 $(shell)
    // calls each, most of them compiler runs), so the seeds are few.
    let n = randconfig_property(&l, "x86_64", 1..7) + randconfig_property(&l, "arm64", 1..4);
    eprintln!("randconfig: {} configurations compared (x86_64 seeds 1-6, arm64 seeds 1-3)", n);
    assert_eq!(n, 9);
}

/// Our own randconfig is reproducible from its seed and gives a valid
/// configuration: conf's olddefconfig leaves it unchanged.
#[test]
fn our_randconfig_is_seeded_and_consistent() {
    let Some(l) = linux() else { return };
    let mut env = kernel_env(&l, "x86_64");
    env.insert("KCONFIG_SEED".into(), "0x2a".into());
    let dirs = [scratch(), scratch()];
    for d in &dirs {
        let o = command(&l, true, &env, &["--randconfig"], d).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("KCONFIG_SEED=0x2A\n"));
    }
    let a = std::fs::read_to_string(dirs[0].join(".config")).unwrap();
    assert_eq!(a, std::fs::read_to_string(dirs[1].join(".config")).unwrap(), "same seed, different .config");
    env.remove("KCONFIG_SEED");
    let o = command(&l, false, &env, &["--olddefconfig"], &dirs[0]).output().unwrap();
    assert!(o.status.success());
    assert_same(
        "conf olddefconfig of our randconfig",
        &a,
        &std::fs::read_to_string(dirs[0].join(".config")).unwrap(),
    );
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}
