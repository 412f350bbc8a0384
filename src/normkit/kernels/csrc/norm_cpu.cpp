// normkit's fused CPU kernels for the norms of normkit::norm (see normkit/kernels/__init__.py).
//
// Built on the LibTorch stable ABI (STABLE_TORCH_LIBRARY, torch::stable::parallel_for): one build
// works across torch versions that share the ABI. The kernels only read and write memory the caller
// allocated; Python checks shapes, layouts and dtypes and keeps the contract of normkit.ops.core.
//
// Every norm here is one of five memory patterns of an (N, C, S) tensor (S = product of the spatial
// dims), with an optional per-channel affine:
//   0 BATCH_NCHW   (N, C, S) memory, one set per channel        (BatchNorm)
//   1 BATCH_CL     (N, S, C) memory, one set per channel        (BatchNorm channels_last, BatchNorm1d)
//   2 GROUP_NCHW   (N, C, S) memory, one set per (n, group)     (GroupNorm, InstanceNorm, LN over C,H,W,
//                                                                 LN over a last dim: S = 1)
//   3 GROUP_CL     (N, S, C) memory, one set per (n, group)     (the same, channels_last)
//   4 CHANNEL_NCHW (N, C, S) memory, one set per (n, s)         (LayerNorm2d over C on NCHW)
//
// Statistics: each set is read in cache-sized chunks; a chunk's moments are two-pass (a rough mean,
// then sums of deviations from it, the second pass from L1) and chunks merge exactly (Chan et al.),
// so the input is read from memory once for the statistics. Partial sums are kept in lanes of the
// compute type (float for float/half/bfloat16, double for double) for a bounded number of elements
// and flushed into double accumulators. A set whose statistics cannot be stored exactly in the
// float32 statistics format (a non-finite input or variance, a variance below 2^-100 that eps does
// not dominate) clears the `ok` flag: the caller then recomputes the call with the scaled reference.
//
// The saved statistics follow normkit.ops.core: rows (shift, inv, cmean, rstd, var, count), here with
// shift = the mean rounded to the statistics dtype, inv = 1, cmean = the rounding residual.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using torch::stable::Tensor;

namespace {

enum Mode : int64_t { BATCH_NCHW = 0, BATCH_CL = 1, GROUP_NCHW = 2, GROUP_CL = 3, CHANNEL_NCHW = 4 };

#ifndef NK_LANES
#define NK_LANES 32
#define NK_FLUSH 2048
#define NK_CHUNK 8192
#define NK_ROWS 64
#endif
constexpr int LANES = NK_LANES;        // independent partial sums per accumulator
constexpr int64_t FLUSH = NK_FLUSH;    // elements summed in the compute type before a flush into double
constexpr int64_t CHUNK = NK_CHUNK;    // elements of a contiguous chunk (32 KB of float: L1 / L2)
constexpr int64_t ROWS = NK_ROWS;      // rows per chunk of the channels-last patterns (flushed per chunk)

// Minimum elements per parallel task: a small input runs on the calling thread (waking the pool
// costs more than its arithmetic).
constexpr int64_t GRAIN = 32768;
inline int64_t grain(int64_t per_item) { return std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, per_item)); }

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

// Loads and stores in the compute type. bfloat16 <-> float by bit operations the compiler vectorises
// (c10::BFloat16's own conversion does not vectorise here); round to nearest even, NaN kept quiet.
template <typename O, typename T>
inline O cv(T v) {
  return static_cast<O>(v);
}
template <>
inline float cv<float, c10::BFloat16>(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename T, typename O>
inline T to(O v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 to<c10::BFloat16, float>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

// ---- moments -------------------------------------------------------------------------------

struct Mom {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  // Merge a chunk of n values whose deviations d = x - shift sum to s1 and square-sum to s2.
  inline void add_shifted(double cn, double shift, double s1, double s2) {
    if (cn <= 0) return;
    double mu = s1 / cn;
    double cm2 = std::max(s2 - s1 * mu, 0.0);
    double cmean = shift + mu;
    if (n == 0) { n = cn; mean = cmean; m2 = cm2; return; }
    double tot = n + cn, delta = cmean - mean;
    mean += delta * (cn / tot);
    m2 += cm2 + delta * delta * (n * (cn / tot));
    n = tot;
  }
  inline void add(const Mom& o) {
    if (o.n > 0) add_shifted(o.n, o.mean, 0.0, o.m2);
  }
};

// Sum of a contiguous run (the rough mean of a chunk: float partial sums over the whole chunk).
template <typename T, typename O>
inline double run_sum(const T* p, int64_t len) {
  O a[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= len; i += LANES) {
#pragma omp simd
    for (int j = 0; j < LANES; ++j) a[j] += cv<O>(p[i + j]);
  }
  double s = 0.0;
  for (int j = 0; j < LANES; ++j) s += a[j];
  for (; i < len; ++i) s += cv<O>(p[i]);
  return s;
}

// Sums of u = x - m and v = u^2 (DEV), or of u = dy and v = dy * (x - m) (DSUMS), over a contiguous run:
// partial sums in the compute type O for up to FLUSH elements per lane, then added lane-wise into
// double lanes (no serial dependency chain per flush).
// Double lane accumulators shared by the runs of one set: reduced once, at the end.
struct Lanes {
  double d1[LANES] = {}, d2[LANES] = {};
  void total(double& s1, double& s2) const {
    for (int j = 0; j < LANES; ++j) {
      s1 += d1[j];
      s2 += d2[j];
    }
  }
};

template <bool DSUMS, typename T, typename O>
inline void run_pair_lanes(const T* x, const T* dy, int64_t len, O m, Lanes& acc) {
  int64_t i = 0;
  while (i + LANES <= len) {
    O a1[LANES] = {}, a2[LANES] = {};
    int64_t stop = std::min(len - (len - i) % LANES, i + FLUSH);
    for (; i < stop; i += LANES) {
#pragma omp simd
      for (int j = 0; j < LANES; ++j) {
        O d = cv<O>(x[i + j]) - m;
        if constexpr (DSUMS) {
          O g = cv<O>(dy[i + j]);
          a1[j] += g;
          a2[j] += g * d;
        } else {
          a1[j] += d;
          a2[j] += d * d;
        }
      }
    }
#pragma omp simd
    for (int j = 0; j < LANES; ++j) {
      acc.d1[j] += a1[j];
      acc.d2[j] += a2[j];
    }
  }
  for (int j = 0; i < len; ++i, ++j) {  // the tail, spread over the lanes
    O d = cv<O>(x[i]) - m;
    if constexpr (DSUMS) {
      O g = cv<O>(dy[i]);
      acc.d1[j] += g;
      acc.d2[j] += static_cast<double>(g) * d;
    } else {
      acc.d1[j] += d;
      acc.d2[j] += static_cast<double>(d) * d;
    }
  }
}

template <bool DSUMS, typename T, typename O>
inline void run_pair(const T* x, const T* dy, int64_t len, O m, double& s1, double& s2) {
  Lanes acc;
  run_pair_lanes<DSUMS, T, O>(x, dy, len, m, acc);
  acc.total(s1, s2);
}

template <typename T, typename O>
inline void run_dev(const T* p, int64_t len, O m, double& s1, double& s2) {
  run_pair<false, T, O>(p, p, len, m, s1, s2);
}

constexpr int64_t SHORT = 2048;

// Two-pass moments of one short contiguous set (from L1): 32 lanes (four independent vector chains:
// one chain alone is latency-bound), reduced once.
template <typename T, typename O>
inline Mom short_moments(const T* p, int64_t len) {
  constexpr int L = 32;
  const int64_t body = len - len % L;
  O a[L] = {};
  for (int64_t i = 0; i < body; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) a[j] += cv<O>(p[i + j]);
  }
  const int64_t body8 = len - len % 8;
  for (int64_t i = body; i < body8; i += 8) {
#pragma omp simd
    for (int j = 0; j < 8; ++j) a[j] += cv<O>(p[i + j]);
  }
  O s = 0;
  for (int64_t k = body8; k < len; ++k) s += cv<O>(p[k]);
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  const O m = (a[0] + s) / static_cast<O>(len);
  O u[L] = {}, v[L] = {};
  for (int64_t i = 0; i < body; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      O d = cv<O>(p[i + j]) - m;
      u[j] += d;
      v[j] += d * d;
    }
  }
  for (int64_t i = body; i < body8; i += 8) {
#pragma omp simd
    for (int j = 0; j < 8; ++j) {
      O d = cv<O>(p[i + j]) - m;
      u[j] += d;
      v[j] += d * d;
    }
  }
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) {
      u[j] += u[j + w];
      v[j] += v[j + w];
    }
  O t1 = 0, t2 = 0;
  for (int64_t i = body8; i < len; ++i) {
    O d = cv<O>(p[i]) - m;
    t1 += d;
    t2 += d * d;
  }
  double s1 = static_cast<double>(u[0]) + t1, s2 = static_cast<double>(v[0]) + t2;
  Mom mo;
  mo.add_shifted(static_cast<double>(len), static_cast<double>(m), s1, s2);
  return mo;
}

// Two-pass moments of a short set of `nruns` runs of `len` values, `stride` apart (8 lanes, no flushes:
// the per-set cost of the lane accumulators would exceed the arithmetic).
template <typename T, typename O>
inline Mom short_runs_moments(const T* p, int64_t nruns, int64_t len, int64_t stride) {
  O a[8] = {};
  O tail = 0;
  for (int64_t r = 0; r < nruns; ++r) {
    const T* q = p + r * stride;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
#pragma omp simd
      for (int j = 0; j < 8; ++j) a[j] += cv<O>(q[i + j]);
    }
    for (; i < len; ++i) tail += cv<O>(q[i]);
  }
  const double n = static_cast<double>(nruns * len);
  const O m = static_cast<O>(
      static_cast<double>((((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) + tail) / n);
  O u[8] = {}, v[8] = {};
  double s1 = 0.0, s2 = 0.0;
  for (int64_t r = 0; r < nruns; ++r) {
    const T* q = p + r * stride;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
#pragma omp simd
      for (int j = 0; j < 8; ++j) {
        O d = cv<O>(q[i + j]) - m;
        u[j] += d;
        v[j] += d * d;
      }
    }
    for (; i < len; ++i) {
      O d = cv<O>(q[i]) - m;
      s1 += d;
      s2 += static_cast<double>(d) * d;
    }
  }
  for (int j = 0; j < 8; ++j) {
    s1 += u[j];
    s2 += v[j];
  }
  Mom mo;
  mo.add_shifted(n, static_cast<double>(m), s1, s2);
  return mo;
}

template <typename T, typename O>
inline Mom set_moments(const T* p, int64_t nruns, int64_t len, int64_t stride) {
  if (nruns == 1 && len >= 128 && len <= SHORT) return short_moments<T, O>(p, len);
  if (nruns * len <= SHORT) return short_runs_moments<T, O>(p, nruns, len, stride);
  const int64_t probe = std::min<int64_t>(len, 256);
  O m = static_cast<O>(run_sum<T, O>(p, probe) / static_cast<double>(probe));
  double s1 = 0.0, s2 = 0.0;
  {
    Lanes acc;
    for (int64_t r = 0; r < nruns; ++r) run_pair_lanes<false, T, O>(p + r * stride, p, len, m, acc);
    acc.total(s1, s2);
  }
  const double n = static_cast<double>(nruns * len);
  const double mu = s1 / n;
  if (mu * mu * n > s2 - s1 * mu) {  // z > 1
    m = static_cast<O>(static_cast<double>(m) + mu);
    s1 = s2 = 0.0;
    Lanes acc;
    for (int64_t r = 0; r < nruns; ++r) run_pair_lanes<false, T, O>(p + r * stride, p, len, m, acc);
    acc.total(s1, s2);
  }
  Mom mo;
  mo.add_shifted(n, static_cast<double>(m), s1, s2);
  return mo;
}

// u[j] += d and v[j] += d^2, d = x - m[j], over `nr` rows of the CB columns from c0 (row stride `ld`)
template <int64_t CB, typename T, typename O>
inline void block_dev_sums(const T* q, int64_t nr, int64_t c0, int64_t ld, const O* m, O* u, O* v) {
  for (int64_t r = 0; r < nr; ++r) {
    const T* row = q + r * ld + c0;
#pragma omp simd
    for (int j = 0; j < CB; ++j) {
      O d = cv<O>(row[j]) - m[j];
      u[j] += d;
      v[j] += d * d;
    }
  }
}

// Per-column sums of d = x - shift[c] and d^2 over `nr` rows of the CB columns from c0 (row stride `ld`),
// in registers, added into the double sums s1, s2.
template <int64_t CB, typename T, typename O>
inline void cols_block(const T* q, int64_t nr, int64_t c0, int64_t ld, const O* shift, double* s1, double* s2) {
  O sh[CB], u[CB] = {}, v[CB] = {};
#pragma omp simd
  for (int j = 0; j < CB; ++j) sh[j] = shift[c0 + j];
  block_dev_sums<CB, T, O>(q, nr, c0, ld, sh, u, v);
#pragma omp simd
  for (int j = 0; j < CB; ++j) {
    s1[c0 + j] += u[j];
    s2[c0 + j] += v[j];
  }
}

// Per-column sums of d = x - shift[c] and d^2 over `rows` rows of `cols` contiguous values (row stride
// `ld`), added into the double sums s1, s2; register blocks of 64 columns, then 32, partial sums per
// ROWS rows. Blocks of 64 walk each row's 256 bytes at once: the channels-last statistics pass at
// (32, 64, 56, 56) with cold inputs took 0.63x (BatchNorm) and 0.81x (GroupNorm) the forward's time of
// blocks of 32, which read half of every row per walk down the chunk (`ab_kernels.py --rotate 4`).
template <typename T, typename O>
inline void cols_sums(const T* p, int64_t rows, int64_t cols, int64_t ld, const O* shift, double* s1, double* s2) {
  for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
    const int64_t nr = std::min(ROWS, rows - r0);
    const T* q = p + r0 * ld;
    int64_t c0 = 0;
    for (; c0 + 64 <= cols; c0 += 64) cols_block<64, T, O>(q, nr, c0, ld, shift, s1, s2);
    for (; c0 + 32 <= cols; c0 += 32) cols_block<32, T, O>(q, nr, c0, ld, shift, s1, s2);
    for (int64_t r = 0; r < nr; ++r) {  // the remaining columns
      const T* row = q + r * ld;
      for (int64_t c = c0; c < cols; ++c) {
        O d = cv<O>(row[c]) - shift[c];
        s1[c] += d;
        s2[c] += static_cast<double>(d) * d;
      }
    }
  }
}

// Per-column moments of `rows` rows in one pass about the first rows' column means (again about the
// column mean for the columns where that shift was more than one standard deviation off).
template <typename T, typename O>
inline void cols_moments1(const T* p, int64_t rows, int64_t cols, int64_t ld, Mom* out, std::vector<O>& shift,
                          std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t probe = std::min<int64_t>(rows, 16);
  std::fill(s1.begin(), s1.begin() + cols, 0.0);
  for (int64_t r = 0; r < probe; ++r) {
    const T* row = p + r * ld;
    double* S1 = s1.data();
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) S1[c] += static_cast<double>(cv<O>(row[c]));
  }
  for (int64_t c = 0; c < cols; ++c) {
    shift[c] = cv<O>(s1[c] / static_cast<double>(probe));
    s1[c] = 0.0;
    s2[c] = 0.0;
  }
  cols_sums<T, O>(p, rows, cols, ld, shift.data(), s1.data(), s2.data());
  const double n = static_cast<double>(rows);
  bool again = false;
  for (int64_t c = 0; c < cols; ++c) {
    const double mu = s1[c] / n;
    if (mu * mu * n > s2[c] - s1[c] * mu) {
      again = true;
      break;
    }
  }
  if (again) {
    for (int64_t c = 0; c < cols; ++c) {
      shift[c] = static_cast<O>(static_cast<double>(shift[c]) + s1[c] / n);
      s1[c] = 0.0;
      s2[c] = 0.0;
    }
    cols_sums<T, O>(p, rows, cols, ld, shift.data(), s1.data(), s2.data());
  }
  for (int64_t c = 0; c < cols; ++c) {
    Mom mo;
    mo.add_shifted(n, static_cast<double>(shift[c]), s1[c], s2[c]);
    out[c] = mo;
  }
}

