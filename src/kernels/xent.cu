// Softmax cross-entropy over one chunk of bf16 logits, in place
// (src/kernels/xent.rs; docs/gpu.md "The language-model loss"). One block
// per row: a pass for the row's max and sum of exponentials (online, in
// float32), then a pass that overwrites the logits with the row's weighted
// gradient w · (softmax − onehot(y)) in bf16 and stores the row's loss
// −w · log_softmax[y]. Rows are read as pairs of bf16 (the row length must
// be even, so every row starts 4-byte aligned).
typedef unsigned int u32;
typedef long long i64;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float lo(u32 p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float hi(u32 p) { return __uint_as_float(p & 0xffff0000u); }

// Round to nearest even, as a float -> bf16 cast does; NaN stays NaN.
__device__ __forceinline__ u32 bf16(float f) {
  u32 b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (b >> 16) | 0x40u;
  b += 0x7fffu + ((b >> 16) & 1u);
  return b >> 16;
}

// (m, s): running max and sum of exp(x - m); -inf with 0 is empty.
__device__ __forceinline__ void add(float& m, float& s, float x) {
  if (x == NEG_INF) return;  // exp(-inf) adds nothing (and -inf - -inf is NaN)
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (m2 == NEG_INF) return;
  if (m == NEG_INF) {
    m = m2;
    s = s2;
    return;
  }
  const float n = fmaxf(m, m2);
  s = s * expf(m - n) + s2 * expf(m2 - n);
  m = n;
}

extern "C" __global__ void xent_bf16(u32* __restrict__ logits, i64 half_v, const i64* __restrict__ y,
                                     const float* __restrict__ w, float* __restrict__ loss) {
  __shared__ float sm[32], ss[32];
  const i64 row = blockIdx.x;
  u32* z = logits + row * half_v;
  float m = NEG_INF, s = 0.0f;
  for (i64 j = threadIdx.x; j < half_v; j += blockDim.x) {
    const u32 p = z[j];
    add(m, s, lo(p));
    add(m, s, hi(p));
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? sm[lane] : NEG_INF;
    s = lane < warps ? ss[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge(m, s, m2, s2);
    }
    if (lane == 0) {
      sm[0] = m;
      ss[0] = s;
    }
  }
  __syncthreads();
  const float lse = sm[0] + logf(ss[0]);
  const float wr = w[row];
  // -1: ignored (weight 0, no one-hot). Any other id outside the row is
  // never read: the row's loss is NaN (the host checks ids beforehand).
  const i64 t = y[row];
  const bool ok = t >= 0 && t < 2 * half_v;
  if (threadIdx.x == 0) {
    float l = 0.0f;
    if (ok) {
      const u32 p = z[t >> 1];
      l = -wr * (((t & 1) ? hi(p) : lo(p)) - lse);
    } else if (t != -1) {
      l = __int_as_float(0x7fc00000);
    }
    loss[row] = l;
  }
  __syncthreads();  // the target's logit is read before it is overwritten
  for (i64 j = threadIdx.x; j < half_v; j += blockDim.x) {
    const u32 p = z[j];
    float g0 = expf(lo(p) - lse), g1 = expf(hi(p) - lse);
    if (2 * j == t) g0 -= 1.0f;
    if (2 * j + 1 == t) g1 -= 1.0f;
    z[j] = bf16(wr * g0) | (bf16(wr * g1) << 16);
  }
}
