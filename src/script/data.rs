//! Data sets and loaders in scripts: images (Fashion-MNIST, CIFAR, IDX),
//! batch loaders, nanoGPT token files, the Brown corpus and GPT-2 BPE.
//! The work happens in `crate::data`; these are thin, validated wrappers.
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rhai::{Array, Dynamic, Engine, ImmutableString, Map, FLOAT, INT};
use tch::{Device, Kind, Tensor};

use super::api::{Api, DocEntry};
use super::value::*;
use crate::data::{self, bpe, brown, Batch, ImageDataset, Loader, LoaderOptions, TextSplit, TokenDataset};
use crate::tensor::parse_device_or_auto;

/// The reference's section for these bindings.
pub const GROUP: &str = "Data";

/// An image data set held by a script (immutable; clones share it).
#[derive(Clone, Debug)]
pub struct RImages(pub Rc<ImageDataset>);

/// A loader held by a script. Clones share the position, so passing a
/// loader to a function advances the caller's loader too.
#[derive(Clone, Debug)]
pub struct RLoader(pub Rc<RefCell<Loader>>);

/// A token data set held by a script (clones share the window generator).
#[derive(Clone, Debug)]
pub struct RTokens(pub Rc<RefCell<TokenDataset>>);

/// Iterates over the rest of the loader's current epoch.
pub struct LoaderIter(Rc<RefCell<Loader>>);

impl IntoIterator for RLoader {
    type Item = RResult<Map>;
    type IntoIter = LoaderIter;
    fn into_iter(self) -> LoaderIter {
        LoaderIter(self.0)
    }
}

impl Iterator for LoaderIter {
    type Item = RResult<Map>;
    fn next(&mut self) -> Option<RResult<Map>> {
        let mut l = match self.0.try_borrow_mut() {
            Ok(l) => l,
            Err(_) => return Some(Err(rerr("the loader is busy"))),
        };
        match l.next_batch() {
            Ok(Some(b)) => Some(Ok(batch_map(b))),
            Ok(None) => None,
            Err(e) => Some(Err(rerr(format!("{e:#}")))),
        }
    }
}

fn batch_map(b: Batch) -> Map {
    map_of(vec![("x", Dynamic::from(RTensor(b.x))), ("y", Dynamic::from(RTensor(b.y)))])
}

fn loader_mut(l: &RLoader) -> RResult<std::cell::RefMut<'_, Loader>> {
    l.0.try_borrow_mut().map_err(|_| rerr("the loader is busy"))
}

fn tokens_mut(t: &RTokens) -> RResult<std::cell::RefMut<'_, TokenDataset>> {
    t.0.try_borrow_mut().map_err(|_| rerr("the token data set is busy"))
}

fn describe_loader(l: &Loader) -> String {
    let [c, h, w] = l.image_shape();
    format!(
        "Loader({}: {} batches of {} x {c}x{h}x{w}, epoch {}, batch {})",
        l.name(),
        l.len(),
        l.options().batch_size,
        l.epoch(),
        l.position()
    )
}

fn describe_tokens(t: &TokenDataset) -> String {
    format!(
        "TokenDataset({}: {} train / {} val tokens, vocab {})",
        t.dir.display(),
        t.train.len(),
        t.val.len(),
        t.vocab_size
    )
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RImages>("ImageDataset");
    engine.register_type_with_name::<RLoader>("Loader");
    engine.register_type_with_name::<RTokens>("TokenDataset");
    engine.register_iterator_result::<RLoader, Map>();
    engine.register_fn("to_string", |d: &mut RImages| d.0.to_string());
    engine.register_fn("to_debug", |d: &mut RImages| d.0.to_string());
    engine.register_fn("to_string", |l: &mut RLoader| {
        l.0.try_borrow().map_or("Loader(busy)".into(), |l| describe_loader(&l))
    });
    engine.register_fn("to_debug", |l: &mut RLoader| {
        l.0.try_borrow().map_or("Loader(busy)".into(), |l| describe_loader(&l))
    });
    engine.register_fn("to_string", |t: &mut RTokens| {
        t.0.try_borrow().map_or("TokenDataset(busy)".into(), |t| describe_tokens(&t))
    });
    engine.register_fn("to_debug", |t: &mut RTokens| {
        t.0.try_borrow().map_or("TokenDataset(busy)".into(), |t| describe_tokens(&t))
    });
    let mut api = Api::new(engine, docs);
    api.group(GROUP);
    image_sets(&mut api);
    loaders(&mut api);
    text(&mut api);
}

