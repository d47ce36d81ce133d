//! Text corpora from a source tree: the Linux kernel as training text.
//!
//! `knlp prepare-corpus linux --src TREE --out DIR` walks an extracted
//! kernel tree (Debian's `linux-source-6.1`, which `make
//! prepare-kernel-corpus` unpacks), keeps the files a [`Preset`] names,
//! and writes nanoGPT token files with GPT-2's BPE, one document per file.
//!
//! What is kept, in this order (every count lands in meta.json):
//! 1. files whose name matches the preset (extensions, or exact names such
//!    as `Kconfig` and `Makefile`) under its folders;
//! 2. at most `max_file_bytes` (default 256 KiB): this drops the generated
//!    register tables (amdgpu's `asic_reg` headers alone are 430 MB of
//!    `#define`s) that would otherwise dominate the corpus;
//! 3. valid UTF-8 and not empty;
//! 4. exact duplicates (same SHA-256 of the content) once, the first in
//!    path order (checked before 3, so a duplicated non-UTF-8 file counts
//!    as a duplicate).
//!
//! The kept files are then ordered by SHA-256 of their path, a fixed
//! pseudo-random order, so that a corpus capped at `max_tokens` samples
//! the whole tree rather than its first folders. Files are taken in that
//! order while they fit under the cap. File i of that order is held out
//! for validation when `floor((i+1) f) > floor(i f)` (f the val fraction):
//! every 1/f-th file, so validation text comes from files never trained on.
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::bpe::{ENCODING_NAME, GPT2_EOT, GPT2_VOCAB_SIZE, TOKENIZER_NAME};
use super::prepare::{encode_texts, le_bytes, read_meta, write_token_set, SplitBy, TokenMeta};

/// Which files of a tree make a corpus.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    /// Folders (relative to the tree) to walk; empty: the whole tree.
    pub folders: &'static [&'static str],
    /// File extensions kept (without the dot).
    pub extensions: &'static [&'static str],
    /// Whole file names kept (or name prefixes ending in `*`).
    pub names: &'static [&'static str],
}

/// The presets, by name.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "linux",
        about: "the kernel's C, assembly, scripts, build files and documentation",
        folders: &[],
        extensions: &["c", "h", "S", "rs", "rst", "txt", "sh", "py", "pl", "yaml"],
        names: &["Kconfig*", "Makefile*", "Kbuild*", "README"],
    },
    Preset {
        name: "linux-docs",
        about: "Documentation/ only: English prose (reStructuredText and plain text)",
        folders: &["Documentation"],
        extensions: &["rst", "txt"],
        names: &["README"],
    },
];

pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        anyhow::anyhow!("unknown corpus '{name}' (valid: {})", names.join(", "))
    })
}

pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024;
pub const DEFAULT_CORPUS_VAL_FRACTION: f64 = 0.05;

/// What to build: everything that decides the output's bytes.
#[derive(Clone, Debug)]
pub struct CorpusOptions {
    pub preset: &'static Preset,
    pub src: PathBuf,
    pub out: PathBuf,
    pub val_fraction: f64,
    /// Stop adding files at this many tokens (train + val); None: all.
    pub max_tokens: Option<u64>,
    pub max_file_bytes: u64,
    /// The tree's package version (e.g. Debian's `6.1.172-1`), recorded.
    pub source_version: Option<String>,
    /// Rebuild even when meta.json says the output is up to date.
    pub force: bool,
    /// Print progress on stderr.
    pub progress: bool,
}

/// The recipe a prepared folder was made with; equal recipes and intact
/// files mean the folder is reused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub corpus: String,
    /// VERSION.PATCHLEVEL.SUBLEVEL from the tree's top Makefile.
    pub kernel_version: Option<String>,
    pub source_version: Option<String>,
    pub folders: Vec<String>,
    pub extensions: Vec<String>,
    pub names: Vec<String>,
    pub max_file_bytes: u64,
    pub max_tokens: Option<u64>,
    pub val_fraction: f64,
    pub dedup: String,
    pub order: String,
    pub split: String,
}

/// Files looked at and why each one left out was left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub matched: u64,
    pub too_big: u64,
    pub not_utf8: u64,
    pub empty: u64,
    pub duplicate: u64,
    pub over_cap: u64,
    pub kept: u64,
    pub kept_bytes: u64,
}

/// meta.json's `corpus` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CorpusMeta {
    pub recipe: Recipe,
    pub counts: Counts,
    /// SHA-256 of train.bin and val.bin.
    pub train_sha256: String,
    pub val_sha256: String,
    /// The held-out files (relative paths), in corpus order.
    pub val_files: Vec<String>,
}

