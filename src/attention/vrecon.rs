//! The seed's optional V reconstructor for KV-cache pruning
//! (knlp-spec.md section 14, `VReconstructor`, never trained in the seed):
//! a pruned decode step reads only the kept positions, and the values it
//! reads are corrected so the step's output stays close to the dense one.
//!
//! Per layer l, head h, position j with attention input x_j (after ln_1):
//!
//! ```text
//! v̂_j  = W_l x_j + b_l                  (d → H·hs, split per head)
//! g_j  = σ(G_l x_j + c_l)                (d → H, one gate per head)
//! ṽ_j  = g_j·v_j + (1 − g_j)·v̂_j        (read by pruned steps instead of v_j)
//! ```
//!
//! The seed fed "the MLP hidden state"; the cache only ever sees the
//! attention input of each position, so x_j is that (documented in
//! docs/attention.md). ṽ is computed once, when position j is written
//! into the cache, and kept in its own slot (an extra [B, H, cap, hs]).
//!
//! Fitting (the model frozen, only W, b, G, c learn): for held-out
//! sequences, per layer, the dense causal output y_i = Σ_{j≤i} A_ij v_j is
//! the target and the pruned output with the reconstructed values
//!
//! ```text
//! ŷ_i = Σ_{j∈K_i} A_ij ṽ_j / Σ_{j∈K_i} A_ij
//! ```
//!
//! the prediction, loss = Σ_l mean((ŷ − y)²), Adam (`decode::recon`, which
//! runs the model; this module is the math and the parameters only). K_i is the top-k set a
//! decode step at query i would read ([`keep_mask`]): importance from the
//! column mass of the causal pattern over queries 0..i, exposure-corrected,
//! the recency window forced in, k = `Config::kept(i + 1)`. The fit uses
//! the exact importance (no EMA, no eviction); decode applies the
//! configured EMA. The gate starts at σ(4) ≈ 0.98, so an unfitted
//! reconstructor nearly reads the true values.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, TchError, Tensor};

use super::kvprune;
use crate::tensor::torch_error;

fn te(e: TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

/// Initial gate bias: σ(4) ≈ 0.982.
const GATE_BIAS: f64 = 4.0;
/// Saved files carry this format tag.
const FORMAT: &str = "knlp-vrecon-1";

/// One layer's parameters (float32).
pub struct Layer {
    /// [H·hs, d], [H·hs]
    pub w: Tensor,
    pub b: Tensor,
    /// [H, d], [H]
    pub g_w: Tensor,
    pub g_b: Tensor,
}

impl Layer {
    fn params(&self) -> [&Tensor; 4] {
        [&self.w, &self.b, &self.g_w, &self.g_b]
    }
}

/// A V reconstructor for every layer of one model shape.
pub struct VRecon {
    pub layers: Vec<Layer>,
    pub n_embd: i64,
    pub n_head: i64,
    pub head_size: i64,
}

impl std::fmt::Debug for VRecon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VRecon({} layers, d {}, {} heads of {})",
            self.layers.len(),
            self.n_embd,
            self.n_head,
            self.head_size
        )
    }
}