// ---- option helpers ----------------------------------------------------------

fn opt_int(m: &Map, key: &str, what: &str) -> RResult<Option<i64>> {
    m.get(key)
        .map(|v| v.as_int().map_err(|t| rerr(format!("{what}: {key} must be an int, got {t}"))))
        .transpose()
}

fn opt_bool(m: &Map, key: &str, what: &str) -> RResult<Option<bool>> {
    m.get(key)
        .map(|v| v.as_bool().map_err(|t| rerr(format!("{what}: {key} must be a bool, got {t}"))))
        .transpose()
}

fn opt_str(m: &Map, key: &str, what: &str) -> RResult<Option<String>> {
    m.get(key).map(|v| expect_str(v, &format!("{what}: {key}"))).transpose()
}

fn positive(v: i64, key: &str, what: &str) -> RResult<i64> {
    if v < 1 {
        return Err(rerr(format!("{what}: {key} must be at least 1, got {v}")));
    }
    Ok(v)
}

/// A number or an array of numbers.
fn numbers(v: &Dynamic, what: &str) -> RResult<Vec<f64>> {
    if let Some(a) = v.read_lock::<Array>() {
        if a.is_empty() {
            return Err(rerr(format!("{what} must not be empty")));
        }
        return a.iter().map(|x| as_number(x, what)).collect();
    }
    Ok(vec![as_number(v, what)?])
}

fn split_of(m: &Map, what: &str) -> RResult<data::Split> {
    match opt_str(m, "split", what)? {
        Some(s) => data::Split::parse(&s).rt(),
        None => Ok(data::Split::Train),
    }
}

fn images(ds: anyhow::Result<ImageDataset>) -> RResult<RImages> {
    ds.map(|d| RImages(Rc::new(d))).rt()
}

fn floats(v: &[f64]) -> Array {
    v.iter().map(|&x| Dynamic::from_float(x as FLOAT)).collect()
}

// ---- image data sets -------------------------------------------------------

const FASHION_KEYS: &[&str] = &["split", "root"];
const CIFAR10_KEYS: &[&str] = &["split"];
const CIFAR100_KEYS: &[&str] = &["split", "labels"];

fn fashion(m: &Map) -> RResult<RImages> {
    check_keys(m, FASHION_KEYS, "fashion_mnist option")?;
    let split = split_of(m, "fashion_mnist")?;
    let root = opt_str(m, "root", "fashion_mnist")?.unwrap_or_else(|| data::FASHION_MNIST_DIR.to_string());
    images(data::fashion_mnist(Path::new(&root), split))
}

fn cifar10(dir: &str, m: &Map) -> RResult<RImages> {
    check_keys(m, CIFAR10_KEYS, "cifar10 option")?;
    images(data::cifar10(Path::new(dir), split_of(m, "cifar10")?))
}

fn cifar100(dir: &str, m: &Map) -> RResult<RImages> {
    check_keys(m, CIFAR100_KEYS, "cifar100 option")?;
    let label = match opt_str(m, "labels", "cifar100")? {
        Some(s) => data::Cifar100Label::parse(&s).rt()?,
        None => data::Cifar100Label::Fine,
    };
    images(data::cifar100(Path::new(dir), split_of(m, "cifar100")?, label))
}