/// What [`prepare_corpus`] did.
#[derive(Debug)]
pub struct CorpusSummary {
    pub out: PathBuf,
    pub meta: TokenMeta,
    pub reused: bool,
    pub seconds: f64,
}

impl std::fmt::Display for CorpusSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let m = &self.meta;
        let c = m.corpus.as_ref().expect("a corpus meta");
        let r = &c.recipe;
        let k = &c.counts;
        if self.reused {
            writeln!(f, "{}: up to date (same recipe, checksums match); nothing to do", self.out.display())?;
        } else {
            writeln!(f, "prepared corpus '{}' in {} ({:.1}s)", r.corpus, self.out.display(), self.seconds)?;
        }
        writeln!(
            f,
            "  source   Linux {} {}",
            r.kernel_version.as_deref().unwrap_or("?"),
            r.source_version.as_deref().map(|v| format!("(package {v})")).unwrap_or_default()
        )?;
        writeln!(
            f,
            "  files    {} matched: {} kept ({:.1} MB), {} over {} bytes, {} not UTF-8, {} empty, {} duplicates, {} past the token cap",
            k.matched, k.kept, k.kept_bytes as f64 / 1e6, k.too_big, r.max_file_bytes, k.not_utf8, k.empty, k.duplicate, k.over_cap
        )?;
        writeln!(f, "  train.bin  {:>12} tokens  {:>6} files", m.train_tokens, m.train_documents)?;
        writeln!(
            f,
            "  val.bin    {:>12} tokens  {:>6} files (held out by file)",
            m.val_tokens, m.val_documents
        )?;
        write!(f, "  sha256   train {} val {}", &c.train_sha256[..16], &c.val_sha256[..16])
    }
}

/// A file that matched the preset, before reading.
struct Candidate {
    rel: String,
    path: PathBuf,
    len: u64,
}

fn name_matches(preset: &Preset, name: &str) -> bool {
    let by_ext =
        name.rsplit_once('.').is_some_and(|(stem, ext)| !stem.is_empty() && preset.extensions.contains(&ext));
    by_ext
        || preset.names.iter().any(|n| match n.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *n,
        })
}

