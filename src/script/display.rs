//! Rich display: values as MIME bundles (`text/plain` always; HTML tables
//! for tensors and Frames; PNG/SVG for images and plots), `display(x)` and
//! `image(path)`.
//!
//! A front end that can show rich output (the Jupyter kernel) installs a
//! sink with [`set_sink`]; without one, `display` prints the text form and
//! plots are only written to their files, as before.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rhai::{Dynamic, Engine, NativeCallContext};
use serde_json::{Map as JMap, Value};
use tch::{Kind, Tensor};

use super::api::{Api, DocEntry};
use super::report::RFrame;
use super::value::*;

/// Rows (and columns) of a tensor or Frame shown in HTML before eliding.
const MAX_ROWS: usize = 12;
const MAX_FRAME_ROWS: usize = 60;

/// One displayable value: MIME type to content (`data`) and per-type
/// `metadata` (image sizes), as Jupyter's `display_data` carries them.
#[derive(Clone, Debug, Default)]
pub struct Bundle {
    pub data: JMap<String, Value>,
    pub metadata: JMap<String, Value>,
}

impl Bundle {
    pub fn text(text: String) -> Self {
        let mut b = Bundle::default();
        b.data.insert("text/plain".into(), Value::String(text));
        b
    }
}

/// An image file read into memory, shown inline by notebooks.
#[derive(Clone, Debug)]
pub struct RImage {
    pub path: PathBuf,
    pub png: Option<Vec<u8>>,
    pub svg: Option<String>,
}

type Sink = Box<dyn FnMut(Bundle)>;

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// Show `display(...)` output and plots through `sink` on this thread.
pub fn set_sink(sink: impl FnMut(Bundle) + 'static) {
    SINK.with(|s| *s.borrow_mut() = Some(Box::new(sink)));
}

/// Whether a rich front end is listening.
pub fn active() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

fn emit(b: Bundle) -> bool {
    SINK.with(|s| match s.borrow_mut().as_mut() {
        Some(f) => {
            f(b);
            true
        }
        None => false,
    })
}

/// Read an image file (PNG or SVG by extension).
pub fn read_image(path: &Path) -> Result<RImage, String> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let mut img = RImage { path: path.to_path_buf(), png: None, svg: None };
    match ext.as_str() {
        "png" => {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
                return Err(format!("{}: not a PNG file", path.display()));
            }
            img.png = Some(bytes);
        }
        "svg" => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            if !text.contains("<svg") {
                return Err(format!("{}: not an SVG file", path.display()));
            }
            img.svg = Some(text);
        }
        _ => return Err(format!("{}: images are .png or .svg files", path.display())),
    }
    Ok(img)
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(b: &[u8]) -> Option<(u32, u32)> {
    let w = u32::from_be_bytes(b.get(16..20)?.try_into().ok()?);
    let h = u32::from_be_bytes(b.get(20..24)?.try_into().ok()?);
    Some((w, h))
}

fn image_bundle(img: &RImage) -> Bundle {
    let mut b = Bundle::text(image_text(img));
    if let Some(png) = &img.png {
        b.data
            .insert("image/png".into(), Value::String(base64::engine::general_purpose::STANDARD.encode(png)));
        if let Some((w, h)) = png_size(png) {
            let mut m = JMap::new();
            m.insert("width".into(), w.into());
            m.insert("height".into(), h.into());
            b.metadata.insert("image/png".into(), Value::Object(m));
        }
    }
    if let Some(svg) = &img.svg {
        b.data.insert("image/svg+xml".into(), Value::String(svg.clone()));
    }
    b
}

fn image_text(img: &RImage) -> String {
    let size = img.png.as_deref().and_then(png_size).map(|(w, h)| format!(", {w}x{h}")).unwrap_or_default();
    format!("Image({}{size})", img.path.display())
}

/// Show the files a plot function just wrote (PNG and SVG of one figure are
/// one display). Without a rich front end this does nothing.
pub fn show_files(paths: &[PathBuf]) {
    if !active() {
        return;
    }
    let mut img = RImage { path: PathBuf::new(), png: None, svg: None };
    for p in paths {
        if let Ok(one) = read_image(p) {
            if img.path.as_os_str().is_empty() || one.png.is_some() {
                img.path = one.path;
            }
            img.png = img.png.or(one.png);
            img.svg = img.svg.or(one.svg);
        }
    }
    if img.png.is_some() || img.svg.is_some() {
        emit(image_bundle(&img));
    }
}

/// Indices shown along a dimension of `n`: all, or the first and last few
/// with `None` where the rest are elided.
fn shown(n: i64) -> Vec<Option<i64>> {
    let max = MAX_ROWS as i64;
    if n <= max {
        return (0..n).map(Some).collect();
    }
    let half = max / 2;
    (0..half).map(Some).chain(std::iter::once(None)).chain((n - half..n).map(Some)).collect()
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16)
}

fn cell(t: &Tensor, idx: &[i64], kind: Kind) -> String {
    match kind {
        Kind::Bool => t.f_int64_value(idx).map(|v| (v != 0).to_string()).unwrap_or_default(),
        k if is_float(k) => t.f_double_value(idx).map(|v| format!("{v:.4}")).unwrap_or_default(),
        _ => t.f_int64_value(idx).map(|v| v.to_string()).unwrap_or_default(),
    }
}