// Running per-column moments: all columns share the count, so merging a chunk is one vector loop.
struct ColMoments {
  double n = 0.0;
  std::vector<double> mean, m2;
  explicit ColMoments(int64_t cols = 0) : mean(cols, 0.0), m2(cols, 0.0) {}
  // a chunk of cn rows: per column shift m, sums a1 = sum (x - m), a2 = sum (x - m)^2
  template <typename O>
  void add(double cn, int64_t cols, const O* m, const O* a1, const O* a2) {
    const double f = cn / (n + cn), h = n * f, icn = 1.0 / cn;
    double* M = mean.data();
    double* Q = m2.data();
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      double s1 = a1[j], mu = s1 * icn;
      double c2 = static_cast<double>(a2[j]) - s1 * mu;
      c2 = c2 > 0.0 ? c2 : 0.0;
      double d = (static_cast<double>(m[j]) + mu) - M[j];
      M[j] += d * f;
      Q[j] += c2 + d * d * h;
    }
    n += cn;
  }
  Mom col(int64_t j) const { return Mom{n, mean[j], m2[j]}; }
};

// Per-column moments of `rows` rows of `cols` contiguous values (row stride `ld`), chunk by chunk of
// ROWS rows (two passes over each chunk, the second from cache), merged into cm.
template <typename T, typename O>
inline void cols_moments(const T* p, int64_t rows, int64_t cols, int64_t ld, ColMoments& cm, std::vector<O>& a1,
                         std::vector<O>& a2, std::vector<O>& m) {
  constexpr int64_t CB = 32;  // columns per register block
  for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
    int64_t nr = std::min(ROWS, rows - r0);
    const T* q = p + r0 * ld;
    O* A1 = a1.data();
    O* A2 = a2.data();
    O* M = m.data();
    const O inr = O(1) / static_cast<O>(nr);
    int64_t c0 = 0;
    for (; c0 + CB <= cols; c0 += CB) {  // register blocks: both passes over the chunk's rows
      O s0[CB] = {}, s1[CB] = {};  // two rows at a time: two independent dependency chains
      int64_t r = 0;
      for (; r + 1 < nr; r += 2) {
        const T* row = q + r * ld + c0;
#pragma omp simd
        for (int j = 0; j < CB; ++j) {
          s0[j] += cv<O>(row[j]);
          s1[j] += cv<O>(row[ld + j]);
        }
      }
      if (r < nr) {
        const T* row = q + r * ld + c0;
#pragma omp simd
        for (int j = 0; j < CB; ++j) s0[j] += cv<O>(row[j]);
      }
      O mm[CB], u[CB] = {}, v[CB] = {};
#pragma omp simd
      for (int j = 0; j < CB; ++j) mm[j] = (s0[j] + s1[j]) * inr;
      block_dev_sums<CB, T, O>(q, nr, c0, ld, mm, u, v);
      for (int j = 0; j < CB; ++j) {
        M[c0 + j] = mm[j];
        A1[c0 + j] = u[j];
        A2[c0 + j] = v[j];
      }
    }
    if (c0 < cols) {  // the remaining columns
      std::fill(A1 + c0, A1 + cols, O(0));
      for (int64_t r = 0; r < nr; ++r) {
        const T* row = q + r * ld;
#pragma omp simd
        for (int64_t c = c0; c < cols; ++c) A1[c] += cv<O>(row[c]);
      }
#pragma omp simd
      for (int64_t c = c0; c < cols; ++c) {
        M[c] = A1[c] * inr;
        A1[c] = O(0);
        A2[c] = O(0);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const T* row = q + r * ld;
#pragma omp simd
        for (int64_t c = c0; c < cols; ++c) {
          O d = cv<O>(row[c]) - M[c];
          A1[c] += d;
          A2[c] += d * d;
        }
      }
    }
    cm.add<O>(static_cast<double>(nr), cols, M, A1, A2);
  }
}

// ---- per-set finalisation --------------------------------------------------------------------

template <typename O>
struct SetStats {
  O shift;   // the mean, rounded
  double cm; // mean - shift
  double rstd;
};

// Store one set's statistics (rows of `st`, nsets columns) and return them; clears ok on failure.
template <typename O>
inline SetStats<O> finish_stats(double mean, double var, double rstd, double n, double eps, O* st, int64_t nsets,
                                int64_t k, int32_t* ok) {
  O shift = static_cast<O>(mean);
  double cm = mean - static_cast<double>(shift);
  O var_o = static_cast<O>(var);
  constexpr bool is_double = sizeof(O) == 8;
  const double tiny = is_double ? std::ldexp(1.0, -900) : std::ldexp(1.0, -100);
  bool good = std::isfinite(var_o) && std::isfinite(mean) && std::isfinite(rstd) &&
              (var >= tiny || eps >= tiny * std::ldexp(1.0, 40));
  if (!good) __atomic_store_n(ok, 0, __ATOMIC_RELAXED);
  st[0 * nsets + k] = shift;
  st[1 * nsets + k] = O(1);
  st[2 * nsets + k] = static_cast<O>(cm);
  st[3 * nsets + k] = static_cast<O>(rstd);
  st[4 * nsets + k] = var_o;
  st[5 * nsets + k] = static_cast<O>(n);
  return {shift, cm, rstd};
}

// Store one set's statistics (rows of `st`, nsets columns) and return them; clears ok on failure.
template <typename O>
inline SetStats<O> finish_set(const Mom& mo, double eps, O* st, int64_t nsets, int64_t k, int32_t* ok) {
  double var = mo.m2 / mo.n;
  return finish_stats<O>(mo.mean, var, 1.0 / std::sqrt(var + eps), mo.n, eps, st, nsets, k, ok);
}

// y = (x - shift) * A + B over a contiguous run
template <typename T, typename O>
inline void run_apply(const T* x, T* y, int64_t len, O shift, O A, O B) {
#ifdef NO_APPLY
  return;
#endif
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) y[i] = to<T>((cv<O>(x[i]) - shift) * A + B);
}

// y[c] = (x[c] - sh[c]) * A[c] + B[c] over a row
template <typename T, typename O>
inline void row_apply(const T* x, T* y, int64_t len, const O* sh, const O* A, const O* B) {
#ifdef NO_APPLY
  return;
#endif
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) y[i] = to<T>((cv<O>(x[i]) - sh[i]) * A[i] + B[i]);
}

template <typename O>
inline void affine_coef(const SetStats<O>& s, const O* w, const O* b, int64_t c, O& A, O& B) {
  double wc = w ? static_cast<double>(w[c]) : 1.0;
  double bc = b ? static_cast<double>(b[c]) : 0.0;
  double a = s.rstd * wc;
  A = static_cast<O>(a);
  B = static_cast<O>(bc - s.cm * a);
}

// Per-set coefficients of dx = a_c * dy + bx * (x - shift) + cc, with a_c = w[c] * tr.
struct BackCoef {
  double tr, bx, cc;
};

template <typename O>
inline BackCoef back_coef_n(const O* st, int64_t nsets, int64_t k, double g_sum, double gd_sum, double invn) {
  // g_sum = sum_c w_c * sum dy, gd_sum = sum_c w_c * sum dy * d (d = (x - shift) * inv)
  double inv = st[nsets + k], cm = st[2 * nsets + k], rstd = st[3 * nsets + k];
  double gx_sum = (gd_sum - cm * g_sum) * rstd;  // sum g * x_hat
  double tr = rstd * inv;
  double bcoef = -(rstd * tr) * gx_sum * invn;
  double cc = -tr * g_sum * invn - cm * bcoef;
  return {tr, bcoef * inv, cc};
}

template <typename O>
inline BackCoef back_coef(const O* st, int64_t nsets, int64_t k, double g_sum, double gd_sum) {
  return back_coef_n<O>(st, nsets, k, g_sum, gd_sum, 1.0 / static_cast<double>(st[5 * nsets + k]));
}

// ---- rows: GROUP_NCHW with S == 1 (LayerNorm over trailing dims, LayerNorm2d on channels_last) --------
// Each row (sample) holds G sets of Cg contiguous values, with a per-element affine.
//  * the forward processes short sets (Cg <= SHORT) RB at a time, so their short reductions form
//    independent dependency chains (one set alone is latency-bound: a row of 64 floats is four vector
//    adds); the backward takes one set at a time (see rows_bwd_set);
//  * the backward accumulates dweight / dbias in float per column for up to RFLUSH rows, then in
//    double (a double read-modify-write per element would cost more than the data);
//  * long sets (Cg > LONG_ROW) take the backward in two parallel passes: the per-set sums by chunks,
//    then dx and dweight / dbias by column tiles over all rows (a tile's accumulators stay in L1).

// Outputs larger than this many bytes (about half this machine's last-level cache) are written with
// non-temporal stores: they cannot stay cached anyway, and a plain store first reads every line it
// writes (measured: the long-row LayerNorm forward at (32, 64*56*56) 1.8 -> 1.55 ms; at (8, 256*28*28),
// whose output stays in cache, streaming costs 0.29 -> 0.35 ms, hence the threshold). Every pattern's
// forward y and backward dx take them (but the short rows' backward and the channels-last Proxy Norm
// activation step, below): at (32, 64, 56, 56) with fresh outputs and inputs read cold, forward +
// backward 0.76x the plain stores' time for BatchNorm NCHW, 0.78x GroupNorm NCHW, 0.84x LayerNorm2d
// NCHW, 0.87-0.88x the channels-last patterns (`python benchmarks/ab_kernels.py --modes ... --rotate 4`);
// runs shorter than a buffer stream too.
constexpr int64_t STREAM_BYTES = int64_t(16) << 20;
// whether an output of n values of T is written with non-temporal stores
template <typename T>
inline bool streamed(int64_t n) {
  return n * static_cast<int64_t>(sizeof(T)) > STREAM_BYTES;
}
// The channels-last GroupNorm forward takes a sample at a time (statistics, then the output from this
// core's cache) only for inputs up to this size: beyond it the blocked schedule (all statistics, then
// all outputs) measured faster, 1.35-1.4x at (32, 32, 56, 56) and (32, 64, 56, 56) with fresh outputs
// (`python benchmarks/ab_kernels.py --base d074594~1 --modes group_cl`).
constexpr int64_t SAMPLE_FWD_BYTES = int64_t(8) << 20;
constexpr int64_t EMIT = 1024;  // outputs per L1 buffer of those stores
// Short rows (LayerNorm over a last dim, LayerNorm2d on channels_last) stream their forward output only
// from 256 values on: at (25088, 256) and (12544, 512) 0.63-0.76x the cached stores' time, at 128 values
// neutral, at 64 values 1.27x (the L1 buffer's round trip per short row). Their backward writes dx with
// plain stores: streamed, it measured 1.0-1.3x at 128-512 values (`ab_kernels.py --modes rows`).
constexpr int64_t STREAM_ROW = 256;

// Writes n outputs at q through `fill(j, len, dst)` (which writes outputs j .. j + len - 1 to dst); with
// `stream`, float outputs go through an L1 buffer and non-temporal stores (call fence() after).
template <typename T, typename F>
inline void emit(T* q, int64_t n, bool stream, F&& fill) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      const int64_t head = std::min<int64_t>(n, ((32 - (reinterpret_cast<uintptr_t>(q) & 31)) & 31) / 4);
      fill(0, head, q);
      alignas(32) float buf[EMIT];
      for (int64_t j = head; j < n;) {
        const int64_t m = std::min(EMIT, n - j), body = m & ~int64_t(7);
        fill(j, m, buf);
        for (int64_t i = 0; i < body; i += 8) _mm256_stream_ps(q + j + i, _mm256_load_ps(buf + i));
        for (int64_t i = body; i < m; ++i) q[j + i] = buf[i];
        j += m;
      }
      return;
    }
  }
#endif
  fill(0, n, q);
}

// Rows r0 .. r1 - 1 of C contiguous values at q, as emit() writes them: row(r, c, len, dst) writes
// columns c .. c + len - 1 of row r to dst (a run of a row: the L1 buffer's blocks cross rows).
template <typename T, typename F>
inline void emit_rows(T* q, int64_t r0, int64_t r1, int64_t C, bool stream, F&& row) {
  if (!stream) {
    for (int64_t r = r0; r < r1; ++r) row(r, 0, C, q + r * C);
    return;
  }
  emit(q + r0 * C, (r1 - r0) * C, true, [&](int64_t j, int64_t m, T* dst) {
    while (m > 0) {
      const int64_t r = r0 + j / C, c = j % C, len = std::min(m, C - c);
      row(r, c, len, dst);
      j += len;
      dst += len;
      m -= len;
    }
  });
}

inline void fence(bool stream) {
#if defined(__AVX__)
  if (stream) _mm_sfence();  // the non-temporal stores are weakly ordered: visible before the join
#endif
}

constexpr int RB = 4;  // sets interleaved in the forward (tried 1, 2, 4, 8 with 32- and 64-byte lanes: 4 x 32 bytes)
constexpr int64_t RFLUSH = 256;      // rows of dweight / dbias terms summed in float before a flush
constexpr int64_t LONG_ROW = 16384;  // longer sets: the column-tiled backward
constexpr int64_t RTILE = 2048;      // columns per tile of that backward
constexpr int64_t RCHUNK = 16384;    // elements per task of its sums

template <typename O>
constexpr int row_lanes() { return static_cast<int>(32 / sizeof(O)); }  // one 256-bit vector

template <int L, typename O>
inline O hsum(const O* a) {
  O t[L];
  for (int l = 0; l < L; ++l) t[l] = a[l];
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// y = ((x - sh) * r - cmr) * w + b over one set, w / b per element (or absent)
template <typename T, typename O>
inline void row_out(const T* __restrict p, T* __restrict q, int64_t n, O sh, O r, O cmr, const O* __restrict wc,
                    const O* __restrict bc) {
  if (wc && bc) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) q[j] = to<T>(((cv<O>(p[j]) - sh) * r - cmr) * wc[j] + bc[j]);
  } else if (wc) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) q[j] = to<T>(((cv<O>(p[j]) - sh) * r - cmr) * wc[j]);
  } else if (bc) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) q[j] = to<T>(((cv<O>(p[j]) - sh) * r - cmr) + bc[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) q[j] = to<T>((cv<O>(p[j]) - sh) * r - cmr);
  }
}

