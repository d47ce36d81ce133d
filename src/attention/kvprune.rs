//! KV-cache pruning during decoding (knlp-spec.md section 14, the seed's
//! `lib/kv_pruning.py`, which was never wired into a model): each
//! single-token decode step attends over a top-k subset of the cached
//! positions chosen by how much attention they have received.
//!
//! What pruning means for our cache (docs/attention.md, "KV-cache
//! pruning"): the preallocated cache keeps every position; pruning selects
//! which positions a decode step *reads*. The prefill (and any multi-token
//! chunk) attends densely and only feeds the importance statistics. With
//! `evict: true` a position left out once is never read again (a
//! memory-bounded cache of k positions behaves exactly so); with `evict:
//! false` (default, the seed's V-only semantics) every key is still scored,
//! and a position left out may come back at a later step.
//!
//! The math, per layer, per sequence b and head h. At a step the cache
//! holds L positions j = 0..L−1 and the newest query sits at L−1.
//!
//! ```text
//! s_ij  = q_i·k_j/√hs                          for j ≤ i (causal; j > i never exists in the cache)
//! A_ij  = exp(s_ij) / Σ_{j'≤i} exp(s_ij')       (evict: the sums run over live j only)
//! M_j   = Σ_{i=j..L−1} A_ij                     column mass over every query seen so far
//! I_j   = M_j / (L − j)                         exposure correction: L − j queries could see j
//!       = M_j / L                               exposure: false (the mean over queries)
//! E     ← β·E + (1−β)·I  on positions the EMA already covers, E_j = I_j on new ones,
//!         every `ema_every` decode steps (β = `ema`; 0 = off, then E = I);
//!         between updates the score is E on covered positions and I on newer ones
//! S_j   = +∞ for the last `recency` positions (always kept), else E_j
//! k     = min(L, max(k_min, ⌊keep_ratio·L⌋, recency))
//! K     = top-k positions of S
//! v_only:        out = Σ_{j∈K} A_ij v_j / Σ_{j∈K} A_ij        (gather A columns and V rows, renormalise)
//! scores_reuse:  out = Σ_{j∈K} softmax_{j∈K}(s_ij) v_j          (gather the scores, re-softmax)
//! ```
//!
//! The two modes are equal in exact arithmetic (a renormalised softmax
//! restricted to K is the softmax over K); they differ in what they
//! compute and in rounding. The seed's pruner had no causal mask, so in a
//! full-sequence forward every token read the values of later tokens; here
//! the prefill's column mass comes from the causal pattern and a decode
//! step only ever sees positions ≤ its own. The seed forced the recency
//! window to importance 1, which ties with a key every query attended to
//! fully; +∞ cannot tie. With a fitted V reconstructor (`vrecon`, the
//! seed's `VReconstructor`) pruned steps read ṽ_j in place of v_j.
use anyhow::{bail, Result};
use tch::{Kind, TchError, Tensor};

use super::layer::{pattern, sdpa};
use super::spec::{KvSource, Mixer, Spec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Gather the kept columns of A and rows of V, renormalise the rows.
    VOnly,
    /// Gather the kept scores and softmax over them.
    ScoresReuse,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "v_only" => Ok(Mode::VOnly),
            "scores_reuse" => Ok(Mode::ScoresReuse),
            other => bail!("kv_prune: mode must be \"v_only\" or \"scores_reuse\", got '{other}'"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::VOnly => "v_only",
            Mode::ScoresReuse => "scores_reuse",
        }
    }
}

/// A shared, fitted V reconstructor (`vrecon`); equal only to itself.
#[derive(Clone)]
pub struct Recon(pub std::rc::Rc<super::vrecon::VRecon>);

