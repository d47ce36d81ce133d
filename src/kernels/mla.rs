//! One graphed decode token of an absorbed MLA layer in three kernels
//! (`mla.cu`) instead of about a dozen libtorch ones: the query rows and
//! the RoPE-rotated cache row in one, a split-row (flash-decoding) online
//! softmax over the latent cache, and the merge of the splits. The
//! reference is `attention::absorb`'s libtorch path (`Folded::attend` after
//! `rope::apply_at`, the concatenations and `index_copy_`), which keeps
//! scores and probabilities in bf16 where these kernels keep them in fp32.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::{check, contiguous_of, kernel, launch, launch_grid, same_device, te, Arg, OptIn};

const SOURCE: &str = include_str!("mla.cu");
/// Threads per block of `mla_row`.
const ROW_THREADS: u32 = 256;

/// Off unless asked for (`KNLP_FUSED_MLA_DECODE=1`, or [`set_enabled`]):
/// these kernels have not run on a GPU yet (docs/attention.md, "Fused
/// absorbed decode"); the libtorch step is the default until they have.
static SWITCH: OptIn = OptIn::new("KNLP_FUSED_MLA_DECODE");

pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether the graphed absorbed step may use these kernels (the global
/// switch, `kernels::usable`, applies on top).
pub fn enabled() -> bool {
    SWITCH.enabled()
}

/// The shape of one layer's absorbed step.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub heads: i64,
    /// Latent width (a cache row's content part).
    pub r: i64,
    /// Decoupled RoPE width (0 without).
    pub dr: i64,
}

impl Shape {
    fn source(&self) -> String {
        format!("#define R {}\n#define DR {}\n#define H {}\n{SOURCE}", self.r, self.dr, self.heads)
    }

    /// Whether the kernels take this shape: a warp per head, a thread per
    /// latent column in the merge, an even RoPE width up to 256, and an
    /// attend kernel that keeps its columns in registers without spilling.
    /// (`mla_attend`'s launch bounds make ptxas fit any H into the register
    /// file; past this bound it would spill, which costs speed, not
    /// correctness.)
    pub fn fits(&self) -> bool {
        (1..=32).contains(&self.heads)
            && (1..=1024).contains(&self.r)
            && (0..=256).contains(&self.dr)
            && self.dr % 2 == 0
            && check::block_registers(self.attend_registers(), 32 * self.heads as u32)
                <= check::BLOCK_REGISTERS
    }

    /// An estimate from above of the registers `mla_attend` needs per
    /// thread: a lane holds its query and key columns (2·⌈(R+DR)/32⌉) and
    /// its share of the R accumulators (⌈R/32⌉), plus 48 for the rest.
    /// Measured with NVRTC 13.0 without launch bounds over R in steps of 8
    /// (and some odd R) and DR in {0, 2, 32, 64, 128, 256}: ptxas used at
    /// most this, rounded up to a multiple of 8, minus 5 on sm_80 and
    /// sm_90. Not monotone in R, so `check_sources` compiles inside points
    /// too. Called only for shapes within the bounds `fits` checks first.
    fn attend_registers(&self) -> u32 {
        let ke = (self.r + self.dr + 31) / 32;
        let re = (self.r + 31) / 32;
        (2 * ke + re + 48) as u32
    }
}

/// The sources [`super::check`] compiles: GPT-2 124M's latent shapes with
/// and without decoupled RoPE, a tiny test shape, and the boundary of
/// [`Shape::fits`].
pub fn check_sources() -> Vec<check::Source> {
    // For a given head count the largest latent `fits` admits, with and
    // without RoPE: the shapes that press hardest on the register file.
    let widest = |heads: i64, dr: i64| (1..=1024).rev().find(|&r| Shape { heads, r, dr }.fits());
    // ptxas's registers are not monotone in R: add inside points, among
    // them the most register-hungry one measured (R 824, DR 32 on sm_80).
    let mut shapes = vec![(12, 256, 32), (12, 256, 0), (2, 16, 8), (8, 824, 32), (8, 816, 0), (8, 928, 64)];
    for heads in [1, 8, 12, 16, 17, 18, 21, 25, 32] {
        for dr in [0, 64, 256] {
            shapes.extend(widest(heads, dr).map(|r| (heads, r, dr)));
        }
    }
    shapes
        .into_iter()
        .map(|(heads, r, dr)| {
            let sh = Shape { heads, r, dr };
            check::Source {
                family: "mla",
                variant: format!("H {heads}, R {r}, DR {dr}"),
                src: sh.source(),
                entries: vec![
                    ("mla_row", ROW_THREADS),
                    ("mla_attend", 32 * heads as u32),
                    ("mla_combine", r as u32),
                ],
            }
        })
        .collect()
}

