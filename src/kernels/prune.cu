// Fused score + exact radix selection for pruning mask updates
// (src/kernels/prune.rs; docs/gpu.md "Mask update"). The host prepends
// `#define SCORE(w, m, v) <expression>` for the scorer in use.
//
// Keys are order-preserving: a float's bits with the sign bit set for
// positives and all bits flipped for negatives, so unsigned order is float
// order; -0 is keyed as +0 (they tie, and ties go in index order) and every
// NaN gets the largest key (as kthvalue and sort rank NaN).
// The selection finds the key of the k-th smallest element in three passes
// over 11, 11 and 10 bits; each pass is one histogram of the candidates'
// digit, and one warp picks the bin holding the k-th element.
//
// state (u64[4]): [0] the key bits found so far, [1] the rank still sought
// within them (1-based), [2] elements strictly below them, [3] elements in
// the chosen bin.
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define BINS 2048

__device__ __forceinline__ u32 key_of(float s) {
  if (s == 0.0f) s = 0.0f;  // -0 ties with +0, as float comparison has it
  u32 b = __float_as_uint(s);
  if (s != s) return 0xFFFFFFFFu;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Count `bin` once per group of lanes that share it: many scores crowd into
// a few bins, and one shared-memory atomic per group instead of per lane
// keeps those bins from serialising. Every lane of the warp calls it (loops
// run warp-uniform); lanes with nothing to count pass bin = BINS.
__device__ __forceinline__ void count(u32* h, u32 bin) {
  const u32 peers = __match_any_sync(0xffffffffu, bin);
  if (bin < BINS && (threadIdx.x & 31) == (u32)(__ffs(peers) - 1)) atomicAdd(&h[bin], (u32)__popc(peers));
}

__device__ __forceinline__ void flush(u32* h, u32* hist, int bins) {
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x)
    if (h[i]) atomicAdd(&hist[i], h[i]);
}

// Pass 1: score every element, rank pruned ones (live[i] == 0) below all
// others, write the keys and count their top 11 bits.
extern "C" __global__ void score_keys(const float* __restrict__ w, const float* __restrict__ m,
                                      const float* __restrict__ v, const unsigned char* __restrict__ live,
                                      u32* __restrict__ keys, i64 n, u32* __restrict__ hist) {
  __shared__ u32 h[BINS];
  for (int i = threadIdx.x; i < BINS; i += blockDim.x) h[i] = 0;
  __syncthreads();
  // The loop bound is the warp's first index, so all lanes iterate alike.
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 w0 = (i64)blockIdx.x * blockDim.x + (threadIdx.x & ~31); w0 < n; w0 += stride) {
    const i64 i = w0 + (threadIdx.x & 31);
    u32 bin = BINS;
    if (i < n) {
      float s = SCORE(w[i], m[i], v[i]);
      if (live != nullptr && live[i] == 0) s = __int_as_float(0xff800000);  // -inf
      const u32 k = key_of(s);
      keys[i] = k;
      bin = k >> 21;
    }
    count(h, bin);
  }
  flush(h, hist, BINS);
}

// Passes 2 and 3: count digit (key >> shift) & (2^bits - 1) of the keys
// whose bits above shift + bits equal the prefix found so far.
extern "C" __global__ void radix_pass(const u32* __restrict__ keys, i64 n, const u64* __restrict__ state,
                                      int shift, int bits, u32* __restrict__ hist) {
  __shared__ u32 h[BINS];
  for (int i = threadIdx.x; i < BINS; i += blockDim.x) h[i] = 0;
  __syncthreads();
  const u32 prefix = (u32)state[0];
  const int above = shift + bits;
  const u32 digit = (1u << bits) - 1u;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 w0 = (i64)blockIdx.x * blockDim.x + (threadIdx.x & ~31); w0 < n; w0 += stride) {
    const i64 i = w0 + (threadIdx.x & 31);
    u32 bin = BINS;
    if (i < n) {
      const u32 k = keys[i];
      if ((k >> above) == prefix) bin = (k >> shift) & digit;
    }
    count(h, bin);
  }
  flush(h, hist, 1 << bits);
}

// One warp: find the bin holding the state's k-th element and append it to
// the prefix. Each lane sums 2^bits / 32 bins; a warp scan gives the lane
// whose range holds the rank, and that lane walks its bins.
extern "C" __global__ void radix_find(const u32* __restrict__ hist, int bits, u64* __restrict__ state) {
  const int lane = threadIdx.x;
  const int per = (1 << bits) / 32;
  const u64 k = state[1];
  u64 sum = 0;
  for (int j = 0; j < per; j++) sum += hist[lane * per + j];
  u64 inc = sum;
  for (int o = 1; o < 32; o <<= 1) {
    u64 t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  __syncwarp();
  const u64 exc = inc - sum;
  if (exc < k && k <= inc) {
    u64 seen = exc;
    for (int j = 0; j < per; j++) {
      const u64 c = hist[lane * per + j];
      if (seen + c >= k) {
        state[0] = (state[0] << bits) | (u64)(lane * per + j);
        state[1] = k - seen;
        state[2] += seen;
        state[3] = c;
        break;
      }
      seen += c;
    }
  }
}

// keep[i] = key[i] > the selected key: prunes every element at or below it,
// and NaN (as "score > threshold" does).
extern "C" __global__ void keep_above(const u32* __restrict__ keys, i64 n, const u64* __restrict__ state,
                                      unsigned char* __restrict__ keep) {
  const u32 t = (u32)state[0];
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    keep[i] = keys[i] > t && keys[i] != 0xFFFFFFFFu;
}