fn image_sets(api: &mut Api) {
    api.f(
        "fashion_mnist",
        "",
        "Fashion-MNIST's 60000 training images (uint8 1x28x28, 10 classes) from /usr/share/datasets/fashion-mnist.",
        || fashion(&Map::new()),
    );
    api.f(
        "fashion_mnist",
        "options",
        "Fashion-MNIST with `#{ split: \"train\"|\"test\", root: folder of the IDX .gz files }`.",
        |m: Map| fashion(&m),
    );
    api.f(
        "idx_images",
        "images_path, labels_path",
        "An image data set from MNIST-format IDX files (plain or gzip); classes = largest label + 1.",
        |images_path: &str, labels_path: &str| {
            images(ImageDataset::from_idx(Path::new(images_path), Path::new(labels_path)))
        },
    );
    api.f(
        "cifar10",
        "dir",
        "CIFAR-10's training split (50000 images of 3x32x32) from the binary files in `dir`.",
        |dir: &str| cifar10(dir, &Map::new()),
    );
    api.f(
        "cifar10",
        "dir, options",
        "CIFAR-10 from `dir` with `#{ split: \"train\"|\"test\" }`.",
        |dir: &str, m: Map| cifar10(dir, &m),
    );
    api.f(
        "cifar100",
        "dir",
        "CIFAR-100's training split with its 100 fine labels from `train.bin` in `dir`.",
        |dir: &str| cifar100(dir, &Map::new()),
    );
    api.f(
        "cifar100",
        "dir, options",
        "CIFAR-100 from `dir` with `#{ split: \"train\"|\"test\", labels: \"fine\"|\"coarse\" }`.",
        |dir: &str, m: Map| cifar100(dir, &m),
    );
    api.get("len", "Number of images.", |d: &mut RImages| d.0.len() as INT);
    api.get("classes", "Number of classes.", |d: &mut RImages| d.0.classes as INT);
    api.get("shape", "[C, H, W] of one image.", |d: &mut RImages| shape_to_array(&d.0.shape()));
    api.get(
        "name",
        "The data set's name (`fashion-mnist`, `cifar10`, `cifar100`, `idx`).",
        |d: &mut RImages| d.0.name.clone(),
    );
    api.get("split", "`train` or `test` (empty for IDX files).", |d: &mut RImages| d.0.split.clone());
    api.get("class_names", "The class names, by label.", |d: &mut RImages| -> Array {
        d.0.class_names.iter().map(|s| Dynamic::from(s.clone())).collect()
    });
    api.get(
        "mean",
        "Per-channel mean of the pixels in [0, 1] (training statistics for named sets).",
        |d: &mut RImages| floats(&d.0.mean),
    );
    api.get("std", "Per-channel standard deviation of the pixels in [0, 1].", |d: &mut RImages| {
        floats(&d.0.std)
    });
    api.get(
        "images",
        "All images, uint8 [N, C, H, W] (shares memory with the data set).",
        |d: &mut RImages| RTensor(d.0.images.shallow_clone()),
    );
    api.get("labels", "All labels, int64 [N].", |d: &mut RImages| RTensor(d.0.labels.shallow_clone()));
    api.f(
        "get",
        "self, index",
        "Image `index` as `#{ x: uint8 [C, H, W], y: int }` (negative counts from the end).",
        |d: &mut RImages, i: INT| -> RResult<Map> {
            let n = d.0.len() as i64;
            let j = if i < 0 { i + n } else { i };
            if j < 0 || j >= n {
                return Err(rerr(format!("index {i} is out of range for {n} images")));
            }
            let x = d.0.images.f_get(j).rt()?;
            let y = d.0.labels.f_int64_value(&[j]).rt()?;
            Ok(map_of(vec![("x", Dynamic::from(RTensor(x))), ("y", Dynamic::from_int(y))]))
        },
    );
    api.f(
        "slice",
        "self, start, end",
        "Images start..end as a data set sharing memory (for quick experiments).",
        |d: &mut RImages, start: INT, end: INT| -> RResult<RImages> {
            if start < 0 || end < 0 {
                return Err(rerr(format!("slice({start}, {end}): bounds must be non-negative")));
            }
            images(d.0.slice(start as usize, end as usize))
        },
    );
}

// ---- loaders ------------------------------------------------------------------

