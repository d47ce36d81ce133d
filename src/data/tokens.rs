//! nanoGPT's token files: `train.bin` and `val.bin` in one folder, each a
//! flat array of little-endian uint16 token ids, memory-mapped. Batches are
//! random windows of `block_size + 1` tokens: x = window[..T], y = window[1..].
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::bpe::GPT2_VOCAB_SIZE;
use super::loader::Batch;
use super::prepare::{read_meta, TokenMeta};
use super::{Rng, Tch};

/// One token file, memory-mapped and validated.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    /// None for an empty file (which cannot be mapped).
    map: Option<Mmap>,
}

impl TokenFile {
    /// Map `path`; with `vocab_size`, every id is checked to be below it
    /// (one pass over the file).
    pub fn open(path: &Path, vocab_size: Option<u32>) -> Result<TokenFile> {
        let p = path.display();
        let file = File::open(path).with_context(|| format!("{p}: cannot open the token file"))?;
        let len = file.metadata().with_context(|| format!("{p}: cannot read the file's size"))?.len();
        if len % 2 != 0 {
            bail!("{p}: {len} bytes is an odd count; a token file holds 2-byte (uint16) ids (truncated?)");
        }
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only; like nanoGPT's np.memmap, it
            // assumes nobody truncates or rewrites the file while it is open
            // (prepare_text replaces files by rename, which is safe).
            Some(unsafe { Mmap::map(&file) }.with_context(|| format!("{p}: cannot memory-map the file"))?)
        };
        let tf = TokenFile { path: path.to_path_buf(), map };
        if let Some(v) = vocab_size {
            tf.check_vocab(v)?;
        }
        Ok(tf)
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.bytes().len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuse ids >= `vocab_size`, naming the first offender's position.
    pub fn check_vocab(&self, vocab_size: u32) -> Result<()> {
        let ids = || self.bytes().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32);
        let max = ids().fold(0u32, u32::max);
        if max >= vocab_size {
            let (pos, id) = ids().enumerate().find(|(_, t)| *t >= vocab_size).unwrap_or((0, max));
            bail!(
                "{}: token id {id} at position {pos} is outside the vocabulary of {vocab_size}",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Tokens `start..start + len` as int64.
    pub fn read(&self, start: usize, len: usize) -> Result<Vec<i64>> {
        let n = self.len();
        if start.checked_add(len).is_none_or(|e| e > n) {
            bail!("{}: tokens {start}..{} are outside the file's {n}", self.path.display(), start + len);
        }
        Ok(self.bytes()[2 * start..2 * (start + len)]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
            .collect())
    }

    /// `batch_size` windows at random offsets drawn from `rng`:
    /// x int64 [B, T] and y int64 [B, T], y shifted one token ahead of x.
    pub fn sample(&self, batch_size: usize, block_size: usize, rng: &mut Rng) -> Result<Batch> {
        let n = self.len();
        if batch_size == 0 || block_size == 0 {
            bail!("batch_size and block_size must be at least 1 (got {batch_size} and {block_size})");
        }
        if n <= block_size {
            bail!(
                "{}: {n} tokens are too few for windows of block_size + 1 = {} tokens",
                self.path.display(),
                block_size + 1
            );
        }
        let bytes = self.bytes();
        let mut xs = Vec::with_capacity(batch_size * block_size);
        let mut ys = Vec::with_capacity(batch_size * block_size);
        for _ in 0..batch_size {
            let i = rng.below((n - block_size) as u64) as usize;
            let window = &bytes[2 * i..2 * (i + block_size + 1)];
            let mut ids = window.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i64);
            let first = ids.next().unwrap_or(0);
            xs.push(first);
            for t in ids {
                xs.push(t);
                ys.push(t);
            }
            xs.pop();
        }
        let shape = [batch_size as i64, block_size as i64];
        let x = Tensor::f_from_slice(&xs).and_then(|t| t.f_view(shape)).tch()?;
        let y = Tensor::f_from_slice(&ys).and_then(|t| t.f_view(shape)).tch()?;
        Ok(Batch { x, y })
    }
}

/// `train` or `val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextSplit {
    Train,
    Val,
}

impl TextSplit {
    pub fn parse(name: &str) -> Result<TextSplit> {
        match name.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(TextSplit::Train),
            "val" => Ok(TextSplit::Val),
            _ => bail!("unknown split '{name}' (valid: train, val)"),
        }
    }
}

/// The generator state of a [`TokenDataset`], to save with a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenState {
    pub seed: u64,
    pub rng: u64,
}

/// A folder with `train.bin` and `val.bin` (and optionally `meta.json`).
#[derive(Debug)]
pub struct TokenDataset {
    pub dir: PathBuf,
    pub train: TokenFile,
    pub val: TokenFile,
    /// The vocabulary size ids were checked against.
    pub vocab_size: u32,
    /// meta.json, when the folder has one (written by `prepare_text`).
    pub meta: Option<TokenMeta>,
    seed: u64,
    rng: Rng,
}

impl TokenDataset {
    /// Open `dir`. Ids are checked against `vocab_size`, else meta.json's
    /// `vocab_size`, else GPT-2's 50257.
    pub fn open(dir: &Path, vocab_size: Option<u32>, seed: u64) -> Result<TokenDataset> {
        if !dir.is_dir() {
            bail!("{}: no such folder (expected train.bin and val.bin in it)", dir.display());
        }
        let meta = if dir.join("meta.json").exists() { Some(read_meta(dir)?) } else { None };
        let vocab = vocab_size.or(meta.as_ref().map(|m| m.vocab_size)).unwrap_or(GPT2_VOCAB_SIZE);
        if vocab == 0 || vocab > 65536 {
            bail!("vocab_size {vocab} does not fit uint16 token files (1..=65536)");
        }
        let train = TokenFile::open(&dir.join("train.bin"), Some(vocab))?;
        let val = TokenFile::open(&dir.join("val.bin"), Some(vocab))?;
        Ok(TokenDataset {
            dir: dir.to_path_buf(),
            train,
            val,
            vocab_size: vocab,
            meta,
            seed,
            rng: Rng::new(seed),
        })
    }

    pub fn file(&self, split: TextSplit) -> &TokenFile {
        match split {
            TextSplit::Train => &self.train,
            TextSplit::Val => &self.val,
        }
    }

    pub fn tokens(&self, split: TextSplit) -> usize {
        self.file(split).len()
    }

    /// Random windows from `split` (see [`TokenFile::sample`]), on `device`.
    pub fn batch(
        &mut self,
        split: TextSplit,
        batch_size: usize,
        block_size: usize,
        device: Device,
    ) -> Result<Batch> {
        let file = match split {
            TextSplit::Train => &self.train,
            TextSplit::Val => &self.val,
        };
        let b = file.sample(batch_size, block_size, &mut self.rng)?;
        if device == Device::Cpu {
            return Ok(b);
        }
        Ok(Batch { x: b.x.f_to_device(device).tch()?, y: b.y.f_to_device(device).tch()? })
    }

    /// Back to the first window of this seed.
    pub fn rewind(&mut self) {
        self.rng = Rng::new(self.seed);
    }

    /// Reseed the window generator.
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
        self.rng = Rng::new(seed);
    }

    pub fn state(&self) -> TokenState {
        TokenState { seed: self.seed, rng: self.rng.state() }
    }

    pub fn restore(&mut self, state: &TokenState) {
        self.seed = state.seed;
        self.rng = Rng::from_state(state.rng);
    }
}
