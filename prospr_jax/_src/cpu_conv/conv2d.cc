// 2-D convolutions of float32 arrays for XLA's CPU backend, called through the XLA FFI.
//
// Layouts: activations [N, H, W, C] (channels last), kernels [KH, KW, I, O]. Two operations:
//
//   conv2d_forward   out[n, oh, ow, o] = sum_{kh, kw, c} xd[n, oh*sh + kh - ph, ow*sw + kw - pw, c] * k[kh, kw, c, o]
//                    where xd is x dilated by (dh, dw) (dh - 1 zero rows between rows) and zero outside.
//   conv2d_kernel_grad  out[kh, kw, c, o] = sum_{n, oh, ow} x[n, oh*sh + kh - ph, ow*sw + kw - pw, c] * g[n, oh, ow, o]
//
// The input gradient of a convolution is conv2d_forward of the output gradient (dilated by the
// strides) with the flipped, transposed kernel; the Python side arranges that.
//
// Both work one output row (n, oh) at a time: the KH input rows it reads are copied into a zero
// padded row buffer, so that the inner loops run without bounds checks over a contiguous
// (kw, c) range, and an R x OB block of 8-float accumulators stays in registers. Rows are split over
// XLA's intra-op thread pool. Results do not depend on the number of threads: every output of
// conv2d_forward is summed by one thread in a fixed order, and conv2d_kernel_grad sums fixed row
// chunks into their own partial results, added in chunk order.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector of L floats: 16 (AVX-512) or 8 (AVX2 and others), as the compiler targets.
#if defined(__AVX512F__)
constexpr int L = 16;
#else
constexpr int L = 8;
#endif
typedef float v8 __attribute__((vector_size(4 * L)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 bcast8(float x) { return v8{} + x; }

// Runs body(chunk) for chunk in [0, chunks) on the caller and up to threads - 1 pool workers. The
// caller waits only for the chunks, never for a worker to start (a pool may run tasks late).
template <typename Body>
void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t chunks;
    const Body* body;
  };
  auto state = std::make_shared<State>();
  state->chunks = chunks;
  state->body = &body;
  auto work = [](State& s) {
    for (;;) {
      int64_t i = s.next.fetch_add(1);
      if (i >= s.chunks) return;
      (*s.body)(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t workers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t t = 0; t < workers; ++t) {
    pool.Schedule([state, work]() { work(*state); });
  }
  work(*state);
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Calls f(std::integral_constant<int, n>) for a run-time 0 < n < R (the tail of a blocked loop).
template <int R, typename F>
inline void dispatch_tail(int64_t n, const F& f) {
  if constexpr (R > 1) {
    if (n == R - 1) return f(std::integral_constant<int, R - 1>{});
    dispatch_tail<R - 1>(n, f);
  }
}

struct Geometry {
  int64_t n, h, w, c;      // input
  int64_t kh, kw;          // window
  int64_t oh, ow;          // output rows / columns
  int64_t sh, sw;          // window strides
  int64_t dh, dw;          // input dilation
  int64_t ph, pw;          // low padding
  int64_t buf_w() const { return (ow - 1) * sw + kw; }
};

// Copies the input rows read by output row (n, oh) into buf ([kh][buf_w][c], zero padded). valid[kh]
// says whether row kh holds data (rows outside the input or between dilated rows are all zero and
// skipped by the callers).
void fill_rows(const float* x, const Geometry& g, int64_t n, int64_t oh, float* buf, bool* valid) {
  const int64_t bw = g.buf_w();
  const int64_t h_dilated = (g.h - 1) * g.dh + 1, w_dilated = (g.w - 1) * g.dw + 1;
  for (int64_t r = 0; r < g.kh; ++r) {
    float* row = buf + r * bw * g.c;
    const int64_t ihd = oh * g.sh + r - g.ph;
    valid[r] = ihd >= 0 && ihd < h_dilated && ihd % g.dh == 0;
    if (!valid[r]) continue;
    const float* src = x + ((n * g.h) + ihd / g.dh) * g.w * g.c;
    if (g.dw == 1) {
      const int64_t lo = std::max<int64_t>(0, g.pw), hi = std::min<int64_t>(bw, g.w + g.pw);
      if (lo > 0) std::memset(row, 0, sizeof(float) * std::min(lo, bw) * g.c);
      if (hi > lo) std::memcpy(row + lo * g.c, src + (lo - g.pw) * g.c, sizeof(float) * (hi - lo) * g.c);
      if (hi < bw) std::memset(row + std::max(hi, int64_t{0}) * g.c, 0, sizeof(float) * (bw - std::max(hi, int64_t{0})) * g.c);
    } else {
      for (int64_t j = 0; j < bw; ++j) {
        const int64_t jd = j - g.pw;
        if (jd >= 0 && jd < w_dilated && jd % g.dw == 0) {
          std::memcpy(row + j * g.c, src + (jd / g.dw) * g.c, sizeof(float) * g.c);
        } else {
          std::memset(row + j * g.c, 0, sizeof(float) * g.c);
        }
      }
    }
  }
}

// Forward block: R output columns from ow0, OB vectors of L output channels from o8 (in floats).
// kp: packed kernel [kh][kw * c][opad].
template <int R, int OB>
inline void forward_block(const float* buf, const bool* valid, const float* kp, const Geometry& g,
                          int64_t opad, int64_t ow0, int64_t o8, float* out_row, int64_t o) {
  v8 acc[R][OB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < OB; ++b) acc[r][b] = v8{};
  const int64_t kk_n = g.kw * g.c, bw = g.buf_w(), step = g.sw * g.c;
  for (int64_t r_k = 0; r_k < g.kh; ++r_k) {
    if (!valid[r_k]) continue;
    const float* xb = buf + r_k * bw * g.c + ow0 * step;
    const float* kb = kp + r_k * kk_n * opad + o8;
    for (int64_t kk = 0; kk < kk_n; ++kk) {
      v8 wv[OB];
      for (int b = 0; b < OB; ++b) wv[b] = load8(kb + kk * opad + L * b);
      for (int r = 0; r < R; ++r) {
        const v8 xv = bcast8(xb[r * step + kk]);
        for (int b = 0; b < OB; ++b) acc[r][b] += xv * wv[b];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* dst = out_row + (ow0 + r) * o + o8;
    for (int b = 0; b < OB; ++b) {
      if (o8 + L * (b + 1) <= o) {
        store8(dst + L * b, acc[r][b]);
      } else {
        float tmp[L];
        store8(tmp, acc[r][b]);
        for (int64_t i = 0; i < o - o8 - L * b; ++i) dst[L * b + i] = tmp[i];
      }
    }
  }
}

// Registers for accumulators: 16 vector registers with AVX2, 32 with AVX-512, less the OB kernel
// vectors and one broadcast.
template <int OB>
constexpr int block_width() {
  return ((L == 16 ? 32 : 16) - OB - 2) / OB;
}

// Splits n into the fewest blocks of at most R, of near-equal widths, and calls
// block(start, std::integral_constant<int, width>) for each.
template <int R, typename Block>
inline void blocks_of(int64_t n, const Block& block) {
  const int64_t nb = (n + R - 1) / R;
  if (nb == 0) return;
  const int64_t base = n / nb, extra = n % nb;
  int64_t start = 0;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t w = base + (i < extra ? 1 : 0);
    dispatch_tail<R + 1>(w, [&](auto r) { block(start, r); });
    start += w;
  }
}

template <int OB>
void forward_row(const float* buf, const bool* valid, const float* kp, const Geometry& g, int64_t opad,
                 int64_t o8, float* out_row, int64_t o) {
  blocks_of<block_width<OB>()>(g.ow, [&](int64_t ow0, auto r) {
    forward_block<decltype(r)::value, OB>(buf, valid, kp, g, opad, ow0, o8, out_row, o);
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                   int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), kd = k.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || od.size() != 4 || kd[2] != xd[3] || od[0] != xd[0] ||
      od[3] != kd[3] || sh < 1 || sw < 1 || dh < 1 || dw < 1) {
    return ffi::Error::InvalidArgument("conv2d_forward: inconsistent shapes or attributes");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], od[1], od[2], sh, sw, dh, dw, ph, pw};
  const int64_t o = kd[3], opad = (o + L - 1) / L * L;
  // Packed kernel [kh][kw * c][opad], the padding channels zero.
  std::vector<float> kp(g.kh * g.kw * g.c * opad, 0.0f);
  const float* kdata = k.typed_data();
  for (int64_t i = 0; i < g.kh * g.kw * g.c; ++i) std::memcpy(&kp[i * opad], kdata + i * o, sizeof(float) * o);
  const float* xdata = x.typed_data();
  float* odata = out->typed_data();
  const int64_t rows = g.n * g.oh;
  if (rows == 0 || g.ow == 0 || o == 0) return ffi::Error::Success();
  const int64_t chunk_rows = std::max<int64_t>(1, rows / (8 * std::max<int64_t>(1, pool.num_threads())));
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  parallel_chunks(pool, chunks, [&](int64_t chunk) {
    std::vector<float> buf(g.kh * g.buf_w() * g.c);
    std::vector<char> valid_store(g.kh);
    bool* valid = reinterpret_cast<bool*>(valid_store.data());
    for (int64_t row = chunk * chunk_rows; row < std::min(rows, (chunk + 1) * chunk_rows); ++row) {
      const int64_t n = row / g.oh, oh = row % g.oh;
      fill_rows(xdata, g, n, oh, buf.data(), valid);
      float* out_row = odata + row * g.ow * o;
      int64_t o8 = 0;
      for (; o8 + 2 * L <= opad; o8 += 2 * L) forward_row<2>(buf.data(), valid, kp.data(), g, opad, o8, out_row, o);
      for (; o8 < opad; o8 += L) forward_row<1>(buf.data(), valid, kp.data(), g, opad, o8, out_row, o);
    }
  });
  return ffi::Error::Success();
}

// Kernel-gradient block: channels c0 .. c0 + R, OB vectors of output channels from o8, one tap
// (kh, kw), summed over the output pixels of a group of rows. xrows[i]: row i's input buffer at the
// tap (nullptr where that input row is zero), grows[i]: its output-gradient row padded to [ow][opad];
// acc_mem: the partial result of the tap, [c][opad].
template <int R, int OB>
inline void kernel_grad_block(const float* const* xrows, const float* const* grows, int64_t group,
                              const Geometry& g, int64_t opad, int64_t c0, int64_t o8, float* acc_mem) {
  v8 acc[R][OB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < OB; ++b) acc[r][b] = load8(acc_mem + (c0 + r) * opad + o8 + L * b);
  const int64_t step = g.sw * g.c;
  for (int64_t i = 0; i < group; ++i) {
    if (xrows[i] == nullptr) continue;
    const float* xp = xrows[i] + c0;
    const float* gp = grows[i] + o8;
    for (int64_t j = 0; j < g.ow; ++j) {
      v8 gv[OB];
      for (int b = 0; b < OB; ++b) gv[b] = load8(gp + j * opad + L * b);
      for (int r = 0; r < R; ++r) {
        const v8 xv = bcast8(xp[j * step + r]);
        for (int b = 0; b < OB; ++b) acc[r][b] += xv * gv[b];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < OB; ++b) store8(acc_mem + (c0 + r) * opad + o8 + L * b, acc[r][b]);
}

template <int OB>
void kernel_grad_tap(const float* const* xrows, const float* const* grows, int64_t group, const Geometry& g,
                     int64_t opad, int64_t o8, float* acc_mem) {
  blocks_of<block_width<OB>()>(g.c, [&](int64_t c0, auto r) {
    kernel_grad_block<decltype(r)::value, OB>(xrows, grows, group, g, opad, c0, o8, acc_mem);
  });
}

// Kernel-gradient block for stride-1 rows and 3 columns of taps at once: channels c0 .. c0 + R, one
// vector of output channels from o8, the three taps (kh, 0..2). An input value at buffer column p
// meets the output gradient of pixel p - kw at tap kw, so each broadcast feeds three multiply-adds.
// grows[i] points at pixel 0 of a row padded with two zero vectors on either side.
template <int R>
inline void kernel_grad_block3(const float* const* xrows, const float* const* grows, int64_t group,
                               const Geometry& g, int64_t opad, int64_t c0, int64_t o8, float* acc_mem) {
  v8 acc[R][3];
  const int64_t tap = g.c * opad;  // distance between the (kh, kw) slices of the partial result
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 3; ++q) acc[r][q] = load8(acc_mem + q * tap + (c0 + r) * opad + o8);
  const int64_t positions = g.ow + 2;
  for (int64_t i = 0; i < group; ++i) {
    if (xrows[i] == nullptr) continue;
    const float* xp = xrows[i] + c0;
    const float* gp = grows[i] + o8;
    for (int64_t p = 0; p < positions; ++p) {
      const v8 g0 = load8(gp + p * opad), g1 = load8(gp + (p - 1) * opad), g2 = load8(gp + (p - 2) * opad);
      for (int r = 0; r < R; ++r) {
        const v8 xv = bcast8(xp[p * g.c + r]);
        acc[r][0] += xv * g0;
        acc[r][1] += xv * g1;
        acc[r][2] += xv * g2;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 3; ++q) store8(acc_mem + q * tap + (c0 + r) * opad + o8, acc[r][q]);
}

// Channels per block of the three-tap path: 3 * R accumulators, three gradient vectors, one broadcast.
constexpr int kThreeTapWidth = ((L == 16 ? 32 : 16) - 4) / 3;

// Output rows summed per pass over a tap, so that short rows (8x8 images) still run long inner loops.
constexpr int64_t kGroupPixels = 64;

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                      ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), gd = gy.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || od.size() != 4 || gd[0] != xd[0] || od[2] != xd[3] ||
      od[3] != gd[3] || sh < 1 || sw < 1) {
    return ffi::Error::InvalidArgument("conv2d_kernel_grad: inconsistent shapes or attributes");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], od[0], od[1], gd[1], gd[2], sh, sw, 1, 1, ph, pw};
  const int64_t o = gd[3], opad = (o + L - 1) / L * L;
  const int64_t taps = g.kh * g.kw * g.c * opad;
  const float* xdata = x.typed_data();
  const float* gdata = gy.typed_data();
  float* odata = out->typed_data();
  const int64_t rows = g.n * g.oh;
  if (taps == 0) return ffi::Error::Success();
  // A fixed number of chunks (not tied to the thread count), each summed into its own partial result.
  const int64_t chunks = std::clamp<int64_t>(rows / 64, 1, 32);
  const int64_t group_max = std::max<int64_t>(1, kGroupPixels / std::max<int64_t>(1, g.ow));
  const int64_t bw = g.buf_w(), row_floats = g.kh * bw * g.c;
  std::vector<float> partial(chunks * taps, 0.0f);
  // Stride-1 rows of a 3-wide window: three taps per broadcast (kernel_grad_block3).
  const bool three_taps = g.sw == 1 && g.kw == 3;
  parallel_chunks(pool, chunks, [&](int64_t chunk) {
    std::vector<float> buf(group_max * row_floats);
    // Output-gradient rows padded to [2 + ow + 2][opad] (zero margins for the three-tap path).
    const int64_t grow_floats = (g.ow + 4) * opad;
    std::vector<float> grow(group_max * grow_floats, 0.0f);
    std::vector<char> valid_store(group_max * g.kh);
    std::vector<const float*> xrows(group_max), grows(group_max);
    float* acc = partial.data() + chunk * taps;
    const int64_t lo = rows * chunk / chunks, hi = rows * (chunk + 1) / chunks;
    for (int64_t row0 = lo; row0 < hi; row0 += group_max) {
      const int64_t group = std::min(group_max, hi - row0);
      for (int64_t i = 0; i < group; ++i) {
        const int64_t row = row0 + i;
        fill_rows(xdata, g, row / g.oh, row % g.oh, buf.data() + i * row_floats,
                  reinterpret_cast<bool*>(valid_store.data()) + i * g.kh);
        const float* src = gdata + row * g.ow * o;
        float* dst = grow.data() + i * grow_floats + 2 * opad;
        for (int64_t j = 0; j < g.ow; ++j) std::memcpy(dst + j * opad, src + j * o, sizeof(float) * o);
        grows[i] = dst;
      }
      // xrows[i]: row i's input buffer at tap (r, q), nullptr where that input row is zero.
      auto point_rows = [&](int64_t r, int64_t q) {
        for (int64_t i = 0; i < group; ++i) {
          xrows[i] = valid_store[i * g.kh + r] ? buf.data() + i * row_floats + (r * bw + q) * g.c : nullptr;
        }
      };
      for (int64_t r = 0; r < g.kh; ++r) {
        if (three_taps) {
          point_rows(r, 0);
          float* acc_row = acc + r * g.kw * g.c * opad;
          for (int64_t o8 = 0; o8 < opad; o8 += L) {
            blocks_of<kThreeTapWidth>(g.c, [&](int64_t c0, auto w) {
              kernel_grad_block3<decltype(w)::value>(xrows.data(), grows.data(), group, g, opad, c0, o8, acc_row);
            });
          }
          continue;
        }
        for (int64_t q = 0; q < g.kw; ++q) {
          point_rows(r, q);
          float* acc_tap = acc + (r * g.kw + q) * g.c * opad;
          int64_t o8 = 0;
          for (; o8 + 2 * L <= opad; o8 += 2 * L)
            kernel_grad_tap<2>(xrows.data(), grows.data(), group, g, opad, o8, acc_tap);
          for (; o8 < opad; o8 += L) kernel_grad_tap<1>(xrows.data(), grows.data(), group, g, opad, o8, acc_tap);
        }
      }
    }
  });
  // Partial results added in chunk order (vectorised), then the padding channels dropped.
  float* total = partial.data();
  for (int64_t ch = 1; ch < chunks; ++ch) {
    const float* part = partial.data() + ch * taps;
    for (int64_t i = 0; i < taps; ++i) total[i] += part[i];
  }
  for (int64_t i = 0; i < g.kh * g.kw * g.c; ++i) std::memcpy(odata + i * o, total + i * opad, sizeof(float) * o);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProsprConv2dForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProsprConv2dKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));
