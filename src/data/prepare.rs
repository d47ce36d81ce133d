//! `prepare-text`: text files to nanoGPT token files with GPT-2's BPE.
//!
//! Each input is one document. Every document is followed by
//! `<|endoftext|>` (50256), as nanoGPT's OpenWebText preparation does, so
//! the token stream alternates documents and separators.
//!
//! The split is by document where it can be: `round(n * val_fraction)`
//! documents, evenly spaced through the inputs (every 1/f-th one), go to
//! `val.bin`, the rest to `train.bin`. When that would leave either side
//! without a document (fewer documents than the fraction can divide, e.g.
//! one file), the concatenated token stream is split instead: its last
//! `round(tokens * val_fraction)` tokens go to `val.bin`, as nanoGPT's
//! Shakespeare preparation does. The summary and meta.json say which.
//!
//! Files are written atomically (a temporary file, fsync, rename); meta.json
//! is written last, so a folder with a meta.json holds a complete set.
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::bpe::{self, ENCODING_NAME, GPT2_EOT, GPT2_VOCAB_SIZE, TOKENIZER_NAME};

pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

/// How the validation split was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitBy {
    Documents,
    Tokens,
}

/// meta.json beside the token files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenMeta {
    /// "uint16": little-endian token ids, nanoGPT's format.
    pub dtype: String,
    pub tokenizer: String,
    pub encoding: String,
    pub vocab_size: u32,
    pub eot_token: u32,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub documents: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    pub split: SplitBy,
    pub val_fraction: f64,
    /// Where the documents came from (file paths, or corpus file names).
    pub sources: Vec<String>,
    /// Pre-processing applied before tokenising (e.g. Brown tag stripping).
    #[serde(default)]
    pub preprocess: Option<String>,
    /// How a corpus from a source tree was made (`prepare-corpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus: Option<super::corpus::CorpusMeta>,
}

/// One document: its text and where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    pub source: String,
    pub text: String,
}

/// What [`prepare_text`] wrote.
#[derive(Clone, Debug)]
pub struct Summary {
    pub out: PathBuf,
    pub meta: TokenMeta,
    pub seconds: f64,
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = &self.meta;
        let by = match m.split {
            SplitBy::Documents => "by document",
            SplitBy::Tokens => "by token (too few documents to split by document)",
        };
        writeln!(
            f,
            "prepared {} document(s), {} tokens (GPT-2 BPE, {:.1}s) in {}",
            m.documents,
            thousands(m.train_tokens + m.val_tokens),
            self.seconds,
            self.out.display()
        )?;
        writeln!(
            f,
            "  train.bin  {:>12} tokens  {:>6} document(s)",
            thousands(m.train_tokens),
            m.train_documents
        )?;
        writeln!(
            f,
            "  val.bin    {:>12} tokens  {:>6} document(s)",
            thousands(m.val_tokens),
            m.val_documents
        )?;
        write!(f, "  split {by}, val fraction {}", m.val_fraction)
    }
}

/// Tokenise text files (each one document) into `out/{train,val}.bin` and
/// `out/meta.json`.
pub fn prepare_text(inputs: &[PathBuf], out: &Path, val_fraction: f64) -> Result<Summary> {
    check_fraction(val_fraction)?;
    if inputs.is_empty() {
        bail!("prepare-text: no input files");
    }
    let mut docs = Vec::with_capacity(inputs.len());
    for p in inputs {
        let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read the input", p.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                p.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        docs.push(Document { source: p.display().to_string(), text });
    }
    prepare_documents(&docs, out, val_fraction, None)
}

fn check_fraction(val_fraction: f64) -> Result<()> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        bail!("val fraction {val_fraction} is outside (0, 1)");
    }
    Ok(())
}

/// How text becomes token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// GPT-2's BPE (50257 ids).
    Gpt2,
    /// One id per byte, 256 for end of text (257 ids): a small vocabulary
    /// for small models, e.g. the induction-head experiment.
    Bytes,
}

/// The byte tokenizer's end-of-text id and vocabulary.
pub const BYTES_EOT: u32 = 256;
pub const BYTES_VOCAB_SIZE: u32 = 257;

impl Tokenizer {
    pub const NAMES: &'static [(&'static str, Tokenizer)] =
        &[("gpt2", Tokenizer::Gpt2), ("bytes", Tokenizer::Bytes)];

    pub fn parse(name: &str) -> Result<Tokenizer> {
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).ok_or_else(|| {
            let valid: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
            anyhow::anyhow!("unknown tokenizer '{name}' (valid: {})", valid.join(", "))
        })
    }

    /// meta.json's tokenizer, encoding, vocab_size and eot_token.
    fn meta(self) -> (&'static str, &'static str, u32, u32) {
        match self {
            Tokenizer::Gpt2 => (TOKENIZER_NAME, ENCODING_NAME, GPT2_VOCAB_SIZE, GPT2_EOT),
            Tokenizer::Bytes => ("bytes", "utf-8", BYTES_VOCAB_SIZE, BYTES_EOT),
        }
    }

    pub fn name(self) -> &'static str {
        self.meta().0
    }
}

/// Tokenise `docs` (in parallel) with GPT-2's BPE and write the split token files.
pub fn prepare_documents(
    docs: &[Document],
    out: &Path,
    val_fraction: f64,
    preprocess: Option<&str>,
) -> Result<Summary> {
    prepare_documents_with(docs, out, val_fraction, preprocess, Tokenizer::Gpt2)
}

