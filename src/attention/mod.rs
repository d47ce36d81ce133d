//! Attention research (knlp-spec.md section 5, DECISIONS.md "Models and
//! attention"): one composable attention layer whose axes (direction, K/V
//! source, Q source, mixer, RoPE) the seed's variants are presets over, the
//! preallocated decoding cache, and the analyses the seed logged.
//!
//! - `spec`: the axes and presets (`mha`, `ra`, `mla`, `ra_mla`, ...).
//! - `layer`: projections, direction, mixing, cached attention.
//! - `rope`, `kvsplice`, `sba`, `route`: one mechanism each.
//! - `cache`: per-layer slots written in place.
//! - `absorb`: decoding over a latent cache without expanding it.
//! - `kvprune`: KV-cache pruning during decoding (top-k positions per step).
//! - `vrecon`: the optional learned V reconstructor pruned steps read.
//! - `fisher`: Fisher-information metrics of attention patterns.
pub mod absorb;
pub mod cache;
pub mod fisher;
pub mod kvprune;
pub mod kvsplice;
pub mod layer;
pub mod rope;
pub mod route;
pub mod sba;
pub mod spec;
pub mod steps;
pub mod vrecon;

pub use cache::Cache;
pub use layer::{Attention, Ctx, Dims, Probe};
pub use spec::{Direction, KvSource, Mixer, QSource, Rope, Spec};
