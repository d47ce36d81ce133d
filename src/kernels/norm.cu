// Residual add + layer norm for bf16 autocast (src/kernels/norm.rs; docs/gpu.md
// "Residual add and layer norm"). The source is compiled once per row width:
// norm.rs puts `#define COLS <C>` in front. One warp per row; lane l owns the
// float4 columns l, l + 32, ... of its row, so a row stays in registers
// between the two reductions.
//
// Forward: x1 = x + float(a) (the residual stream, float32), then
// y = bf16((x1 - mean) * rstd * w + b) with the biased variance, as
// libtorch's layer norm under autocast followed by the cast to bf16 that
// the next linear would make.
//
// Backward: with g = float(gy) and xhat = (x1 - mean) * rstd,
// gx = gx1 + rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)), written as
// float32 (to the residual stream) and as bf16 (to the branch a);
// gw and gb are summed per block into [blocks, C] partials.
typedef unsigned int u32;
typedef long long i64;

#define VEC (COLS / 4)
#define PER ((VEC + 31) / 32)

__device__ __forceinline__ float bf(u32 h) { return __uint_as_float(h << 16); }

// Round to nearest even, as a float -> bf16 cast does; NaN stays NaN.
__device__ __forceinline__ u32 to_bf(float f) {
  u32 b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (b >> 16) | 0x40u;
  b += 0x7fffu + ((b >> 16) & 1u);
  return b >> 16;
}

__device__ __forceinline__ float4 unpack(uint2 p) {
  return make_float4(bf(p.x & 0xffffu), bf(p.x >> 16), bf(p.y & 0xffffu), bf(p.y >> 16));
}

__device__ __forceinline__ uint2 pack(float4 v) {
  return make_uint2(to_bf(v.x) | (to_bf(v.y) << 16), to_bf(v.z) | (to_bf(v.w) << 16));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

extern "C" __global__ void add_ln_fwd(const float4* __restrict__ x, const uint2* __restrict__ a,
                                      const float4* __restrict__ w, const float4* __restrict__ b, float eps,
                                      i64 rows, float4* __restrict__ x1, uint2* __restrict__ y,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out) {
  const int lane = threadIdx.x & 31;
  const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps only: the row is the warp's
  const i64 base = row * VEC;
  float4 v[PER];
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < PER; i++) {
    const int j = lane + 32 * i;
    if (j < VEC) {
      const float4 xv = x[base + j];
      const float4 av = unpack(a[base + j]);
      v[i] = make_float4(xv.x + av.x, xv.y + av.y, xv.z + av.z, xv.w + av.w);
      x1[base + j] = v[i];
      s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
    }
  }
  const float mean = warp_sum(s) / COLS;
  float q = 0.0f;
#pragma unroll
  for (int i = 0; i < PER; i++) {
    if (lane + 32 * i < VEC) {
      const float dx = v[i].x - mean, dy = v[i].y - mean, dz = v[i].z - mean, dw = v[i].w - mean;
      q += (dx * dx + dy * dy) + (dz * dz + dw * dw);
    }
  }
  const float rstd = rsqrtf(warp_sum(q) / COLS + eps);
#pragma unroll
  for (int i = 0; i < PER; i++) {
    const int j = lane + 32 * i;
    if (j < VEC) {
      const float4 g = w[j];
      const float4 c = b ? b[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      float4 o;
      o.x = (v[i].x - mean) * rstd * g.x + c.x;
      o.y = (v[i].y - mean) * rstd * g.y + c.y;
      o.z = (v[i].z - mean) * rstd * g.z + c.z;
      o.w = (v[i].w - mean) * rstd * g.w + c.w;
      y[base + j] = pack(o);
    }
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// WARPS warps per block (norm.rs launches 32 * WARPS threads); the block's
// warps take rows blockIdx.x * WARPS + warp, then every gridDim.x * WARPS.
#define WARPS 4

extern "C" __global__ void add_ln_bwd(const float4* __restrict__ gx1, const uint2* __restrict__ gy,
                                      const float4* __restrict__ x1, const float4* __restrict__ w,
                                      const float* __restrict__ mean, const float* __restrict__ rstd, i64 rows,
                                      float4* __restrict__ gx, uint2* __restrict__ ga, float* __restrict__ gw_part,
                                      float* __restrict__ gb_part) {
  __shared__ float red[WARPS * COLS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float4 gw_acc[PER], gb_acc[PER];
#pragma unroll
  for (int i = 0; i < PER; i++) {
    gw_acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    gb_acc[i] = gw_acc[i];
  }
  for (i64 row = (i64)blockIdx.x * WARPS + warp; row < rows; row += (i64)gridDim.x * WARPS) {
    const i64 base = row * VEC;
    const float m = mean[row], r = rstd[row];
    float4 g[PER], h[PER];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; i++) {
      const int j = lane + 32 * i;
      if (j < VEC) {
        const float4 gv = unpack(gy[base + j]);
        const float4 xv = x1[base + j];
        const float4 wv = w[j];
        h[i] = make_float4((xv.x - m) * r, (xv.y - m) * r, (xv.z - m) * r, (xv.w - m) * r);
        gw_acc[i].x += gv.x * h[i].x;
        gw_acc[i].y += gv.y * h[i].y;
        gw_acc[i].z += gv.z * h[i].z;
        gw_acc[i].w += gv.w * h[i].w;
        gb_acc[i].x += gv.x;
        gb_acc[i].y += gv.y;
        gb_acc[i].z += gv.z;
        gb_acc[i].w += gv.w;
        g[i] = make_float4(gv.x * wv.x, gv.y * wv.y, gv.z * wv.z, gv.w * wv.w);
        s1 += (g[i].x + g[i].y) + (g[i].z + g[i].w);
        s2 += (g[i].x * h[i].x + g[i].y * h[i].y) + (g[i].z * h[i].z + g[i].w * h[i].w);
      }
    }
    const float c1 = warp_sum(s1) / COLS, c2 = warp_sum(s2) / COLS;
#pragma unroll
    for (int i = 0; i < PER; i++) {
      const int j = lane + 32 * i;
      if (j < VEC) {
        float4 d;
        d.x = r * (g[i].x - c1 - h[i].x * c2);
        d.y = r * (g[i].y - c1 - h[i].y * c2);
        d.z = r * (g[i].z - c1 - h[i].z * c2);
        d.w = r * (g[i].w - c1 - h[i].w * c2);
        if (gx1) {
          const float4 u = gx1[base + j];
          d.x += u.x;
          d.y += u.y;
          d.z += u.z;
          d.w += u.w;
        }
        gx[base + j] = d;
        ga[base + j] = pack(d);
      }
    }
  }
  // The block's column sums of gw, then of gb: each warp's row of `red`,
  // then one thread per column adds the warps' values in a fixed order.
  for (int pass = 0; pass < 2; pass++) {
    float* part = pass == 0 ? gw_part : gb_part;
#pragma unroll
    for (int i = 0; i < PER; i++) {
      const int j = lane + 32 * i;
      if (j < VEC) {
        const float4 v = pass == 0 ? gw_acc[i] : gb_acc[i];
        float* dst = red + warp * COLS + 4 * j;
        dst[0] = v.x;
        dst[1] = v.y;
        dst[2] = v.z;
        dst[3] = v.w;
      }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < COLS; c += blockDim.x) {
      float t = 0.0f;
      for (int k = 0; k < WARPS; k++) t += red[k * COLS + c];
      part[(i64)blockIdx.x * COLS + c] = t;
    }
    __syncthreads();
  }
}
