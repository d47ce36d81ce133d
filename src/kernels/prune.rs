//! Mask updates in a few passes over memory: one kernel scores every
//! prunable weight from (w, m, v), writes an order-preserving key and counts
//! the keys' top 11 bits; two more passes over the keys narrow the count to
//! the exact k-th smallest; one more writes the keep masks. The libtorch
//! reference is `prune::select::kth_smallest` and `Pruner::keep_mask`, which
//! select the same element and prune the same weights (ties at the
//! threshold in index order).
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::{contiguous_of, grid_for, kernel, launch, same_device, te, Arg};

const SOURCE: &str = include_str!("prune.cu");
const BINS: i64 = 2048;
const BLOCK: u32 = 256;
/// The key every NaN gets (`key_of` in prune.cu).
const NAN_KEY: u32 = u32::MAX;

/// One contiguous float32 range to score: the weights (or ready-made
/// scores), the optimizer moments a scorer reads, and the current keep
/// mask when pruned weights must stay pruned.
pub struct Part<'a> {
    pub w: &'a Tensor,
    pub m: Option<&'a Tensor>,
    pub v: Option<&'a Tensor>,
    pub live: Option<&'a Tensor>,
}

/// Where the k-th smallest key lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The k-th smallest key.
    pub key: u32,
    /// Elements strictly below it.
    pub below: i64,
    /// Elements equal to it.
    pub ties: i64,
}

impl Selection {
    /// The float the key encodes.
    pub fn value(&self) -> f32 {
        let b = if self.key & 0x8000_0000 != 0 { self.key & 0x7FFF_FFFF } else { !self.key };
        f32::from_bits(b)
    }
}

/// Threads of the one-warp bin finder.
const FIND_THREADS: u32 = 32;

/// The sources [`super::check`] compiles: one per scorer expression
/// (name, CUDA expression) and one for ready scores (`w`).
pub fn check_sources(scores: &[(String, String)]) -> Vec<super::check::Source> {
    let ready = [("ready scores".to_string(), "w".to_string())];
    scores
        .iter()
        .chain(ready.iter())
        .map(|(name, expr)| super::check::Source {
            family: "prune",
            variant: name.clone(),
            src: source(expr),
            entries: vec![
                ("score_keys", BLOCK),
                ("radix_pass", BLOCK),
                ("radix_find", FIND_THREADS),
                ("keep_above", BLOCK),
            ],
        })
        .collect()
}

fn source(expr: &str) -> String {
    format!("#define SCORE(w, m, v) ({expr})\n{SOURCE}")
}

/// Score `parts` with `expr` (a CUDA expression in `w`, `m`, `v`) and find
/// the k-th smallest score over all of them, in part order. Returns the
/// keys (int32 bits, concatenated) and the selection.
pub fn select(expr: &str, parts: &[Part], k: i64) -> Result<(Tensor, Selection)> {
    let (keys, _, sel) = select_in(&source(expr), parts, k)?;
    Ok((keys, sel))
}

/// [`select`] from the module source `src`; also the device state, whose
/// first element is the selected key (what `keep_above` reads).
fn select_in(src: &str, parts: &[Part], k: i64) -> Result<(Tensor, Tensor, Selection)> {
    let Some(first) = parts.first() else { bail!("nothing to select from") };
    let dev = first.w.device();
    let n: i64 = parts.iter().map(|p| p.w.numel() as i64).sum();
    if k < 1 || k > n {
        bail!("kth_smallest: k = {k} is outside 1..={n}");
    }
    if n >= u32::MAX as i64 {
        bail!("the fused selection counts fewer than 2^32 - 1 elements, got {n}");
    }
    for p in parts {
        contiguous_of(p.w, Kind::Float, "the score input")?;
        same_device(&[p.w], dev)?;
        for t in [p.m, p.v].into_iter().flatten() {
            contiguous_of(t, Kind::Float, "an optimizer moment")?;
            same_device(&[t], dev)?;
            if t.numel() != p.w.numel() {
                bail!("a moment has {} elements, the weights {}", t.numel(), p.w.numel());
            }
        }
        if let Some(l) = p.live {
            if l.kind() != Kind::Bool || !l.is_contiguous() || l.numel() != p.w.numel() {
                bail!("the live mask must be a contiguous bool tensor like the weights");
            }
            same_device(&[l], dev)?;
        }
    }
    let k_score = kernel(dev, "prune", src, "score_keys")?;
    let k_pass = kernel(dev, "prune", src, "radix_pass")?;
    let k_find = kernel(dev, "prune", src, "radix_find")?;

    let keys = Tensor::f_empty([n], (Kind::Int, dev)).map_err(te)?;
    let hist = Tensor::f_zeros([3 * BINS], (Kind::Int, dev)).map_err(te)?;
    let state = Tensor::from_slice(&[0i64, k, 0, 0]).f_to_device(dev).map_err(te)?;
    let h = |i: i64| Arg::tensor(&hist, i * BINS);
    let mut off = 0i64;
    for p in parts {
        let len = p.w.numel() as i64;
        let m = p.m.unwrap_or(p.w);
        let v = p.v.unwrap_or(p.w);
        let live = match p.live {
            Some(l) => Arg::tensor(l, 0)?,
            None => Arg::null(),
        };
        launch(
            k_score,
            grid_for(dev, len, BLOCK)?,
            BLOCK,
            0,
            &[
                Arg::tensor(p.w, 0)?,
                Arg::tensor(m, 0)?,
                Arg::tensor(v, 0)?,
                live,
                Arg::tensor(&keys, off)?,
                Arg::I64(len),
                h(0)?,
            ],
        )?;
        off += len;
    }
    let st = Arg::tensor(&state, 0)?;
    launch(k_find, 1, FIND_THREADS, 0, &[h(0)?, Arg::I32(11), st])?;
    for (i, (shift, bits)) in [(10, 11), (0, 10)].into_iter().enumerate() {
        let hi = h(i as i64 + 1)?;
        launch(
            k_pass,
            grid_for(dev, n, BLOCK)?,
            BLOCK,
            0,
            &[Arg::tensor(&keys, 0)?, Arg::I64(n), st, Arg::I32(shift), Arg::I32(bits), hi],
        )?;
        launch(k_find, 1, FIND_THREADS, 0, &[hi, Arg::I32(bits), st])?;
    }
    let s = Vec::<i64>::try_from(state.f_to_device(Device::Cpu).map_err(te)?).map_err(te)?;
    let sel = Selection { key: s[0] as u32, below: s[2], ties: s[3] };
    // The rank left within the final bin must be 1..=ties and add up to k.
    if s[1] < 1 || s[1] > s[3] || s[2] + s[1] != k {
        bail!("internal: radix selection state {s:?} is inconsistent with k = {k} of {n}");
    }
    Ok((keys, state, sel))
}

