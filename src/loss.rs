//! The training loss of a language model without its logits.
//!
//! GPT-2's loss is the mean cross-entropy of `logits = h · Wᵀ (+ b)` over
//! B·T positions and a 50,304-word vocabulary. Eagerly, the logits exist
//! whole, in the matmul dtype and again in fp32 with their log-softmax and
//! its gradient: about 10 GB at batch 16 × 1024, the largest memory item of
//! a training step. [`linear_cross_entropy`] goes through the rows in chunks
//! and, for each, computes the logits, the loss terms and the gradients
//! with respect to `h`, `W` and `b` at once (the gradient of the mean
//! cross-entropy is `(softmax − onehot) / n` per row), so only one chunk of
//! logits is ever alive. It returns a scalar whose backward delivers those
//! gradients: `loss + S − detach(S)`, with `S = Σ h ⊙ ∂h + Σ W ⊙ ∂W (+ Σ b ⊙ ∂b)`
//! and the `∂` detached, which has the loss's value and, being linear in
//! `h`, `W` and `b`, exactly the stored gradients (scaled by whatever
//! multiplies the loss afterwards: accumulation, rank shares, loss scaling).
//!
//! The matmuls run in the dtype autocast gives a linear layer (bf16 under
//! `autocast("bf16")`), the softmax in fp32, as the eager path does; only
//! the summation order of `∂W` over chunks differs. Targets of -1 are
//! ignored, as in [`crate::models::cross_entropy`].

use tch::{Kind, Tensor};

use crate::tensor::num;

/// Rows of logits per chunk: 4096 × 50,304 fp32 logits are 824 MB.
pub const CHUNK_ROWS: i64 = 4096;