const LOADER_KEYS: &[&str] = &[
    "batch_size",
    "shuffle",
    "seed",
    "drop_last",
    "resize",
    "pad_to",
    "crop_padding",
    "hflip",
    "normalize",
    "mean",
    "std",
    "device",
];

fn loader_options(ds: &ImageDataset, m: &Map) -> RResult<LoaderOptions> {
    const W: &str = "loader";
    check_keys(m, LOADER_KEYS, "loader option")?;
    let mut o = LoaderOptions::default();
    if let Some(b) = opt_int(m, "batch_size", W)? {
        o.batch_size = positive(b, "batch_size", W)? as usize;
    }
    o.shuffle = opt_bool(m, "shuffle", W)?.unwrap_or(o.shuffle);
    o.seed = opt_int(m, "seed", W)?.map_or(o.seed, |s| s as u64);
    o.drop_last = opt_bool(m, "drop_last", W)?.unwrap_or(o.drop_last);
    o.resize = opt_int(m, "resize", W)?.map(|v| positive(v, "resize", W)).transpose()?;
    o.pad_to = opt_int(m, "pad_to", W)?.map(|v| positive(v, "pad_to", W)).transpose()?;
    if let Some(p) = opt_int(m, "crop_padding", W)? {
        if p < 0 {
            return Err(rerr(format!("loader: crop_padding must be non-negative, got {p}")));
        }
        o.crop_padding = p;
    }
    o.hflip = opt_bool(m, "hflip", W)?.unwrap_or(o.hflip);
    let normalize = opt_bool(m, "normalize", W)?;
    match (m.get("mean"), m.get("std")) {
        (Some(mean), Some(std)) => {
            if normalize == Some(false) {
                return Err(rerr("loader: normalize is false but mean and std are given"));
            }
            o.normalize = Some((numbers(mean, "loader: mean")?, numbers(std, "loader: std")?));
        }
        (None, None) => {
            if normalize == Some(true) {
                o.normalize = Some((ds.mean.clone(), ds.std.clone()));
            }
        }
        _ => return Err(rerr("loader: give both mean and std, or neither")),
    }
    if let Some(d) = opt_str(m, "device", W)? {
        o.device = parse_device_or_auto(&d).rt()?;
    }
    Ok(o)
}

fn make_loader(ds: &RImages, m: &Map) -> RResult<RLoader> {
    let o = loader_options(&ds.0, m)?;
    Loader::new(&ds.0, o).map(|l| RLoader(Rc::new(RefCell::new(l)))).rt()
}

fn loaders(api: &mut Api) {
    api.f(
        "loader",
        "dataset",
        "A shuffling loader of batches of 64 (`#{ x: float32 [B, C, H, W] in [0, 1], y: int64 [B] }`); `for b in loader` runs one epoch.",
        |ds: RImages| make_loader(&ds, &Map::new()),
    );
    api.f(
        "loader",
        "dataset, options",
        "A loader with `#{ batch_size, shuffle, seed, drop_last, resize, pad_to, crop_padding, hflip, normalize, mean, std, device }` (see docs/data.md).",
        |ds: RImages, m: Map| make_loader(&ds, &m),
    );
    api.f(
        "next",
        "self",
        "The next batch `#{ x, y }`, or `()` once at the end of each epoch (the next call starts the following epoch).",
        |l: &mut RLoader| -> RResult<Dynamic> {
            match loader_mut(l)?.next_batch().rt()? {
                Some(b) => Ok(Dynamic::from_map(batch_map(b))),
                None => Ok(Dynamic::UNIT),
            }
        },
    );
    api.get("len", "Batches per epoch.", |l: &mut RLoader| -> RResult<INT> {
        Ok(loader_mut(l)?.len() as INT)
    });
    api.get("epoch", "Epochs completed (the current epoch's index).", |l: &mut RLoader| -> RResult<INT> {
        Ok(loader_mut(l)?.epoch() as INT)
    });
    api.get("position", "Batches delivered in the current epoch.", |l: &mut RLoader| -> RResult<INT> {
        Ok(loader_mut(l)?.position() as INT)
    });
    api.get("batch_size", "Samples per batch.", |l: &mut RLoader| -> RResult<INT> {
        Ok(loader_mut(l)?.options().batch_size as INT)
    });
    api.get("samples", "Samples in the data set.", |l: &mut RLoader| -> RResult<INT> {
        Ok(loader_mut(l)?.samples() as INT)
    });
    api.get("shape", "[C, H, W] of the delivered images (after resize or padding).", |l: &mut RLoader| {
        loader_mut(l).map(|l| shape_to_array(&l.image_shape()))
    });
    api.f(
        "reset",
        "self",
        "Back to the first batch of epoch 0, reseeded, as a new loader.",
        |l: &mut RLoader| loader_mut(l).map(|mut l| l.reset()),
    );
    api.f(
        "state",
        "self",
        "The loader's position and generator state as a JSON string (save it with a checkpoint).",
        |l: &mut RLoader| -> RResult<String> {
            serde_json::to_string(&loader_mut(l)?.state()).map_err(|e| rerr(e.to_string()))
        },
    );
    api.f(
        "restore",
        "self, state",
        "Continue from a `state()` string: the following batches are those the saved loader would have given.",
        |l: &mut RLoader, state: &str| -> RResult<()> {
            let s: data::LoaderState = serde_json::from_str(state)
                .map_err(|e| rerr(format!("restore(): not a loader state string ({e})")))?;
            loader_mut(l)?.restore(&s).rt()
        },
    );
}