/// From the folded projection `out` [B, 1, H·r + (H+1)·dr + r] build the
/// query rows [B, H, r + dr] and write the token's cache row into `slot`
/// [B, S, r + dr] at the device position `pos` ([1] int64); `cos_sin`
/// [cap, 2, dr] is `rope`'s table (ignored when dr = 0).
pub fn row(sh: Shape, out: &Tensor, cos_sin: Option<&Tensor>, pos: &Tensor, slot: &Tensor) -> Result<Tensor> {
    let (h, r, dr) = (sh.heads, sh.r, sh.dr);
    let k = r + dr;
    let b = out.size()[0];
    let n_out = h * r + (h + 1) * dr + r;
    if !sh.fits() || out.numel() as i64 != b * n_out {
        bail!("mla kernels: projection {:?} does not fit {sh:?}", out.size());
    }
    let ss = slot.size();
    if ss.len() != 3 || ss[0] != b || ss[2] != k {
        bail!("mla kernels: slot {:?} is not [{b}, S, {k}]", ss);
    }
    contiguous_of(out, Kind::BFloat16, "the projection")?;
    contiguous_of(slot, Kind::BFloat16, "the cache slot")?;
    let dev = out.device();
    same_device(&[slot, pos], dev)?;
    if pos.kind() != Kind::Int64 || pos.numel() != 1 {
        bail!("mla kernels: the position must be one int64");
    }
    let (cs, cap) = match (dr, cos_sin) {
        (0, _) => (Arg::null(), ss[1]),
        (_, Some(t)) => {
            contiguous_of(t, Kind::BFloat16, "the RoPE table")?;
            same_device(&[t], dev)?;
            if t.size()[1..] != [2, dr] {
                bail!("mla kernels: RoPE table {:?} is not [cap, 2, {dr}]", t.size());
            }
            (Arg::tensor(t, 0)?, t.size()[0])
        }
        (_, None) => bail!("mla kernels: decoupled RoPE without its table"),
    };
    let qq = Tensor::f_empty([b, h, k], (Kind::BFloat16, dev)).map_err(te)?;
    let kr = kernel(dev, "mla", &sh.source(), "mla_row")?;
    launch(
        kr,
        b as u32,
        ROW_THREADS,
        0,
        &[
            Arg::tensor(out, 0)?,
            Arg::I64(n_out),
            cs,
            Arg::I64(cap),
            Arg::tensor(pos, 0)?,
            Arg::tensor(&qq, 0)?,
            Arg::tensor(slot, 0)?,
            Arg::I64(ss[1]),
        ],
    )?;
    Ok(qq)
}

/// The mixed latent [B, H, r] of query rows `qq` [B, H, r + dr] over the
/// slot's rows `0..=pos`, scores scaled by `scale`.
pub fn attend(sh: Shape, qq: &Tensor, slot: &Tensor, pos: &Tensor, scale: f64) -> Result<Tensor> {
    let (h, r) = (sh.heads, sh.r);
    let (b, s) = (slot.size()[0], slot.size()[1]);
    if qq.size() != [b, h, r + sh.dr] {
        bail!("mla kernels: queries {:?} do not fit {sh:?}", qq.size());
    }
    contiguous_of(qq, Kind::BFloat16, "the queries")?;
    contiguous_of(slot, Kind::BFloat16, "the cache slot")?;
    let dev = qq.device();
    same_device(&[slot, pos], dev)?;
    // About two blocks per SM of a large GPU in all, at least 32 rows each.
    let splits = (256 / b.max(1)).clamp(1, (s / 32).max(1));
    let chunk = (s + splits - 1) / splits;
    let fopt = (Kind::Float, dev);
    let pm = Tensor::f_empty([b, h, splits], fopt).map_err(te)?;
    let pl = Tensor::f_empty([b, h, splits], fopt).map_err(te)?;
    let pacc = Tensor::f_empty([b, h, splits, r], fopt).map_err(te)?;
    let mixed = Tensor::f_empty([b, h, r], (Kind::BFloat16, dev)).map_err(te)?;
    let src = sh.source();
    let ka = kernel(dev, "mla", &src, "mla_attend")?;
    let kc = kernel(dev, "mla", &src, "mla_combine")?;
    if b > 65_535 {
        bail!("mla kernels: batch {b} exceeds one launch");
    }
    launch_grid(
        ka,
        [splits as u32, b as u32, 1],
        32 * h as u32,
        0,
        &[
            Arg::tensor(qq, 0)?,
            Arg::tensor(slot, 0)?,
            Arg::tensor(pos, 0)?,
            Arg::I64(s),
            Arg::I32(chunk as i32),
            Arg::F32(scale as f32),
            Arg::tensor(&pm, 0)?,
            Arg::tensor(&pl, 0)?,
            Arg::tensor(&pacc, 0)?,
        ],
    )?;
    launch(
        kc,
        (b * h) as u32,
        r as u32,
        0,
        &[
            Arg::tensor(&pm, 0)?,
            Arg::tensor(&pl, 0)?,
            Arg::tensor(&pacc, 0)?,
            Arg::I32(splits as i32),
            Arg::tensor(&mixed, 0)?,
        ],
    )?;
    Ok(mixed)
}