impl VRecon {
    /// Fresh parameters for `n_layer` layers of width `d` with `h` heads on
    /// `dev` (V̂ weights N(0, 0.02²), gate bias 4).
    pub fn new(n_layer: i64, d: i64, h: i64, dev: Device, seed: i64) -> Result<VRecon> {
        if n_layer < 1 || h < 1 || d % h != 0 {
            bail!("vrecon: no model has {n_layer} layers of width {d} with {h} heads");
        }
        let hs = d / h;
        // Seeded from the CPU generator, whose state is put back: fitting
        // does not disturb the script's random numbers.
        let saved = crate::shim::rng_state(None).map_err(|e| anyhow!(e))?;
        tch::manual_seed(seed);
        let init = (0..n_layer)
            .map(|_| Tensor::f_randn([h * hs, d], (Kind::Float, Device::Cpu)))
            .collect::<Result<Vec<_>, _>>();
        crate::shim::set_rng_state(None, &saved).map_err(|e| anyhow!(e))?;
        let init = init.map_err(te)?;
        let layers = init
            .into_iter()
            .map(|w| -> Result<Layer, TchError> {
                Ok(Layer {
                    w: w.f_to_device(dev)?.f_mul_scalar(0.02)?,
                    b: Tensor::f_zeros([h * hs], (Kind::Float, dev))?,
                    g_w: Tensor::f_zeros([h, d], (Kind::Float, dev))?,
                    g_b: Tensor::f_full([h], GATE_BIAS, (Kind::Float, dev))?,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(te)?;
        Ok(VRecon { layers, n_embd: d, n_head: h, head_size: hs })
    }

    /// Was this reconstructor made for `l` layers of width `d` with `h` heads?
    pub fn check(&self, l: i64, d: i64, h: i64) -> Result<()> {
        if self.layers.len() as i64 != l || self.n_embd != d || self.n_head != h {
            bail!(
                "kv_prune: the V reconstructor was fitted for {} layers, d {}, {} heads; the model has {}, {}, {}",
                self.layers.len(),
                self.n_embd,
                self.n_head,
                l,
                d,
                h
            );
        }
        Ok(())
    }

    /// ṽ [B, H, t, hs] (v's dtype) of layer `l` from the attention input
    /// `x` [B, t, d] and the values `v` [B, H, t, hs].
    pub fn veff(&self, l: usize, x: &Tensor, v: &Tensor) -> Result<Tensor, TchError> {
        let p = self.layers.get(l).ok_or_else(|| TchError::Shape(format!("vrecon: no layer {l}")))?;
        let s = x.size();
        let (b, t) = (s[0], s[1]);
        let xf = x.f_to_kind(Kind::Float)?;
        let vhat =
            xf.f_linear(&p.w, Some(&p.b))?.f_view([b, t, self.n_head, self.head_size])?.f_transpose(1, 2)?;
        let g = xf.f_linear(&p.g_w, Some(&p.g_b))?.f_sigmoid()?.f_transpose(1, 2)?.f_unsqueeze(-1)?;
        let vf = v.f_to_kind(Kind::Float)?;
        let out = g.f_mul(&vf)?.f_add(&g.f_neg()?.f_add_scalar(1.0)?.f_mul(&vhat)?)?;
        out.f_to_kind(v.f_kind()?)
    }

    /// Mean gate σ(G x + c) of layer `l` over `x` [B, t, d].
    pub fn mean_gate(&self, l: usize, x: &Tensor) -> Result<f64, TchError> {
        let p = self.layers.get(l).ok_or_else(|| TchError::Shape(format!("vrecon: no layer {l}")))?;
        x.f_to_kind(Kind::Float)?
            .f_linear(&p.g_w, Some(&p.g_b))?
            .f_sigmoid()?
            .f_mean(Kind::Float)?
            .f_double_value(&[])
    }

    pub(crate) fn params(&self) -> Vec<&Tensor> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }

    /// Write the parameters to a safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (n, t) in ["w", "b", "g_w", "g_b"].iter().zip(l.params()) {
                named.push((format!("layer.{i}.{n}"), t));
            }
        }
        let meta: BTreeMap<String, String> = [
            ("format".to_string(), FORMAT.to_string()),
            ("n_layer".into(), self.layers.len().to_string()),
            ("n_embd".into(), self.n_embd.to_string()),
            ("n_head".into(), self.n_head.to_string()),
        ]
        .into();
        crate::safetensors::save(path, &named, &meta, Default::default()).map_err(|e| anyhow!(e))
    }

