// One decode token of an absorbed MLA layer over its latent cache, bf16
// (src/kernels/mla.rs; docs/attention.md "Fused absorbed decode"). The host
// prepends R (latent width), DR (RoPE width, 0 without decoupled RoPE) and
// H (heads); K = R + DR is a cache row's width.
//
// mla_row: from the folded input projection's output row [a | q_r | k_r | c]
// build the query rows [a_h ; rope(q_r,h)] and write the cache row
// [c ; rope(k_r)] at the device position. mla_attend: per (batch, split of
// the rows), per head one warp, the online softmax over the split's rows
// <= pos and the weighted sum of their first R columns. mla_combine: the
// splits merged into the mixed latent [B, H, R].
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
#define K (R + DR)
#define KE ((K + 31) / 32)
#define RE ((R + 31) / 32)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float f(u16 x) { return __uint_as_float(((u32)x) << 16); }

__device__ __forceinline__ u16 bf(float v) {
  u32 b = __float_as_uint(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return (u16)(b >> 16);
}

#if DR > 0
// rotate_half RoPE of element i of x (DR wide) with the table row cs
// ([cos ; sin with its first half negated], 2·DR values).
__device__ __forceinline__ u16 rot(const u16* x, const u16* cs, int i) {
  return bf(f(x[i]) * f(cs[i]) + f(x[(i + DR / 2) % DR]) * f(cs[DR + i]));
}
#else
__device__ __forceinline__ u16 rot(const u16*, const u16*, int) { return 0; }
#endif

// Grid: B blocks. out [B, n_out]; cs [cap, 2, DR]; qq [B, H, K]; slot [B, S, K].
extern "C" __global__ void mla_row(const u16* __restrict__ out, i64 n_out, const u16* __restrict__ cs,
                                   i64 cap, const i64* __restrict__ pos, u16* __restrict__ qq,
                                   u16* __restrict__ slot, i64 S) {
  const i64 b = blockIdx.x;
  const i64 p = pos[0];
  const u16* o = out + b * n_out;
  const u16* a = o;
  const u16* qr = o + H * R;
  const u16* kr = qr + H * DR;
  const u16* c = kr + DR;
  const bool in_table = p >= 0 && p < cap;
  const u16* row_cs = cs + (in_table ? p : 0) * 2 * DR;
  for (int i = threadIdx.x; i < H * K; i += blockDim.x) {
    const int h = i / K, j = i % K;
    qq[(b * H + h) * K + j] = j < R ? a[h * R + j] : rot(qr + h * DR, row_cs, j - R);
  }
  if (p < 0 || p >= S || !in_table) return;  // never written out of the slot
  u16* dst = slot + (b * S + p) * K;
  for (int j = threadIdx.x; j < K; j += blockDim.x) dst[j] = j < R ? c[j] : rot(kr, row_cs, j - R);
}

// Grid: (splits, B); block: 32·H threads, which the launch bounds make
// ptxas fit in the register file for any H. Partials per (b, h, split):
// max m, sum l, and the R weighted sums.
extern "C" __global__ void __launch_bounds__(32 * H) mla_attend(const u16* __restrict__ qq, const u16* __restrict__ slot,
                                      const i64* __restrict__ pos, i64 S, int chunk, float scale,
                                      float* __restrict__ pm, float* __restrict__ pl,
                                      float* __restrict__ pacc) {
  const int split = blockIdx.x, splits = gridDim.x;
  const i64 b = blockIdx.y;
  const int h = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float q[KE];
#pragma unroll
  for (int e = 0; e < KE; e++) {
    const int j = lane + 32 * e;
    q[e] = j < K ? f(qq[(b * H + h) * K + j]) * scale : 0.0f;
  }
  const i64 valid = pos[0] + 1 < S ? pos[0] + 1 : S;
  const i64 start = (i64)split * chunk;
  const i64 end = start + chunk < valid ? start + chunk : valid;
  float m = NEG_INF, l = 0.0f, acc[RE];
#pragma unroll
  for (int e = 0; e < RE; e++) acc[e] = 0.0f;
  for (i64 t = start; t < end; t++) {
    const u16* k = slot + (b * S + t) * K;
    float v[KE];
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < KE; e++) {
      const int j = lane + 32 * e;
      v[e] = j < K ? f(k[j]) : 0.0f;
      s += q[e] * v[e];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float mn = fmaxf(m, s);
    const float corr = expf(m - mn), pr = expf(s - mn);
    l = l * corr + pr;
#pragma unroll
    for (int e = 0; e < RE; e++) acc[e] = acc[e] * corr + (lane + 32 * e < R ? pr * v[e] : 0.0f);
    m = mn;
  }
  const i64 at = (b * H + h) * splits + split;
  if (lane == 0) {
    pm[at] = m;
    pl[at] = l;
  }
#pragma unroll
  for (int e = 0; e < RE; e++) {
    const int j = lane + 32 * e;
    if (j < R) pacc[at * R + j] = acc[e];
  }
}

// Grid: B·H blocks; block: R threads (R <= 1024). mixed [B, H, R] bf16.
extern "C" __global__ void mla_combine(const float* __restrict__ pm, const float* __restrict__ pl,
                                       const float* __restrict__ pacc, int splits,
                                       u16* __restrict__ mixed) {
  const i64 bh = blockIdx.x;
  const int j = threadIdx.x;
  float mx = NEG_INF;
  for (int i = 0; i < splits; i++) mx = fmaxf(mx, pm[bh * splits + i]);
  float l = 0.0f, o = 0.0f;
  for (int i = 0; i < splits; i++) {
    const float m = pm[bh * splits + i];
    if (m == NEG_INF) continue;  // a split with no row <= pos
    const float w = expf(m - mx);
    l += w * pl[bh * splits + i];
    o += w * pacc[(bh * splits + i) * R + j];
  }
  if (j < R) mixed[bh * R + j] = bf(o / l);
}