// ---- text ---------------------------------------------------------------------

const TEXT_KEYS: &[&str] = &["vocab_size", "seed"];
const BROWN_KEYS: &[&str] = &["root", "cache", "val_fraction", "seed", "tokenizer"];

fn text_dataset(dir: &str, m: &Map) -> RResult<RTokens> {
    const W: &str = "text_dataset";
    check_keys(m, TEXT_KEYS, "text_dataset option")?;
    let vocab = match opt_int(m, "vocab_size", W)? {
        Some(v) if !(1..=65536).contains(&v) => {
            return Err(rerr(format!("{W}: vocab_size must be in 1..=65536 for uint16 files, got {v}")))
        }
        v => v.map(|v| v as u32),
    };
    let seed = opt_int(m, "seed", W)?.unwrap_or(0) as u64;
    TokenDataset::open(Path::new(dir), vocab, seed).map(|t| RTokens(Rc::new(RefCell::new(t)))).rt()
}

fn brown_dataset(m: &Map) -> RResult<RTokens> {
    const W: &str = "brown";
    check_keys(m, BROWN_KEYS, "brown option")?;
    let root = opt_str(m, "root", W)?.unwrap_or_else(|| brown::default_dir().display().to_string());
    let cache = opt_str(m, "cache", W)?.unwrap_or_else(|| data::default_cache_dir().display().to_string());
    let f = match m.get("val_fraction") {
        Some(v) => as_number(v, "brown: val_fraction")?,
        None => data::DEFAULT_VAL_FRACTION,
    };
    let seed = opt_int(m, "seed", W)?.unwrap_or(0) as u64;
    let tok = match opt_str(m, "tokenizer", W)? {
        Some(t) => data::Tokenizer::parse(&t).rt()?,
        None => data::Tokenizer::Gpt2,
    };
    let dir = data::brown_dataset_with(Path::new(&root), Path::new(&cache), f, tok).rt()?;
    TokenDataset::open(&dir, None, seed).map(|t| RTokens(Rc::new(RefCell::new(t)))).rt()
}

fn text_split(s: &str) -> RResult<TextSplit> {
    TextSplit::parse(s).rt()
}

fn token_batch(t: &RTokens, split: &str, b: INT, block: INT, device: Device) -> RResult<Map> {
    let b = positive(b, "batch_size", "batch")? as usize;
    let block = positive(block, "block_size", "batch")? as usize;
    let split = text_split(split)?;
    tokens_mut(t)?.batch(split, b, block, device).map(batch_map).rt()
}