// R short sets k .. k + R - 1: two-pass moments from L1 (lanes of the compute type), then the output.
template <int R, typename T, typename O>
inline void rows_fwd_short(const T* x, const O* w, const O* b, T* y, O* st, int32_t* ok, int64_t nsets, int64_t k,
                           int64_t Cg, int64_t G, double eps, bool stream) {
  constexpr int L = row_lanes<O>();
  const int64_t body = Cg - Cg % L;
  const T* p = x + k * Cg;  // set r at p + r * Cg (affine indexing: the loops vectorise)
  O a[R][L] = {};
  for (int64_t i = 0; i < body; i += L)
    for (int r = 0; r < R; ++r) {
#pragma omp simd
      for (int l = 0; l < L; ++l) a[r][l] += cv<O>(p[r * Cg + i + l]);
    }
  O m[R];
  for (int r = 0; r < R; ++r) {
    O s = hsum<L, O>(a[r]);
    for (int64_t i = body; i < Cg; ++i) s += cv<O>(p[r * Cg + i]);
    m[r] = s / static_cast<O>(Cg);
  }
  O u[R][L] = {}, v[R][L] = {};
  for (int64_t i = 0; i < body; i += L)
    for (int r = 0; r < R; ++r) {
      const O mr = m[r];
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        O d = cv<O>(p[r * Cg + i + l]) - mr;
        u[r][l] += d;
        v[r][l] += d * d;
      }
    }
  const double invn = 1.0 / static_cast<double>(Cg);
  double mean[R], var[R], rstd[R];
  for (int r = 0; r < R; ++r) {
    double s1 = hsum<L, O>(u[r]), s2 = hsum<L, O>(v[r]);
    for (int64_t i = body; i < Cg; ++i) {
      O d = cv<O>(p[r * Cg + i]) - m[r];
      s1 += d;
      s2 += static_cast<double>(d) * d;
    }
    const double mu = s1 * invn;
    mean[r] = static_cast<double>(m[r]) + mu;
    var[r] = std::max(s2 - s1 * mu, 0.0) * invn;
  }
  for (int r = 0; r < R; ++r) rstd[r] = 1.0 / std::sqrt(var[r] + eps);
  for (int r = 0; r < R; ++r) {
    auto s = finish_stats<O>(mean[r], var[r], rstd[r], static_cast<double>(Cg), eps, st, nsets, k + r, ok);
    const int64_t c0 = G == 1 ? 0 : ((k + r) % G) * Cg;
    const O rs = static_cast<O>(s.rstd), cmr = static_cast<O>(s.cm * s.rstd);
    if (stream)
      emit(y + (k + r) * Cg, Cg, true, [&](int64_t j, int64_t n, T* q) {
        row_out<T, O>(p + r * Cg + j, q, n, s.shift, rs, cmr, w ? w + c0 + j : nullptr, b ? b + c0 + j : nullptr);
      });
    else
      row_out<T, O>(p + r * Cg, y + (k + r) * Cg, Cg, s.shift, rs, cmr, w ? w + c0 : nullptr, b ? b + c0 : nullptr);
  }
}

template <typename T, typename O>
void rows_forward(const T* x, const O* w, const O* b, T* y, O* st, int32_t* ok, int64_t N, int64_t C, int64_t G,
                  double eps) {
  const int64_t Cg = C / G, nsets = N * G;
  const bool stream = streamed<T>(N * C) && Cg >= STREAM_ROW;
  torch::stable::parallel_for(0, nsets, grain(Cg), [&](int64_t k0, int64_t k1) {
    int64_t k = k0;
    if (Cg <= SHORT) {
      for (; k + RB <= k1; k += RB) rows_fwd_short<RB, T, O>(x, w, b, y, st, ok, nsets, k, Cg, G, eps, stream);
      for (; k < k1; ++k) rows_fwd_short<1, T, O>(x, w, b, y, st, ok, nsets, k, Cg, G, eps, stream);
      fence(stream);
      return;
    }
    for (; k < k1; ++k) {
      const int64_t c0 = (k % G) * Cg;
      auto s = finish_set<O>(set_moments<T, O>(x + k * Cg, 1, Cg, Cg), eps, st, nsets, k, ok);
      const T* p = x + k * Cg;
      emit(y + k * Cg, Cg, stream, [&](int64_t j, int64_t n, T* q) {
        row_out<T, O>(p + j, q, n, s.shift, static_cast<O>(s.rstd), static_cast<O>(s.cm * s.rstd),
                      w ? w + c0 + j : nullptr, b ? b + c0 + j : nullptr);
      });
    }
    fence(stream);
  });
}

// Sums of g = w * dy and g * (x - shift) over a run, in lanes of the compute type.
template <int L, bool W, typename T, typename O>
inline void wdsums(const T* __restrict gp, const T* __restrict xp, const O* __restrict wc, int64_t n, O shift,
                   O* __restrict a1, O* __restrict a2) {
  for (int64_t i = 0; i + L <= n; i += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      O gw = cv<O>(gp[i + l]);
      if constexpr (W) gw *= wc[i + l];
      a1[l] += gw;
      a2[l] += gw * (cv<O>(xp[i + l]) - shift);
    }
  }
}

// dx = w * tr * dy + bx * (x - shift) + cc over a set (dx may be absent), and the dweight / dbias terms
// dy * x_hat, dy added into float accumulators (absent when not needed).
template <bool W, typename T, typename O>
inline void row_dx(const T* __restrict gp, const T* __restrict xp, const O* __restrict wc, T* __restrict out,
                   O* __restrict aw, O* __restrict ab, int64_t n, O shift, O tr, O bx, O cc, O xr, O cr) {
  if (out && aw) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      O gv = cv<O>(gp[j]), d = cv<O>(xp[j]) - shift;
      O a = tr * gv;
      if constexpr (W) a *= wc[j];
      out[j] = to<T>(a + bx * d + cc);
      aw[j] += gv * (d * xr - cr);
      ab[j] += gv;
    }
  } else if (out) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      O gv = cv<O>(gp[j]), d = cv<O>(xp[j]) - shift;
      O a = tr * gv;
      if constexpr (W) a *= wc[j];
      out[j] = to<T>(a + bx * d + cc);
    }
  } else if (aw) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      O gv = cv<O>(gp[j]);
      aw[j] += gv * ((cv<O>(xp[j]) - shift) * xr - cr);
      ab[j] += gv;
    }
  }
}

// The backward of set k (at most LONG_ROW values): sums from memory, dx from cache. One set at a time:
// interleaving 2 or 4 sets (as the forward does) was measured 1.2-1.5x slower here at 6272 rows of 256
// with a fresh dx (`python benchmarks/ab_kernels.py --modes rows`), and no faster at 64 or 128.
// aw / ab: float accumulators over the C columns (or null).
template <bool W, typename T, typename O>
inline void rows_bwd_set(const T* dy, const T* x, const O* w, const O* st, T* dx, O* aw, O* ab, int64_t nsets,
                         int64_t k, int64_t Cg, int64_t G) {
  constexpr int L = row_lanes<O>();
  const int64_t body = Cg - Cg % L;
  O a1[L] = {}, a2[L] = {};
  const T* gp = dy + k * Cg;
  const T* xp = x + k * Cg;
  const int64_t c0 = G == 1 ? 0 : (k % G) * Cg;
  const O* wc = W ? w + c0 : nullptr;
  const O shift = st[k];
  wdsums<L, W, T, O>(gp, xp, wc, body, shift, a1, a2);
  double g_sum = hsum<L, O>(a1), gd_sum = hsum<L, O>(a2);
  for (int64_t j = body; j < Cg; ++j) {
    O gw = cv<O>(gp[j]);
    if constexpr (W) gw *= wc[j];
    g_sum += gw;
    gd_sum += static_cast<double>(gw) * (cv<O>(xp[j]) - shift);
  }
  const double inv = st[nsets + k], cm = st[2 * nsets + k], rstd = st[3 * nsets + k];
  auto kc = back_coef_n<O>(st, nsets, k, g_sum, gd_sum * inv, 1.0 / static_cast<double>(Cg));
  row_dx<W, T, O>(gp, xp, wc, dx ? dx + k * Cg : nullptr, aw ? aw + c0 : nullptr, ab ? ab + c0 : nullptr, Cg, shift,
                  static_cast<O>(kc.tr), static_cast<O>(kc.bx), static_cast<O>(kc.cc), static_cast<O>(inv * rstd),
                  static_cast<O>(cm * rstd));
}

// dweight / dbias (D: double, or the statistics dtype straight into the caller's tensors) are stored,
// not added: the column tiles partition the columns, each tile sums its own in double. With M > 1
// members (M dividing N: member m holds rows [m N / M, (m + 1) N / M)), dweight / dbias are (M, C),
// each member's rows summed on their own (per-sample gradients under torch.func.vmap).
template <bool W, typename T, typename O, typename D>
void rows_backward_long(const T* dy, const T* x, const O* w, const O* st, T* dx, D* dw, D* db, int64_t N,
                        int64_t C, int64_t G, int64_t M = 1) {
  constexpr int L = row_lanes<O>();
  const int64_t Cg = C / G, nsets = N * G, nch = (Cg + RCHUNK - 1) / RCHUNK;
  // 1. per-set sums, by chunks (parallel even for one set)
  std::vector<double> s1(static_cast<size_t>(nsets * nch)), s2(s1.size());
  torch::stable::parallel_for(0, nsets * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / nch, j0 = (t % nch) * RCHUNK, n = std::min(RCHUNK, Cg - j0);
      const T* gp = dy + k * Cg + j0;
      const T* xp = x + k * Cg + j0;
      const O* wc = W ? w + (k % G) * Cg + j0 : nullptr;
      const O shift = st[k];
      const int64_t body = n - n % L;
      double d1[L] = {}, d2[L] = {};
      for (int64_t i = 0; i < body; i += FLUSH) {  // float lanes flushed into double
        O a1[L] = {}, a2[L] = {};
        const int64_t m = std::min(FLUSH, body - i);
        wdsums<L, W, T, O>(gp + i, xp + i, W ? wc + i : nullptr, m, shift, a1, a2);
        for (int l = 0; l < L; ++l) {
          d1[l] += a1[l];
          d2[l] += a2[l];
        }
      }
      double g_sum = 0.0, gd_sum = 0.0;
      for (int l = 0; l < L; ++l) {
        g_sum += d1[l];
        gd_sum += d2[l];
      }
      for (int64_t j = body; j < n; ++j) {
        O gw = cv<O>(gp[j]);
        if constexpr (W) gw *= wc[j];
        g_sum += gw;
        gd_sum += static_cast<double>(gw) * (cv<O>(xp[j]) - shift);
      }
      s1[t] = g_sum;
      s2[t] = gd_sum;
    }
  });
  // 2. per-set coefficients
  std::vector<O> co(static_cast<size_t>(5 * nsets));
  for (int64_t k = 0; k < nsets; ++k) {
    double g_sum = 0.0, gd_sum = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
      g_sum += s1[k * nch + c];
      gd_sum += s2[k * nch + c];
    }
    const double inv = st[nsets + k], cm = st[2 * nsets + k], rstd = st[3 * nsets + k];
    auto kc = back_coef<O>(st, nsets, k, g_sum, gd_sum * inv);
    co[5 * k] = static_cast<O>(kc.tr);
    co[5 * k + 1] = static_cast<O>(kc.bx);
    co[5 * k + 2] = static_cast<O>(kc.cc);
    co[5 * k + 3] = static_cast<O>(inv * rstd);
    co[5 * k + 4] = static_cast<O>(cm * rstd);
  }
  // 3. dx and dweight / dbias by column tiles: each tile walks all rows, its sums stay in L1
  const bool need_p = dw || db;
  const bool stream = dx && streamed<T>(nsets * Cg);
  const int64_t ntile = (Cg + RTILE - 1) / RTILE;
  torch::stable::parallel_for(0, G * ntile, 1, [&](int64_t t0, int64_t t1) {
    std::vector<O> aw(need_p ? RTILE : 0), ab(aw.size());
    std::vector<double> sw(aw.size()), sb(aw.size());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / ntile, j0 = (t % ntile) * RTILE, n = std::min(RTILE, Cg - j0), c0 = g * Cg + j0;
      std::fill(aw.begin(), aw.end(), O(0));
      std::fill(ab.begin(), ab.end(), O(0));
      std::fill(sw.begin(), sw.end(), 0.0);
      std::fill(sb.begin(), sb.end(), 0.0);
      auto flush = [&]() {
        for (int64_t j = 0; j < n; ++j) {
          sw[j] += aw[j];
          sb[j] += ab[j];
          aw[j] = ab[j] = O(0);
        }
      };
      for (int64_t mem = 0; mem < M; ++mem) {
        const int64_t r1 = N * (mem + 1) / M;
        for (int64_t r = N * mem / M; r < r1; ++r) {
          const int64_t k = r * G + g, off = k * Cg + j0;
          const O* c = co.data() + 5 * k;
          if (dx) {
            emit(dx + off, n, stream, [&](int64_t j, int64_t m, T* q) {
              row_dx<W, T, O>(dy + off + j, x + off + j, W ? w + c0 + j : nullptr, q,
                              need_p ? aw.data() + j : nullptr, need_p ? ab.data() + j : nullptr, m, st[k], c[0],
                              c[1], c[2], c[3], c[4]);
            });
          } else {
            row_dx<W, T, O>(dy + off, x + off, W ? w + c0 : nullptr, nullptr, aw.data(), ab.data(), n, st[k], c[0],
                            c[1], c[2], c[3], c[4]);
          }
          if (need_p && (r + 1) % RFLUSH == 0) flush();
        }
        if (need_p) {
          flush();
          for (int64_t j = 0; j < n; ++j) {
            if (dw) dw[mem * C + c0 + j] = static_cast<D>(sw[j]);
            if (db) db[mem * C + c0 + j] = static_cast<D>(sb[j]);
            sw[j] = sb[j] = 0.0;
          }
        }
      }
    }
    fence(stream);
  });
}

template <bool W, typename T, typename O>
void rows_backward_w(const T* dy, const T* x, const O* w, const O* st, T* dx, double* dw, double* db, int64_t N,
                     int64_t C, int64_t G) {
  const int64_t Cg = C / G, nsets = N * G;
  if (Cg > LONG_ROW) {
    rows_backward_long<W, T, O, double>(dy, x, w, st, dx, dw, db, N, C, G);
    return;
  }
  const int64_t nthreads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const bool need_p = dw || db;
  const int64_t blocks = std::max<int64_t>(1, std::min({nthreads, N, N * C / GRAIN}));
  std::vector<double> pw(need_p ? static_cast<size_t>(blocks * C) : 0, 0.0), pb(pw.size(), 0.0);
  torch::stable::parallel_for(0, blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<O> aw(need_p ? C : 0, O(0)), ab(aw.size(), O(0));
    O* AW = need_p ? aw.data() : nullptr;
    O* AB = need_p ? ab.data() : nullptr;
    for (int64_t blk = i0; blk < i1; ++blk) {
      const int64_t kend = (N * (blk + 1) / blocks) * G;
      for (int64_t k = (N * blk / blocks) * G; k < kend;) {
        const int64_t kstop = std::min(kend, k + RFLUSH * G);  // then flush the float sums
        for (; k < kstop; ++k) rows_bwd_set<W, T, O>(dy, x, w, st, dx, AW, AB, nsets, k, Cg, G);
        if (need_p) {
          double* PW = pw.data() + blk * C;
          double* PB = pb.data() + blk * C;
          for (int64_t c = 0; c < C; ++c) {
            PW[c] += aw[c];
            PB[c] += ab[c];
            aw[c] = ab[c] = O(0);
          }
        }
      }
    }
  });
  if (need_p) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (dw)
        for (int64_t c = 0; c < C; ++c) dw[c] += pw[blk * C + c];
      if (db)
        for (int64_t c = 0; c < C; ++c) db[c] += pb[blk * C + c];
    }
  }
}