impl PartialEq for Recon {
    fn eq(&self, other: &Recon) -> bool {
        std::rc::Rc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Recon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The seed's `KVPruneCfg`, plus `evict` and the optional reconstructor.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Fraction of the cached positions a step reads, in (0, 1].
    pub keep_ratio: f64,
    /// Never fewer positions than this.
    pub k_min: i64,
    /// The newest `recency` positions are always kept.
    pub recency: i64,
    /// Divide the column mass by the number of queries that could see the
    /// position (else by all queries).
    pub exposure: bool,
    /// EMA factor β of the importance, in [0, 1); 0 turns it off.
    pub ema: f64,
    /// Decode steps between EMA updates (the first step updates).
    pub ema_every: i64,
    pub mode: Mode,
    /// A position left out once is never read again.
    pub evict: bool,
    /// Pruned steps read ṽ = g·v + (1 − g)·v̂ instead of v (`vrecon`).
    pub recon: Option<Recon>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keep_ratio: 0.382,
            k_min: 64,
            recency: 64,
            exposure: true,
            ema: 0.9,
            ema_every: 8,
            mode: Mode::VOnly,
            evict: false,
            recon: None,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        if !(self.keep_ratio > 0.0 && self.keep_ratio <= 1.0) {
            bail!("kv_prune: keep_ratio must be in (0, 1], got {}", self.keep_ratio);
        }
        if self.k_min < 1 {
            bail!("kv_prune: k_min must be at least 1, got {}", self.k_min);
        }
        if self.recency < 0 {
            bail!("kv_prune: recency must be >= 0, got {}", self.recency);
        }
        if !(self.ema >= 0.0 && self.ema < 1.0) {
            bail!("kv_prune: ema must be in [0, 1) (0 = off), got {}", self.ema);
        }
        if self.ema_every < 1 {
            bail!("kv_prune: ema_every must be at least 1, got {}", self.ema_every);
        }
        Ok(())
    }

    /// Positions a step over `len` cached positions reads:
    /// min(len, max(k_min, ⌊keep_ratio·len⌋, recency)).
    pub fn kept(&self, len: i64) -> i64 {
        let r = (self.keep_ratio * len as f64).floor() as i64;
        len.min(self.k_min.max(r).max(self.recency))
    }
}

/// Can layers of `spec` be pruned? `name` is the model's attention option,
/// named in the error.
pub fn check_spec(spec: &Spec, name: &str) -> Result<()> {
    let mixer = match spec.mixer {
        Mixer::Softmax => None,
        Mixer::Sba => Some("the sba mixer"),
        Mixer::Route => Some("the route mixer (two head groups)"),
    };
    if let Some(m) = mixer {
        bail!(
            "kv_prune: attention '{name}' mixes with {m}, not softmax attention; KV pruning supports \
             softmax attention over per-head K and V (mha, ra, kv_tying, kv_tying_t)"
        );
    }
    if matches!(spec.kv, KvSource::Latent | KvSource::Splice) {
        bail!(
            "kv_prune: attention '{name}' caches a latent, not per-head K and V; KV pruning supports \
             softmax attention over per-head K and V (mha, ra, kv_tying, kv_tying_t)"
        );
    }
    Ok(())
}

fn se(msg: String) -> TchError {
    TchError::Shape(msg)
}

/// One layer's pruning state, kept in its cache slot.
pub struct State {
    pub cfg: Config,
    /// [B, H, cap] float32: M_j, the attention each position received.
    mass: Option<Tensor>,
    /// [B, H, cap] float32: the EMA of the importance.
    ema: Option<Tensor>,
    /// Positions the EMA covers.
    ema_len: i64,
    /// [B, H, cap] bool: evicted positions (evict only).
    evicted: Option<Tensor>,
    /// Pruned decode steps taken.
    pub steps: i64,
    /// Σ over decode steps of the positions read, and of the positions cached.
    pub read: i64,
    pub cached: i64,
    /// Positions observed so far (the queries whose attention is in `mass`).
    pub len: i64,
}

impl State {
    pub fn new(cfg: Config) -> State {
        State { cfg, mass: None, ema: None, ema_len: 0, evicted: None, steps: 0, read: 0, cached: 0, len: 0 }
    }