/// Every matching regular file under the preset's folders, in path order
/// (symbolic links are not followed).
fn walk(preset: &Preset, src: &Path) -> Result<Vec<Candidate>> {
    let roots: Vec<PathBuf> = if preset.folders.is_empty() {
        vec![src.to_path_buf()]
    } else {
        preset.folders.iter().map(|f| src.join(f)).collect()
    };
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for root in roots {
        if !root.is_dir() {
            bail!("{}: no such folder (is --src an extracted kernel tree?)", root.display());
        }
        stack.push(root);
    }
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("{}: cannot list", dir.display()))?;
            let ty = e.file_type().with_context(|| format!("{}: cannot stat", e.path().display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if ty.is_dir() {
                if !name.starts_with('.') {
                    stack.push(e.path());
                }
            } else if ty.is_file() && name_matches(preset, &name) {
                let path = e.path();
                let rel = path.strip_prefix(src).unwrap_or(&path).to_string_lossy().into_owned();
                let len = e.metadata().with_context(|| format!("{}: cannot stat", path.display()))?.len();
                out.push(Candidate { rel, path, len });
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` from the tree's top Makefile.
fn kernel_version(src: &Path) -> Option<String> {
    let text = std::fs::read_to_string(src.join("Makefile")).ok()?;
    let get = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    Some(format!("{}.{}.{}", get("VERSION")?, get("PATCHLEVEL")?, get("SUBLEVEL")?))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(sha256_hex(&bytes))
}

impl CorpusOptions {
    fn recipe(&self) -> Recipe {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Recipe {
            corpus: self.preset.name.into(),
            kernel_version: kernel_version(&self.src),
            source_version: self.source_version.clone(),
            folders: strings(self.preset.folders),
            extensions: strings(self.preset.extensions),
            names: strings(self.preset.names),
            max_file_bytes: self.max_file_bytes,
            max_tokens: self.max_tokens,
            val_fraction: self.val_fraction,
            dedup: "exact: sha256 of the content, first in path order kept".into(),
            order: "sha256 of the relative path".into(),
            split: "by file: file i held out when floor((i+1)f) > floor(if)".into(),
        }
    }
}

/// Is `out` already this recipe's output, intact?
fn up_to_date(out: &Path, recipe: &Recipe) -> Option<TokenMeta> {
    let meta = read_meta(out).ok()?;
    let c = meta.corpus.as_ref()?;
    if &c.recipe != recipe {
        return None;
    }
    let train = file_sha256(&out.join("train.bin")).ok()?;
    let val = file_sha256(&out.join("val.bin")).ok()?;
    (train == c.train_sha256 && val == c.val_sha256).then_some(meta)
}

/// Progress on stderr: redrawn in place on a terminal, a line every 10 s
/// otherwise (logs).
struct Progress {
    on: bool,
    tty: bool,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(on: bool) -> Self {
        let now = Instant::now();
        Progress { on, tty: std::io::stderr().is_terminal(), started: now, last: now }
    }

    fn show(&mut self, files: usize, total: usize, tokens: u64, cap: Option<u64>, bytes: u64, done: bool) {
        if !self.on {
            return;
        }
        let due = if self.tty { 0.2 } else { 10.0 };
        if !done && self.last.elapsed().as_secs_f64() < due {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let frac = match cap {
            Some(c) => (tokens as f64 / c as f64).min(1.0),
            None => files as f64 / total.max(1) as f64,
        };
        let width = 30;
        let filled = (frac * width as f64).round() as usize;
        let line = format!(
            "tokenising [{}{}] {:5.1}%  {files}/{total} files  {:.1}M tokens  {:.1} MB/s",
            "#".repeat(filled),
            " ".repeat(width - filled),
            frac * 100.0,
            tokens as f64 / 1e6,
            bytes as f64 / 1e6 / secs
        );
        if self.tty {
            eprint!("\r{line}");
            if done {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
    }
}

/// Build (or reuse) the corpus `opts` describes.
pub fn prepare_corpus(opts: &CorpusOptions) -> Result<CorpusSummary> {
    let started = Instant::now();
    if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        bail!("val fraction {} is outside (0, 1)", opts.val_fraction);
    }
    if opts.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 1");
    }
    if opts.max_file_bytes == 0 {
        bail!("--max-file-bytes must be at least 1");
    }
    let recipe = opts.recipe();
    if !opts.force {
        if let Some(meta) = up_to_date(&opts.out, &recipe) {
            return Ok(CorpusSummary { out: opts.out.clone(), meta, reused: true, seconds: 0.0 });
        }
    }
    let mut counts = Counts::default();
    let candidates = walk(opts.preset, &opts.src)?;
    counts.matched = candidates.len() as u64;
    // Size filter, then order by path hash; contents are tokenised in that
    // order, so a small cap tokenises little of a large tree (duplicate
    // detection still hashes every file that shares its size with another).
    let mut order: Vec<(String, Candidate)> = Vec::with_capacity(candidates.len());
    for c in candidates {
        if c.len > opts.max_file_bytes {
            counts.too_big += 1;
        } else {
            order.push((sha256_hex(c.rel.as_bytes()), c));
        }
    }
    // Duplicates keep the first copy in path order, whatever the hash
    // order (so under a cap a content's kept copy may lie past it: the
    // content is then absent; 200 files of Linux 6.1 are duplicates).
    let dups = duplicates(&order.iter().map(|(_, c)| c).collect::<Vec<_>>())?;
    order.sort_by(|a, b| a.0.cmp(&b.0));

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut progress = Progress::new(opts.progress);
    let (mut train, mut val) = (Vec::<u16>::new(), Vec::<u16>::new());
    let (mut sources, mut val_files) = (Vec::new(), Vec::new());
    let mut total: u64 = 0;
    let mut capped = false;
    let batch = threads * 64;
    let mut i = 0usize;
    for (ci, chunk) in order.chunks(batch).enumerate() {
        let texts: Vec<Option<String>> = chunk
            .iter()
            .map(|(_, c)| {
                if dups.contains(&c.rel) {
                    return Ok(None);
                }
                let bytes =
                    std::fs::read(&c.path).with_context(|| format!("{}: cannot read", c.path.display()))?;
                Ok(String::from_utf8(bytes).ok())
            })
            .collect::<Result<_>>()?;
        let readable: Vec<&str> = texts.iter().flatten().map(String::as_str).collect();
        let mut encoded = encode_texts(&readable, threads)?.into_iter();
        for ((_, c), text) in chunk.iter().zip(&texts) {
            // Every readable text has its ids, in order, used or not.
            let ids = text.as_ref().and_then(|_| encoded.next());
            if dups.contains(&c.rel) {
                counts.duplicate += 1;
                continue;
            }
            // Past the cap nothing else is looked at, as for the unread
            // files below: the counts do not depend on the batch size.
            if capped {
                counts.over_cap += 1;
                continue;
            }
            let Some(text) = text else {
                counts.not_utf8 += 1;
                continue;
            };
            if text.trim().is_empty() {
                counts.empty += 1;
                continue;
            }
            let ids = ids.expect("encoded with its text");
            if opts.max_tokens.is_some_and(|cap| total + ids.len() as u64 > cap) {
                capped = true;
                counts.over_cap += 1;
                continue;
            }
            total += ids.len() as u64;
            counts.kept += 1;
            counts.kept_bytes += text.len() as u64;
            let held_out =
                ((i + 1) as f64 * opts.val_fraction).floor() > (i as f64 * opts.val_fraction).floor();
            if held_out {
                val.extend_from_slice(&ids);
                val_files.push(c.rel.clone());
            } else {
                train.extend_from_slice(&ids);
            }
            sources.push(c.rel.clone());
            i += 1;
        }
        progress.show(i, order.len(), total, opts.max_tokens, counts.kept_bytes, false);
        if capped {
            // The rest are past the cap (or duplicates), not read.
            let rest = &order[((ci + 1) * batch).min(order.len())..];
            let d = rest.iter().filter(|(_, c)| dups.contains(&c.rel)).count() as u64;
            counts.duplicate += d;
            counts.over_cap += rest.len() as u64 - d;
            break;
        }
    }
    progress.show(i, order.len(), total, opts.max_tokens, counts.kept_bytes, true);
    if train.is_empty() || val.is_empty() {
        bail!(
            "{}: {} file(s) kept ({} tokens): too few for a train and a validation split with val fraction {}",
            opts.src.display(),
            counts.kept,
            total,
            opts.val_fraction
        );
    }
    // The files' bytes, serialised once for the checksums and the writes.
    let (train_bytes, val_bytes) = (le_bytes(&train), le_bytes(&val));
    let corpus = CorpusMeta {
        recipe,
        counts,
        train_sha256: sha256_hex(&train_bytes),
        val_sha256: sha256_hex(&val_bytes),
        val_files,
    };
    let meta = TokenMeta {
        dtype: "uint16".into(),
        tokenizer: TOKENIZER_NAME.into(),
        encoding: ENCODING_NAME.into(),
        vocab_size: GPT2_VOCAB_SIZE,
        eot_token: GPT2_EOT,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        documents: sources.len() as u64,
        train_documents: (sources.len() - corpus.val_files.len()) as u64,
        val_documents: corpus.val_files.len() as u64,
        split: SplitBy::Documents,
        val_fraction: opts.val_fraction,
        sources,
        preprocess: None,
        corpus: Some(corpus),
    };
    write_token_set(&opts.out, &train_bytes, &val_bytes, &meta)?;
    Ok(CorpusSummary { out: opts.out.clone(), meta, reused: false, seconds: started.elapsed().as_secs_f64() })
}

/// Relative paths of files whose content equals an earlier file's in path
/// order. Only files of equal size are hashed.
fn duplicates(files: &[&Candidate]) -> Result<HashSet<String>> {
    let mut by_len: std::collections::HashMap<u64, Vec<&Candidate>> = Default::default();
    for c in files {
        by_len.entry(c.len).or_default().push(c);
    }
    let mut dups = HashSet::new();
    for group in by_len.values_mut().filter(|g| g.len() > 1) {
        group.sort_by(|a, b| a.rel.cmp(&b.rel));
        let mut seen = HashSet::new();
        for c in group.iter() {
            if !seen.insert(file_sha256(&c.path)?) {
                dups.insert(c.rel.clone());
            }
        }
    }
    Ok(dups)
}

/// The command that makes `dir` when its name is one `make
/// prepare-kernel-corpus` writes (`corpus-<preset>[-<max tokens>]`).
pub fn make_hint(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?.strip_prefix("corpus-")?;
    let (preset, cap) = match name.rsplit_once('-') {
        Some((p, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (p, Some(n)),
        _ => (name, None),
    };
    PRESETS.iter().find(|p| p.name == preset)?;
    let cap = cap.map(|n| format!(" MAX_TOKENS={n}")).unwrap_or_default();
    let corpus = if preset == "linux" { String::new() } else { format!(" CORPUS={preset}") };
    Some(format!("make it with `make prepare-kernel-corpus{corpus}{cap}`"))
}