// The rows pattern for M members (a vmapped call: per-sample gradients, an ensemble), each member N rows of
// G sets, its own dweight / dbias row (M, C) (stored, in double). Member m reads dy / writes dx at
// m N C, x at m x_step (0: one input every member shares), the affine at m w_step (0: shared; C: its
// own) and the statistics from set m st_step on, nst sets to a statistics row.
template <bool W, typename T, typename O>
void rows_backward_members(const T* dy, const T* x, const O* w, const O* st, T* dx, double* dw, double* db,
                           int64_t N, int64_t C, int64_t G, int64_t M, int64_t x_step, int64_t w_step,
                           int64_t st_step, int64_t nst) {
  const int64_t Cg = C / G, nsets = N * G;
  const bool need_p = dw || db;
  torch::stable::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<O> aw(need_p ? C : 0, O(0)), ab(aw.size(), O(0));
    O* AW = need_p ? aw.data() : nullptr;
    O* AB = need_p ? ab.data() : nullptr;
    for (int64_t m = m0; m < m1; ++m) {
      const T* dym = dy + m * N * C;
      const T* xm = x + m * x_step;
      const O* wm = W ? w + m * w_step : nullptr;
      const O* stm = st + m * st_step;
      T* dxm = dx ? dx + m * N * C : nullptr;
      for (int64_t k = 0; k < nsets;) {
        const int64_t kstop = std::min(nsets, k + RFLUSH * G);  // then flush the float sums
        for (; k < kstop; ++k) rows_bwd_set<W, T, O>(dym, xm, wm, stm, dxm, AW, AB, nst, k, Cg, G);
        for (int64_t c = 0; need_p && c < C; ++c) {
          if (dw) dw[m * C + c] += aw[c];
          if (db) db[m * C + c] += ab[c];
          aw[c] = ab[c] = O(0);
        }
      }
    }
  });
}

template <typename T, typename O>
void rows_backward(const T* dy, const T* x, const O* w, const O* st, T* dx, double* dw, double* db, int64_t N,
                   int64_t C, int64_t G) {
  if (w)
    rows_backward_w<true, T, O>(dy, x, w, st, dx, dw, db, N, C, G);
  else
    rows_backward_w<false, T, O>(dy, x, w, st, dx, dw, db, N, C, G);
}

// Columns per block of the CHANNEL_NCHW pattern: a (C x W) tile of about 256 KB of x stays in L2 between
// the statistics and the output (with dy, half of it in the backward). Tiles of 32 KB (W = 32 at
// C = 256) made every row of the backward a 32-value loop around a double reduction: 3.4-3.7 ms for
// (8, 256, 28, 28) against 0.82 ms now, 0.6 -> 0.3 ms at (8, 512, 14, 14), 5.0 -> 4.2 ms at
// (32, 64, 56, 56) (`python benchmarks/ab_kernels.py --modes channel_nchw`, fresh outputs).
inline int64_t channel_block(int64_t C, int64_t S) {
  int64_t w = (65536 / std::max<int64_t>(C, 1)) / 32 * 32;
  return std::min<int64_t>(S, std::max<int64_t>(32, std::min<int64_t>(w, 512)));
}

// The channels-last patterns: rows of C channels. BATCH_CL: all N * S rows share the C sets, split
// into blocks of rows (one per thread) merged afterwards; GROUP_CL: each sample's S rows hold its G sets.
struct ClLayout {
  bool batch;
  int64_t group, nsets, rows, samples, blocks;
  ClLayout(int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G, int64_t nthreads)
      : batch(mode == BATCH_CL),
        group(batch ? 1 : C / G),
        nsets(batch ? C : N * G),
        rows(batch ? N * S : S),
        samples(batch ? 1 : N),
        blocks(batch ? std::max<int64_t>(1, std::min({nthreads, rows / ROWS, rows * C / GRAIN})) : 1) {}
};

// One sample's `per` sets of `group` channels each, from the per-column moments of `blocks` blocks of
// rows (part[blk * C + c]): statistics stored (sets set0 ..), and per channel the coefficients of
// y = (x - sh) * A + B.
template <typename O>
inline void sample_coefs(const Mom* part, int64_t blocks, int64_t C, int64_t group, int64_t per, int64_t set0,
                         int64_t nsets, double eps, const O* w, const O* b, O* st, int32_t* ok, O* sh, O* A, O* B) {
  for (int64_t k = 0; k < per; ++k) {
    Mom mo;  // the set's columns, from every block
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = k * group; c < (k + 1) * group; ++c) mo.add(part[blk * C + c]);
    auto s = finish_set<O>(mo, eps, st, nsets, set0 + k, ok);
    for (int64_t c = k * group; c < (k + 1) * group; ++c) {
      sh[c] = s.shift;
      affine_coef<O>(s, w, b, c, A[c], B[c]);
    }
  }
}

// The statistics of the channels-last patterns (one pass, exact merges across blocks of rows), stored in
// st, and per (sample, channel) the coefficients of y = (x - sh) * A + B (one sample for BATCH_CL).
template <typename T, typename O>
void cl_coefs(const T* x, const O* w, const O* b, O* st, int32_t* ok, int64_t mode, int64_t N, int64_t C, int64_t S,
              int64_t G, double eps, int64_t nthreads, std::vector<O>& sh, std::vector<O>& A, std::vector<O>& B) {
  const ClLayout L(mode, N, C, S, G, nthreads);
  const bool batch = L.batch;
  const int64_t group = L.group, nsets = L.nsets, rows = L.rows, samples = L.samples, blocks = L.blocks;
  const int64_t per = nsets / samples;  // sets per sample
  std::vector<Mom> part(static_cast<size_t>(samples * blocks * C));
  torch::stable::parallel_for(0, samples * blocks, batch ? 1 : grain(rows * C), [&](int64_t i0, int64_t i1) {
    std::vector<O> shift(C);
    std::vector<double> s1(C), s2(C);
    for (int64_t i = i0; i < i1; ++i) {
      int64_t n = i / blocks, blk = i % blocks;
      int64_t r0 = rows * blk / blocks, r1 = rows * (blk + 1) / blocks;
      cols_moments1<T, O>(x + (n * rows + r0) * C, r1 - r0, C, C, part.data() + i * C, shift, s1, s2);
    }
  });
  sh.assign(static_cast<size_t>(samples * C), O(0));
  A.assign(sh.size(), O(0));
  B.assign(sh.size(), O(0));
  for (int64_t n = 0; n < samples; ++n)
    sample_coefs<O>(part.data() + n * blocks * C, blocks, C, group, per, n * per, nsets, eps, w, b, st, ok,
                    sh.data() + n * C, A.data() + n * C, B.data() + n * C);
}

// ---- forward ---------------------------------------------------------------------------------

template <typename T>
void forward_impl(const T* x, const typename OpMath<T>::type* w, const typename OpMath<T>::type* b, T* y,
                  typename OpMath<T>::type* st, int32_t* ok, int64_t mode, int64_t N, int64_t C, int64_t S,
                  int64_t G, double eps) {
  using O = typename OpMath<T>::type;
  const int64_t nthreads = std::max<int64_t>(1, torch::stable::get_num_threads());
  if (mode == GROUP_NCHW && S == 1) {
    rows_forward<T, O>(x, w, b, y, st, ok, N, C, G, eps);
    return;
  }
  const bool stream = streamed<T>(N * C * S);
  if (mode == BATCH_NCHW) {
    torch::stable::parallel_for(0, C, grain(N * S), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Mom mo = set_moments<T, O>(x + c * S, N, S, C * S);
        auto s = finish_set<O>(mo, eps, st, C, c, ok);
        O A, B;
        affine_coef<O>(s, w, b, c, A, B);
        for (int64_t n = 0; n < N; ++n) {
          const T* p = x + (n * C + c) * S;
          emit(y + (n * C + c) * S, S, stream,
               [&](int64_t j, int64_t m, T* q) { run_apply<T, O>(p + j, q, m, s.shift, A, B); });
        }
      }
      fence(stream);
    });
  } else if (mode == GROUP_CL && N >= nthreads && N * S * C * static_cast<int64_t>(sizeof(T)) <= SAMPLE_FWD_BYTES) {
    // a sample at a time, statistics then output: the second read of the sample comes from cache
    const int64_t group = C / G;
    torch::stable::parallel_for(0, N, grain(S * C), [&](int64_t n0, int64_t n1) {
      std::vector<O> shift(C), sh(C), A(C), B(C);
      std::vector<double> s1(C), s2(C);
      std::vector<Mom> part(static_cast<size_t>(C));
      for (int64_t n = n0; n < n1; ++n) {
        const T* xs = x + n * S * C;
        cols_moments1<T, O>(xs, S, C, C, part.data(), shift, s1, s2);
        sample_coefs<O>(part.data(), 1, C, group, G, n * G, N * G, eps, w, b, st, ok, sh.data(), A.data(), B.data());
        if (!__atomic_load_n(ok, __ATOMIC_RELAXED)) return;  // the caller recomputes the whole call
        T* ys = y + n * S * C;
        for (int64_t r = 0; r < S; ++r) row_apply<T, O>(xs + r * C, ys + r * C, C, sh.data(), A.data(), B.data());
      }
    });
  } else if (mode == BATCH_CL || mode == GROUP_CL) {
    const bool batch = mode == BATCH_CL;
    std::vector<O> sh, A, B;
    cl_coefs<T, O>(x, w, b, st, ok, mode, N, C, S, G, eps, nthreads, sh, A, B);
    if (!__atomic_load_n(ok, __ATOMIC_RELAXED)) return;
    torch::stable::parallel_for(0, N * S, grain(C), [&](int64_t r0, int64_t r1) {
      emit_rows(y, r0, r1, C, stream, [&](int64_t r, int64_t c, int64_t len, T* q) {
        const int64_t o = (batch ? 0 : r / S) * C + c;
        row_apply<T, O>(x + r * C + c, q, len, sh.data() + o, A.data() + o, B.data() + o);
      });
      fence(stream);
    });
  } else if (mode == GROUP_NCHW) {
    const int64_t Cg = C / G, L = Cg * S;
    torch::stable::parallel_for(0, N * G, grain(C / G * S), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const T* p = x + k * L;
        T* q = y + k * L;
        Mom mo = set_moments<T, O>(p, 1, L, L);
        auto s = finish_set<O>(mo, eps, st, N * G, k, ok);
        const int64_t c0 = (k % G) * Cg;
        if (S > 1) {
          for (int64_t j = 0; j < Cg; ++j) {
            O A, B;
            affine_coef<O>(s, w, b, c0 + j, A, B);
            emit(q + j * S, S, stream,
                 [&](int64_t i, int64_t m, T* o) { run_apply<T, O>(p + j * S + i, o, m, s.shift, A, B); });
          }
        } else {  // one value per channel: vectorise over the channels
          const O r = static_cast<O>(s.rstd), cmr = static_cast<O>(s.cm * s.rstd), sh = s.shift;
          const O* wc = w ? w + c0 : nullptr;
          const O* bc = b ? b + c0 : nullptr;
          if (wc && bc) {
#pragma omp simd
            for (int64_t j = 0; j < Cg; ++j) q[j] = to<T>(((cv<O>(p[j]) - sh) * r - cmr) * wc[j] + bc[j]);
          } else {
            for (int64_t j = 0; j < Cg; ++j) {
              O t = (cv<O>(p[j]) - sh) * r - cmr;
              if (wc) t = t * wc[j];
              if (bc) t = t + bc[j];
              q[j] = to<T>(t);
            }
          }
        }
      }
      fence(stream);
    });
  } else if (mode == CHANNEL_NCHW) {
    // sets (n, s) reduce over the C rows of stride S: blocks of W columns, in cache from stats to output
    const int64_t W = channel_block(C, S);
    const int64_t nb = (S + W - 1) / W;
    torch::stable::parallel_for(0, N * nb, grain(C * W), [&](int64_t i0, int64_t i1) {
      std::vector<O> a1(W), a2(W), m(W), r(W), cmr(W), sh(W);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t n = i / nb, s0 = (i % nb) * W, ns = std::min(W, S - s0);
        const T* p = x + n * C * S + s0;
        T* q = y + n * C * S + s0;
        // the columns are the sets: per-column moments over the C rows
        ColMoments cm(ns);
        cols_moments<T, O>(p, C, ns, S, cm, a1, a2, m);
        for (int64_t j = 0; j < ns; ++j) {
          auto s = finish_set<O>(cm.col(j), eps, st, N * S, n * S + s0 + j, ok);
          sh[j] = s.shift;
          r[j] = static_cast<O>(s.rstd);
          cmr[j] = static_cast<O>(s.cm * s.rstd);
        }
        for (int64_t c = 0; c < C; ++c) {
          const T* row = p + c * S;
          const O wc = w ? w[c] : O(1), bc = b ? b[c] : O(0);
          const O *SH = sh.data(), *R = r.data(), *CM = cmr.data();
          auto fill = [=](int64_t j0, int64_t m, T* __restrict out) {
#pragma omp simd
            for (int64_t j = 0; j < m; ++j)
              out[j] = to<T>(((cv<O>(row[j0 + j]) - SH[j0 + j]) * R[j0 + j] - CM[j0 + j]) * wc + bc);
          };
          if (stream)
            emit(q + c * S, ns, true, fill);
          else
            fill(0, ns, q + c * S);
        }
      }
      fence(stream);
    });
  }
}

// ---- backward --------------------------------------------------------------------------------

// sums of dy and dy * (x - shift) over a contiguous run
template <typename T, typename O>
inline void run_dsums(const T* dy, const T* x, int64_t len, O shift, double& sdy, double& sdyd) {
  run_pair<true, T, O>(x, dy, len, shift, sdy, sdyd);
}

// sum dy and sum dy * (x - shift) over a short run (8 float lanes, one reduction)
// sum dy and sum dy * (x - shift) over a very short run: 8 lanes, one reduction
template <typename T, typename O>
inline void tiny_dsums(const T* dy, const T* x, int64_t len, O shift, double& sdy, double& sdyd) {
  O a[8] = {}, c[8] = {};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
#pragma omp simd
    for (int j = 0; j < 8; ++j) {
      O g = cv<O>(dy[i + j]);
      a[j] += g;
      c[j] += g * (cv<O>(x[i + j]) - shift);
    }
  }
  O t1 = 0, t2 = 0;
  for (; i < len; ++i) {
    O g = cv<O>(dy[i]);
    t1 += g;
    t2 += g * (cv<O>(x[i]) - shift);
  }
  sdy += static_cast<double>(((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) + t1;
  sdyd += static_cast<double>(((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]))) + t2;
}

// the same over a short run (up to SHORT): 32 lanes, four independent vector chains
template <typename T, typename O>
inline void short_dsums(const T* dy, const T* x, int64_t len, O shift, double& sdy, double& sdyd) {
  if (len < 128) return tiny_dsums<T, O>(dy, x, len, shift, sdy, sdyd);
  constexpr int L = 32;
  const int64_t body = len - len % L;
  O a[L] = {}, c[L] = {};
  for (int64_t i = 0; i < body; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      O g = cv<O>(dy[i + j]);
      a[j] += g;
      c[j] += g * (cv<O>(x[i + j]) - shift);
    }
  }
  const int64_t body8 = len - len % 8;
  for (int64_t i = body; i < body8; i += 8) {
#pragma omp simd
    for (int j = 0; j < 8; ++j) {
      O g = cv<O>(dy[i + j]);
      a[j] += g;
      c[j] += g * (cv<O>(x[i + j]) - shift);
    }
  }
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) {
      a[j] += a[j + w];
      c[j] += c[j + w];
    }
  O t1 = 0, t2 = 0;
  for (int64_t i = body8; i < len; ++i) {
    O g = cv<O>(dy[i]);
    t1 += g;
    t2 += g * (cv<O>(x[i]) - shift);
  }
  sdy += static_cast<double>(a[0]) + t1;
  sdyd += static_cast<double>(c[0]) + t2;
}

// dx[c] = A[c] * dy[c] + B[c] * (x[c] - sh[c]) + Cc[c] over a run of a channels-last row
template <typename T, typename O>
inline void cl_dx(const T* __restrict g, const T* __restrict xr, T* __restrict out, int64_t len, const O* SH,
                  const O* AA, const O* BB, const O* CC) {
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) out[c] = to<T>(AA[c] * cv<O>(g[c]) + BB[c] * (cv<O>(xr[c]) - SH[c]) + CC[c]);
}

