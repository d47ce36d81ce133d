//! Distributed data parallel on libtorch's own c10d process groups (Gloo for
//! CPU tensors, NCCL for CUDA tensors), reached through `csrc/dist.cpp`.
//!
//! A process is a rank when torchrun's variables are set (`RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, ...; [`launch`] sets the same
//! ones). The store connection and each backend are made on first use, so a
//! rank that never communicates costs nothing, and a run on CPU tensors under
//! a GPU launch still gets Gloo. Every collective is a method of the one
//! process-wide group; all ranks must call the same collectives in the same
//! order (as in PyTorch).
pub mod launch;

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn knlp_dist_last_error() -> *const c_char;
    fn knlp_dist_has_nccl() -> c_int;
    fn knlp_dist_has_gloo() -> c_int;
    fn knlp_dist_store_new(
        host: *const c_char,
        port: c_int,
        world: c_int,
        server: c_int,
        prefix: *const c_char,
        timeout_s: f64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn knlp_dist_store_free(s: *mut c_void);
    fn knlp_dist_new(
        store: *mut c_void,
        name: *const c_char,
        backend: c_int,
        rank: c_int,
        world: c_int,
        timeout_s: f64,
        host: *const c_char,
        ifname: *const c_char,
        cuda_device: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn knlp_dist_free(g: *mut c_void);
    fn knlp_dist_all_reduce(g: *mut c_void, t: *mut C_tensor, op: c_int) -> c_int;
    fn knlp_dist_broadcast(g: *mut c_void, t: *mut C_tensor, src: c_int) -> c_int;
    fn knlp_dist_barrier(g: *mut c_void) -> c_int;
}

fn check(rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: a pointer into the shim's thread-local error string.
    let msg = unsafe { CStr::from_ptr(knlp_dist_last_error()) }.to_string_lossy().to_string();
    Err(anyhow!("{what}: {}", crate::tensor::clean_torch_message(&msg)))
}

/// Whether this binary can make NCCL process groups (built with the CUDA
/// headers) and Gloo ones (built with gloo's headers).
pub fn has_nccl() -> bool {
    unsafe { knlp_dist_has_nccl() != 0 }
}

pub fn has_gloo() -> bool {
    unsafe { knlp_dist_has_gloo() != 0 }
}

/// The rank's place, from torchrun's environment variables.
#[derive(Clone, Debug, PartialEq)]
pub struct Env {
    pub rank: i64,
    pub local_rank: i64,
    pub world: i64,
    pub local_world: i64,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store: every rank, rank 0 too, is a client.
    pub agent_store: bool,
    pub restart_count: i64,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn int_var(name: &str) -> Result<Option<i64>> {
    var(name).map(|v| v.trim().parse::<i64>().map_err(|_| anyhow!("{name}={v}: not an integer"))).transpose()
}

impl Env {
    /// `None` when `WORLD_SIZE` is unset (not a rank); an error when the
    /// variables are set but inconsistent.
    pub fn from_env() -> Result<Option<Env>> {
        let Some(world) = int_var("WORLD_SIZE")? else {
            return Ok(None);
        };
        let rank = int_var("RANK")?.ok_or_else(|| anyhow!("WORLD_SIZE is set but RANK is not"))?;
        if world < 1 {
            bail!("WORLD_SIZE={world}: must be at least 1");
        }
        if rank < 0 || rank >= world {
            bail!("RANK={rank}: must be in 0..{world} (WORLD_SIZE={world})");
        }
        let local_rank = int_var("LOCAL_RANK")?.unwrap_or(rank);
        let local_world = int_var("LOCAL_WORLD_SIZE")?.unwrap_or(world);
        if local_rank < 0 || local_rank >= local_world.max(1) {
            bail!("LOCAL_RANK={local_rank}: must be in 0..{local_world} (LOCAL_WORLD_SIZE)");
        }
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = int_var("MASTER_PORT")?.unwrap_or(29500);
        let master_port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow!("MASTER_PORT={port}: not a port"))?;
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let restart_count = int_var("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
        Ok(Some(Env {
            rank,
            local_rank,
            world,
            local_world,
            master_addr,
            master_port,
            agent_store,
            restart_count,
        }))
    }
}

/// The environment read once per process (a bad environment is reported by
/// [`init`], and the process then runs as a single rank nowhere else).
fn env() -> Option<&'static Env> {
    static ENV: OnceLock<Option<Env>> = OnceLock::new();
    ENV.get_or_init(|| Env::from_env().ok().flatten()).as_ref()
}

/// This process's rank (0 when not distributed).
pub fn rank() -> i64 {
    env().map_or(0, |e| e.rank)
}

/// Number of ranks (1 when not distributed).
pub fn world_size() -> i64 {
    env().map_or(1, |e| e.world)
}

/// Whether this process is one rank of a launched job (world size 1
/// included: that runs every collective, which is how its cost is measured).
pub fn is_active() -> bool {
    env().is_some()
}

/// The CUDA device a rank uses for `cuda`: its local rank, so that the ranks
/// of one host share out its GPUs.
pub fn default_cuda_index() -> usize {
    env().map_or(0, |e| e.local_rank.max(0) as usize)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Sum,
    Avg,
    Max,
    Min,
}

impl Op {
    pub fn parse(s: &str) -> Result<Op> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "sum" => Op::Sum,
            "avg" | "mean" => Op::Avg,
            "max" => Op::Max,
            "min" => Op::Min,
            _ => bail!("unknown reduction '{s}' (expected sum, avg, max or min)"),
        })
    }

    fn code(self) -> c_int {
        match self {
            Op::Sum | Op::Avg => 0,
            Op::Max => 1,
            Op::Min => 2,
        }
    }
}