    fn mass_slot(&mut self, like: &Tensor, cap: i64) -> Result<&Tensor, TchError> {
        if self.mass.is_none() {
            let s = like.size();
            self.mass = Some(Tensor::f_zeros([s[0], s[1], cap], (Kind::Float, like.device()))?);
        }
        self.mass.as_ref().ok_or_else(|| se("kv_prune: no mass".into()))
    }

    /// Add the column mass of the causal pattern `a` [B, H, t, S] of the
    /// queries at positions `pos0..pos0 + t` (S = pos0 + t keys).
    pub fn observe(&mut self, a: &Tensor, pos0: i64, cap: i64) -> Result<(), TchError> {
        let (t, s) = (a.size()[2], a.size()[3]);
        if pos0 != self.len || s != pos0 + t {
            return Err(se(format!(
                "kv_prune: observing queries {pos0}..{} over {s} keys after {} positions",
                pos0 + t,
                self.len
            )));
        }
        let m = self.mass_slot(a, cap)?;
        let mut dst = m.f_narrow(2, 0, s)?;
        let _ = dst.f_add_(&a.f_to_kind(Kind::Float)?.f_sum_dim_intlist(2, false, Kind::Float)?)?;
        self.len = s;
        Ok(())
    }

    /// I_j over the `len` observed positions [B, H, len] (float32).
    pub fn importance(&self) -> Result<Tensor, TchError> {
        let m = self.mass.as_ref().ok_or_else(|| se("kv_prune: nothing observed".into()))?;
        let len = self.len;
        let m = m.f_narrow(2, 0, len)?;
        if self.cfg.exposure {
            let j = Tensor::f_arange(len, (Kind::Float, m.device()))?;
            let exposure = j.f_neg()?.f_add_scalar(len as f64)?;
            m.f_div(&exposure)
        } else {
            m.f_div_scalar(len as f64)
        }
    }

    /// The selection score S over the observed positions, advancing the
    /// EMA when this decode step is an update step.
    pub fn score(&mut self) -> Result<Tensor, TchError> {
        let cur = self.importance()?;
        let len = self.len;
        let mut s = if self.cfg.ema > 0.0 {
            let size = cur.size();
            if self.ema.is_none() {
                let cap = self.mass.as_ref().map_or(len, |m| m.size()[2]);
                self.ema = Some(Tensor::f_zeros([size[0], size[1], cap], (Kind::Float, cur.device()))?);
            }
            let e = self.ema.as_ref().ok_or_else(|| se("kv_prune: no ema".into()))?;
            let covered = self.ema_len;
            if self.steps % self.cfg.ema_every == 0 {
                let beta = self.cfg.ema;
                let mut old = e.f_narrow(2, 0, covered)?;
                let upd =
                    old.f_mul_scalar(beta)?.f_add(&cur.f_narrow(2, 0, covered)?.f_mul_scalar(1.0 - beta)?)?;
                old.f_copy_(&upd)?;
                let mut new = e.f_narrow(2, covered, len - covered)?;
                new.f_copy_(&cur.f_narrow(2, covered, len - covered)?)?;
                self.ema_len = len;
                e.f_narrow(2, 0, len)?.f_detach_copy()?
            } else {
                Tensor::f_cat(&[&e.f_narrow(2, 0, covered)?, &cur.f_narrow(2, covered, len - covered)?], 2)?
            }
        } else {
            cur
        };
        let r = self.cfg.recency.min(len);
        if r > 0 {
            let _ = s.f_narrow(2, len - r, r)?.f_fill_(f64::INFINITY)?;
        }
        if let Some(ev) = &self.evicted {
            s = s.f_masked_fill(&ev.f_narrow(2, 0, len)?, f64::NEG_INFINITY)?;
        }
        Ok(s)
    }