/// The k-th smallest value (1-based) of a float tensor on a CUDA device.
pub fn kth_smallest(x: &Tensor, k: i64) -> Result<f64> {
    let x = x
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_reshape([-1]))
        .map_err(te)?;
    let (_, sel) = select("w", &[Part { w: &x, m: None, v: None, live: None }], k)?;
    Ok(sel.value() as f64)
}

/// The tie rule of every exact mask update (this one and
/// `Pruner::keep_mask`): of the elements equal to the threshold (`ties`, a
/// flat bool mask), the first `prune` in index order go and the rest are
/// kept. Returns the kept ones.
pub fn ties_kept(ties: &Tensor, prune: i64) -> Result<Tensor> {
    let rank = ties.f_cumsum(0, Kind::Int64).map_err(te)?;
    rank.f_gt(prune).and_then(|r| r.f_logical_and(ties)).map_err(te)
}

/// Write keep masks (one bool tensor per part, in place) that prune the `k`
/// lowest scores: every score below the k-th smallest, then ties at it in
/// index order, as `Pruner::keep_mask` does; like it, NaN scores are pruned
/// too (so more than k when there are any).
pub fn keep_masks(expr: &str, parts: &[Part], keep: &mut [Tensor], k: i64) -> Result<Selection> {
    if keep.len() != parts.len() {
        bail!("internal: {} masks for {} parts", keep.len(), parts.len());
    }
    for (p, m) in parts.iter().zip(keep.iter()) {
        if m.kind() != Kind::Bool || !m.is_contiguous() || m.numel() != p.w.numel() {
            bail!("internal: a keep mask must be a contiguous bool tensor like its weights");
        }
        same_device(&[m], p.w.device())?;
    }
    let src = source(expr);
    let (keys, state, sel) = select_in(&src, parts, k)?;
    let dev = keys.device();
    let k_keep = kernel(dev, "prune", &src, "keep_above")?;
    let mut off = 0i64;
    for (p, m) in parts.iter().zip(keep.iter()) {
        let len = p.w.numel() as i64;
        launch(
            k_keep,
            grid_for(dev, len, BLOCK)?,
            BLOCK,
            0,
            &[Arg::tensor(&keys, off)?, Arg::I64(len), Arg::tensor(&state, 0)?, Arg::tensor(m, 0)?],
        )?;
        off += len;
    }
    // As `Pruner::keep_mask` compares floats: NaN scores are never kept, and
    // a NaN threshold keeps nothing (no NaN ties with another).
    let prune_ties = k - sel.below;
    if prune_ties < sel.ties && sel.key != NAN_KEY {
        // Only the first `prune_ties` elements equal to the threshold go.
        let ties = keys.f_eq(sel.key as i32 as i64).map_err(te)?;
        let keep_ties = ties_kept(&ties, prune_ties)?;
        let mut off = 0i64;
        for m in keep.iter_mut() {
            let len = m.numel() as i64;
            let _ = m.f_logical_or_(&keep_ties.f_narrow(0, off, len).map_err(te)?).map_err(te)?;
            off += len;
        }
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's `key_of`, transcribed.
    fn key_of(s: f32) -> u32 {
        let s = if s == 0.0 { 0.0 } else { s };
        let b = s.to_bits();
        if s.is_nan() {
            u32::MAX
        } else if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    }

    #[test]
    fn keys_order_floats_and_decode_back() {
        let xs = [f32::NEG_INFINITY, -3.5, -1e-30, 0.0, 1e-45, 2.0, 1e30, f32::INFINITY];
        for w in xs.windows(2) {
            assert!(key_of(w[0]) < key_of(w[1]), "{} vs {}", w[0], w[1]);
        }
        assert_eq!(key_of(-0.0), key_of(0.0));
        for x in xs {
            let sel = Selection { key: key_of(x), below: 0, ties: 1 };
            assert_eq!(sel.value().to_bits(), x.to_bits());
        }
        assert!(Selection { key: key_of(f32::NAN), below: 0, ties: 1 }.value().is_nan());
        assert!(key_of(f32::NAN) > key_of(f32::INFINITY));
    }
}