/// Mean cross-entropy of `h · wᵀ + b` ([.., C] against `w` [V, C]) against
/// `targets` (ids, same leading shape as `h`), `chunk` rows at a time; its
/// backward gives `h`, `w` and `b` their gradients (module docs).
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    targets: &Tensor,
    chunk: i64,
) -> Result<Tensor, tch::TchError> {
    let c = *h.size().last().unwrap_or(&0);
    let h2 = h.f_reshape([-1, c])?;
    let n = h2.size()[0];
    let y = targets.f_reshape([-1])?.f_to_device(h.device())?;
    if y.size()[0] != n {
        return Err(tch::TchError::Shape(format!(
            "linear_cross_entropy: {} targets for {} rows of h",
            y.size()[0],
            n
        )));
    }
    // The dtype autocast gives a linear layer (the input's outside it);
    // softmax and sums in fp32 (fp64 for fp64 inputs).
    let mk = tch::no_grad(|| h2.f_narrow(0, 0, n.min(1))?.f_linear(w, b))?.kind();
    let fk = if mk == Kind::Double { Kind::Double } else { Kind::Float };
    let (loss, gh, gw, gb) = tch::no_grad(|| -> Result<_, tch::TchError> {
        let hk = h2.f_to_kind(mk)?;
        let wk = w.f_to_kind(mk)?;
        let valid = y.f_ne_tensor(&num(-1)?)?;
        let inv_n = valid.f_sum(fk)?.f_reciprocal()?;
        // Ignored rows (-1) gather class 0 and weigh nothing.
        let y_safe = y.f_mul(&valid)?.f_unsqueeze(1)?;
        let weight = valid.f_to_kind(fk)?.f_mul(&inv_n)?.f_unsqueeze(1)?;
        let gh = Tensor::f_empty([n, c], (mk, h.device()))?;
        let mut gw = Tensor::f_zeros(w.size(), (fk, w.device()))?;
        let mut gb = match b {
            Some(b) => Some(Tensor::f_zeros(b.size(), (fk, b.device()))?),
            None => None,
        };
        let mut loss = Tensor::f_zeros([], (fk, h.device()))?;
        // bf16 logits on a GPU: one fused kernel per chunk (kernels::xent),
        // once the targets are known to index the vocabulary (the kernel
        // does not bounds-check them).
        let v = w.size()[0];
        let mut fused = mk == Kind::BFloat16
            && v % 2 == 0
            && y.kind() == Kind::Int64
            && crate::kernels::usable(h.device());
        if fused && n > 0 {
            // One host read per loss; the libtorch path would fail on the
            // device (a sticky CUDA error) instead of saying which id.
            let (lo, hi) = y.f_aminmax(None::<i64>, false)?;
            let (lo, hi) = (lo.f_int64_value(&[])?, hi.f_int64_value(&[])?);
            if lo < -1 || hi >= v {
                let bad = if lo < -1 { lo } else { hi };
                return Err(tch::TchError::Shape(format!(
                    "linear_cross_entropy: target id {bad} is outside the vocabulary of {v} (-1 = ignored)"
                )));
            }
        }
        let chunk = chunk.max(1);
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let hr = hk.f_narrow(0, start, len)?;
            let logits_of = || -> Result<Tensor, tch::TchError> {
                let logits = hr.f_matmul(&wk.f_transpose(0, 1)?)?;
                match b {
                    Some(b) => logits.f_add(&b.f_to_kind(mk)?),
                    None => Ok(logits),
                }
            };
            let wr = weight.f_narrow(0, start, len)?;
            // The gradient rows and, when they are not weighted yet, their
            // weights; logits the kernel left untouched are reused below.
            let mut weighted = None;
            let mut untouched = None;
            if fused {
                let mut logits = logits_of()?;
                let yr = y.f_narrow(0, start, len)?;
                let wr1 = wr.f_squeeze_dim(1)?;
                // A layout the kernel does not take is not a failure: this
                // chunk goes the libtorch way.
                let run = crate::kernels::xent::fits(&logits)
                    .then(|| crate::kernels::xent::xent_(&mut logits, &yr, &wr1));
                match run {
                    Some(Ok(rows)) => {
                        loss = loss.f_add(&rows.f_sum(fk)?)?;
                        weighted = Some(logits);
                    }
                    // The kernel may have written part of the logits.
                    Some(Err(e)) => {
                        crate::kernels::disable(&e);
                        fused = false;
                    }
                    None => untouched = Some(logits),
                }
            }
            let (g, wrk) = match weighted {
                Some(g) => (g, None),
                None => {
                    // Four passes over the chunk's logits: to fp32, log-softmax,
                    // exp (the softmax), back to the matmul dtype. The row weights
                    // (1/n, 0 for ignored targets) go on the small operands instead.
                    let z = match untouched {
                        Some(l) => l,
                        None => logits_of()?,
                    };
                    let z = z.f_to_kind(fk)?;
                    let mut z = z.f_log_softmax(-1, fk)?;
                    let yr = y_safe.f_narrow(0, start, len)?;
                    let picked = z.f_gather(1, &yr, false)?;
                    loss = loss.f_sub(&picked.f_mul(&wr)?.f_sum(fk)?)?;
                    let _ = z.f_exp_()?;
                    // softmax − onehot: the gradient of each row's cross-entropy.
                    let _ = z.f_scatter_add_(1, &yr, &Tensor::f_full([len, 1], -1.0, (fk, z.device()))?)?;
                    (z.f_to_kind(mk)?, Some(wr.f_to_kind(mk)?))
                }
            };
            if let Some(gb) = gb.as_mut() {
                let db = match &wrk {
                    Some(wrk) => wrk.f_transpose(0, 1)?.f_matmul(&g)?.f_squeeze_dim(0)?,
                    None => g.f_sum_dim_intlist([0i64].as_slice(), false, fk)?,
                };
                *gb = gb.f_add(&db.f_to_kind(fk)?)?;
            }
            let (dh, hw) = match &wrk {
                Some(wrk) => (g.f_matmul(&wk)?.f_mul(wrk)?, hr.f_mul(wrk)?),
                None => (g.f_matmul(&wk)?, hr.shallow_clone()),
            };
            gh.f_narrow(0, start, len)?.f_copy_(&dh)?;
            gw = gw.f_add(&g.f_transpose(0, 1)?.f_matmul(&hw)?.f_to_kind(fk)?)?;
            start += len;
        }
        Ok((loss, gh, gw, gb))
    })?;
    let mut s = h2.f_mul(&gh.f_to_kind(h2.kind())?)?.f_sum(fk)?;
    s = s.f_add(&w.f_mul(&gw.f_to_kind(w.kind())?)?.f_sum(fk)?)?;
    if let (Some(b), Some(gb)) = (b, gb) {
        s = s.f_add(&b.f_mul(&gb.f_to_kind(b.kind())?)?.f_sum(fk)?)?;
    }
    s.f_sub(&s.f_detach()?)?.f_add(&loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Loss and gradients against the eager linear + cross-entropy, with
    /// ignored targets, a bias, and chunks that do not divide the rows.
    #[test]
    fn matches_eager_linear_cross_entropy() {
        tch::manual_seed(0);
        let opts = (Kind::Double, Device::Cpu);
        let h0 = Tensor::randn([3, 5, 8], opts);
        let w0 = Tensor::randn([11, 8], opts);
        let b0 = Tensor::randn([11], opts);
        let y = Tensor::randint(11, [3, 5], (Kind::Int64, Device::Cpu));
        let _ = y.get(0).get(2).fill_(-1);
        let _ = y.get(2).get(4).fill_(-1);
        for (bias, chunk) in [(false, 4), (true, 7), (true, 100)] {
            let grads = |fused: bool| {
                let h = h0.copy().set_requires_grad(true);
                let w = w0.copy().set_requires_grad(true);
                let b = b0.copy().set_requires_grad(true);
                let bb = if bias { Some(&b) } else { None };
                let loss = if fused {
                    linear_cross_entropy(&h, &w, bb, &y, chunk).unwrap()
                } else {
                    crate::models::cross_entropy(&h.linear(&w, bb), &y).unwrap()
                };
                // A scale after the loss must reach the gradients.
                (loss.shallow_clone() * 3.0).backward();
                (loss, h.grad(), w.grad(), b.grad())
            };
            let (l1, gh1, gw1, gb1) = grads(true);
            let (l2, gh2, gw2, gb2) = grads(false);
            let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-10;
            assert!(close(&l1, &l2), "loss {l1:?} vs {l2:?}");
            assert!(close(&gh1, &gh2) && close(&gw1, &gw2), "gradients differ (bias {bias}, chunk {chunk})");
            if bias {
                assert!(close(&gb1, &gb2));
            }
        }
    }

    #[test]
    fn mismatched_targets_are_an_error() {
        let h = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
        let y = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
        let e = linear_cross_entropy(&h, &w, None, &y, 2).unwrap_err();
        assert!(e.to_string().contains("3 targets for 4 rows"), "{e}");
    }
}
