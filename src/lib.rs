//! knlp: a kernel-style research shell over libtorch.
//!
//! The library is usable from Rust without Rhai; [`script`] is the Rhai
//! layer on top and the binaries in `src/bin/` are thin.
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod cudagraph;
pub mod data;
pub mod decode;
pub mod dist;
pub mod fused;
pub mod glob;
pub mod gpumon;
pub mod gputop;
pub mod hooks;
pub mod hyperparams;
pub mod inference;
pub mod interrupt;
pub mod jupyter;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod matrix;
pub mod mechint;
pub mod models;
pub mod nvml;
pub mod optim;
pub mod output;
pub mod params;
pub mod profile;
pub mod project;
pub mod prune;
pub mod runs;
pub mod safetensors;
pub mod scaling;
pub mod script;
pub mod serve;
pub mod shell;
pub mod shim;
pub mod sweep;
pub mod tensor;
pub mod testhook;
pub mod tiering;
pub mod tokenizer;
pub mod track;
pub mod train;
