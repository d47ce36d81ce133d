//! Data sets and input pipelines (no Rhai here; see `script::data`).
//!
//! - images: [`ImageDataset`] (uint8 [N, C, H, W] in memory) from IDX files
//!   ([`idx`], Fashion-MNIST by default) or CIFAR binaries ([`cifar`]);
//!   [`Loader`] batches them with [`transforms`].
//! - text: nanoGPT token files ([`tokens`]), made by [`prepare_text`] with
//!   GPT-2's BPE ([`bpe`]); the Brown corpus ([`brown`]) is the default;
//!   [`corpus`] makes one from a source tree (the Linux kernel).
//! - [`Rng`]: the one generator behind shuffling, crops, flips and text
//!   windows, with a state that checkpoints can save for exact resumption.
//!
//! Every error names the file it concerns; nothing here panics on bad input.
pub mod bpe;
pub mod brown;
pub mod cifar;
pub mod corpus;
pub mod idx;
pub mod images;
pub mod loader;
pub mod prepare;
pub mod rng;
pub mod tokens;
pub mod transforms;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

pub use cifar::{cifar10, cifar100, Cifar100Label};
pub use corpus::{prepare_corpus, CorpusOptions};
pub use images::{fashion_mnist, ImageDataset, Split, FASHION_MNIST_DIR};
pub use loader::{Batch, Loader, LoaderOptions, LoaderState};
pub use prepare::{
    prepare_documents, prepare_documents_with, prepare_text, Document, SplitBy, Summary, TokenMeta,
    Tokenizer, DEFAULT_VAL_FRACTION,
};
pub use rng::Rng;
pub use tokens::{TextSplit, TokenDataset, TokenFile, TokenState};

/// libtorch errors as `anyhow` errors, without the C++ backtrace.
pub(crate) trait Tch<T> {
    fn tch(self) -> Result<T>;
}

impl<T> Tch<T> for std::result::Result<T, tch::TchError> {
    fn tch(self) -> Result<T> {
        self.map_err(|e| anyhow!(crate::tensor::torch_error(&e)))
    }
}

/// Where prepared data sets are cached by default: the project's
/// `.deps/cache`, found at run time (`crate::project`; ignored by git,
/// `make distclean` removes it).
pub fn default_cache_dir() -> PathBuf {
    crate::project::cache_dir()
}

/// Whether `dir` holds a complete token set that `check` accepts: meta.json
/// readable and file sizes matching its token counts.
fn valid_token_dir(dir: &Path, tokenizer: Tokenizer, check: impl Fn(&TokenMeta) -> bool) -> bool {
    let Ok(meta) = prepare::read_meta(dir) else { return false };
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).ok();
    check(&meta)
        && size("train.bin") == Some(2 * meta.train_tokens)
        && size("val.bin") == Some(2 * meta.val_tokens)
        && meta.tokenizer == tokenizer.name()
}

/// Prepare the Brown corpus under `brown_dir` into `<cache_dir>/brown`
/// ({train,val}.bin, meta.json) unless a valid copy with the same val
/// fraction is already there; returns that folder.
pub fn brown_dataset(brown_dir: &Path, cache_dir: &Path, val_fraction: f64) -> Result<PathBuf> {
    brown_dataset_with(brown_dir, cache_dir, val_fraction, Tokenizer::Gpt2)
}

/// [`brown_dataset`] with a choice of tokenizer (bytes go to `<cache_dir>/brown-bytes`).
pub fn brown_dataset_with(
    brown_dir: &Path,
    cache_dir: &Path,
    val_fraction: f64,
    tokenizer: Tokenizer,
) -> Result<PathBuf> {
    let out = match tokenizer {
        Tokenizer::Gpt2 => cache_dir.join("brown"),
        Tokenizer::Bytes => cache_dir.join("brown-bytes"),
    };
    let fits = |m: &TokenMeta| {
        m.preprocess.as_deref() == Some(brown::PREPROCESS)
            && m.val_fraction == val_fraction
            && m.documents == m.sources.len() as u64
    };
    if valid_token_dir(&out, tokenizer, fits) {
        return Ok(out);
    }
    let docs = brown::named_documents(brown_dir)?;
    prepare_documents_with(&docs, &out, val_fraction, Some(brown::PREPROCESS), tokenizer)
        .with_context(|| format!("preparing the Brown corpus from {}", brown_dir.display()))?;
    Ok(out)
}

/// The default text data set: the Brown corpus from
/// [`brown::default_dir`], prepared once into `<cache_dir>/brown`
/// with a 10% validation split and reused afterwards.
pub fn default_text_dataset(cache_dir: &Path) -> Result<PathBuf> {
    brown_dataset(&brown::default_dir(), cache_dir, DEFAULT_VAL_FRACTION)
}