template <typename T, typename O>
inline void run_dx(const T* dy, const T* x, T* dx, int64_t len, O shift, O a, O bx, O cc) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    dx[i] = to<T>(a * cv<O>(dy[i]) + bx * (cv<O>(x[i]) - shift) + cc);
}

template <typename T>
void backward_impl(const T* dy, const T* x, const typename OpMath<T>::type* w, const typename OpMath<T>::type* st,
                   T* dx, double* dw, double* db, int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G) {
  using O = typename OpMath<T>::type;
  const int64_t nthreads = std::max<int64_t>(1, torch::stable::get_num_threads());
  auto wv = [&](int64_t c) { return w ? static_cast<double>(w[c]) : 1.0; };
  if (mode == GROUP_NCHW && S == 1) {
    rows_backward<T, O>(dy, x, w, st, dx, dw, db, N, C, G);
    return;
  }
  const bool stream = dx && streamed<T>(N * C * S);
  if (mode == BATCH_NCHW) {
    torch::stable::parallel_for(0, C, grain(N * S), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const O shift = st[c];
        double sdy = 0.0, sdyd = 0.0;
        if (N * S <= SHORT) {  // a short set: no lane accumulators
          for (int64_t n = 0; n < N; ++n)
            short_dsums<T, O>(dy + (n * C + c) * S, x + (n * C + c) * S, S, shift, sdy, sdyd);
        } else {
          Lanes acc;
          for (int64_t n = 0; n < N; ++n)
            run_pair_lanes<true, T, O>(x + (n * C + c) * S, dy + (n * C + c) * S, S, shift, acc);
          acc.total(sdy, sdyd);
        }
        double inv = st[C + c], cm = st[2 * C + c], rstd = st[3 * C + c];
        double sdyxh = (sdyd * inv - cm * sdy) * rstd;
        if (dw) dw[c] = sdyxh;
        if (db) db[c] = sdy;
        if (!dx) continue;
        auto k = back_coef<O>(st, C, c, wv(c) * sdy, wv(c) * sdyd * inv);
        const O a = static_cast<O>(wv(c) * k.tr), bx = static_cast<O>(k.bx), cc = static_cast<O>(k.cc);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * S;
          emit(dx + off, S, stream,
               [&](int64_t j, int64_t m, T* q) { run_dx<T, O>(dy + off + j, x + off + j, q, m, shift, a, bx, cc); });
        }
      }
      fence(stream);
    });
  } else if (mode == GROUP_CL && N >= nthreads) {
    // a sample at a time, sums then dx: the second read of the sample's dy and x comes from cache
    const int64_t group = C / G, nsets = N * G;
    std::vector<double> p1(static_cast<size_t>(N * C)), p2(p1.size());  // per (n, c): sum dy, sum dy * x_hat
    torch::stable::parallel_for(0, N, grain(S * C), [&](int64_t n0, int64_t n1) {
      std::vector<O> a1(C), a2(C), sh(C), A(C), Bx(C), Cc(C);
      std::vector<double> sdy(C), sdyd(C);
      for (int64_t n = n0; n < n1; ++n) {
        const T* gs = dy + n * S * C;
        const T* xs = x + n * S * C;
        for (int64_t c = 0; c < C; ++c) sh[c] = st[n * G + c / group];
        std::fill(sdy.begin(), sdy.end(), 0.0);
        std::fill(sdyd.begin(), sdyd.end(), 0.0);
        for (int64_t q0 = 0; q0 < S; q0 += ROWS) {
          const int64_t q1 = std::min(S, q0 + ROWS);
          std::fill(a1.begin(), a1.end(), O(0));
          std::fill(a2.begin(), a2.end(), O(0));
          O* A1 = a1.data();
          O* A2 = a2.data();
          const O* SH = sh.data();
          for (int64_t r = q0; r < q1; ++r) {
            const T* g = gs + r * C;
            const T* xr = xs + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              O gv = cv<O>(g[c]);
              A1[c] += gv;
              A2[c] += gv * (cv<O>(xr[c]) - SH[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            sdy[c] += a1[c];
            sdyd[c] += a2[c];
          }
        }
        for (int64_t k = 0; k < G; ++k) {
          const int64_t set = n * G + k;
          double inv = st[nsets + set], cm = st[2 * nsets + set], rstd = st[3 * nsets + set];
          double g_sum = 0.0, gd_sum = 0.0;
          for (int64_t c = k * group; c < (k + 1) * group; ++c) {
            p1[n * C + c] = sdy[c];
            p2[n * C + c] = (sdyd[c] * inv - cm * sdy[c]) * rstd;
            g_sum += wv(c) * sdy[c];
            gd_sum += wv(c) * sdyd[c] * inv;
          }
          auto kc = back_coef<O>(st, nsets, set, g_sum, gd_sum);
          for (int64_t c = k * group; c < (k + 1) * group; ++c) {
            A[c] = static_cast<O>(wv(c) * kc.tr);
            Bx[c] = static_cast<O>(kc.bx);
            Cc[c] = static_cast<O>(kc.cc);
          }
        }
        if (!dx) continue;
        emit_rows(dx, n * S, (n + 1) * S, C, stream, [&](int64_t r, int64_t c0, int64_t len, T* out) {
          cl_dx<T, O>(dy + r * C + c0, x + r * C + c0, out, len, sh.data() + c0, A.data() + c0, Bx.data() + c0,
                      Cc.data() + c0);
        });
      }
      fence(stream);
    });
    if (dw || db) {
      for (int64_t c = 0; c < C; ++c) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          s1 += p1[n * C + c];
          s2 += p2[n * C + c];
        }
        if (db) db[c] = s1;
        if (dw) dw[c] = s2;
      }
    }
  } else if (mode == BATCH_CL || mode == GROUP_CL) {
    const ClLayout L(mode, N, C, S, G, nthreads);
    const bool batch = L.batch;
    const int64_t group = L.group, nsets = L.nsets, rows = L.rows, samples = L.samples, blocks = L.blocks;
    // per (sample, block) and channel: sum dy, sum dy * (x - shift)
    std::vector<double> p1(static_cast<size_t>(samples * blocks * C), 0.0), p2(p1.size(), 0.0);
    torch::stable::parallel_for(0, samples * blocks, batch ? 1 : grain(rows * C), [&](int64_t i0, int64_t i1) {
      std::vector<O> a1(C), a2(C), sh(C);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t n = i / blocks, blk = i % blocks;
        int64_t r0 = rows * blk / blocks, r1 = rows * (blk + 1) / blocks;
        for (int64_t c = 0; c < C; ++c) sh[c] = st[batch ? c : n * G + c / group];
        double* P1 = p1.data() + i * C;
        double* P2 = p2.data() + i * C;
        for (int64_t q0 = r0; q0 < r1; q0 += ROWS) {
          int64_t q1 = std::min(r1, q0 + ROWS);
          std::fill(a1.begin(), a1.end(), O(0));
          std::fill(a2.begin(), a2.end(), O(0));
          for (int64_t r = q0; r < q1; ++r) {
            const T* g = dy + (n * rows + r) * C;
            const T* xr = x + (n * rows + r) * C;
            O* A1 = a1.data();
            O* A2 = a2.data();
            const O* SH = sh.data();
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              O gv = cv<O>(g[c]);
              A1[c] += gv;
              A2[c] += gv * (cv<O>(xr[c]) - SH[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) { P1[c] += a1[c]; P2[c] += a2[c]; }
        }
      }
    });
    std::vector<O> sh(static_cast<size_t>(samples * C)), A(sh.size()), Bx(sh.size()), Cc(sh.size());
    for (int64_t n = 0; n < samples; ++n) {
      std::vector<double> sdy(C, 0.0), sdyd(C, 0.0);
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int64_t c = 0; c < C; ++c) {
          sdy[c] += p1[(n * blocks + blk) * C + c];
          sdyd[c] += p2[(n * blocks + blk) * C + c];
        }
      for (int64_t k = 0; k < nsets / samples; ++k) {
        int64_t set = n * (nsets / samples) + k;
        double inv = st[nsets + set], cm = st[2 * nsets + set], rstd = st[3 * nsets + set];
        double g_sum = 0.0, gd_sum = 0.0;
        for (int64_t c = k * group; c < (k + 1) * group; ++c) {
          double sdyxh = (sdyd[c] * inv - cm * sdy[c]) * rstd;
          if (dw) dw[c] += sdyxh;
          if (db) db[c] += sdy[c];
          g_sum += wv(c) * sdy[c];
          gd_sum += wv(c) * sdyd[c] * inv;
        }
        auto kc = back_coef<O>(st, nsets, set, g_sum, gd_sum);
        for (int64_t c = k * group; c < (k + 1) * group; ++c) {
          sh[n * C + c] = st[set];
          A[n * C + c] = static_cast<O>(wv(c) * kc.tr);
          Bx[n * C + c] = static_cast<O>(kc.bx);
          Cc[n * C + c] = static_cast<O>(kc.cc);
        }
      }
    }
    if (!dx) return;
    torch::stable::parallel_for(0, N * S, grain(C), [&](int64_t r0, int64_t r1) {
      emit_rows(dx, r0, r1, C, stream, [&](int64_t r, int64_t c0, int64_t len, T* out) {
        const int64_t o = (batch ? 0 : r / S) * C + c0;
        cl_dx<T, O>(dy + r * C + c0, x + r * C + c0, out, len, sh.data() + o, A.data() + o, Bx.data() + o,
                    Cc.data() + o);
      });
      fence(stream);
    });
  } else if (mode == GROUP_NCHW) {
    const int64_t Cg = C / G, L = Cg * S;
    std::vector<double> p1(static_cast<size_t>(N * C)), p2(p1.size());  // per (n, c): sum dy, sum dy * x_hat
    torch::stable::parallel_for(0, N * G, grain(C / G * S), [&](int64_t k0, int64_t k1) {
      std::vector<double> sdy(Cg), sdyd(Cg);
      for (int64_t k = k0; k < k1; ++k) {
        const O shift = st[k];
        const T* g = dy + k * L;
        const T* xp = x + k * L;
        const int64_t c0 = (k % G) * Cg, n = k / G;
        double inv = st[N * G + k], cm = st[2 * N * G + k], rstd = st[3 * N * G + k];
        double g_sum = 0.0, gd_sum = 0.0;
        for (int64_t j = 0; j < Cg; ++j) {
          double a = 0.0, bsum = 0.0;
          if (S > 1) {
            if (S <= SHORT) short_dsums<T, O>(g + j * S, xp + j * S, S, shift, a, bsum);
            else run_dsums<T, O>(g + j * S, xp + j * S, S, shift, a, bsum);
          } else {
            O gv = cv<O>(g[j]);
            a = gv;
            bsum = static_cast<double>(gv) * (cv<O>(xp[j]) - shift);
          }
          sdy[j] = a;
          sdyd[j] = bsum;
          p1[n * C + c0 + j] = a;
          p2[n * C + c0 + j] = (bsum * inv - cm * a) * rstd;
          g_sum += wv(c0 + j) * a;
          gd_sum += wv(c0 + j) * bsum * inv;
        }
        if (!dx) continue;
        auto kc = back_coef<O>(st, N * G, k, g_sum, gd_sum);
        const O bx = static_cast<O>(kc.bx), cc = static_cast<O>(kc.cc);
        if (S > 1) {
          for (int64_t j = 0; j < Cg; ++j) {
            const O a = static_cast<O>(wv(c0 + j) * kc.tr);
            emit(dx + k * L + j * S, S, stream, [&](int64_t i, int64_t m, T* q) {
              run_dx<T, O>(g + j * S + i, xp + j * S + i, q, m, shift, a, bx, cc);
            });
          }
        } else {
          T* out = dx + k * L;
          const O tr = static_cast<O>(kc.tr);
          for (int64_t j = 0; j < Cg; ++j) {
            O a = w ? cv<O>(w[c0 + j]) * tr : tr;
            out[j] = to<T>(a * cv<O>(g[j]) + bx * (cv<O>(xp[j]) - shift) + cc);
          }
        }
      }
      fence(stream);
    });
    if (dw || db) {
      for (int64_t c = 0; c < C; ++c) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t n = 0; n < N; ++n) { s1 += p1[n * C + c]; s2 += p2[n * C + c]; }
        if (db) db[c] = s1;
        if (dw) dw[c] = s2;
      }
    }
  } else if (mode == CHANNEL_NCHW) {
    const int64_t W = channel_block(C, S);
    const int64_t nb = (S + W - 1) / W;
    const int64_t nsets = N * S;
    std::vector<double> p1(static_cast<size_t>(N * nb * C), 0.0), p2(p1.size(), 0.0);
    torch::stable::parallel_for(0, N * nb, grain(C * W), [&](int64_t i0, int64_t i1) {
      std::vector<double> gs(W), gds(W);
      std::vector<O> sh(W), xr(W), cmr(W), a1(W), a2(W), A(W), Bx(W), Cc(W);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t n = i / nb, s0 = (i % nb) * W, ns = std::min(W, S - s0);
        const T* gp = dy + n * C * S + s0;
        const T* xp = x + n * C * S + s0;
        for (int64_t j = 0; j < ns; ++j) {
          int64_t k = n * S + s0 + j;
          sh[j] = st[k];
          // x_hat = (x - shift) * inv * rstd - cm * rstd
          xr[j] = static_cast<O>(static_cast<double>(st[nsets + k]) * st[3 * nsets + k]);
          cmr[j] = static_cast<O>(static_cast<double>(st[2 * nsets + k]) * st[3 * nsets + k]);
          gs[j] = 0.0;
          gds[j] = 0.0;
        }
        for (int64_t r0 = 0; r0 < C; r0 += ROWS) {
          int64_t nr = std::min(ROWS, C - r0);
          std::fill(a1.begin(), a1.begin() + ns, O(0));
          std::fill(a2.begin(), a2.begin() + ns, O(0));
          for (int64_t c = r0; c < r0 + nr; ++c) {
            const T* g = gp + c * S;
            const T* xx = xp + c * S;
            const O wc = w ? w[c] : O(1);
            O *A1 = a1.data(), *A2 = a2.data();
            const O *SH = sh.data(), *XR = xr.data(), *CR = cmr.data();
            double t1 = 0.0, t2 = 0.0;  // sum dy, sum dy * x_hat along this channel's row
#pragma omp simd reduction(+ : t1, t2)
            for (int64_t j = 0; j < ns; ++j) {
              O gv = cv<O>(g[j]);
              O d = cv<O>(xx[j]) - SH[j];
              A1[j] += wc * gv;
              A2[j] += wc * gv * d;
              t1 += gv;
              t2 += gv * (d * XR[j] - CR[j]);
            }
            p1[i * C + c] += t1;
            p2[i * C + c] += t2;
          }
          for (int64_t j = 0; j < ns; ++j) { gs[j] += a1[j]; gds[j] += a2[j]; }
        }
        if (!dx) continue;
        for (int64_t j = 0; j < ns; ++j) {
          int64_t k = n * S + s0 + j;
          double inv = st[nsets + k];
          auto kc = back_coef<O>(st, nsets, k, gs[j], gds[j] * inv);
          A[j] = static_cast<O>(kc.tr);
          Bx[j] = static_cast<O>(kc.bx);
          Cc[j] = static_cast<O>(kc.cc);
        }
        for (int64_t c = 0; c < C; ++c) {
          const O wc = w ? w[c] : O(1);
          emit(dx + n * C * S + s0 + c * S, ns, stream, [&](int64_t j0, int64_t m, T* out) {
            const T* g = gp + c * S + j0;
            const T* xx = xp + c * S + j0;
            const O *SH = sh.data() + j0, *AA = A.data() + j0, *BB = Bx.data() + j0, *CC = Cc.data() + j0;
#pragma omp simd
            for (int64_t j = 0; j < m; ++j)
              out[j] = to<T>(wc * AA[j] * cv<O>(g[j]) + BB[j] * (cv<O>(xx[j]) - SH[j]) + CC[j]);
          });
        }
      }
      fence(stream);
    });
    if (dw || db) {
      for (int64_t c = 0; c < C; ++c) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t i = 0; i < N * nb; ++i) { s1 += p1[i * C + c]; s2 += p2[i * C + c]; }
        if (db) db[c] = s1;
        if (dw) dw[c] = s2;
      }
    }
  }
}