    /// Indices [B, H, k] of the positions this step reads (unsorted), k =
    /// [`Config::kept`] of the observed length; marks the rest evicted when
    /// `evict`.
    pub fn select(&mut self) -> Result<Tensor, TchError> {
        let k = self.cfg.kept(self.len);
        let s = self.score()?;
        let (_, idx) = s.f_topk(k, -1, true, false)?;
        if self.cfg.evict {
            let size = s.size();
            let cap = self.mass.as_ref().map_or(self.len, |m| m.size()[2]);
            if self.evicted.is_none() {
                self.evicted = Some(Tensor::f_zeros([size[0], size[1], cap], (Kind::Bool, s.device()))?);
            }
            let ev = self.evicted.as_ref().ok_or_else(|| se("kv_prune: no eviction mask".into()))?;
            let kept = Tensor::f_zeros(&size, (Kind::Bool, s.device()))?.f_scatter_value(-1, &idx, 1)?;
            ev.f_narrow(2, 0, self.len)?.f_copy_(&kept.f_logical_not()?)?;
        }
        Ok(idx)
    }

    /// A copy of the eviction mask [B, H, len] over the observed positions
    /// (None before the first eviction or without `evict`).
    pub fn evicted(&self) -> Option<Tensor> {
        self.evicted.as_ref().and_then(|e| e.f_narrow(2, 0, self.len).and_then(|e| e.f_detach_copy()).ok())
    }

    /// Attention of the new queries `q` [B, H, t, hs] at positions
    /// `pos0..` over the cached keys and values `k`, `v` [B, H, pos0 + t, hs]:
    /// dense (and observed) for t > 1, pruned for a single-token step,
    /// which reads the rows of `v_eff` (the reconstructed values, same
    /// shape) instead of `v` when given.
    pub fn attend(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        v_eff: Option<&Tensor>,
        pos0: i64,
        cap: i64,
    ) -> Result<Tensor, TchError> {
        let (t, len, hs) = (q.size()[2], k.size()[2], q.size()[3]);
        if len != pos0 + t {
            return Err(se(format!("kv_prune: {len} cached keys for queries at {pos0}..{}", pos0 + t)));
        }
        if t > 1 {
            let y = sdpa(q, k, v, pos0, 0.0)?;
            self.observe(&pattern(q, k, pos0)?, pos0, cap)?;
            return Ok(y);
        }
        let scores = q
            .f_to_kind(Kind::Float)?
            .f_matmul(&k.f_to_kind(Kind::Float)?.f_transpose(-2, -1)?)?
            .f_mul_scalar(1.0 / (hs as f64).sqrt())?;
        let scores = match &self.evicted {
            Some(ev) => scores.f_masked_fill(&ev.f_narrow(2, 0, len)?.f_unsqueeze(2)?, f64::NEG_INFINITY)?,
            None => scores,
        };
        let a = scores.f_softmax(-1, Kind::Float)?;
        self.observe(&a, pos0, cap)?;
        let idx = self.select()?;
        self.steps += 1;
        let kk = idx.size()[2];
        self.read += kk;
        self.cached += len;
        let col = idx.f_unsqueeze(2)?;
        let a_k = match self.cfg.mode {
            Mode::VOnly => {
                let g = a.f_gather(-1, &col, false)?;
                let z =
                    g.f_sum_dim_intlist(-1, true, Kind::Float)?.f_clamp_min(f64::from(f32::MIN_POSITIVE))?;
                g.f_div(&z)?
            }
            Mode::ScoresReuse => scores.f_gather(-1, &col, false)?.f_softmax(-1, Kind::Float)?,
        };
        let s = v.size();
        let rows = idx.f_unsqueeze(-1)?.f_expand([s[0], s[1], kk, s[3]], false)?;
        let v_k = v_eff.unwrap_or(v).f_gather(2, &rows, false)?.f_to_kind(Kind::Float)?;
        a_k.f_matmul(&v_k)?.f_to_kind(v.f_kind()?)
    }
}