/// [`prepare_documents`] with a choice of tokenizer.
pub fn prepare_documents_with(
    docs: &[Document],
    out: &Path,
    val_fraction: f64,
    preprocess: Option<&str>,
    tokenizer: Tokenizer,
) -> Result<Summary> {
    let started = Instant::now();
    check_fraction(val_fraction)?;
    if docs.is_empty() {
        bail!("empty corpus: no documents to prepare");
    }
    if let Some(d) = docs.iter().find(|d| d.text.trim().is_empty()) {
        bail!("{}: the document has no text", d.source);
    }
    let tokens = match tokenizer {
        Tokenizer::Gpt2 => tokenize_all(docs)?,
        Tokenizer::Bytes => {
            docs.iter().map(|d| d.text.bytes().map(u16::from).chain([BYTES_EOT as u16]).collect()).collect()
        }
    };
    let (tok_name, encoding, vocab_size, eot_token) = tokenizer.meta();
    let n = docs.len();
    let k = (n as f64 * val_fraction).round() as usize;
    let (train, val, split, val_docs) = if k >= 1 && k < n {
        // Document i goes to val when the running count floor(i k / n) steps.
        let mut train = Vec::new();
        let mut val = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if (i + 1) * k / n > i * k / n {
                val.extend_from_slice(t);
            } else {
                train.extend_from_slice(t);
            }
        }
        (train, val, SplitBy::Documents, k)
    } else {
        let all: Vec<u16> = tokens.concat();
        let v = (all.len() as f64 * val_fraction).round() as usize;
        if v == 0 || v >= all.len() {
            bail!(
                "{} tokens are too few to split with val fraction {val_fraction} (both splits need tokens)",
                all.len()
            );
        }
        let cut = all.len() - v;
        (all[..cut].to_vec(), all[cut..].to_vec(), SplitBy::Tokens, 0)
    };
    let meta = TokenMeta {
        dtype: "uint16".into(),
        tokenizer: tok_name.into(),
        encoding: encoding.into(),
        vocab_size,
        eot_token,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        documents: n as u64,
        train_documents: if split == SplitBy::Documents { (n - val_docs) as u64 } else { n as u64 },
        val_documents: val_docs as u64,
        split,
        val_fraction,
        sources: docs.iter().map(|d| d.source.clone()).collect(),
        preprocess: preprocess.map(String::from),
        corpus: None,
    };
    write_token_set(out, &le_bytes(&train), &le_bytes(&val), &meta)?;
    Ok(Summary { out: out.to_path_buf(), meta, seconds: started.elapsed().as_secs_f64() })
}

/// Each document's tokens followed by `<|endoftext|>`, in input order,
/// tokenised on up to 8 threads.
fn tokenize_all(docs: &[Document]) -> Result<Vec<Vec<u16>>> {
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    encode_texts(&texts, threads)
}

/// Each text's GPT-2 ids followed by `<|endoftext|>`, in order, on up to
/// `threads` threads.
pub(crate) fn encode_texts(texts: &[&str], threads: usize) -> Result<Vec<Vec<u16>>> {
    let bpe = bpe::gpt2()?;
    let per = texts.len().div_ceil(threads.clamp(1, texts.len().max(1))).max(1);
    let encode = |t: &&str| -> Vec<u16> {
        let mut ids: Vec<u16> = bpe.encode_ordinary(t).into_iter().map(|t| t as u16).collect();
        ids.push(GPT2_EOT as u16);
        ids
    };
    let chunks: Vec<Vec<Vec<u16>>> = std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .chunks(per)
            .map(|chunk| s.spawn(move || chunk.iter().map(encode).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<std::result::Result<Vec<_>, _>>()
    })
    .map_err(|_| anyhow::anyhow!("a tokenizer thread failed"))?;
    Ok(chunks.into_iter().flatten().collect())
}

/// `train.bin`, `val.bin`, then `meta.json` into `out`. The old meta.json
/// goes first, so the folder reads as incomplete until the new set is in.
/// `train` and `val` are the files' bytes ([`le_bytes`]).
pub fn write_token_set(out: &Path, train: &[u8], val: &[u8], meta: &TokenMeta) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the folder", out.display()))?;
    let meta_path = out.join("meta.json");
    if meta_path.exists() {
        std::fs::remove_file(&meta_path)
            .with_context(|| format!("{}: cannot replace", meta_path.display()))?;
    }
    write_atomic(&out.join("train.bin"), train)?;
    write_atomic(&out.join("val.bin"), val)?;
    write_atomic(&meta_path, &serde_json::to_vec_pretty(meta)?)
}

/// Write `tokens` as little-endian uint16, atomically.
pub fn write_tokens(path: &Path, tokens: &[u16]) -> Result<()> {
    write_atomic(path, &le_bytes(tokens))
}

/// Token ids as a token file's bytes: little-endian uint16.
pub fn le_bytes(tokens: &[u16]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Write to a temporary file in the same folder, fsync, rename over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let p = path.display();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename durable; not every file system supports it.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{p}: cannot write the file"))
}

/// meta.json of a token folder.
pub fn read_meta(dir: &Path) -> Result<TokenMeta> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a knlp token meta.json", path.display()))
}
