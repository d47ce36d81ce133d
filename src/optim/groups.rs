//! Parameter groups (torch's `param_groups`): parameters picked by name take
//! their own learning-rate factor and weight decay.
//!
//! A step works on the flat buffers, so a group is not a list of tensors but
//! a set of ranges of each buffer. [`segments`] cuts every buffer into runs
//! of parameters with the same (lr factor, weight decay); one fused kernel
//! updates all runs of a segment together.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::glob;
use crate::params::ParamStore;

/// One parameter group of an optimizer configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParamGroup {
    /// Parameter names or globs (`*` any run of characters, `?` one).
    pub params: Vec<String>,
    /// Multiplies the optimizer's learning rate (as scheduled) for this group.
    #[serde(default = "one")]
    pub lr_scale: f64,
    /// Weight decay of every parameter in the group, whatever its role;
    /// unset, the usual rule holds (weights and embeddings decay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
}

fn one() -> f64 {
    1.0
}

/// Elements of one flat buffer that share a learning-rate factor and a
/// weight decay: `(offset, len)` ranges, updated by one kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Seg {
    pub ranges: Vec<(i64, i64)>,
    pub lr_scale: f64,
    pub weight_decay: f64,
    /// Which step counter the segment advances: 0 for the decaying part of
    /// the layout, 1 for the rest (the checkpoint format predates groups).
    pub counter: usize,
}

impl Seg {
    pub fn numel(&self) -> i64 {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

pub fn validate(groups: &[ParamGroup]) -> Result<()> {
    for (i, g) in groups.iter().enumerate() {
        if g.params.is_empty() {
            bail!("parameter group {i}: params is empty");
        }
        if !(g.lr_scale.is_finite() && g.lr_scale >= 0.0) {
            bail!("parameter group {i}: lr_scale must be a finite number >= 0, got {}", g.lr_scale);
        }
        if let Some(wd) = g.weight_decay {
            if !(wd.is_finite() && wd >= 0.0) {
                bail!("parameter group {i}: weight_decay must be a finite number >= 0, got {wd}");
            }
        }
    }
    Ok(())
}

/// The group of each parameter of `store` (None: no group), checking that
/// every pattern matches something and no parameter is in two groups.
fn membership(store: &ParamStore, groups: &[ParamGroup]) -> Result<Vec<Option<usize>>> {
    let params = store.params();
    let mut of = vec![None; params.len()];
    for (gi, g) in groups.iter().enumerate() {
        for pat in &g.params {
            let mut hit = false;
            for (pi, p) in params.iter().enumerate() {
                if !glob::matches(pat, &p.name) {
                    continue;
                }
                hit = true;
                match of[pi] {
                    Some(other) if other != gi => {
                        bail!("parameter '{}' is in parameter groups {other} and {gi}", p.name)
                    }
                    _ => of[pi] = Some(gi),
                }
            }
            if !hit {
                bail!("parameter group {gi}: '{pat}' matches no parameter of the model (see parameters())");
            }
        }
    }
    Ok(of)
}

/// Segments of every flat buffer of `store`, for base weight decay `wd`.
/// Without groups each buffer has two: the decaying range and the rest.
pub fn segments(store: &ParamStore, groups: &[ParamGroup], wd: f64) -> Result<Vec<Vec<Seg>>> {
    let of = membership(store, groups)?;
    let mut out = Vec::new();
    for fg in store.groups() {
        let mut segs: Vec<Seg> = Vec::new();
        for &(pi, off, n) in &fg.members {
            let g = of[pi].map(|i| &groups[i]);
            let counter = if off < fg.decay_len { 0 } else { 1 };
            let base_wd = if counter == 0 { wd } else { 0.0 };
            let weight_decay = g.and_then(|g| g.weight_decay).unwrap_or(base_wd);
            let lr_scale = g.map_or(1.0, |g| g.lr_scale);
            let same =
                |s: &Seg| s.lr_scale == lr_scale && s.weight_decay == weight_decay && s.counter == counter;
            match segs.iter_mut().find(|s| same(s)) {
                Some(s) => match s.ranges.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += n,
                    _ => s.ranges.push((off, n)),
                },
                None => segs.push(Seg { ranges: vec![(off, n)], lr_scale, weight_decay, counter }),
            }
        }
        out.push(segs);
    }
    Ok(out)
}
