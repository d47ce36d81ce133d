//! The k-th smallest score, exactly, by radix selection over an
//! order-preserving integer view of the float bits: three passes of 11, 11
//! and 10 bits, each one element-wise op and one small histogram (2048 bins
//! fit GPU shared memory, so counting stays fast even when the scores crowd
//! into a few bins). Unlike `kthvalue` (a sort-based selection on the CPU)
//! or `quantile` (refuses more than 2^24 elements) it scales to every weight
//! of a large model on any device.
use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};

use crate::tensor::torch_error;

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

/// Order-preserving int32 keys of float32 values: for negative floats the
/// magnitude bits are flipped, so integer order equals float order. Every
/// NaN, whatever its sign bit, gets the largest key, as `kthvalue` and
/// `sort` rank NaN above +inf.
fn keys(x: &Tensor) -> Result<Tensor> {
    let bits = x.f_contiguous().and_then(|c| c.f_view_dtype(Kind::Int)).map_err(te)?;
    let flipped = bits.f_bitwise_xor(0x7FFF_FFFFi64).map_err(te)?;
    let neg = bits.f_lt(0).map_err(te)?;
    let keyed = flipped.f_where_self(&neg, &bits).map_err(te)?;
    let top = crate::tensor::num(i32::MAX as i64).and_then(|t| t.f_to_kind(Kind::Int)).map_err(te)?;
    let nan = x.f_isnan().map_err(te)?;
    top.f_where_self(&nan, &keyed).map_err(te)
}

fn float_of_key(key: i32) -> f32 {
    let bits = if key < 0 { key ^ 0x7FFF_FFFF } else { key };
    f32::from_bits(bits as u32)
}

/// Index of the bin holding the k-th (1-based) element, and how many
/// elements lie in earlier bins.
fn find_bin(counts: &Tensor, k: i64) -> Result<(i64, i64)> {
    let c: Vec<i64> = Vec::<i64>::try_from(counts.f_to_device(Device::Cpu).map_err(te)?).map_err(te)?;
    let mut seen = 0i64;
    for (b, n) in c.iter().enumerate() {
        if seen + n >= k {
            return Ok((b as i64, seen));
        }
        seen += n;
    }
    bail!("k = {k} exceeds the {seen} elements")
}

/// The k-th smallest value (1-based) of a float tensor (any shape). On a
/// CUDA device with NVRTC, the fused kernels of `kernels::prune` (one
/// histogram kernel per pass, no intermediate tensors); elsewhere, or if
/// they fail, libtorch ops.
pub fn kth_smallest(x: &Tensor, k: i64) -> Result<f64> {
    let n = x.numel() as i64;
    if k < 1 || k > n {
        bail!("kth_smallest: k = {k} is outside 1..={n}");
    }
    if crate::kernels::usable(x.device()) {
        match crate::kernels::prune::kth_smallest(x, k) {
            Ok(v) => return Ok(v),
            Err(e) => crate::kernels::disable(&e),
        }
    }
    kth_smallest_torch(x, k)
}

/// [`kth_smallest`] with libtorch ops only (the fused kernels' reference).
pub fn kth_smallest_torch(x: &Tensor, k: i64) -> Result<f64> {
    let n = x.numel() as i64;
    if k < 1 || k > n {
        bail!("kth_smallest: k = {k} is outside 1..={n}");
    }
    let x = x.f_to_kind(Kind::Float).and_then(|t| t.f_reshape([-1])).map_err(te)?;
    let mut cand = keys(&x)?;
    let mut k = k;
    // (shift, bits): the top digit is signed (arithmetic shift), offset to 0..
    let passes: [(i64, i64, i64); 3] = [(21, 11, 1024), (10, 11, 0), (0, 10, 0)];
    let mut key = 0i64;
    for (i, &(shift, bits, offset)) in passes.iter().enumerate() {
        let mask = (1i64 << bits) - 1;
        let shifted = cand.f_bitwise_right_shift_tensor_scalar(shift).map_err(te)?;
        let digit = if offset > 0 { shifted.f_add_scalar(offset) } else { shifted.f_bitwise_and(mask) }
            .map_err(te)?;
        let counts =
            digit.f_to_kind(Kind::Int64).and_then(|d| d.f_bincount::<Tensor>(None, 1 << bits)).map_err(te)?;
        let (bin, below) = find_bin(&counts, k)?;
        k -= below;
        key = (key << bits) | bin;
        if i + 1 < passes.len() {
            cand = cand.f_masked_select(&digit.f_eq(bin).map_err(te)?).map_err(te)?;
        }
    }
    // Undo the top digit's offset: the key's upper 11 bits are signed.
    let key = key - (1024 << 21);
    Ok(float_of_key(key as i32) as f64)
}

/// An estimate of the k-th smallest value from a uniform sample (with
/// replacement) of `fraction` of the elements, drawn with libtorch's
/// generator: k' = max(1, floor(k * M / N)) of the M samples.
pub fn kth_smallest_sampled(x: &Tensor, k: i64, fraction: f64) -> Result<f64> {
    let n = x.numel() as i64;
    if !(fraction > 0.0 && fraction <= 1.0) {
        bail!("sample_fraction must be in (0, 1], got {fraction}");
    }
    let m = ((fraction * n as f64) as i64).max(1);
    let idx = Tensor::f_randint(n, [m], (Kind::Int64, x.device())).map_err(te)?;
    let sample = x.f_reshape([-1]).and_then(|f| f.f_index_select(0, &idx)).map_err(te)?;
    let kp = ((k as f64 * m as f64 / n as f64) as i64).max(1);
    kth_smallest(&sample, kp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kthvalue_including_negatives_and_ties() {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let cases = [
            Tensor::randn([10_000], opts),
            Tensor::rand([5_000], opts).f_mul_scalar(1e-6).unwrap(),
            Tensor::randint(5, [3_000], opts), // many ties
            Tensor::from_slice(&[-0.0f32, 0.0, -1e-30, 1e-30, f32::MIN_POSITIVE, -3.5, 2.0]),
        ];
        for x in cases {
            let n = x.numel() as i64;
            for k in [1, 2, n / 3, n / 2, n - 1, n] {
                let want = x.kthvalue(k, 0, false).0.double_value(&[]);
                let got = kth_smallest(&x, k).unwrap();
                assert_eq!(got, want, "k = {k} of {n}");
            }
        }
        assert!(kth_smallest(&Tensor::ones([3], opts), 4).is_err());
    }

    #[test]
    fn nan_ranks_largest_whatever_its_sign() {
        // 0.0 / 0.0 on x86 is a NaN with the sign bit set.
        let neg_nan = f32::from_bits(0xFFC0_0000);
        let x = Tensor::from_slice(&[1.0f32, neg_nan, 3.0, f32::NAN, -2.0, f32::INFINITY]);
        for k in 1..=6 {
            let want = x.kthvalue(k, 0, false).0.double_value(&[]);
            let got = kth_smallest(&x, k).unwrap();
            assert!(got == want || (got.is_nan() && want.is_nan()), "k = {k}: {got} vs kthvalue {want}");
        }
    }

    #[test]
    fn sampled_estimate_is_close() {
        tch::manual_seed(3);
        let x = Tensor::rand([200_000], (Kind::Float, Device::Cpu));
        let est = kth_smallest_sampled(&x, 100_000, 0.05).unwrap();
        assert!((est - 0.5).abs() < 0.02, "{est}");
    }
}
