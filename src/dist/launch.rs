//! knlp's own launcher for one host (`knlp run --nproc N`, `knlp train
//! --nproc N`, `make NPROC=N`): start N ranks of the same command with
//! torchrun's variables, forward Ctrl-C and SIGTERM to them, and end the
//! whole job as soon as one rank fails.
//!
//! Each rank runs in its own process group (so a terminal's Ctrl-C reaches
//! the launcher once, and the launcher forwards it once) and dies with the
//! launcher (`PR_SET_PDEATHSIG`), so no rank outlives it.
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long ranks get to stop after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// A free TCP port on the loopback interface for the store.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the rendezvous")?;
    Ok(l.local_addr()?.port())
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn exit_code(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Start `cmd` in a process group of its own (a terminal's Ctrl-C reaches
/// only this process, which passes it on once) and have it killed when this
/// process dies (`PR_SET_PDEATHSIG`), so it never outlives its parent.
/// Used for ranks and for matrix cells.
pub fn tie_to_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Run `program args` as `nproc` ranks on this host; returns the exit status
/// for the launcher (0 when every rank succeeded).
pub fn run(nproc: usize, program: &Path, args: &[OsString]) -> Result<i32> {
    if nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if std::env::var_os("WORLD_SIZE").is_some() {
        bail!("--nproc inside a launched job (WORLD_SIZE is already set): launch once, from outside");
    }
    let port = match std::env::var("MASTER_PORT").ok().and_then(|p| p.parse::<u16>().ok()) {
        Some(p) => p,
        None => free_port()?,
    };
    crate::interrupt::install();
    // SAFETY: installing an async-signal-safe handler that only stores a flag.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    // The ranks share the cores (torchrun sets 1; a share keeps CPU runs fast).
    let threads = std::env::var_os("OMP_NUM_THREADS").is_none().then(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / nproc).max(1).to_string()
    });
    let mut ranks: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for r in 0..nproc {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("GROUP_RANK", "0")
            .env("ROLE_RANK", r.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE");
        if let Some(t) = &threads {
            cmd.env("OMP_NUM_THREADS", t);
        }
        tie_to_parent(&mut cmd);
        match cmd.spawn() {
            Ok(c) => ranks.push(Some(c)),
            Err(e) => {
                for c in ranks.iter_mut().flatten() {
                    signal(c, libc::SIGKILL);
                    let _ = c.wait();
                }
                return Err(e).with_context(|| format!("cannot start rank {r}: {}", program.display()));
            }
        }
    }
    let mut failed: Option<(usize, ExitStatus)> = None;
    let mut last_code = 0;
    let (mut int_sent, mut term_sent) = (false, false);
    let mut kill_at: Option<Instant> = None;
    loop {
        let mut alive = 0;
        for (r, slot) in ranks.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.try_wait()? {
                Some(st) => {
                    // After a forwarded Ctrl-C, ranks ending with 130 is the
                    // stop asked for: the others must finish their checkpoint.
                    if !st.success() && failed.is_none() && !int_sent {
                        failed = Some((r, st));
                    }
                    last_code = last_code.max(exit_code(st));
                    *slot = None;
                }
                None => alive += 1,
            }
        }
        if alive == 0 {
            break;
        }
        if let Some((r, st)) = failed.filter(|_| kill_at.is_none()) {
            eprintln!("knlp: rank {r} {}; stopping the other {alive} rank(s)", describe(st));
            for c in ranks.iter().flatten() {
                signal(c, libc::SIGTERM);
            }
            kill_at = Some(Instant::now() + GRACE);
        }
        if crate::interrupt::requested() && !int_sent {
            for c in ranks.iter().flatten() {
                signal(c, libc::SIGINT);
            }
            int_sent = true;
        }
        if TERM.load(Ordering::SeqCst) && !term_sent {
            for c in ranks.iter().flatten() {
                signal(c, libc::SIGTERM);
            }
            term_sent = true;
            kill_at.get_or_insert(Instant::now() + GRACE);
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for c in ranks.iter().flatten() {
                signal(c, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(match failed {
        Some((_, st)) => exit_code(st).max(1),
        None => last_code,
    })
}
