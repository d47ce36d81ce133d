//! The Jupyter kernel for knlp's Rhai (`knlp jupyter kernel -f FILE`) and
//! its kernelspec (`knlp jupyter install`). A front end over the same
//! `script::Runtime` as `knlp run` and `knlp-shell` (docs/notebooks.md).
pub mod capture;
pub mod install;
pub mod kernel;
pub mod wire;

pub use kernel::run;
