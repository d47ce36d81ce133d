//! The decoding cache: per layer, exactly what the variant needs to attend
//! to past tokens, preallocated to the generation's full length and written
//! in place (never concatenated per token).
//!
//! | layer kind                         | slots (per token unless noted)        |
//! |------------------------------------|---------------------------------------|
//! | proj, tied_t, route                | key-role [H, hs] and value [H, hs]    |
//! | KV pruning with a V reconstructor  | adds ṽ [H, hs]                        |
//! | tied (K = V), standard direction   | value [H, hs] only (keys are values)  |
//! | latent                             | latent c [d_latent]                   |
//! | splice                             | compressed latent z [d_c]             |
//! | sba (adds)                         | column log-normaliser [H], float32    |
//! | route (adds, per sequence)         | running sum of the inputs [d], float32|
//!
//! In a reciprocal layer the key role is played by the past *queries*, so
//! the key slot holds queries there.
use tch::{Kind, TchError, Tensor};

/// One layer's slots; each is allocated on its first write.
#[derive(Default)]
pub struct LayerCache {
    /// [B, H, cap, hs]
    pub key: Option<Tensor>,
    /// [B, H, cap, hs]
    pub value: Option<Tensor>,
    /// KV pruning with a V reconstructor: ṽ [B, H, cap, hs].
    pub value_eff: Option<Tensor>,
    /// [B, cap, r]
    pub latent: Option<Tensor>,
    /// SBA: [B, H, cap] log Σ_{i'=j..i} exp(s_{i'j}) for the newest i.
    pub col_norm: Option<Tensor>,
    /// Route: [B, d] sum of the attention inputs seen so far.
    pub ctx_sum: Option<Tensor>,
    /// This layer attends in the reciprocal direction (fixed for the cache's life).
    pub reciprocal: bool,
    /// KV pruning: what decode steps read (`kvprune`); None reads everything.
    pub prune: Option<super::kvprune::State>,
    /// An absorbed `mla` layer's folded weights, made on its first decode
    /// step (the weights must not change while the cache lives).
    pub folded: std::cell::OnceCell<super::absorb::Folded>,
}

pub struct Cache {
    pub layers: Vec<LayerCache>,
    /// Tokens already written.
    pub len: i64,
    /// Tokens the slots hold.
    pub capacity: i64,
    pub batch: i64,
    /// A step failed part-way: the slots no longer describe `len` tokens.
    pub poisoned: bool,
}

impl Cache {
    pub fn new(reciprocal: Vec<bool>, batch: i64, capacity: i64) -> Cache {
        let layers =
            reciprocal.into_iter().map(|r| LayerCache { reciprocal: r, ..Default::default() }).collect();
        Cache { layers, len: 0, capacity, batch, poisoned: false }
    }

    /// Prune every later decode step with `cfg` (fresh statistics per layer).
    /// Set it before the prefill: the prefill's attention seeds the importance.
    pub fn set_prune(&mut self, cfg: &super::kvprune::Config) {
        for l in &mut self.layers {
            l.prune = Some(super::kvprune::State::new(cfg.clone()));
        }
    }

    /// Fraction of the cached positions pruned decode steps read, over
    /// every layer and step (1.0 when nothing was pruned).
    pub fn prune_read_fraction(&self) -> f64 {
        let (r, c) = self
            .layers
            .iter()
            .filter_map(|l| l.prune.as_ref())
            .fold((0, 0), |a, s| (a.0 + s.read, a.1 + s.cached));
        if c == 0 {
            1.0
        } else {
            r as f64 / c as f64
        }
    }

    /// Bytes of every slot allocated so far.
    pub fn bytes(&self) -> i64 {
        let n = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.numel() as i64 * elem_size(t.kind()));
        self.layers
            .iter()
            .map(|l| {
                n(&l.key) + n(&l.value) + n(&l.value_eff) + n(&l.latent) + n(&l.col_norm) + n(&l.ctx_sum)
            })
            .sum()
    }
}

pub fn elem_size(k: Kind) -> i64 {
    match k {
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        Kind::Float | Kind::Int => 4,
        Kind::Double | Kind::Int64 => 8,
        _ => 1,
    }
}

/// Write `new` (time along `dim`) into `slot` at `pos`, allocating the slot
/// as `shape` with `new`'s dtype on first use; returns the filled prefix
/// `[0, pos + T)` as a view.
pub fn write(
    slot: &mut Option<Tensor>,
    shape: &[i64],
    dim: i64,
    pos: i64,
    new: &Tensor,
) -> Result<Tensor, TchError> {
    let t = new.size()[dim as usize];
    if slot.is_none() {
        *slot = Some(Tensor::f_zeros(shape, (new.f_kind()?, new.device()))?);
    }
    let buf = slot.as_ref().ok_or_else(|| TchError::Kind("cache slot".into()))?;
    if pos + t > buf.size()[dim as usize] {
        return Err(TchError::Shape(format!(
            "kv cache full: {} tokens allocated, writing {} at position {pos}",
            buf.size()[dim as usize],
            t
        )));
    }
    let mut dst = buf.f_narrow(dim, pos, t)?;
    dst.f_copy_(new)?;
    buf.f_narrow(dim, 0, pos + t)
}
