//! Distributed data parallel for scripts: the rank's place and the
//! collectives of `crate::dist` (`knlp run --nproc N`, or torchrun).
use rhai::{Engine, INT};

use super::api::{Api, DocEntry};
use super::value::{rerr, OrScript, RResult, RTensor};
use crate::dist::{self, Op};

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Distributed");
    api.f("dist_rank", "", "This process's rank (0 outside a distributed run).", || dist::rank() as INT);
    api.f("dist_world_size", "", "Number of ranks (1 outside a distributed run).", || {
        dist::world_size() as INT
    });
    api.f(
        "dist_local_rank",
        "",
        "The rank on this host (`cuda` means `cuda:<local rank>` in a distributed run).",
        || dist::default_cuda_index() as INT,
    );
    api.f(
        "dist_active",
        "",
        "True when launched as ranks (`knlp run --nproc N`, torchrun); `train()` then splits each batch over them.",
        dist::is_active,
    );
    api.f(
        "all_reduce",
        "t, op",
        "In place: reduce `t` over every rank with `\"sum\"`, `\"avg\"`, `\"max\"` or `\"min\"` (Gloo for CPU tensors, NCCL for CUDA); returns t. Every rank must call it.",
        |t: &mut RTensor, op: &str| -> RResult<RTensor> {
            let op = Op::parse(op).map_err(|e| rerr(format!("all_reduce(): {e}")))?;
            dist::all_reduce(&t.0, op).map_err(|e| rerr(format!("all_reduce(): {e:#}")))?;
            Ok(RTensor(t.0.shallow_clone()))
        },
    );
    api.f(
        "broadcast",
        "t, src",
        "In place: every rank's `t` becomes rank `src`'s (same shape and dtype everywhere); returns t.",
        |t: &mut RTensor, src: INT| -> RResult<RTensor> {
            dist::broadcast(&t.0, src).map_err(|e| rerr(format!("broadcast(): {e:#}")))?;
            Ok(RTensor(t.0.shallow_clone()))
        },
    );
    api.f("barrier", "", "Wait until every rank reaches this call.", || -> RResult<()> {
        dist::barrier().rt()
    });
}