fn ids_of(v: &Dynamic) -> RResult<Vec<u32>> {
    let raw: Vec<i64> = if let Some(t) = v.read_lock::<RTensor>() {
        let k = t.0.f_kind().rt()?;
        if crate::tensor::is_floating(k) || k == Kind::Bool {
            return Err(rerr(format!(
                "decode(): token ids must be an integer tensor, got {}",
                crate::tensor::kind_name(k)
            )));
        }
        crate::tensor::to_vec_i64(&t.0).rt()?
    } else if let Some(a) = v.read_lock::<Array>() {
        a.iter()
            .map(|x| x.as_int().map_err(|t| rerr(format!("decode(): token ids must be ints, got {t}"))))
            .collect::<RResult<_>>()?
    } else if let Ok(i) = v.as_int() {
        vec![i]
    } else {
        return Err(rerr(format!(
            "decode(): expected a Tensor or an array of token ids, got {}",
            v.type_name()
        )));
    };
    raw.into_iter()
        .map(|i| {
            u32::try_from(i)
                .map_err(|_| rerr(format!("decode(): token id {i} is outside GPT-2's vocabulary")))
        })
        .collect()
}

fn summary_map(s: &data::Summary) -> Map {
    let m = &s.meta;
    let int = |v: u64| Dynamic::from_int(v as INT);
    map_of(vec![
        ("out", Dynamic::from(s.out.display().to_string())),
        ("documents", int(m.documents)),
        ("train_tokens", int(m.train_tokens)),
        ("val_tokens", int(m.val_tokens)),
        ("train_documents", int(m.train_documents)),
        ("val_documents", int(m.val_documents)),
        (
            "split",
            Dynamic::from(
                if m.split == data::SplitBy::Documents { "documents" } else { "tokens" }.to_string(),
            ),
        ),
        ("summary", Dynamic::from(s.to_string())),
    ])
}

fn prepare(paths: &Array, out: &str, f: f64) -> RResult<Map> {
    let inputs: Vec<PathBuf> = paths
        .iter()
        .map(|p| expect_str(p, "prepare_text(): each input path").map(PathBuf::from))
        .collect::<RResult<_>>()?;
    data::prepare_text(&inputs, Path::new(out), f).map(|s| summary_map(&s)).rt()
}