// ---- Proxy Norm's activation step: out = (act(w * y + b) - m) * r per channel --------------------------
// (normkit.ops.proxy). One pass forward; one pass backward, which recomputes a = w * y + b and also
// returns the per-channel sums the parameter gradients need.

enum ActKind : int64_t { A_RELU = 0, A_LEAKY = 1, A_SILU = 2, A_GELU = 3, A_GELU_TANH = 4, A_SIGMOID = 5, A_TANH = 6, A_IDENT = 7 };

template <int A, typename O>
inline O act_f(O a, O slope) {
  if constexpr (A == A_RELU) return std::max(a, O(0));
  else if constexpr (A == A_LEAKY) return std::max(a, O(0)) + slope * std::min(a, O(0));
  else if constexpr (A == A_SILU) return a / (O(1) + std::exp(-a));
  else if constexpr (A == A_GELU) return O(0.5) * a * (O(1) + std::erf(a * O(0.70710678118654752440)));
  else if constexpr (A == A_GELU_TANH) {
    const O k = O(0.79788456080286535588);
    return O(0.5) * a * (O(1) + std::tanh(k * (a + O(0.044715) * a * a * a)));
  } else if constexpr (A == A_SIGMOID) return O(1) / (O(1) + std::exp(-a));
  else if constexpr (A == A_TANH) return std::tanh(a);
  else return a;
}

// act'(a), given z = act(a)
template <int A, typename O>
inline O act_d(O a, O z, O slope) {
  if constexpr (A == A_RELU) return static_cast<O>(z > O(0));
  else if constexpr (A == A_LEAKY) return static_cast<O>(a > O(0)) + slope * static_cast<O>(a <= O(0));
  else if constexpr (A == A_SILU) {
    O s = O(1) / (O(1) + std::exp(-a));
    return s * (O(1) + a * (O(1) - s));
  } else if constexpr (A == A_GELU) {
    O cdf = O(0.5) * (O(1) + std::erf(a * O(0.70710678118654752440)));
    O pdf = std::exp(O(-0.5) * a * a) * O(0.39894228040143267794);
    return cdf + a * pdf;
  } else if constexpr (A == A_GELU_TANH) {
    const O k = O(0.79788456080286535588), c = O(0.044715);
    O t = std::tanh(k * (a + c * a * a * a));
    return O(0.5) * (O(1) + t) + O(0.5) * a * (O(1) - t * t) * k * (O(1) + O(3) * c * a * a);
  } else if constexpr (A == A_SIGMOID) return z * (O(1) - z);
  else if constexpr (A == A_TANH) return O(1) - z * z;
  else return O(1);
}

template <int A, typename T, typename O>
void act_forward_impl(const T* y, const O* w, const O* b, const O* m, const O* r, T* out, O slope, int64_t N, int64_t C,
                      int64_t S, bool cl) {
  // NCHW only: on channels-last rows of 64 values the streamed stores measured 1.13x forward and 1.2x
  // backward with inputs out of the cache (`ab_kernels.py --modes act_cl --rotate 4`)
  const bool stream = !cl && streamed<T>(N * C * S);
  if (!cl) {
    torch::stable::parallel_for(0, N * C, grain(S), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = k % C;
        const O W = w[c], B = b[c], M = m[c], R = r[c];
        const T* p = y + k * S;
        auto fill = [=](int64_t i0, int64_t n, T* __restrict q) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) q[i] = to<T>((act_f<A, O>(W * cv<O>(p[i0 + i]) + B, slope) - M) * R);
        };
        if (stream)
          emit(out + k * S, S, true, fill);
        else
          fill(0, S, out + k * S);
      }
      fence(stream);
    });
  } else {
    torch::stable::parallel_for(0, N * S, grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const T* p = y + row * C;
        T* q = out + row * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) q[c] = to<T>((act_f<A, O>(w[c] * cv<O>(p[c]) + b[c], slope) - m[c]) * r[c]);
      }
    });
  }
}

// One contiguous run of a channel: dy (when STORE) and the four per-channel sums.
template <int A, bool STORE, typename T, typename O>
inline void act_bwd_run(const T* g, const T* p, T* q, int64_t S, O W, O B, O M, O R, O slope, O* t) {
  constexpr int L = 16;
  O a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
  int64_t i = 0;
  for (; i + L <= S; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      O yv = cv<O>(p[i + j]), gv = cv<O>(g[i + j]);
      O a = W * yv + B;
      O z = act_f<A, O>(a, slope);
      O da = act_d<A, O>(a, z, slope) * gv * R;
      if constexpr (STORE) q[i + j] = to<T>(da * W);
      a0[j] += da * yv;
      a1[j] += da;
      a2[j] += gv;
      a3[j] += gv * (z - M);
    }
  }
  O t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (int j = 0; j < L; ++j) {
    t0 += a0[j];
    t1 += a1[j];
    t2 += a2[j];
    t3 += a3[j];
  }
  for (; i < S; ++i) {
    O yv = cv<O>(p[i]), gv = cv<O>(g[i]);
    O a = W * yv + B;
    O z = act_f<A, O>(a, slope);
    O da = act_d<A, O>(a, z, slope) * gv * R;
    if constexpr (STORE) q[i] = to<T>(da * W);
    t0 += da * yv;
    t1 += da;
    t2 += gv;
    t3 += gv * (z - M);
  }
  t[0] = t0; t[1] = t1; t[2] = t2; t[3] = t3;
}

// dy = act'(a) * dout * r * w; per channel: dw = sum act'(a) dout r y, db = sum act'(a) dout r,
// sdo = sum dout, sdz = sum dout * (z - m)   (dm = -r * sdo, dr = sdz: left to the caller)
template <int A, typename T, typename O>
void act_backward_impl(const T* dout, const T* y, const O* w, const O* b, const O* m, const O* r, T* dy, double* sums,
                       O slope, int64_t N, int64_t C, int64_t S, bool cl) {
  const int64_t nthreads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const bool stream = !cl && dy && streamed<T>(N * C * S);  // as the forward
  // sums: 4 rows of C (dw, db, sdo, sdz)
  if (!cl) {
    torch::stable::parallel_for(0, C, grain(N * S), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const O W = w[c], B = b[c], M = m[c], R = r[c];
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * S;
          const T* g = dout + off;
          const T* p = y + off;
          O t[4] = {0, 0, 0, 0};
          if (stream) {  // through the L1 buffer: the sums of each buffer's run added in double
            emit(dy + off, S, true, [&](int64_t j, int64_t n, T* q) {
              act_bwd_run<A, true, T, O>(g + j, p + j, q, n, W, B, M, R, slope, t);
              s0 += t[0]; s1 += t[1]; s2 += t[2]; s3 += t[3];
            });
            continue;
          }
          if (dy)
            act_bwd_run<A, true, T, O>(g, p, dy + off, S, W, B, M, R, slope, t);
          else
            act_bwd_run<A, false, T, O>(g, p, nullptr, S, W, B, M, R, slope, t);
          const O t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3];
          s0 += t0; s1 += t1; s2 += t2; s3 += t3;
        }
        sums[c] = s0; sums[C + c] = s1; sums[2 * C + c] = s2; sums[3 * C + c] = s3;
      }
      fence(stream);
    });
    return;
  }
  const int64_t rows = N * S;
  const int64_t blocks = std::max<int64_t>(1, std::min({nthreads, rows / ROWS, rows * C / GRAIN}));
  std::vector<double> part(static_cast<size_t>(blocks * 4 * C), 0.0);
  torch::stable::parallel_for(0, blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<O> acc(static_cast<size_t>(4 * C));
    std::vector<T> scratch(static_cast<size_t>(C));
    for (int64_t blk = i0; blk < i1; ++blk) {
      double* P = part.data() + blk * 4 * C;
      const int64_t ra = rows * blk / blocks, rb = rows * (blk + 1) / blocks;
      for (int64_t q0 = ra; q0 < rb; q0 += ROWS) {
        const int64_t q1 = std::min(rb, q0 + ROWS);
        std::fill(acc.begin(), acc.end(), O(0));
        O *A0 = acc.data(), *A1 = A0 + C, *A2 = A1 + C, *A3 = A2 + C;
        for (int64_t row = q0; row < q1; ++row) {
          const T* g = dout + row * C;
          const T* p = y + row * C;
          T* q = dy ? dy + row * C : scratch.data();  // dy not needed: written to a scratch row
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            O yv = cv<O>(p[c]), gv = cv<O>(g[c]);
            O a = w[c] * yv + b[c];
            O z = act_f<A, O>(a, slope);
            O da = act_d<A, O>(a, z, slope) * gv * r[c];
            q[c] = to<T>(da * w[c]);
            A0[c] += da * yv;
            A1[c] += da;
            A2[c] += gv;
            A3[c] += gv * (z - m[c]);
          }
        }
        for (int64_t j = 0; j < 4 * C; ++j) P[j] += acc[j];
      }
    }
  });
  std::fill(sums, sums + 4 * C, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t j = 0; j < 4 * C; ++j) sums[j] += part[blk * 4 * C + j];
}

// ---- GroupNorm (no affine) + Proxy Norm's activation, fused ---------------------------------------
// out = (act(wa * xhat + ba) - M) * R per channel, xhat = x group-normalized (normkit.kernels._fast's
// GroupNormProxyAct2d path). Forward: the statistics pass, then one pass that writes out (xhat is never
// stored). Backward: it recomputes xhat, act and act' from x and the statistics; one pass gives the
// GroupNorm sums of dY = dL/dxhat and the four per-channel sums of the activation step (sums: 4 rows
// of C in double: dwa, dba, sum dout, sum dout * (z - M)), one more pass gives dx.

template <int A, typename T, typename O>
void gn_act_forward_impl(const T* x, const O* wa, const O* ba, const O* M, const O* R, T* out, O* st, int32_t* ok,
                         O slope, int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G, double eps) {
  const int64_t nthreads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const bool stream = streamed<T>(N * C * S);
  if (mode == GROUP_NCHW) {
    const int64_t Cg = C / G, L = Cg * S;
    torch::stable::parallel_for(0, N * G, grain(L), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const T* p = x + k * L;
        T* q = out + k * L;
        auto s = finish_set<O>(set_moments<T, O>(p, 1, L, L), eps, st, N * G, k, ok);
        const double b0 = -s.cm * s.rstd;
        const O sh = s.shift;
        for (int64_t j = 0; j < Cg; ++j) {
          const int64_t c = (k % G) * Cg + j;
          const O P = static_cast<O>(wa[c] * s.rstd), Q = static_cast<O>(wa[c] * b0 + ba[c]), Mc = M[c], Rc = R[c];
          const T* pp = p + j * S;
          auto fill = [=](int64_t i0, int64_t m, T* __restrict qq) {
#pragma omp simd
            for (int64_t i = 0; i < m; ++i)
              qq[i] = to<T>((act_f<A, O>((cv<O>(pp[i0 + i]) - sh) * P + Q, slope) - Mc) * Rc);
          };
          if (stream)
            emit(q + j * S, S, true, fill);
          else
            fill(0, S, q + j * S);
        }
      }
      fence(stream);
    });
    return;
  }
  std::vector<O> sh, P, Q;  // GROUP_CL
  cl_coefs<T, O>(x, static_cast<const O*>(nullptr), static_cast<const O*>(nullptr), st, ok, mode, N, C, S, G, eps,
                 nthreads, sh, P, Q);
  if (!__atomic_load_n(ok, __ATOMIC_RELAXED)) return;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {  // fold the activation's affine into the normalisation's
      O& p = P[n * C + c];
      O& q = Q[n * C + c];
      q = q * wa[c] + ba[c];
      p = p * wa[c];
    }
  const O *SH0 = sh.data(), *PP0 = P.data(), *QQ0 = Q.data();
  torch::stable::parallel_for(0, N * S, grain(C), [&](int64_t r0, int64_t r1) {
    emit_rows(out, r0, r1, C, stream, [=](int64_t r, int64_t c0, int64_t len, T* __restrict q) {
      const int64_t o = (r / S) * C + c0;
      const T* __restrict p = x + r * C + c0;
      const O* __restrict SH = SH0 + o;
      const O* __restrict PP = PP0 + o;
      const O* __restrict QQ = QQ0 + o;
      const O* __restrict Mc = M + c0;
      const O* __restrict Rc = R + c0;
#pragma omp simd
      for (int64_t c = 0; c < len; ++c)
        q[c] = to<T>((act_f<A, O>((cv<O>(p[c]) - SH[c]) * PP[c] + QQ[c], slope) - Mc[c]) * Rc[c]);
    });
    fence(stream);
  });
}

// The backward in four sums per channel and set: with d = x - shift, a = P d + Q (P = wa rstd,
// Q = ba - wa cm rstd), z = act(a), t = dout act'(a):  St = sum t, Std = sum t d, Sg = sum dout,
// Sgz = sum dout (z - M). Then dL/dxhat = R wa t, so the GroupNorm sums are R wa St and R wa Std, and
// dwa = R (rstd Std - cm rstd St), dba = R St.
template <int A, typename O>
inline void gn_act_point(O xv, O gv, O sh, O P, O Q, O Mc, O slope, O& d, O& t, O& gz) {
  d = xv - sh;
  const O a = d * P + Q;
  const O z = act_f<A, O>(a, slope);
  t = gv * act_d<A, O>(a, z, slope);
  gz = gv * (z - Mc);
}