struct Handle(*mut c_void);
// SAFETY: c10d stores and backends are thread-safe objects; the pointers are
// only used under the STATE mutex.
unsafe impl Send for Handle {}

struct State {
    env: Env,
    store: Handle,
    gloo: Option<Handle>,
    nccl: Option<Handle>,
}

impl Drop for State {
    fn drop(&mut self) {
        unsafe {
            for h in [self.gloo.take(), self.nccl.take()].into_iter().flatten() {
                knlp_dist_free(h.0);
            }
            knlp_dist_store_free(self.store.0);
        }
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Seconds a collective or the rendezvous may wait for a peer
/// (`KNLP_DIST_TIMEOUT`, default 300).
pub fn timeout_s() -> f64 {
    var("KNLP_DIST_TIMEOUT").and_then(|v| v.parse::<f64>().ok()).filter(|t| *t > 0.0).unwrap_or(300.0)
}

fn with_state<T>(f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
    let mut guard = STATE.lock().map_err(|_| anyhow!("distributed state poisoned by an earlier panic"))?;
    if guard.is_none() {
        let env = Env::from_env()?.ok_or_else(|| {
            anyhow!(
                "not a distributed run (WORLD_SIZE is unset): launch with `knlp run --nproc N` or torchrun"
            )
        })?;
        let host = CString::new(env.master_addr.clone()).context("MASTER_ADDR")?;
        // torchrun's ranks keep their keys per restart, as PyTorch's env://
        // rendezvous does.
        let prefix =
            if env.agent_store { format!("/worker/attempt_{}", env.restart_count) } else { String::new() };
        let prefix = CString::new(prefix)?;
        let mut out = std::ptr::null_mut();
        let server = (env.rank == 0 && !env.agent_store) as c_int;
        check(
            unsafe {
                knlp_dist_store_new(
                    host.as_ptr(),
                    env.master_port as c_int,
                    env.world as c_int,
                    server,
                    prefix.as_ptr(),
                    timeout_s(),
                    &mut out,
                )
            },
            &format!("rendezvous at {}:{}", env.master_addr, env.master_port),
        )?;
        *guard = Some(State { env, store: Handle(out), gloo: None, nccl: None });
    }
    f(guard.as_mut().expect("state set above"))
}

/// The group for tensors on `device`, made (collectively) on first use.
fn group(st: &mut State, device: Device) -> Result<*mut c_void> {
    let (slot, backend, name, cuda) = match device {
        Device::Cpu => (&mut st.gloo, 0, "gloo", 0),
        Device::Cuda(i) => (&mut st.nccl, 1, "nccl", i as c_int),
        d => bail!("no process group for tensors on {d:?}"),
    };
    if let Some(h) = slot {
        return Ok(h.0);
    }
    if backend == 0 && !has_gloo() {
        bail!("this knlp was built without Gloo (install libgloo-dev, then rebuild; `make` does both)");
    }
    let host = CString::new(st.env.master_addr.clone())?;
    let ifname = CString::new(var("GLOO_SOCKET_IFNAME").unwrap_or_default())?;
    let cname = CString::new(name)?;
    let mut out = std::ptr::null_mut();
    check(
        unsafe {
            knlp_dist_new(
                st.store.0,
                cname.as_ptr(),
                backend,
                st.env.rank as c_int,
                st.env.world as c_int,
                timeout_s(),
                host.as_ptr(),
                ifname.as_ptr(),
                cuda,
                &mut out,
            )
        },
        &format!("{name} process group (rank {} of {})", st.env.rank, st.env.world),
    )?;
    *slot = Some(Handle(out));
    Ok(out)
}

/// Run `f` on a contiguous tensor that shares `t`'s storage, or on a
/// contiguous copy that is written back.
fn on_contiguous(t: &Tensor, f: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
    if t.is_contiguous() {
        return f(t);
    }
    let c = t.f_contiguous().map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
    f(&c)?;
    let mut dst = t.shallow_clone();
    tch::no_grad(|| dst.f_copy_(&c)).map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
    Ok(())
}

/// Reduce `t` over all ranks in place.
pub fn all_reduce(t: &Tensor, op: Op) -> Result<()> {
    let world = world_size();
    on_contiguous(t, |c| {
        with_state(|st| {
            let g = group(st, c.device())?;
            let mut c = c.shallow_clone();
            check(unsafe { knlp_dist_all_reduce(g, c.as_mut_ptr(), op.code()) }, "all_reduce")
        })
    })?;
    if op == Op::Avg && world > 1 {
        let mut m = t.shallow_clone();
        let _ = tch::no_grad(|| m.f_div_scalar_(world as f64))
            .map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
    }
    Ok(())
}

/// Copy rank `src`'s `t` into every rank's `t`.
pub fn broadcast(t: &Tensor, src: i64) -> Result<()> {
    let world = world_size();
    if src < 0 || src >= world {
        bail!("broadcast: source rank {src} is not in 0..{world}");
    }
    on_contiguous(t, |c| {
        with_state(|st| {
            let g = group(st, c.device())?;
            let mut c = c.shallow_clone();
            check(unsafe { knlp_dist_broadcast(g, c.as_mut_ptr(), src as c_int) }, "broadcast")
        })
    })
}

/// Wait until every rank gets here (through the store: no device needed).
pub fn barrier() -> Result<()> {
    with_state(|st| {
        let g = group(st, Device::Cpu).or_else(|_| match st.nccl.as_ref() {
            Some(h) => Ok(h.0),
            None => bail!("barrier: no process group"),
        })?;
        check(unsafe { knlp_dist_barrier(g) }, "barrier")
    })
}

/// Reduce a few host numbers over all ranks (through Gloo on the CPU: no
/// device synchronisation).
pub fn all_reduce_f64(vals: &mut [f64], op: Op) -> Result<()> {
    let t = Tensor::from_slice(vals);
    all_reduce(&t, op)?;
    let out: Vec<f64> = Vec::<f64>::try_from(&t).map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
    vals.copy_from_slice(&out);
    Ok(())
}

/// All-reduce (sum) `flat`, a 1-D buffer, in buckets of `bucket_bytes`.
pub fn all_reduce_buckets(flat: &Tensor, bucket_bytes: i64) -> Result<()> {
    let n = flat.numel() as i64;
    let elem = flat.kind().elt_size_in_bytes() as i64;
    let per = (bucket_bytes / elem.max(1)).max(1);
    let mut off = 0;
    while off < n {
        let len = per.min(n - off);
        let v = flat.f_narrow(0, off, len).map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
        all_reduce(&v, Op::Sum)?;
        off += len;
    }
    Ok(())
}

/// The rows of a global batch of `n` that belong to `rank` of `world`:
/// (start, length), contiguous, sizes differing by at most one.
pub fn shard(n: i64, rank: i64, world: i64) -> (i64, i64) {
    let base = n / world;
    let extra = n % world;
    let start = rank * base + rank.min(extra);
    (start, base + i64::from(rank < extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_a_batch_once() {
        for n in 1..20 {
            for w in 1..=n.min(7) {
                let mut next = 0;
                for r in 0..w {
                    let (s, l) = shard(n, r, w);
                    assert_eq!(s, next, "n={n} w={w} r={r}");
                    assert!(l == n / w || l == n / w + 1);
                    next = s + l;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn reductions_parse() {
        assert_eq!(Op::parse("AVG").unwrap(), Op::Avg);
        assert!(Op::parse("prod").unwrap_err().to_string().contains("prod"));
    }
}