fn text(api: &mut Api) {
    api.f(
        "text_dataset",
        "dir",
        "nanoGPT token files `dir/train.bin` and `dir/val.bin` (uint16, memory-mapped), ids checked against meta.json's vocab_size or GPT-2's 50257.",
        |dir: &str| text_dataset(dir, &Map::new()),
    );
    api.f(
        "text_dataset",
        "dir, options",
        "Token files with `#{ vocab_size, seed }` (seed of the window generator, default 0).",
        |dir: &str, m: Map| text_dataset(dir, &m),
    );
    api.f(
        "brown",
        "",
        "The Brown corpus as GPT-2 tokens: prepared once into .deps/cache/brown (10% of the documents for val) and reused.",
        || brown_dataset(&Map::new()),
    );
    api.f(
        "brown",
        "options",
        "The Brown corpus with `#{ root: corpus folder, cache: cache folder, val_fraction, seed, tokenizer: \"gpt2\" | \"bytes\" }` (bytes: one id per byte, 256 = end of text, vocabulary 257, cached in .deps/cache/brown-bytes).",
        |m: Map| brown_dataset(&m),
    );
    api.f(
        "brown_documents",
        "",
        "The Brown corpus's 500 documents as plain text (tags stripped), from the default folder.",
        || -> RResult<Array> {
            let docs = brown::documents(&brown::default_dir()).rt()?;
            Ok(docs.into_iter().map(Dynamic::from).collect())
        },
    );
    api.f(
        "brown_documents",
        "dir",
        "The Brown corpus documents under `dir` as plain text (tags stripped).",
        |dir: &str| -> RResult<Array> {
            Ok(brown::documents(Path::new(dir)).rt()?.into_iter().map(Dynamic::from).collect())
        },
    );
    api.f(
        "batch",
        "self, split, batch_size, block_size",
        "Random windows from `\"train\"` or `\"val\"`: `#{ x, y }`, int64 [B, T], y one token ahead of x.",
        |t: &mut RTokens, split: &str, b: INT, block: INT| token_batch(t, split, b, block, Device::Cpu),
    );
    api.f(
        "batch",
        "self, split, batch_size, block_size, device",
        "Random windows as `batch()`, delivered on `device` (`\"cuda\"`, `\"auto\"`, ...).",
        |t: &mut RTokens, split: &str, b: INT, block: INT, device: &str| {
            let d = parse_device_or_auto(device).rt()?;
            token_batch(t, split, b, block, d)
        },
    );
    api.f(
        "tokens",
        "self, split",
        "Number of tokens in `\"train\"` or `\"val\"`.",
        |t: &mut RTokens, split: &str| -> RResult<INT> {
            let s = text_split(split)?;
            Ok(tokens_mut(t)?.tokens(s) as INT)
        },
    );
    api.f(
        "slice",
        "self, split, start, len",
        "Tokens start..start+len of a split as an int64 tensor.",
        |t: &mut RTokens, split: &str, start: INT, len: INT| -> RResult<RTensor> {
            if start < 0 || len < 0 {
                return Err(rerr(format!(
                    "slice(): start and len must be non-negative, got {start} and {len}"
                )));
            }
            let s = text_split(split)?;
            let ids = tokens_mut(t)?.file(s).read(start as usize, len as usize).rt()?;
            Tensor::f_from_slice(&ids).map(RTensor).rt()
        },
    );
    api.get(
        "vocab_size",
        "The vocabulary size token ids were checked against.",
        |t: &mut RTokens| -> RResult<INT> { Ok(tokens_mut(t)?.vocab_size as INT) },
    );
    api.get("dir", "The folder of the token files.", |t: &mut RTokens| -> RResult<String> {
        Ok(tokens_mut(t)?.dir.display().to_string())
    });
    api.f(
        "seed",
        "self, seed",
        "Reseed the window generator.",
        |t: &mut RTokens, seed: INT| -> RResult<()> {
            tokens_mut(t)?.set_seed(seed as u64);
            Ok(())
        },
    );
    api.f(
        "state",
        "self",
        "The window generator's state as a JSON string (save it with a checkpoint).",
        |t: &mut RTokens| -> RResult<String> {
            serde_json::to_string(&tokens_mut(t)?.state()).map_err(|e| rerr(e.to_string()))
        },
    );
    api.f(
        "restore",
        "self, state",
        "Continue the window generator from a `state()` string.",
        |t: &mut RTokens, state: &str| -> RResult<()> {
            let s: data::TokenState = serde_json::from_str(state)
                .map_err(|e| rerr(format!("restore(): not a token data set state string ({e})")))?;
            tokens_mut(t)?.restore(&s);
            Ok(())
        },
    );
    api.f(
        "prepare_text",
        "paths, out_dir",
        "Tokenise text files (one document each) with GPT-2 BPE into out_dir/{train,val}.bin and meta.json, 10% for val.",
        |paths: Array, out: &str| prepare(&paths, out, data::DEFAULT_VAL_FRACTION),
    );
    api.f(
        "prepare_text",
        "paths, out_dir, val_fraction",
        "As `prepare_text(paths, out_dir)` with the validation fraction in (0, 1); returns a summary map.",
        |paths: Array, out: &str, f: FLOAT| prepare(&paths, out, f),
    );
    api.f(
        "encode",
        "text",
        "GPT-2 BPE token ids of `text` (int64 tensor).",
        |text: ImmutableString| -> RResult<RTensor> {
            let ids: Vec<i64> = bpe::encode(&text).rt()?.into_iter().map(i64::from).collect();
            Tensor::f_from_slice(&ids).map(RTensor).rt()
        },
    );
    api.f(
        "decode",
        "ids: Tensor|array",
        "Text of GPT-2 token ids (a tensor or an array of ints).",
        |ids: Dynamic| -> RResult<String> { bpe::decode(&ids_of(&ids)?).rt() },
    );
}
