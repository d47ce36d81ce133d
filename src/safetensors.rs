//! safetensors files: read with validation, written atomically.
//!
//! Our own reader/writer (the format is an 8-byte little-endian header
//! length, a JSON header, then raw little-endian data) because tch's copy
//! drops metadata, reads whole files and does not write atomically.
//! Every error names the file and, where it applies, the tensor.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use crate::tensor::torch_error;

/// Largest header we accept (a guard against garbage lengths).
const MAX_HEADER: u64 = 100 << 20;

const DTYPES: &[(Kind, &str)] = &[
    (Kind::Double, "F64"),
    (Kind::Float, "F32"),
    (Kind::Half, "F16"),
    (Kind::BFloat16, "BF16"),
    (Kind::Int64, "I64"),
    (Kind::Int, "I32"),
    (Kind::Int16, "I16"),
    (Kind::Int8, "I8"),
    (Kind::Uint8, "U8"),
    (Kind::Bool, "BOOL"),
];

fn dtype_name(kind: Kind) -> Option<&'static str> {
    DTYPES.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n)
}

fn dtype_kind(name: &str) -> Option<Kind> {
    DTYPES.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
}

/// A loaded file: tensors in file order (on the CPU) and the string metadata.
pub struct Loaded {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: BTreeMap<String, String>,
}

impl Loaded {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// What [`save`] may do at its destination besides replacing a regular
/// file: create missing folders, write to the file a symbolic link names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub create_dirs: bool,
    pub follow_symlinks: bool,
}

impl Target {
    /// A script's `save`: nothing beyond a regular file in an existing folder.
    pub const STRICT: Target = Target { create_dirs: false, follow_symlinks: false };
    /// knlp's own outputs (checkpoints, exports) in folders it lays out.
    pub const OWNED: Target = Target { create_dirs: true, follow_symlinks: false };
}

fn kind_of(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match () {
        _ if ft.is_dir() => "a folder",
        _ if ft.is_symlink() => "a symbolic link",
        _ if ft.is_char_device() => "a character device",
        _ if ft.is_block_device() => "a block device",
        _ if ft.is_fifo() => "a FIFO",
        _ if ft.is_socket() => "a socket",
        _ => "not a regular file",
    }
}

/// The file [`save`] writes for `path`: an existing path must be a regular
/// file (never a device, FIFO, socket or folder); a symbolic link is
/// refused unless followed (one level, to a regular file or nothing); a
/// missing folder is an error unless created.
pub fn target_path(path: &Path, t: Target) -> Result<PathBuf, String> {
    let show = crate::tensor::short_path(path);
    let mut p = path.to_path_buf();
    match fs::symlink_metadata(&p) {
        Ok(md) if md.file_type().is_symlink() => {
            if !t.follow_symlinks {
                return Err(format!(
                    "{show}: is a symbolic link; refusing to replace it (follow_symlinks: true writes to the file it names)"
                ));
            }
            let dest = fs::read_link(&p).map_err(|e| format!("{show}: {e}"))?;
            p = if dest.is_relative() { p.parent().unwrap_or(Path::new(".")).join(dest) } else { dest };
            if let Ok(md) = fs::symlink_metadata(&p) {
                if !md.is_file() {
                    return Err(format!(
                        "{show}: links to {}, which is {}; save writes regular files only",
                        crate::tensor::short_path(&p),
                        kind_of(md.file_type())
                    ));
                }
            }
        }
        Ok(md) if !md.is_file() => {
            return Err(format!(
                "{show}: exists and is {}; save writes regular files only",
                kind_of(md.file_type())
            ));
        }
        _ => {}
    }
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            if !t.create_dirs {
                return Err(format!(
                    "{show}: the folder {} does not exist (mkdir: true creates it)",
                    crate::tensor::short_path(dir)
                ));
            }
            fs::create_dir_all(dir).map_err(|e| format!("{show}: {e}"))?;
        }
    }
    Ok(p)
}