template <int A, typename T, typename O>
void gn_act_backward_impl(const T* dout, const T* x, const O* wa, const O* ba, const O* M, const O* R, const O* st,
                          T* dx, double* sums, O slope, int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G) {
  const int64_t nsets = N * G, Cg = C / G;
  const int64_t nthreads = std::max<int64_t>(1, torch::stable::get_num_threads());
  // per (sample, channel) coefficients of the normalisation, and the four sums
  std::vector<O> SH(static_cast<size_t>(N * C)), PP(SH.size()), QQ(SH.size());
  std::vector<double> S4(static_cast<size_t>(4 * N * C), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = n * G + c / Cg;
      const double rstd = st[3 * nsets + k], cm = st[2 * nsets + k];
      SH[n * C + c] = st[k];
      PP[n * C + c] = static_cast<O>(wa[c] * rstd);
      QQ[n * C + c] = static_cast<O>(ba[c] - wa[c] * cm * rstd);
    }
  if (mode == GROUP_NCHW) {
    constexpr int V = 8;  // lanes per sum (16 was slower: six sums then spill)
    torch::stable::parallel_for(0, N * C, grain(S), [&](int64_t i0, int64_t i1) {
      for (int64_t nc = i0; nc < i1; ++nc) {
        const O sh = SH[nc], P = PP[nc], Q = QQ[nc], Mc = M[nc % C];
        const T* __restrict gp = dout + nc * S;
        const T* __restrict xp = x + nc * S;
        double d4[4] = {};
        for (int64_t j0 = 0; j0 < S; j0 += FLUSH * V) {
          const int64_t j1 = std::min(S, j0 + FLUSH * V), body = j1 - (j1 - j0) % V;
          O a0[V] = {}, a1[V] = {}, a2[V] = {}, a3[V] = {};
          for (int64_t j = j0; j < body; j += V) {
#pragma omp simd
            for (int l = 0; l < V; ++l) {
              O d, t, gz;
              const O gv = cv<O>(gp[j + l]);
              gn_act_point<A, O>(cv<O>(xp[j + l]), gv, sh, P, Q, Mc, slope, d, t, gz);
              a0[l] += t;
              a1[l] += t * d;
              a2[l] += gv;
              a3[l] += gz;
            }
          }
          for (int l = 0; l < V; ++l) {
            d4[0] += a0[l];
            d4[1] += a1[l];
            d4[2] += a2[l];
            d4[3] += a3[l];
          }
          for (int64_t j = body; j < j1; ++j) {
            O d, t, gz;
            const O gv = cv<O>(gp[j]);
            gn_act_point<A, O>(cv<O>(xp[j]), gv, sh, P, Q, Mc, slope, d, t, gz);
            d4[0] += t;
            d4[1] += static_cast<double>(t) * d;
            d4[2] += gv;
            d4[3] += gz;
          }
        }
        for (int q = 0; q < 4; ++q) S4[q * N * C + nc] = d4[q];
      }
    });
  } else {  // GROUP_CL: per sample, blocks of rows with per-column sums
    const int64_t blocks = std::max<int64_t>(1, std::min({nthreads, S / ROWS, S * C / GRAIN}));
    std::vector<double> part(static_cast<size_t>(N * blocks * 4 * C), 0.0);
    torch::stable::parallel_for(0, N * blocks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<O> acc(static_cast<size_t>(4 * C));
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t n = it / blocks, blk = it % blocks;
        const int64_t ra = S * blk / blocks, rb = S * (blk + 1) / blocks;
        double* Pt = part.data() + it * 4 * C;
        const O* __restrict sh = SH.data() + n * C;
        const O* __restrict pp = PP.data() + n * C;
        const O* __restrict qq = QQ.data() + n * C;
        for (int64_t q0 = ra; q0 < rb; q0 += ROWS) {
          const int64_t q1 = std::min(rb, q0 + ROWS);
          std::fill(acc.begin(), acc.end(), O(0));
          O* __restrict A0 = acc.data();
          O* __restrict A1 = A0 + C;
          O* __restrict A2 = A1 + C;
          O* __restrict A3 = A2 + C;
          for (int64_t row = q0; row < q1; ++row) {
            const T* __restrict gp = dout + (n * S + row) * C;
            const T* __restrict xp = x + (n * S + row) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              O d, t, gz;
              const O gv = cv<O>(gp[c]);
              gn_act_point<A, O>(cv<O>(xp[c]), gv, sh[c], pp[c], qq[c], M[c], slope, d, t, gz);
              A0[c] += t;
              A1[c] += t * d;
              A2[c] += gv;
              A3[c] += gz;
            }
          }
          for (int64_t j = 0; j < 4 * C; ++j) Pt[j] += acc[j];
        }
      }
    });
    for (int64_t n = 0; n < N; ++n)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const double* Pt = part.data() + (n * blocks + blk) * 4 * C;
        for (int q = 0; q < 4; ++q)
          for (int64_t c = 0; c < C; ++c) S4[q * N * C + n * C + c] += Pt[q * C + c];
      }
  }
  // per set: the GroupNorm backward's coefficients; per channel: the activation step's sums
  std::vector<O> K1(static_cast<size_t>(N * C)), BX(K1.size()), CC(K1.size());
  const double* St = S4.data();
  const double* Std = St + N * C;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k = n * G + g;
      double g_sum = 0.0, gd_sum = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double f = static_cast<double>(R[c]) * wa[c];
        g_sum += f * St[n * C + c];
        gd_sum += f * Std[n * C + c];
      }
      auto kc = back_coef<O>(st, nsets, k, g_sum, gd_sum);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        K1[n * C + c] = static_cast<O>(kc.tr * R[c] * wa[c]);
        BX[n * C + c] = static_cast<O>(kc.bx);
        CC[n * C + c] = static_cast<O>(kc.cc);
      }
    }
  for (int64_t c = 0; c < C; ++c) {
    double s[4] = {};
    for (int64_t n = 0; n < N; ++n) {
      const int64_t k = n * G + c / Cg;
      const double rstd = st[3 * nsets + k], cm = st[2 * nsets + k];
      s[0] += rstd * Std[n * C + c] - cm * rstd * St[n * C + c];
      s[1] += St[n * C + c];
      s[2] += S4[2 * N * C + n * C + c];
      s[3] += S4[3 * N * C + n * C + c];
    }
    sums[c] = s[0] * R[c];
    sums[C + c] = s[1] * R[c];
    sums[2 * C + c] = s[2];
    sums[3 * C + c] = s[3];
  }
  if (!dx) return;
  // dx = K1 t + bx d + cc
  const bool stream = streamed<T>(N * C * S);
  if (mode == GROUP_NCHW) {
    torch::stable::parallel_for(0, N * C, grain(S), [&](int64_t i0, int64_t i1) {
      for (int64_t nc = i0; nc < i1; ++nc) {
        const O sh = SH[nc], P = PP[nc], Q = QQ[nc], Mc = M[nc % C], k1 = K1[nc], bx = BX[nc], cc = CC[nc];
        const T* gp = dout + nc * S;
        const T* xp = x + nc * S;
        auto fill = [=](int64_t j0, int64_t m, T* __restrict q) {
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) {
            O d, t, gz;
            gn_act_point<A, O>(cv<O>(xp[j0 + j]), cv<O>(gp[j0 + j]), sh, P, Q, Mc, slope, d, t, gz);
            q[j] = to<T>(k1 * t + bx * d + cc);
          }
        };
        if (stream)
          emit(dx + nc * S, S, true, fill);
        else
          fill(0, S, dx + nc * S);
      }
      fence(stream);
    });
  } else {
    const O *SH0 = SH.data(), *PP0 = PP.data(), *QQ0 = QQ.data(), *K10 = K1.data(), *BX0 = BX.data(), *CC0 = CC.data();
    torch::stable::parallel_for(0, N * S, grain(C), [&](int64_t r0, int64_t r1) {
      emit_rows(dx, r0, r1, C, stream, [=](int64_t row, int64_t c0, int64_t len, T* __restrict q) {
        const int64_t o = (row / S) * C + c0;
        const T* __restrict gp = dout + row * C + c0;
        const T* __restrict xp = x + row * C + c0;
        const O *__restrict sh = SH0 + o, *__restrict pp = PP0 + o, *__restrict qq = QQ0 + o;
        const O *__restrict k1 = K10 + o, *__restrict bx = BX0 + o, *__restrict cc = CC0 + o;
        const O* __restrict Mc = M + c0;
#pragma omp simd
        for (int64_t c = 0; c < len; ++c) {
          O d, t, gz;
          gn_act_point<A, O>(cv<O>(xp[c]), cv<O>(gp[c]), sh[c], pp[c], qq[c], Mc[c], slope, d, t, gz);
          q[c] = to<T>(k1[c] * t + bx[c] * d + cc[c]);
        }
      });
      fence(stream);
    });
  }
}

// ---- Proxy Norm's statistics (normkit.functional.proxy_stats) ------------------------------------
// Per channel c, over n quadrature points u: Y~ = (1 + pw) u + pb, z = act(w Y~ + b), m = mean z,
// r = 1 / sqrt(mean (z - m)^2 + eps) (values in the parameters' dtype, sums in double). The backward
// takes dL/dm and dL/dr and returns dL/dw, dL/db, dL/dpb, dL/dpw (dv/dz_i = 2 (z_i - m) / n: the
// mean's own dependence cancels because the deviations sum to zero).

// (lanes of the parameters' dtype over the points, reduced in double: 200 points are 13 per lane)
template <int A, typename O>
void proxy_stats_impl(const O* w, const O* b, const O* pb, const O* pw, const O* u, int64_t n, int64_t C, O slope,
                      double eps, O* m, O* r) {
  constexpr int L = 16;
  const int64_t body = n - n % L;
  torch::stable::parallel_for(0, C, grain(n), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const O W = w[c], B = b[c], S1 = O(1) + pw[c], PB = pb[c];
      O a[L] = {};
      for (int64_t i = 0; i < body; i += L) {
#pragma omp simd
        for (int l = 0; l < L; ++l) a[l] += act_f<A, O>(W * (S1 * u[i + l] + PB) + B, slope);
      }
      double s = 0.0;
      for (int l = 0; l < L; ++l) s += a[l];
      for (int64_t i = body; i < n; ++i) s += act_f<A, O>(W * (S1 * u[i] + PB) + B, slope);
      const double mu = s / static_cast<double>(n);
      const O muo = static_cast<O>(mu);
      O q[L] = {}, e[L] = {};
      for (int64_t i = 0; i < body; i += L) {
#pragma omp simd
        for (int l = 0; l < L; ++l) {
          const O d = act_f<A, O>(W * (S1 * u[i + l] + PB) + B, slope) - muo;
          e[l] += d;
          q[l] += d * d;
        }
      }
      double sq = 0.0, se = 0.0;
      for (int l = 0; l < L; ++l) {
        sq += q[l];
        se += e[l];
      }
      for (int64_t i = body; i < n; ++i) {
        const double d = static_cast<double>(act_f<A, O>(W * (S1 * u[i] + PB) + B, slope)) - muo;
        se += d;
        sq += d * d;
      }
      const double dm = se / static_cast<double>(n);  // the rounded mean's offset
      const double var = std::max(sq / static_cast<double>(n) - dm * dm, 0.0);
      m[c] = static_cast<O>(static_cast<double>(muo) + dm);
      r[c] = static_cast<O>(1.0 / std::sqrt(static_cast<double>(static_cast<O>(var)) + eps));
    }
  });
}

template <int A, typename O>
void proxy_stats_backward_impl(const O* w, const O* b, const O* pb, const O* pw, const O* u, int64_t n, int64_t C,
                               O slope, const O* m, const O* r, const O* gm, const O* gr, O* dw, O* db, O* dpb, O* dpw) {
  constexpr int L = 16;
  const int64_t body = n - n % L;
  torch::stable::parallel_for(0, C, grain(n), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const O W = w[c], B = b[c], S1 = O(1) + pw[c], PB = pb[c], M = m[c];
      const double R = r[c], inv_n = 1.0 / static_cast<double>(n);
      const O k0 = static_cast<O>((gm ? static_cast<double>(gm[c]) : 0.0) * inv_n);
      const O k1 = static_cast<O>((gr ? -static_cast<double>(gr[c]) * R * R * R : 0.0) * inv_n);  // dz = k0 + k1 (z - m)
      O aw[L] = {}, ab[L] = {}, au[L] = {};
      for (int64_t i = 0; i < body; i += L) {
#pragma omp simd
        for (int l = 0; l < L; ++l) {
          const O yt = S1 * u[i + l] + PB;
          const O a = W * yt + B;
          const O z = act_f<A, O>(a, slope);
          const O da = (k0 + k1 * (z - M)) * act_d<A, O>(a, z, slope);
          aw[l] += da * yt;
          ab[l] += da;
          au[l] += da * u[i + l];
        }
      }
      double sw = 0.0, sb = 0.0, su = 0.0;
      for (int l = 0; l < L; ++l) {
        sw += aw[l];
        sb += ab[l];
        su += au[l];
      }
      for (int64_t i = body; i < n; ++i) {
        const O yt = S1 * u[i] + PB;
        const O a = W * yt + B;
        const O z = act_f<A, O>(a, slope);
        const double da = (static_cast<double>(k0) + static_cast<double>(k1) * (static_cast<double>(z) - M)) *
                          static_cast<double>(act_d<A, O>(a, z, slope));
        sw += da * yt;
        sb += da;
        su += da * u[i];
      }
      dw[c] = static_cast<O>(sw);
      db[c] = static_cast<O>(sb);
      dpb[c] = static_cast<O>(static_cast<double>(W) * sb);
      dpw[c] = static_cast<O>(static_cast<double>(W) * su);
    }
  });
}

template <typename F>
inline void by_act(int64_t act, F f) {
  switch (act) {
    case A_RELU: f(std::integral_constant<int, A_RELU>{}); break;
    case A_LEAKY: f(std::integral_constant<int, A_LEAKY>{}); break;
    case A_SILU: f(std::integral_constant<int, A_SILU>{}); break;
    case A_GELU: f(std::integral_constant<int, A_GELU>{}); break;
    case A_GELU_TANH: f(std::integral_constant<int, A_GELU_TANH>{}); break;
    case A_SIGMOID: f(std::integral_constant<int, A_SIGMOID>{}); break;
    case A_TANH: f(std::integral_constant<int, A_TANH>{}); break;
    default: f(std::integral_constant<int, A_IDENT>{}); break;
  }
}

// ---- entry points ----------------------------------------------------------------------------
// Pointer-level functions (dtype code: 0 float32, 1 float64, 2 float16, 3 bfloat16; the affine and the
// statistics in float32, float64 for float64 inputs; nullptr for an absent affine or output). They are
// exported with C linkage for Python's ctypes (a call costs ~2 us, a boxed stable-ABI op ~11 us, which
// is the whole arithmetic of a small norm), and wrapped as the registered ops normkit_cpu::* below.

template <typename F>
inline void by_dtype(int dt, F f) {
  switch (dt) {
    case 0: f(float{}, float{}); break;
    case 1: f(double{}, double{}); break;
    case 2: f(c10::Half{}, float{}); break;
    case 3: f(c10::BFloat16{}, float{}); break;
    default: STD_TORCH_CHECK(false, "normkit_cpu: unsupported dtype code ", dt);
  }
}

int32_t forward_ptr(int dt, const void* x, const void* w, const void* b, void* y, void* st, int64_t mode, int64_t N,
                    int64_t C, int64_t S, int64_t G, double eps) {
  int32_t ok = 1;
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    forward_impl<T>(static_cast<const T*>(x), static_cast<const O*>(w), static_cast<const O*>(b), static_cast<T*>(y),
                    static_cast<O*>(st), &ok, mode, N, C, S, G, eps);
  });
  return ok;
}

// BatchNorm's training step: the forward, then (when every set's statistics are exact) the running
// statistics updated in place, as normkit.functional._running.update_running_stats does:
// running += factor * (batch - running), the batch variance unbiased (* n / (n - 1)) when asked,
// factor = momentum, or 1 / num_batches_tracked (cumulative average) when momentum < 0. A batch whose
// update would not be finite leaves everything untouched and clears ok: the caller then takes the
// general path (which skips and counts the update).
template <typename O>
void update_running(const O* st, int64_t C, O* rm, O* rv, int64_t* nbt, double momentum, bool unbiased, int32_t* ok) {
  const double n = static_cast<double>(st[5 * C]);
  const O corr = static_cast<O>(unbiased ? n / (n - 1.0) : 1.0);
  for (int64_t c = 0; c < C; ++c) {
    O mean = static_cast<O>(static_cast<double>(st[c]) + static_cast<double>(st[2 * C + c]));
    O var = st[4 * C + c] * corr;
    if (!std::isfinite(mean) || !std::isfinite(var)) {
      *ok = 0;
      return;
    }
  }
  double f = momentum;
  if (nbt) {
    *nbt += 1;
    if (momentum < 0) f = 1.0 / static_cast<double>(*nbt);
  }
  // in double, rounded once, in torch.lerp's two forms (exact at either end: a factor of 1, momentum=1 or
  // the first step of a cumulative average as swa_utils.update_bn runs it, stores the batch's value; the
  // one-form update in float rounded it to a multiple of ulp(old value): 3% off for a variance of 1e-6)
  const double cv = static_cast<double>(corr);
  auto lerp = [f](double a, double b) { return f < 0.5 ? a + f * (b - a) : b - (b - a) * (1.0 - f); };
  for (int64_t c = 0; c < C; ++c) {
    const double mean = static_cast<double>(st[c]) + static_cast<double>(st[2 * C + c]);
    const double var = static_cast<double>(st[4 * C + c]) * cv;
    rm[c] = static_cast<O>(lerp(static_cast<double>(rm[c]), mean));
    rv[c] = static_cast<O>(lerp(static_cast<double>(rv[c]), var));
  }
}

