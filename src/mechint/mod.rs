//! Mechanistic interpretability (docs/mechint.md): hook points with
//! TransformerLens's names, activation caches and their analyses,
//! activation and attribution patching, head detectors, and the seed's KV
//! circuit discovery done right (docs/kv-circuits.md).
pub mod cache;
pub mod detect;
pub mod kv_circuit;
pub mod lens;
pub mod patching;
pub mod weights;

pub use cache::{ActivationCache, Stack};
// Hook points are a model concept (src/hooks.rs); re-exported for users.
pub use crate::hooks::{self, Chain, FnHooks, Hooks, Recorder};