    /// Read a file [`Self::save`] wrote, onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<VRecon> {
        let f = crate::safetensors::load(path).map_err(|e| anyhow!(e))?;
        let p = path.display();
        if f.metadata.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{p}: not a V reconstructor file (metadata format is not {FORMAT})");
        }
        let num = |k: &str| -> Result<i64> {
            f.metadata
                .get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| anyhow!("{p}: metadata '{k}' is missing or not a positive integer"))
        };
        let (n_layer, d, h) = (num("n_layer")?, num("n_embd")?, num("n_head")?);
        if d % h != 0 || n_layer > 4096 {
            bail!("{p}: metadata gives n_embd {d}, n_head {h}, n_layer {n_layer}, which no model has");
        }
        let hs = d / h;
        let get = |name: String, shape: &[i64]| -> Result<Tensor> {
            let t = f.get(&name).ok_or_else(|| anyhow!("{p}: tensor '{name}' is missing"))?;
            if t.size() != shape {
                bail!("{p}: tensor '{name}' has shape {:?}, expected {shape:?}", t.size());
            }
            if t.kind() != Kind::Float {
                bail!("{p}: tensor '{name}' is {:?}, expected float32", t.kind());
            }
            t.f_to_device(device).map_err(te)
        };
        let layers = (0..n_layer)
            .map(|i| {
                Ok(Layer {
                    w: get(format!("layer.{i}.w"), &[h * hs, d])?,
                    b: get(format!("layer.{i}.b"), &[h * hs])?,
                    g_w: get(format!("layer.{i}.g_w"), &[h, d])?,
                    g_b: get(format!("layer.{i}.g_b"), &[h])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VRecon { layers, n_embd: d, n_head: h, head_size: hs })
    }
}

/// K_i for every query: a bool mask [B, H, T, T] of the positions a pruned
/// decode step at query i reads, from the causal pattern `a` [B, H, T, T]
/// (see the module docs; exact importance, no EMA).
pub fn keep_mask(a: &Tensor, cfg: &kvprune::Config) -> Result<Tensor, TchError> {
    let t = a.size()[2];
    let dev = a.device();
    let mass = a.f_to_kind(Kind::Float)?.f_cumsum(2, Kind::Float)?;
    let i = Tensor::f_arange(t, (Kind::Float, dev))?.f_view([t, 1])?;
    let j = Tensor::f_arange(t, (Kind::Float, dev))?.f_view([1, t])?;
    let exposure = if cfg.exposure {
        i.f_sub(&j)?.f_add_scalar(1.0)?.f_clamp_min(1.0)?
    } else {
        i.f_add_scalar(1.0)?.f_expand([t, t], false)?
    };
    let mut s = mass.f_div(&exposure)?;
    let recent = j.f_gt_tensor(&i.f_sub_scalar(cfg.recency as f64)?)?;
    s = s.f_masked_fill(&recent, f64::INFINITY)?;
    let future = j.f_gt_tensor(&i)?;
    s = s.f_masked_fill(&future, f64::NEG_INFINITY)?;
    let order = s.f_argsort(-1, true)?;
    let rank = order.f_argsort(-1, false)?;
    let k: Vec<i64> = (1..=t).map(|len| cfg.kept(len)).collect();
    let k = Tensor::f_from_slice(&k)?.f_to_device(dev)?.f_view([t, 1])?;
    rank.f_lt_tensor(&k)?.f_logical_and(&future.f_logical_not()?)
}

/// ŷ of the module docs: the pattern `a` [B, H, T, T] restricted to `keep`
/// and renormalised, applied to `v` [B, H, T, hs] (float32).
pub fn pruned_output(a: &Tensor, keep: &Tensor, v: &Tensor) -> Result<Tensor, TchError> {
    let ak = a.f_to_kind(Kind::Float)?.f_mul(&keep.f_to_kind(Kind::Float)?)?;
    let z = ak.f_sum_dim_intlist(-1, true, Kind::Float)?.f_clamp_min(f64::from(f32::MIN_POSITIVE))?;
    ak.f_div(&z)?.f_matmul(&v.f_to_kind(Kind::Float)?)
}

/// Per layer: attention input x [B, T, d], values [B, H, T, hs], pattern [B, H, T, T].
pub type Acts = Vec<(Tensor, Tensor, Tensor)>;

/// Σ_l mean((ŷ − y)²) with `recon` (None: the true values), and per layer
/// the relative errors.
pub fn layer_errors(
    recon: Option<&VRecon>,
    acts: &Acts,
    masks: &[Tensor],
) -> Result<(Tensor, Vec<f64>), TchError> {
    let mut total: Option<Tensor> = None;
    let mut rel = Vec::new();
    for (l, ((x, v, a), keep)) in acts.iter().zip(masks).enumerate() {
        let y = a.f_matmul(&v.f_to_kind(Kind::Float)?)?;
        let vv = match recon {
            Some(r) => r.veff(l, x, &v.f_to_kind(Kind::Float)?)?,
            None => v.f_to_kind(Kind::Float)?,
        };
        let yh = pruned_output(a, keep, &vv)?;
        let err = yh.f_sub(&y)?.f_square()?.f_mean(Kind::Float)?;
        let norm = y.f_square()?.f_mean(Kind::Float)?.f_double_value(&[])?;
        rel.push(err.f_double_value(&[])? / norm.max(f64::MIN_POSITIVE));
        total = Some(match total {
            Some(t) => t.f_add(&err)?,
            None => err,
        });
    }
    let total = total.ok_or_else(|| TchError::Shape("vrecon: the model has no layers".into()))?;
    Ok((total, rel))
}