int32_t forward_train_ptr(int dt, const void* x, const void* w, const void* b, void* y, void* st, void* rm, void* rv,
                          int64_t* nbt, int64_t mode, int64_t N, int64_t C, int64_t S, double eps, double momentum,
                          int32_t unbiased) {
  int32_t ok = forward_ptr(dt, x, w, b, y, st, mode, N, C, S, 1, eps);
  if (!ok || !rm) return ok;
  if (dt == 1) {
    update_running<double>(static_cast<const double*>(st), C, static_cast<double*>(rm), static_cast<double*>(rv), nbt,
                           momentum, unbiased != 0, &ok);
  } else {
    update_running<float>(static_cast<const float*>(st), C, static_cast<float*>(rm), static_cast<float*>(rv), nbt,
                          momentum, unbiased != 0, &ok);
  }
  return ok;
}

// Statistics saved by the reference's scaled path (inv != 1, for |x| beyond the float32 squares): the
// caller recomputes on the reference, whose backward keeps every factor representable.
bool scaled_stats(int dt, const void* st, int64_t nsets) {
  bool scaled = false;
  if (dt == 1) {
    const double* inv = static_cast<const double*>(st) + nsets;
    for (int64_t k = 0; k < nsets; ++k) scaled |= inv[k] != 1.0;
  } else {
    const float* inv = static_cast<const float*>(st) + nsets;
    for (int64_t k = 0; k < nsets; ++k) scaled |= inv[k] != 1.0f;
  }
  return scaled;
}

// rows_backward_long for any dtype, with or without weight: dweight / dbias ((M, C), M members of N / M
// rows) stored straight into the caller's tensors in the statistics dtype.
void long_rows_backward(int dt, const void* dy, const void* x, const void* w, const void* st, void* dx, void* dw,
                        void* db, int64_t N, int64_t C, int64_t G, int64_t M) {
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    auto run = [&](auto wflag) {
      rows_backward_long<decltype(wflag)::value, T, O, O>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const O*>(w), static_cast<const O*>(st),
          static_cast<T*>(dx), static_cast<O*>(dw), static_cast<O*>(db), N, C, G, M);
    };
    if (w)
      run(std::true_type{});
    else
      run(std::false_type{});
  });
}

int32_t backward_ptr(int dt, const void* dy, const void* x, const void* w, const void* st, void* dx, void* dw,
                     void* db, int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G) {
  const int64_t nsets = mode == BATCH_NCHW || mode == BATCH_CL ? C : (mode == CHANNEL_NCHW ? N * S : N * G);
  if (scaled_stats(dt, st, nsets)) return 0;
  if (mode == GROUP_NCHW && S == 1 && G > 0 && C / G > LONG_ROW) {  // long rows store dweight / dbias themselves
    long_rows_backward(dt, dy, x, w, st, dx, dw, db, N, C, G, 1);
    return 1;
  }
  // dweight / dbias accumulate in double and are stored in the statistics dtype (float32 / float64)
  std::vector<double> acc(static_cast<size_t>((dw ? C : 0) + (db ? C : 0)), 0.0);
  double* dwa = dw ? acc.data() : nullptr;
  double* dba = db ? acc.data() + (dw ? C : 0) : nullptr;
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    backward_impl<T>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const O*>(w),
                     static_cast<const O*>(st), static_cast<T*>(dx), dwa, dba, mode, N, C, S, G);
    for (int64_t c = 0; c < C; ++c) {
      if (dw) static_cast<O*>(dw)[c] = cv<O>(dwa[c]);
      if (db) static_cast<O*>(db)[c] = cv<O>(dba[c]);
    }
  });
  return 1;
}

// rows_backward_members (N rows of G sets per member, C values a row); dw / db (M, C) in the statistics
// dtype. Long rows take the column-tiled kernel, for members that each have their own input and
// statistics and share the affine (per-sample gradients) only. 0: not taken (as backward_ptr).
int32_t backward_members_ptr(int dt, const void* dy, const void* x, const void* w, const void* st, void* dx,
                             void* dw, void* db, int64_t N, int64_t C, int64_t G, int64_t M, int64_t x_step,
                             int64_t w_step, int64_t st_step) {
  const int64_t nst = st_step ? M * N * G : N * G;
  if (M < 1 || G < 1 || scaled_stats(dt, st, nst)) return 0;
  if (C / G > LONG_ROW) {
    if (x_step != N * C || w_step != 0 || st_step != N * G) return 0;
    long_rows_backward(dt, dy, x, w, st, dx, dw, db, M * N, C, G, M);
    return 1;
  }
  const int64_t P = M * C;
  std::vector<double> acc(static_cast<size_t>((dw ? P : 0) + (db ? P : 0)), 0.0);
  double* dwa = dw ? acc.data() : nullptr;
  double* dba = db ? acc.data() + (dw ? P : 0) : nullptr;
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    auto run = [&](auto wflag) {
      rows_backward_members<decltype(wflag)::value, T, O>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const O*>(w), static_cast<const O*>(st),
          static_cast<T*>(dx), dwa, dba, N, C, G, M, x_step, w_step, st_step, nst);
    };
    if (w)
      run(std::true_type{});
    else
      run(std::false_type{});
    for (int64_t c = 0; c < P; ++c) {
      if (dw) static_cast<O*>(dw)[c] = cv<O>(dwa[c]);
      if (db) static_cast<O*>(db)[c] = cv<O>(dba[c]);
    }
  });
  return 1;
}

int dtype_code(const Tensor& t) {
  using ST = torch::headeronly::ScalarType;
  switch (t.scalar_type()) {
    case ST::Float: return 0;
    case ST::Double: return 1;
    case ST::Half: return 2;
    case ST::BFloat16: return 3;
    default: STD_TORCH_CHECK(false, "normkit_cpu: unsupported dtype"); return -1;
  }
}

inline void* ptr(const Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

void norm_forward(Tensor x, Tensor w, Tensor b, Tensor y, Tensor stats, Tensor ok, int64_t mode, int64_t N, int64_t C,
                  int64_t S, int64_t G, double eps) {
  *static_cast<int32_t*>(ok.data_ptr()) =
      forward_ptr(dtype_code(x), x.data_ptr(), ptr(w), ptr(b), y.data_ptr(), stats.data_ptr(), mode, N, C, S, G, eps);
}

void norm_forward_train(Tensor x, Tensor w, Tensor b, Tensor y, Tensor stats, Tensor ok, Tensor rm, Tensor rv,
                        Tensor nbt, int64_t mode, int64_t N, int64_t C, int64_t S, double eps, double momentum,
                        bool unbiased) {
  *static_cast<int32_t*>(ok.data_ptr()) = forward_train_ptr(
      dtype_code(x), x.data_ptr(), ptr(w), ptr(b), y.data_ptr(), stats.data_ptr(), ptr(rm), ptr(rv),
      static_cast<int64_t*>(ptr(nbt)), mode, N, C, S, eps, momentum, unbiased ? 1 : 0);
}

void norm_backward(Tensor dy, Tensor x, Tensor w, Tensor stats, Tensor dx, Tensor dw, Tensor db, Tensor ok,
                   int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G) {
  *static_cast<int32_t*>(ok.data_ptr()) =
      backward_ptr(dtype_code(x), dy.data_ptr(), x.data_ptr(), ptr(w), stats.data_ptr(), ptr(dx), ptr(dw), ptr(db),
                   mode, N, C, S, G);
}

}  // namespace

// The library namespace is a macro so that variants can be built side by side for A/B timing.
#ifndef NORMKIT_CPU_NS
#define NORMKIT_CPU_NS normkit_cpu
#endif
#define NORMKIT_LIBRARY(ns, m) STABLE_TORCH_LIBRARY(ns, m)
#define NORMKIT_LIBRARY_IMPL(ns, k, m) STABLE_TORCH_LIBRARY_IMPL(ns, k, m)

NORMKIT_LIBRARY(NORMKIT_CPU_NS, m) {
  m.def("norm_forward(Tensor x, Tensor w, Tensor b, Tensor(a!) y, Tensor(b!) stats, Tensor(c!) ok, int mode, "
        "int N, int C, int S, int G, float eps) -> ()");
  m.def("norm_forward_train(Tensor x, Tensor w, Tensor b, Tensor(a!) y, Tensor(b!) stats, Tensor(c!) ok, "
        "Tensor(d!) rm, Tensor(e!) rv, Tensor(f!) nbt, int mode, int N, int C, int S, float eps, float momentum, "
        "bool unbiased) -> ()");
  m.def("norm_backward(Tensor dy, Tensor x, Tensor w, Tensor stats, Tensor(a!) dx, Tensor(b!) dw, Tensor(c!) db, "
        "Tensor(d!) ok, int mode, int N, int C, int S, int G) -> ()");
}

NORMKIT_LIBRARY_IMPL(NORMKIT_CPU_NS, CPU, m) {
  m.impl("norm_forward", TORCH_BOX(&norm_forward));
  m.impl("norm_backward", TORCH_BOX(&norm_backward));
  m.impl("norm_forward_train", TORCH_BOX(&norm_forward_train));
}

extern "C" {
int32_t normkit_forward(int dt, const void* x, const void* w, const void* b, void* y, void* st, int64_t mode, int64_t N,
                        int64_t C, int64_t S, int64_t G, double eps) {
  return forward_ptr(dt, x, w, b, y, st, mode, N, C, S, G, eps);
}
int32_t normkit_forward_train(int dt, const void* x, const void* w, const void* b, void* y, void* st, void* rm,
                              void* rv, int64_t* nbt, int64_t mode, int64_t N, int64_t C, int64_t S, double eps,
                              double momentum, int32_t unbiased) {
  return forward_train_ptr(dt, x, w, b, y, st, rm, rv, nbt, mode, N, C, S, eps, momentum, unbiased);
}
int32_t normkit_backward(int dt, const void* dy, const void* x, const void* w, const void* st, void* dx, void* dw,
                         void* db, int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G) {
  return backward_ptr(dt, dy, x, w, st, dx, dw, db, mode, N, C, S, G);
}
// The rows pattern's backward for M members, dw / db (M, C) (backward_members_ptr): per-sample gradients
// and ensembles of LayerNorm over a last dim. 0 where it does not apply: the caller takes another route.
int32_t normkit_backward_members(int dt, const void* dy, const void* x, const void* w, const void* st, void* dx,
                                 void* dw, void* db, int64_t N, int64_t C, int64_t G, int64_t M, int64_t x_step,
                                 int64_t w_step, int64_t st_step) {
  return backward_members_ptr(dt, dy, x, w, st, dx, dw, db, N, C, G, M, x_step, w_step, st_step);
}
int32_t normkit_act_forward(int dt, const void* y, const void* w, const void* b, const void* m, const void* r, void* out,
                            int64_t act, double slope, int64_t N, int64_t C, int64_t S, int32_t cl) {
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    by_act(act, [&](auto a) {
      act_forward_impl<decltype(a)::value, T, O>(static_cast<const T*>(y), static_cast<const O*>(w),
                                                 static_cast<const O*>(b), static_cast<const O*>(m),
                                                 static_cast<const O*>(r), static_cast<T*>(out), static_cast<O>(slope),
                                                 N, C, S, cl != 0);
    });
  });
  return 1;
}
int32_t normkit_act_backward(int dt, const void* dout, const void* y, const void* w, const void* b, const void* m,
                             const void* r, void* dy, double* sums, int64_t act, double slope, int64_t N, int64_t C,
                             int64_t S, int32_t cl) {
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    by_act(act, [&](auto a) {
      act_backward_impl<decltype(a)::value, T, O>(static_cast<const T*>(dout), static_cast<const T*>(y),
                                                  static_cast<const O*>(w), static_cast<const O*>(b),
                                                  static_cast<const O*>(m), static_cast<const O*>(r),
                                                  static_cast<T*>(dy), sums, static_cast<O>(slope), N, C, S, cl != 0);
    });
  });
  return 1;
}

// GroupNorm (no affine) + Proxy Norm's activation (mode GROUP_NCHW or GROUP_CL): returns ok as normkit_forward
int32_t normkit_gn_act_forward(int dt, const void* x, const void* wa, const void* ba, const void* m, const void* r,
                               void* out, void* st, int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G,
                               double eps, int64_t act, double slope) {
  int32_t ok = 1;
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    by_act(act, [&](auto a) {
      gn_act_forward_impl<decltype(a)::value, T, O>(
          static_cast<const T*>(x), static_cast<const O*>(wa), static_cast<const O*>(ba), static_cast<const O*>(m),
          static_cast<const O*>(r), static_cast<T*>(out), static_cast<O*>(st), &ok, static_cast<O>(slope), mode, N, C,
          S, G, eps);
    });
  });
  return ok;
}

int32_t normkit_gn_act_backward(int dt, const void* dout, const void* x, const void* wa, const void* ba,
                                const void* m, const void* r, const void* st, void* dx, double* sums, int64_t mode,
                                int64_t N, int64_t C, int64_t S, int64_t G, int64_t act, double slope) {
  by_dtype(dt, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    by_act(act, [&](auto a) {
      gn_act_backward_impl<decltype(a)::value, T, O>(
          static_cast<const T*>(dout), static_cast<const T*>(x), static_cast<const O*>(wa), static_cast<const O*>(ba),
          static_cast<const O*>(m), static_cast<const O*>(r), static_cast<const O*>(st), static_cast<T*>(dx), sums,
          static_cast<O>(slope), mode, N, C, S, G);
    });
  });
  return 1;
}

// dt: 0 float32, 1 float64 (the parameters' dtype)
int32_t normkit_proxy_stats(int dt, const void* w, const void* b, const void* pb, const void* pw, const void* u,
                            int64_t n, int64_t C, int64_t act, double slope, double eps, void* m, void* r) {
  auto run = [&](auto o) {
    using O = decltype(o);
    by_act(act, [&](auto a) {
      proxy_stats_impl<decltype(a)::value, O>(static_cast<const O*>(w), static_cast<const O*>(b),
                                              static_cast<const O*>(pb), static_cast<const O*>(pw),
                                              static_cast<const O*>(u), n, C, static_cast<O>(slope), eps,
                                              static_cast<O*>(m), static_cast<O*>(r));
    });
  };
  if (dt == 1) run(double{}); else run(float{});
  return 1;
}

int32_t normkit_proxy_stats_backward(int dt, const void* w, const void* b, const void* pb, const void* pw,
                                     const void* u, int64_t n, int64_t C, int64_t act, double slope, const void* m,
                                     const void* r, const void* gm, const void* gr, void* dw, void* db, void* dpb,
                                     void* dpw) {
  auto run = [&](auto o) {
    using O = decltype(o);
    by_act(act, [&](auto a) {
      proxy_stats_backward_impl<decltype(a)::value, O>(
          static_cast<const O*>(w), static_cast<const O*>(b), static_cast<const O*>(pb), static_cast<const O*>(pw),
          static_cast<const O*>(u), n, C, static_cast<O>(slope), static_cast<const O*>(m), static_cast<const O*>(r),
          static_cast<const O*>(gm), static_cast<const O*>(gr), static_cast<O*>(dw), static_cast<O*>(db),
          static_cast<O*>(dpb), static_cast<O*>(dpw));
    });
  };
  if (dt == 1) run(double{}); else run(float{});
  return 1;
}
}
