//! KVSplice (spec 5.5): a learned affine warp and rank-`d_c` bottleneck on
//! the attention latent.
//!
//! ```text
//! compress(c)   = C · (c ⊙ softplus(scale) + shift)              C: d_c × d_in, orthogonal init
//! decompress(z) = (E · z − shift) / (softplus(scale) + 1e-6)     E: d_in × d_c, init Cᵀ
//! ```
//! The model always uses `decompress(compress(c))` for every token's latent,
//! so what it learns is exactly what a cache of `z` reproduces; the cache
//! stores each token's `z` once and never re-compresses it.
use anyhow::Result;
use tch::{Kind, TchError, Tensor};

use crate::layers::Path;
use crate::params::{Init, ParamStore, Role};

pub struct KvSplice {
    pub scale: Tensor,
    pub shift: Tensor,
    pub compress: Tensor,
    pub expand: Tensor,
    pub d_in: i64,
    pub d_c: i64,
}

/// `d_c = floor(d_in · ratio)`, at least 1.
pub fn compressed_dim(d_in: i64, ratio: f64) -> i64 {
    ((d_in as f64 * ratio).floor() as i64).clamp(1, d_in)
}

/// Rows of a random orthogonal [rows, cols] matrix (rows <= cols), from
/// the QR decomposition of a Gaussian matrix with the sign fix that makes
/// it uniformly distributed (as torch.nn.init.orthogonal_).
fn orthogonal(rows: i64, cols: i64) -> Result<Tensor, TchError> {
    let a = Tensor::f_randn([cols, rows], (Kind::Float, tch::Device::Cpu))?;
    let (q, r) = Tensor::f_linalg_qr(&a, "reduced")?;
    let d = r.f_diagonal(0, 0, 1)?.f_sign()?;
    q.f_mul(&d.f_unsqueeze(0)?)?.f_transpose(0, 1)?.f_contiguous()
}

impl KvSplice {
    pub fn new(s: &mut ParamStore, p: &Path, d_in: i64, ratio: f64) -> Result<Self> {
        let d_c = compressed_dim(d_in, ratio);
        let scale = s.param(&p.name("scale"), &[d_in], Init::Ones, Role::Gate)?;
        let shift = s.param(&p.name("shift"), &[d_in], Init::Zeros, Role::Bias)?;
        let c = tch::no_grad(|| orthogonal(d_c, d_in))?;
        let e = c.f_t_copy()?.f_contiguous()?;
        let compress = s.param_value(&p.sub("compress").name("weight"), c, Role::Weight)?;
        let expand = s.param_value(&p.sub("expand").name("weight"), e, Role::Weight)?;
        Ok(KvSplice { scale, shift, compress, expand, d_in, d_c })
    }

    pub fn compress(&self, c: &Tensor) -> Result<Tensor, TchError> {
        let kind = c.f_kind()?;
        let g = self.scale.f_softplus()?.f_to_kind(kind)?;
        c.f_mul(&g)?.f_add(&self.shift.f_to_kind(kind)?)?.f_linear::<Tensor>(&self.compress, None)
    }

    pub fn decompress(&self, z: &Tensor) -> Result<Tensor, TchError> {
        let y = z.f_linear::<Tensor>(&self.expand, None)?;
        let kind = y.f_kind()?;
        let g = self.scale.f_softplus()?.f_add_scalar(1e-6)?.f_to_kind(kind)?;
        y.f_sub(&self.shift.f_to_kind(kind)?)?.f_div(&g)
    }

    pub fn params(d_in: i64, ratio: f64) -> i64 {
        2 * d_in + 2 * d_in * compressed_dim(d_in, ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_init_reconstructs_the_latent_span() {
        tch::manual_seed(0);
        let mut s = ParamStore::new();
        let k = KvSplice::new(&mut s, &Path::root("k"), 16, 0.5).unwrap();
        assert_eq!(s.numel(), KvSplice::params(16, 0.5));
        let c = k.compress.shallow_clone();
        let eye = c.matmul(&c.tr());
        assert!(eye.allclose(&Tensor::eye(8, (Kind::Float, tch::Device::Cpu)), 1e-5, 1e-5, false));
        // At init a latent inside the bottleneck's span comes back exactly.
        let g = 1f64.exp().ln_1p(); // softplus(1)
        let z = Tensor::randn([3, 8], (Kind::Float, tch::Device::Cpu));
        let x = z.matmul(&c).divide_scalar(g); // (x·g) lies in the row space of C
        let back = k.decompress(&k.compress(&x).unwrap()).unwrap();
        assert!(back.allclose(&x, 1e-4, 1e-4, false), "{}", (back - &x).abs().max());
    }
}