/// A tensor as HTML: a caption with shape, dtype and device, then a table
/// of its values (0-, 1- and 2-D; larger tensors as their printed text).
pub fn tensor_html(t: &Tensor) -> String {
    let dims = t.size();
    let kind = t.kind();
    let caption = format!(
        "Tensor · shape [{}] · {:?} · {}{}",
        dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
        kind,
        crate::tensor::device_name(t.device()),
        if t.requires_grad() { " · requires_grad" } else { "" }
    );
    let supported = is_float(kind)
        || matches!(kind, Kind::Bool | Kind::Int | Kind::Int64 | Kind::Int8 | Kind::Int16 | Kind::Uint8);
    let Ok(cpu) = t.f_detach().and_then(|d| d.f_to(tch::Device::Cpu)) else {
        return format!("<div>{}</div>", report::util::html_escape(&caption));
    };
    if !supported || dims.len() > 2 {
        let text = crate::tensor::format_tensor(t);
        return format!(
            "<div><b>{}</b></div><pre>{}</pre>",
            report::util::html_escape(&caption),
            report::util::html_escape(&text)
        );
    }
    let mut out = format!("<div><b>{}</b></div>\n<table>\n", report::util::html_escape(&caption));
    let (rows, cols) = match dims.len() {
        0 => (vec![], vec![]),
        1 => (vec![], shown(dims[0])),
        _ => (shown(dims[0]), shown(dims[1])),
    };
    if dims.is_empty() {
        out.push_str(&format!("<tr><td>{}</td></tr>\n", cell(&cpu, &[], kind)));
    } else if dims.len() == 1 {
        out.push_str("<tr>");
        for c in &cols {
            let v = c.map(|c| cell(&cpu, &[c], kind)).unwrap_or_else(|| "…".into());
            out.push_str(&format!("<td>{v}</td>"));
        }
        out.push_str("</tr>\n");
    } else {
        out.push_str("<tr><th></th>");
        for c in &cols {
            out.push_str(&format!("<th>{}</th>", c.map(|c| c.to_string()).unwrap_or_else(|| "…".into())));
        }
        out.push_str("</tr>\n");
        for r in &rows {
            let Some(r) = *r else {
                out.push_str(&format!("<tr><th>⋮</th>{}</tr>\n", "<td>⋮</td>".repeat(cols.len())));
                continue;
            };
            out.push_str(&format!("<tr><th>{r}</th>"));
            for c in &cols {
                let v = c.map(|c| cell(&cpu, &[r, c], kind)).unwrap_or_else(|| "…".into());
                out.push_str(&format!("<td>{v}</td>"));
            }
            out.push_str("</tr>\n");
        }
    }
    out.push_str("</table>\n");
    out
}

/// The MIME bundle of `v`; `text` is its plain-text form (as `print` shows it).
pub fn bundle(v: &Dynamic, text: String) -> Bundle {
    if let Some(img) = v.read_lock::<RImage>() {
        return image_bundle(&img);
    }
    let mut b = Bundle::text(text);
    if let Some(t) = v.read_lock::<RTensor>() {
        b.data.insert("text/html".into(), Value::String(tensor_html(&t.0)));
    } else if let Some(f) = v.read_lock::<RFrame>() {
        b.data.insert("text/html".into(), Value::String(report::render_html(&f.0, MAX_FRAME_ROWS)));
    }
    b
}

/// Plain text of `v` as `print` shows it, from inside a native call: knlp's
/// types through their registered `to_string`, a string unquoted.
fn text_of(ctx: &NativeCallContext, v: &Dynamic) -> String {
    if v.is_string() {
        return v.to_string();
    }
    super::display_with(v, &|x| {
        if !x.type_name().contains("::") {
            return None;
        }
        ctx.call_fn::<String>("to_string", (x.clone(),)).ok()
    })
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RImage>("Image");
    engine.register_fn("to_string", |i: &mut RImage| image_text(i));
    engine.register_fn("to_debug", |i: &mut RImage| image_text(i));
    let mut api = Api::new(engine, docs);
    api.group("Script helpers");
    api.f(
        "display",
        "value: any",
        "Show a value: in a notebook as rich output (tensors and Frames as HTML tables, images inline), elsewhere printed as `print` prints it.",
        |ctx: NativeCallContext, v: Dynamic| {
            let text = text_of(&ctx, &v);
            if !emit(bundle(&v, text.clone())) {
                println!("{text}");
            }
        },
    );
    api.f(
        "image",
        "path",
        "Read a .png or .svg file as an Image, which a notebook shows inline (as the last value of a cell, or with `display`).",
        |path: &str| -> RResult<RImage> { read_image(Path::new(path)).map_err(rerr) },
    );
    api.get("path", "The file an Image was read from.", |i: &mut RImage| i.path.display().to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elides_long_dimensions() {
        assert_eq!(shown(3), vec![Some(0), Some(1), Some(2)]);
        let s = shown(100);
        assert_eq!(s.len(), MAX_ROWS + 1);
        assert_eq!(s[MAX_ROWS / 2], None);
        assert_eq!(s.last(), Some(&Some(99)));
    }

    #[test]
    fn tensor_html_has_shape_dtype_device_and_values() {
        let t = Tensor::from_slice(&[1.5f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
        let h = tensor_html(&t);
        assert!(h.contains("shape [2, 2]") && h.contains("Float") && h.contains("cpu"), "{h}");
        assert!(h.contains("<td>1.5000</td>") && h.contains("<td>4.0000</td>"), "{h}");
        let big = Tensor::arange(1000, (Kind::Int64, tch::Device::Cpu)).reshape([100, 10]);
        let h = tensor_html(&big);
        assert!(h.contains("⋮") && h.contains("<th>99</th>") && !h.contains("<th>50</th>"), "{h}");
    }
}