/// Write `tensors` (any device, any layout) and `metadata` to `path`
/// atomically: a temporary file in the same folder, fsync, rename. The
/// destination is checked first ([`target_path`]).
pub fn save(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: &BTreeMap<String, String>,
    target: Target,
) -> Result<(), String> {
    let real = target_path(path, target)?;
    let path = real.as_path();
    let ctx = |e: std::io::Error| format!("{}: {e}", crate::tensor::short_path(path));
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut cpu = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        if name == "__metadata__" {
            return Err(format!("{}: '__metadata__' is not a valid tensor name", path.display()));
        }
        let kind =
            t.f_kind().map_err(|e| format!("{}: tensor '{name}': {}", path.display(), torch_error(&e)))?;
        let dt = dtype_name(kind).ok_or_else(|| {
            format!(
                "{}: tensor '{name}' has dtype {kind:?}, which safetensors files here cannot hold",
                path.display()
            )
        })?;
        let c = t
            .f_detach()
            .and_then(|x| x.f_to_device(Device::Cpu))
            .and_then(|x| x.f_contiguous())
            .map_err(|e| format!("{}: tensor '{name}': {}", path.display(), torch_error(&e)))?;
        let bytes = c.numel() * kind.elt_size_in_bytes();
        header.insert(
            name.clone(),
            json!({"dtype": dt, "shape": c.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
        cpu.push((name, c, bytes));
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).map_err(|e| e.to_string())?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let tmp = temp_path(path);
    let result = (|| -> Result<(), String> {
        let file = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(head.len() as u64).to_le_bytes()).map_err(ctx)?;
        w.write_all(&head).map_err(ctx)?;
        let mut buf = Vec::new();
        for (name, c, bytes) in &cpu {
            buf.resize(*bytes, 0);
            c.f_copy_data_u8(&mut buf, c.numel())
                .map_err(|e| format!("{}: tensor '{name}': {}", path.display(), torch_error(&e)))?;
            w.write_all(&buf).map_err(ctx)?;
        }
        let file = w.into_inner().map_err(|e| ctx(e.into_error()))?;
        file.sync_all().map_err(ctx)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    crate::testhook::point("checkpoint");
    fs::rename(&tmp, path).map_err(ctx)?;
    sync_dir(path);
    Ok(())
}

/// A sibling temporary path, unique to this process.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// fsync the folder holding `path` so a rename survives a crash.
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Read and validate a safetensors file; tensors land on the CPU.
pub fn load(path: &Path) -> Result<Loaded, String> {
    let p = path.display();
    let mut file = File::open(path).map_err(|e| format!("{p}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{p}: {e}"))?.len();
    if len < 8 {
        return Err(format!("{p}: not a safetensors file (only {len} bytes)"));
    }
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|e| format!("{p}: {e}"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > len {
        return Err(format!(
            "{p}: not a safetensors file or truncated (header of {n} bytes in a file of {len})"
        ));
    }
    let mut head = vec![0u8; n as usize];
    file.read_exact(&mut head).map_err(|e| format!("{p}: {e}"))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&head).map_err(|e| format!("{p}: header is not valid JSON: {e}"))?;
    let data_len = (len - 8 - n) as usize;
    let mut entries = Vec::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in &header {
        if name == "__metadata__" {
            // The format's metadata maps names to strings; anything else is refused.
            let m = v.as_object().ok_or_else(|| format!("{p}: __metadata__ must be a map of strings"))?;
            for (k, v) in m {
                let s = v.as_str().ok_or_else(|| format!("{p}: __metadata__ '{k}' is not a string ({v})"))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |what: &str| format!("{p}: tensor '{name}': {what}");
        let dt = v.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("no dtype"))?;
        let kind = dtype_kind(dt).ok_or_else(|| bad(&format!("unsupported dtype {dt}")))?;
        let shape: Vec<i64> = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_i64().filter(|d| *d >= 0).ok_or_else(|| bad("bad shape")))
            .collect::<Result<_, _>>()?;
        let off = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("no data_offsets"))?;
        let (start, end) = match (off[0].as_u64(), off[1].as_u64()) {
            (Some(s), Some(e)) if s <= e => (s as usize, e as usize),
            _ => return Err(bad("bad data_offsets")),
        };
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize))
            .ok_or_else(|| bad("shape overflows"))?;
        if numel.checked_mul(kind.elt_size_in_bytes()) != Some(end - start) {
            return Err(bad(&format!("shape {shape:?} of {dt} does not match {} data bytes", end - start)));
        }
        if end > data_len {
            return Err(bad(&format!("data ends at byte {end} but the file holds {data_len} (truncated?)")));
        }
        entries.push((name.clone(), kind, shape, start, end));
    }
    // Data is read in file order so a large file streams once. As the
    // format requires, the tensors tile the data exactly: no overlap (two
    // tensors sharing bytes), no gap.
    entries.sort_by_key(|e| (e.3, e.4));
    let mut at = 0usize;
    for (name, _, _, start, end) in &entries {
        if *start != at {
            let why = if *start < at { "overlaps the tensor before it" } else { "leaves a gap before it" };
            return Err(format!("{p}: tensor '{name}': data_offsets [{start}, {end}] {why} (at byte {at})"));
        }
        at = *end;
    }
    if at != data_len {
        return Err(format!("{p}: the tensors cover {at} of the {data_len} data bytes"));
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(|e| format!("{p}: {e}"))?;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, kind, shape, start, end) in entries {
        let t = Tensor::f_from_data_size(&data[start..end], &shape, kind)
            .map_err(|e| format!("{p}: tensor '{name}': {}", torch_error(&e)))?;
        tensors.push((name, t));
    }
    Ok(Loaded { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata() {
        let dir = tempdir();
        let path = dir.join("a.safetensors");
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let b = Tensor::from_slice(&[true, false]);
        let at = a.transpose(0, 1); // non-contiguous input
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), "7".to_string());
        save(&path, &[("a".into(), &at), ("b".into(), &b)], &meta, Target::OWNED).unwrap();
        let l = load(&path).unwrap();
        assert_eq!(l.metadata.get("step").unwrap(), "7");
        assert!(l.get("a").unwrap().equal(&at));
        assert!(l.get("b").unwrap().equal(&b));
    }

    #[test]
    fn truncated_files_are_refused() {
        let dir = tempdir();
        let path = dir.join("t.safetensors");
        let a = Tensor::ones([100], (Kind::Float, Device::Cpu));
        save(&path, &[("w".into(), &a)], &BTreeMap::new(), Target::OWNED).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let e = load(&path).err().unwrap();
        assert!(e.contains("'w'") && e.contains("truncated"), "{e}");
        fs::write(&path, b"garbage!garbage!").unwrap();
        assert!(load(&path).err().unwrap().contains("not a safetensors file"));
    }

    /// A file with a hand-written header and `data` bytes.
    fn raw(path: &Path, header: &str, data: &[u8]) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        fs::write(path, b).unwrap();
    }

    #[test]
    fn overlapping_offsets_and_non_string_metadata_are_refused() {
        let dir = tempdir();
        let path = dir.join("o.safetensors");
        let ok = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        raw(&path, ok, &[0u8; 8]);
        assert_eq!(load(&path).unwrap().tensors.len(), 2);
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        raw(&path, overlap, &[0u8; 8]);
        let e = load(&path).err().unwrap();
        assert!(e.contains("'b'") && e.contains("overlaps"), "{e}");
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        raw(&path, gap, &[0u8; 8]);
        assert!(load(&path).err().unwrap().contains("gap"));
        let meta = r#"{"__metadata__":{"step":7},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        raw(&path, meta, &[0u8; 4]);
        let e = load(&path).err().unwrap();
        assert!(e.contains("__metadata__ 'step' is not a string"), "{e}");
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("knlp-st-{}-{}", std::process::id(), rand_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
    }
}
