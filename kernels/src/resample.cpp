// PIL-exact resampling and multi-view composition (CONTRACT.md section 1, "Image composition").
//
// What PIL's Image.resize does for an 8-bit image (Pillow's libImaging/Resample.c), reproduced here:
//   * separable: a horizontal pass, then a vertical pass (each skipped when its size is unchanged);
//     since Pillow 13 (PR #9549) the vertical pass goes first when the height shrinks by more than
//     twice as many pixels as the width: out_h < in_h and in_h - out_h > 2 * (in_w - out_w).
//     The intermediate image is uint8, so the order changes the result: a layout names the order of
//     the Pillow that made its training images ("pillow13", or "pillow-pre13": horizontal always first);
//   * per output pixel, filter taps centred at (xx + 0.5) * scale with the support stretched by the
//     downscale factor (antialiasing); weights normalised to sum 1 in double;
//   * weights stored as fixed point with PRECISION_BITS = 22 (w * 2^22 rounded half away from 0),
//     the accumulator starts at 2^21, the result is clamp(acc >> 22, 0, 255).
// Results are bit-identical to PIL (tests/test_kernels.py checks random and natural images).
//
// Speed: the taps are computed once per (input size, output size) by Composer. The hot loops come
// in two flavours computing the same integers: portable scalar code, and AVX2 code (chosen at run
// time, so the wheel still runs on any x86-64) that splits each 22-bit weight into 11-bit halves
// so that the products fit 16-bit multiply-adds (pmaddwd) exactly. The AVX2 horizontal pass works on
// blocks of 16 rows transposed into 48-byte columns, so it has the vertical pass's vector layout
// (broadcast weights, whole columns per multiply-add); leftover rows use a per-row kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VLA_EDGE_X86 1
#include <immintrin.h>
#endif

#include "array_args.hpp"
#include "kernels.hpp"

namespace vla_edge {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // PIL's PRECISION_BITS for 8-bit images
constexpr int kSplitBits = 11;              // AVX2 path: weight = hi * 2^11 + lo, lo in [0, 2^11)

// ---------------------------------------------------------------------------------------------
// PIL's filters (Resample.c), including its float constants.

double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

double hamming_filter(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * M_PI;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));
}

double bicubic_filter(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double sinc_filter(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}

double lanczos_filter(double x) {
  if (-3.0 <= x && x < 3.0) return sinc_filter(x) * sinc_filter(x / 3);
  return 0.0;
}

struct Filter {
  double (*fn)(double);
  double support;
};

Filter parse_filter(const std::string& name, const char* arg) {
  if (name == "lanczos") return {lanczos_filter, 3.0};
  if (name == "bicubic") return {bicubic_filter, 2.0};
  if (name == "bilinear") return {bilinear_filter, 1.0};
  if (name == "hamming") return {hamming_filter, 1.0};
  if (name == "box") return {box_filter, 0.5};
  throw py::value_error(std::string(arg) + " '" + name +
                        "' is not supported (use lanczos, bicubic, bilinear, hamming or box)");
}

// One axis of a PIL resize: output pixel i reads `count[i]` input pixels from `first[i]` with the
// fixed-point weights k[i * ksize ...] (unused tail entries are 0).
struct Axis {
  int in_size = 0, out_size = 0, ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> k;
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for box (0, in_size), operation for operation.
Axis pil_axis(int in_size, int out_size, const Filter& filter) {
  Axis ax;
  ax.in_size = in_size;
  ax.out_size = out_size;
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter.support * filterscale;
  ax.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  ax.first.resize(out_size);
  ax.count.resize(out_size);
  ax.k.assign(static_cast<size_t>(out_size) * ax.ksize, 0);
  std::vector<double> w(ax.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = filter.fn((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) w[x] /= ww;
      const double f = w[x] * (1 << kPrecisionBits);
      ax.k[static_cast<size_t>(xx) * ax.ksize + x] = static_cast<int32_t>(w[x] < 0 ? -0.5 + f : 0.5 + f);
    }
    ax.first[xx] = xmin;
    ax.count[xx] = xmax;
  }
  // Drop zero weights at either end of a window (bicubic's are exactly 0 at +-2 when upscaling):
  // they add nothing to the sum, and shorter windows are cheaper.
  for (int xx = 0; xx < out_size; ++xx) {
    int32_t* k = &ax.k[static_cast<size_t>(xx) * ax.ksize];
    int lead = 0;
    while (lead < ax.count[xx] - 1 && k[lead] == 0) ++lead;
    if (lead > 0) {
      std::copy(k + lead, k + ax.count[xx], k);
      std::fill(k + ax.count[xx] - lead, k + ax.count[xx], 0);
      ax.first[xx] += lead;
      ax.count[xx] -= lead;
    }
    while (ax.count[xx] > 1 && k[ax.count[xx] - 1] == 0) --ax.count[xx];
  }
  return ax;
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Weight split for the AVX2 path: k = hi * 2^11 + lo exactly, both fitting int16.
inline int16_t split_hi(int32_t k) { return static_cast<int16_t>(k >> kSplitBits); }
inline int16_t split_lo(int32_t k) { return static_cast<int16_t>(k & ((1 << kSplitBits) - 1)); }

// Output pixel addressing: byte of (pixel i, channel c) = i * pixel_step + c * channel_step.
// Interleaved RGB: (3, 1); planar: (1, plane size).
struct PixelLayout {
  ptrdiff_t pixel_step, channel_step;
};

// ---------------------------------------------------------------------------------------------
// Scalar kernels (the definition; the AVX2 kernels must produce the same bytes).

// One row of the horizontal pass: RGB-interleaved `src` -> out_size pixels written at `dst`.
void hpass_row_scalar(const uint8_t* src, const Axis& ax, int xx0, int xx1, uint8_t* dst, PixelLayout o) {
  for (int xx = xx0; xx < xx1; ++xx) {
    const uint8_t* p = src + static_cast<ptrdiff_t>(ax.first[xx]) * 3;
    const int32_t* k = &ax.k[static_cast<size_t>(xx) * ax.ksize];
    int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
    for (int x = 0; x < ax.count[xx]; ++x) {
      s0 += p[x * 3 + 0] * k[x];
      s1 += p[x * 3 + 1] * k[x];
      s2 += p[x * 3 + 2] * k[x];
    }
    uint8_t* d = dst + xx * o.pixel_step;
    d[0] = clip8(s0);
    d[o.channel_step] = clip8(s1);
    d[2 * o.channel_step] = clip8(s2);
  }
}

// One output row of the vertical pass: `n` source rows from `src` (stride bytes apart), weights k.
void vpass_row_scalar(const uint8_t* src, ptrdiff_t stride, int row_bytes, const int32_t* k, int n,
                      uint8_t* dst, int i0 = 0) {
  for (int i = i0; i < row_bytes; ++i) {
    int32_t s = 1 << (kPrecisionBits - 1);
    for (int y = 0; y < n; ++y) s += src[y * stride + i] * k[y];
    dst[i] = clip8(s);
  }
}

// Normalisation (px/255 - 0.5)/0.5 as float32; equal to numpy's float64 formula cast to float32
// for all 256 values (checked by the tests), and cheap to vectorise.
inline float normalise(uint8_t v) { return (static_cast<float>(v) - 127.5f) / 127.5f; }

// float32 -> IEEE half bits, round to nearest even (what numpy's astype(float16) does).
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a < 6.103515625e-05f) {  // subnormal half: units of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  int e;
  const float m = std::frexp(a, &e);                                     // a = m * 2^e, m in [0.5, 1)
  uint32_t mant = static_cast<uint32_t>(std::nearbyint(std::ldexp(m, 11)));  // 11 significant bits
  if (mant == 2048) { mant = 1024; ++e; }
  const uint32_t bits = (static_cast<uint32_t>(e - 1 + 15) << 10) | (mant - 1024);
  return static_cast<uint16_t>(sign | bits);
}

uint16_t g_half_lut[256];

void init_half_lut() {
  for (int v = 0; v < 256; ++v) g_half_lut[v] = float_to_half(normalise(static_cast<uint8_t>(v)));
}

void convert_row_scalar(const uint8_t* src, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = normalise(src[i]);
}

void convert_row_scalar(const uint8_t* src, int n, uint16_t* dst) {
  for (int i = 0; i < n; ++i) dst[i] = g_half_lut[src[i]];
}

// ---------------------------------------------------------------------------------------------
// AVX2 kernels (x86-64 only, selected at run time).

#ifdef VLA_EDGE_X86
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

// Horizontal taps in groups of 4 for the AVX2 pass: per group two 256-bit vectors (hi, lo) of int16
// weights laid out as [k0 k1 k0 k1 k0 k1 0 0 | k2 k3 k2 k3 k2 k3 0 0], matching kHShuffle below.
struct HTaps {
  std::vector<int16_t> w;     // per output pixel: groups * 2 * 16 int16
  std::vector<int> offset;    // index into w of each output pixel's first group
  std::vector<int> groups;    // number of 4-tap groups
};

HTaps pack_htaps(const Axis& ax) {
  HTaps t;
  t.offset.resize(ax.out_size);
  t.groups.resize(ax.out_size);
  for (int xx = 0; xx < ax.out_size; ++xx) {
    const int n = ax.count[xx];
    const int g = (n + 3) / 4;
    t.offset[xx] = static_cast<int>(t.w.size());
    t.groups[xx] = g;
    const int32_t* k = &ax.k[static_cast<size_t>(xx) * ax.ksize];
    for (int gi = 0; gi < g; ++gi) {
      for (int part = 0; part < 2; ++part) {  // 0: hi, 1: lo
        for (int lane = 0; lane < 2; ++lane) {
          for (int j = 0; j < 8; ++j) {
            const int tap = gi * 4 + lane * 2 + (j & 1);
            const int32_t kv = (j < 6 && tap < n) ? k[tap] : 0;
            t.w.push_back(part == 0 ? split_hi(kv) : split_lo(kv));
          }
        }
      }
    }
  }
  return t;
}

__attribute__((target("avx2,f16c"))) void hpass_row_avx2(const uint8_t* src, const uint8_t* src_end,
                                                          const Axis& ax, const HTaps& taps,
                                                          uint8_t* dst, PixelLayout o) {
  // Within each 128-bit lane: pixels (2l, 2l+1) of the 4 loaded -> int16 pairs (R R)(G G)(B B)(0 0).
  const __m256i shuffle = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,  //
                                           6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
  const __m128i round = _mm_set1_epi32(1 << (kPrecisionBits - 1));
  for (int xx = 0; xx < ax.out_size; ++xx) {
    const uint8_t* p = src + static_cast<ptrdiff_t>(ax.first[xx]) * 3;
    const int groups = taps.groups[xx];
    if (p + (groups - 1) * 12 + 16 > src_end) {  // the 16-byte loads would leave the buffer
      hpass_row_scalar(src, ax, xx, xx + 1, dst, o);
      continue;
    }
    const int16_t* w = &taps.w[taps.offset[xx]];
    __m256i acc_hi = _mm256_setzero_si256(), acc_lo = _mm256_setzero_si256();
    for (int g = 0; g < groups; ++g) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + g * 12));
      const __m256i px = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), shuffle);
      const __m256i whi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 32));
      const __m256i wlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 32 + 16));
      acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(px, whi));
      acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(px, wlo));
    }
    const __m256i acc = _mm256_add_epi32(_mm256_slli_epi32(acc_hi, kSplitBits), acc_lo);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_srai_epi32(_mm_add_epi32(s, round), kPrecisionBits);
    s = _mm_packus_epi16(_mm_packs_epi32(s, s), s);  // saturating = PIL's clip8
    const uint32_t rgb = static_cast<uint32_t>(_mm_cvtsi128_si32(s));
    uint8_t* d = dst + xx * o.pixel_step;
    d[0] = static_cast<uint8_t>(rgb);
    d[o.channel_step] = static_cast<uint8_t>(rgb >> 8);
    d[2 * o.channel_step] = static_cast<uint8_t>(rgb >> 16);
  }
}

__attribute__((target("avx2,f16c"))) void vpass_row_avx2(const uint8_t* src, ptrdiff_t stride, int row_bytes,
                                                          const int32_t* k, int n, uint8_t* dst) {
  constexpr int kMaxPairs = 64;
  if (n > 2 * kMaxPairs) { vpass_row_scalar(src, stride, row_bytes, k, n, dst); return; }
  // Tap pairs (t, t+1) as int16 pairs for pmaddwd; an odd last tap pairs with weight 0.
  __m256i whi[kMaxPairs], wlo[kMaxPairs];
  const int pairs = (n + 1) / 2;
  for (int q = 0; q < pairs; ++q) {
    const int32_t k0 = k[2 * q], k1 = (2 * q + 1 < n) ? k[2 * q + 1] : 0;
    whi[q] = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(split_hi(k0)) |
                                                    (static_cast<uint32_t>(static_cast<uint16_t>(split_hi(k1))) << 16)));
    wlo[q] = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(split_lo(k0)) |
                                                    (static_cast<uint32_t>(static_cast<uint16_t>(split_lo(k1))) << 16)));
  }
  const __m256i round = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  int i = 0;
  for (; i + 16 <= row_bytes; i += 16) {
    __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0;
    for (int q = 0; q < pairs; ++q) {
      const uint8_t* r0 = src + (2 * q) * stride + i;
      const uint8_t* r1 = (2 * q + 1 < n) ? r0 + stride : r0;
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1));
      const __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));
      const __m256i hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
      h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(lo, whi[q]));
      h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(hi, whi[q]));
      l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(lo, wlo[q]));
      l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(hi, wlo[q]));
    }
    const __m256i s0 = _mm256_srai_epi32(
        _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h0, kSplitBits), l0), round), kPrecisionBits);
    const __m256i s1 = _mm256_srai_epi32(
        _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h1, kSplitBits), l1), round), kPrecisionBits);
    const __m128i p0 = _mm_packs_epi32(_mm256_castsi256_si128(s0), _mm256_extracti128_si256(s0, 1));
    const __m128i p1 = _mm_packs_epi32(_mm256_castsi256_si128(s1), _mm256_extracti128_si256(s1, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi16(p0, p1));
  }
  vpass_row_scalar(src, stride, row_bytes, k, n, dst, i);
}

__attribute__((target("avx2,f16c"))) void convert_row_avx2(const uint8_t* src, int n, float* dst) {
  const __m256 c = _mm256_set1_ps(127.5f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    _mm256_storeu_ps(dst + i, _mm256_div_ps(_mm256_sub_ps(f, c), c));
  }
  convert_row_scalar(src + i, n - i, dst + i);
}

__attribute__((target("avx2,f16c"))) void convert_row_avx2(const uint8_t* src, int n, uint16_t* dst) {
  const __m256 c = _mm256_set1_ps(127.5f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    const __m256 f = _mm256_div_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), c), c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
  }
  convert_row_scalar(src + i, n - i, dst + i);
}

// Column-blocked horizontal pass (AVX2). A block of kBlockRows rows is transposed so that each input
// column is kColBytes contiguous bytes (row r, channel c at r * 3 + c); output pixel xx of all the
// block's rows is then a weighted sum of whole columns with the same (broadcast) weights: the
// vertical pass's vector layout, with no per-pixel shuffles or horizontal sums. The sums are the
// same integers as the scalar pass (same taps, same 2^21 start, same clamp).
constexpr int kBlockRows = 16;
constexpr int kColBytes = kBlockRows * 3;

// Per output pixel: tap pairs (k[2q], k[2q+1] or 0) as int16 pairs packed in int32, hi then lo.
struct HPairs {
  std::vector<int32_t> w;   // per output pixel: pairs * 2 int32 (hi, lo per pair)
  std::vector<int> offset;  // index into w of each output pixel's first pair
};

inline int32_t pack_pair(int16_t a, int16_t b) {
  return static_cast<int32_t>(static_cast<uint16_t>(a) | (static_cast<uint32_t>(static_cast<uint16_t>(b)) << 16));
}

HPairs pack_hpairs(const Axis& ax) {
  HPairs t;
  t.offset.resize(ax.out_size);
  for (int xx = 0; xx < ax.out_size; ++xx) {
    const int n = ax.count[xx];
    const int32_t* k = &ax.k[static_cast<size_t>(xx) * ax.ksize];
    t.offset[xx] = static_cast<int>(t.w.size());
    for (int q = 0; q < (n + 1) / 2; ++q) {
      const int32_t k0 = k[2 * q], k1 = (2 * q + 1 < n) ? k[2 * q + 1] : 0;
      t.w.push_back(pack_pair(split_hi(k0), split_hi(k1)));
      t.w.push_back(pack_pair(split_lo(k0), split_lo(k1)));
    }
  }
  return t;
}

// `rows` source rows (stride bytes apart, in_w RGB pixels each) -> cols: column x at x * kColBytes.
// Column in_w (the odd last tap's partner, weight 0) is left as is: any bytes will do.
void transpose_in(const uint8_t* src, ptrdiff_t stride, int rows, int in_w, uint8_t* cols, int x0 = 0) {
  for (int x = x0; x < in_w; ++x) {
    const uint8_t* p = src + static_cast<ptrdiff_t>(x) * 3;
    uint8_t* d = cols + static_cast<ptrdiff_t>(x) * kColBytes;
    if (x + 1 < in_w) {
      // 4-byte copies; the extra byte lands on the next slot, written right after (or the next column's).
      for (int r = 0; r < rows; ++r) std::memcpy(d + r * 3, p + r * stride, 4);
    } else {
      for (int r = 0; r < rows; ++r) std::memcpy(d + r * 3, p + r * stride, 3);
    }
  }
}

// transpose_in for kBlockRows rows, 4 pixels x 16 rows at a time: each row's 4 pixels are spread to
// 4 bytes, 4x4 blocks of those are transposed, and each column's 4-row pieces are packed back to 12
// bytes and stored in increasing address order (a store's 4 spare bytes are overwritten next).
__attribute__((target("avx2,f16c"))) void transpose_in_avx2(const uint8_t* src, ptrdiff_t stride, int in_w,
                                                             uint8_t* cols) {
  static_assert(kBlockRows == 16, "transpose_in_avx2 handles 16 rows");
  const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  const __m128i pack = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  int x = 0;
  for (; x * 3 + 16 <= in_w * 3; x += 4) {  // the 16-byte loads stay inside the row
    __m128i seg[4][4];                       // [pixel][row group]
    for (int g = 0; g < 4; ++g) {
      __m128i a[4];
      for (int j = 0; j < 4; ++j) {
        const uint8_t* p = src + (4 * g + j) * stride + x * 3;
        a[j] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), spread);
      }
      const __m128i t0 = _mm_unpacklo_epi32(a[0], a[1]), t1 = _mm_unpacklo_epi32(a[2], a[3]);
      const __m128i t2 = _mm_unpackhi_epi32(a[0], a[1]), t3 = _mm_unpackhi_epi32(a[2], a[3]);
      seg[0][g] = _mm_shuffle_epi8(_mm_unpacklo_epi64(t0, t1), pack);
      seg[1][g] = _mm_shuffle_epi8(_mm_unpackhi_epi64(t0, t1), pack);
      seg[2][g] = _mm_shuffle_epi8(_mm_unpacklo_epi64(t2, t3), pack);
      seg[3][g] = _mm_shuffle_epi8(_mm_unpackhi_epi64(t2, t3), pack);
    }
    for (int px = 0; px < 4; ++px)
      for (int g = 0; g < 4; ++g)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cols + (x + px) * kColBytes + g * 12), seg[px][g]);
  }
  transpose_in(src, stride, kBlockRows, in_w, cols, x);
}

// cols of out_w output pixels -> `rows` rows of dst (row_step bytes apart) with layout o.
void transpose_out(const uint8_t* cols, int rows, int out_w, uint8_t* dst, ptrdiff_t row_step, PixelLayout o) {
  if (o.pixel_step == 3 && o.channel_step == 1) {
    for (int r = 0; r < rows; ++r) {
      uint8_t* d = dst + r * row_step;
      const uint8_t* s = cols + r * 3;
      int xx = 0;
      for (; xx + 1 < out_w; ++xx) std::memcpy(d + xx * 3, s + xx * kColBytes, 4);
      std::memcpy(d + xx * 3, s + xx * kColBytes, 3);
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    uint8_t* d = dst + r * row_step;
    const uint8_t* s = cols + r * 3;
    for (int xx = 0; xx < out_w; ++xx) {
      uint8_t* dd = d + xx * o.pixel_step;
      dd[0] = s[xx * kColBytes];
      dd[o.channel_step] = s[xx * kColBytes + 1];
      dd[2 * o.channel_step] = s[xx * kColBytes + 2];
    }
  }
}

// transpose_out for kBlockRows rows into channel planes (layout {1, plane}), 16 pixels at a time:
// each column's 48 bytes are split into its R, G, B 16-row vectors (pshufb), then each channel's
// 16 pixels x 16 rows are transposed with four unpack stages and stored as 16-byte row pieces.
__attribute__((target("avx2,f16c"))) void transpose_out_planar_avx2(const uint8_t* cols, int out_w, uint8_t* dst,
                                                                     ptrdiff_t row_step, ptrdiff_t plane) {
  const __m128i sel[9] = {
      _mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
      _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1),
      _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13),
      _mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
      _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1),
      _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14),
      _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
      _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1),
      _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15)};
  int x = 0;
  for (; x + 16 <= out_w; x += 16) {
    __m128i m[3][16];  // [channel][pixel]: rows 0..15
    for (int j = 0; j < 16; ++j) {
      const uint8_t* c = cols + (x + j) * kColBytes;
      const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
      const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16));
      const __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 32));
      for (int ch = 0; ch < 3; ++ch) {
        m[ch][j] = _mm_or_si128(
            _mm_or_si128(_mm_shuffle_epi8(v0, sel[ch * 3]), _mm_shuffle_epi8(v1, sel[ch * 3 + 1])),
            _mm_shuffle_epi8(v2, sel[ch * 3 + 2]));
      }
    }
    for (int ch = 0; ch < 3; ++ch) {
      const __m128i* a = m[ch];
      __m128i b[16], c[16], d[16];
      for (int i = 0; i < 8; ++i) {  // 2-pixel groups: rows 0..7 | 8..15
        b[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
        b[8 + i] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
      }
      for (int h = 0; h < 2; ++h) {  // 4-pixel groups: rows h*8 + 0..3 | 4..7
        for (int i = 0; i < 4; ++i) {
          c[h * 8 + i] = _mm_unpacklo_epi16(b[h * 8 + 2 * i], b[h * 8 + 2 * i + 1]);
          c[h * 8 + 4 + i] = _mm_unpackhi_epi16(b[h * 8 + 2 * i], b[h * 8 + 2 * i + 1]);
        }
      }
      for (int q = 0; q < 4; ++q) {  // 8-pixel groups: rows q*4 + 0..1 | 2..3
        for (int i = 0; i < 2; ++i) {
          d[q * 4 + i] = _mm_unpacklo_epi32(c[q * 4 + 2 * i], c[q * 4 + 2 * i + 1]);
          d[q * 4 + 2 + i] = _mm_unpackhi_epi32(c[q * 4 + 2 * i], c[q * 4 + 2 * i + 1]);
        }
      }
      uint8_t* base = dst + ch * plane + x;
      for (int e = 0; e < 8; ++e) {  // rows 2e, 2e+1
        _mm_storeu_si128(reinterpret_cast<__m128i*>(base + (2 * e) * row_step),
                         _mm_unpacklo_epi64(d[2 * e], d[2 * e + 1]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(base + (2 * e + 1) * row_step),
                         _mm_unpackhi_epi64(d[2 * e], d[2 * e + 1]));
      }
    }
  }
  for (int r = 0; r < kBlockRows; ++r) {
    uint8_t* d = dst + r * row_step;
    const uint8_t* s = cols + r * 3;
    for (int xx = x; xx < out_w; ++xx) {
      d[xx] = s[xx * kColBytes];
      d[plane + xx] = s[xx * kColBytes + 1];
      d[2 * plane + xx] = s[xx * kColBytes + 2];
    }
  }
}

// transpose_out for kBlockRows rows into interleaved RGB (layout {3, 1}), 4 pixels x 16 rows at a
// time (transpose_in_avx2 backwards); each row's 12 bytes go out as one 16-byte store whose 4 spare
// bytes are overwritten by the next block. Pixels whose store would pass the row's end (and land on
// the next row, already written) are left to the scalar loop.
__attribute__((target("avx2,f16c"))) void transpose_out_avx2(const uint8_t* cols, int out_w, uint8_t* dst,
                                                              ptrdiff_t row_step, PixelLayout o) {
  static_assert(kBlockRows == 16, "transpose_out_avx2 handles 16 rows");
  if (o.pixel_step == 1) {
    transpose_out_planar_avx2(cols, out_w, dst, row_step, o.channel_step);
    return;
  }
  if (!(o.pixel_step == 3 && o.channel_step == 1)) {
    transpose_out(cols, kBlockRows, out_w, dst, row_step, o);
    return;
  }
  const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  const __m128i pack = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  int x = 0;
  for (; x * 3 + 16 <= out_w * 3; x += 4) {  // the 16-byte stores stay inside the row
    for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3
      __m128i a[4];                 // pixel x+j: its 4 rows' RGB in 4-byte slots
      for (int j = 0; j < 4; ++j) {
        a[j] = _mm_shuffle_epi8(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + (x + j) * kColBytes + g * 12)), spread);
      }
      const __m128i t0 = _mm_unpacklo_epi32(a[0], a[1]), t1 = _mm_unpacklo_epi32(a[2], a[3]);
      const __m128i t2 = _mm_unpackhi_epi32(a[0], a[1]), t3 = _mm_unpackhi_epi32(a[2], a[3]);
      uint8_t* d = dst + (4 * g) * row_step + x * 3;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_shuffle_epi8(_mm_unpacklo_epi64(t0, t1), pack));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + row_step), _mm_shuffle_epi8(_mm_unpackhi_epi64(t0, t1), pack));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * row_step),
                       _mm_shuffle_epi8(_mm_unpacklo_epi64(t2, t3), pack));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 3 * row_step),
                       _mm_shuffle_epi8(_mm_unpackhi_epi64(t2, t3), pack));
    }
  }
  for (int r = 0; r < kBlockRows; ++r) {
    uint8_t* d = dst + r * row_step;
    const uint8_t* s = cols + r * 3;
    for (int xx = x; xx < out_w; ++xx) std::memcpy(d + xx * 3, s + xx * kColBytes, 3);
  }
}

__attribute__((target("avx2,f16c"))) void hconv_cols_avx2(const uint8_t* cols, const Axis& ax, const HPairs& hp,
                                                           uint8_t* out) {
  const __m256i round = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  for (int xx = 0; xx < ax.out_size; ++xx) {
    const uint8_t* c0 = cols + static_cast<ptrdiff_t>(ax.first[xx]) * kColBytes;
    const int pairs = (ax.count[xx] + 1) / 2;
    const int32_t* w = &hp.w[hp.offset[xx]];
    for (int i = 0; i < kColBytes; i += 16) {
      __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0;
      for (int q = 0; q < pairs; ++q) {
        const uint8_t* r0 = c0 + (2 * q) * kColBytes + i;
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + kColBytes));
        const __m256i whi = _mm256_set1_epi32(w[2 * q]), wlo = _mm256_set1_epi32(w[2 * q + 1]);
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
        h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(lo, whi));
        h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(hi, whi));
        l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(lo, wlo));
        l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(hi, wlo));
      }
      const __m256i s0 = _mm256_srai_epi32(
          _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h0, kSplitBits), l0), round), kPrecisionBits);
      const __m256i s1 = _mm256_srai_epi32(
          _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h1, kSplitBits), l1), round), kPrecisionBits);
      const __m128i p0 = _mm_packs_epi32(_mm256_castsi256_si128(s0), _mm256_extracti128_si256(s0, 1));
      const __m128i p1 = _mm_packs_epi32(_mm256_castsi256_si128(s1), _mm256_extracti128_si256(s1, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + static_cast<ptrdiff_t>(xx) * kColBytes + i),
                       _mm_packus_epi16(p0, p1));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI kernels (third run-time level): the same integer sums with 512-bit vectors and
// vpdpwssd (multiply-add-accumulate in one instruction). Each int32 lane holds one byte position's
// tap pair (pixel a, pixel b) as two int16, built by zero-extending 16 bytes to 16 int32 lanes, so
// the lanes stay in byte order and the result packs back with one saturating vpmovusdb.

bool cpu_has_avx512vnni() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

#define VLA_EDGE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")))

// 16 tap pairs (a[i], b[i]) as int16 pairs in int32 lanes.
VLA_EDGE_VNNI inline __m512i pair16(const uint8_t* a, const uint8_t* b) {
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
  const __m512i y = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  return _mm512_or_si512(x, _mm512_slli_epi32(y, 16));
}

// (hi << 11) + lo (lo started at the 2^21 rounding term) -> clamp(>> 22, 0, 255) as 16 bytes.
VLA_EDGE_VNNI inline void store16(uint8_t* d, __m512i hi, __m512i lo) {
  __m512i s = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi, kSplitBits), lo), kPrecisionBits);
  s = _mm512_max_epi32(s, _mm512_setzero_si512());
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm512_cvtusepi32_epi8(s));
}

// 32 tap pairs (a[i], b[i]): bytes widened to words, then interleaved per 128-bit lane, so `lo`
// holds bytes 8k..8k+3 and `hi` bytes 8k+4..8k+7 of lane k; store32 packs them back in order.
VLA_EDGE_VNNI inline void pair32(const uint8_t* a, const uint8_t* b, __m512i& lo, __m512i& hi) {
  const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m512i y = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  lo = _mm512_unpacklo_epi16(x, y);
  hi = _mm512_unpackhi_epi16(x, y);
}

VLA_EDGE_VNNI inline void store32(uint8_t* d, __m512i hlo, __m512i llo, __m512i hhi, __m512i lhi) {
  const __m512i slo = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(hlo, kSplitBits), llo), kPrecisionBits);
  const __m512i shi = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(hhi, kSplitBits), lhi), kPrecisionBits);
  const __m512i w = _mm512_max_epi16(_mm512_packs_epi32(slo, shi), _mm512_setzero_si512());
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtusepi16_epi8(w));
}

VLA_EDGE_VNNI void hconv_cols_vnni(const uint8_t* cols, const Axis& ax, const HPairs& hp, uint8_t* out) {
  static_assert(kColBytes == 48, "hconv_cols_vnni handles 48-byte columns");
  const __m512i round = _mm512_set1_epi32(1 << (kPrecisionBits - 1));
  for (int xx = 0; xx < ax.out_size; ++xx) {
    const uint8_t* c0 = cols + static_cast<ptrdiff_t>(ax.first[xx]) * kColBytes;
    const int pairs = (ax.count[xx] + 1) / 2;
    const int32_t* w = &hp.w[hp.offset[xx]];
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, l0 = round, l1 = round, l2 = round;
    for (int q = 0; q < pairs; ++q) {
      const uint8_t* r0 = c0 + (2 * q) * kColBytes;
      const __m512i whi = _mm512_set1_epi32(w[2 * q]), wlo = _mm512_set1_epi32(w[2 * q + 1]);
      __m512i x0, x1;
      pair32(r0, r0 + kColBytes, x0, x1);
      const __m512i x2 = pair16(r0 + 32, r0 + kColBytes + 32);
      h0 = _mm512_dpwssd_epi32(h0, x0, whi);
      l0 = _mm512_dpwssd_epi32(l0, x0, wlo);
      h1 = _mm512_dpwssd_epi32(h1, x1, whi);
      l1 = _mm512_dpwssd_epi32(l1, x1, wlo);
      h2 = _mm512_dpwssd_epi32(h2, x2, whi);
      l2 = _mm512_dpwssd_epi32(l2, x2, wlo);
    }
    uint8_t* d = out + static_cast<ptrdiff_t>(xx) * kColBytes;
    store32(d, h0, l0, h1, l1);
    store16(d + 32, h2, l2);
  }
}

VLA_EDGE_VNNI void vpass_row_vnni(const uint8_t* src, ptrdiff_t stride, int row_bytes, const int32_t* k, int n,
                                  uint8_t* dst) {
  constexpr int kMaxPairs = 64;
  if (n > 2 * kMaxPairs) { vpass_row_scalar(src, stride, row_bytes, k, n, dst); return; }
  int32_t whi[kMaxPairs], wlo[kMaxPairs];
  const int pairs = (n + 1) / 2;
  for (int q = 0; q < pairs; ++q) {
    const int32_t k0 = k[2 * q], k1 = (2 * q + 1 < n) ? k[2 * q + 1] : 0;
    whi[q] = static_cast<int32_t>(static_cast<uint16_t>(split_hi(k0)) |
                                  (static_cast<uint32_t>(static_cast<uint16_t>(split_hi(k1))) << 16));
    wlo[q] = static_cast<int32_t>(static_cast<uint16_t>(split_lo(k0)) |
                                  (static_cast<uint32_t>(static_cast<uint16_t>(split_lo(k1))) << 16));
  }
  const __m512i round = _mm512_set1_epi32(1 << (kPrecisionBits - 1));
  int i = 0;
  for (; i + 64 <= row_bytes; i += 64) {
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0, l0 = round, l1 = round, l2 = round, l3 = round;
    for (int q = 0; q < pairs; ++q) {
      const uint8_t* r0 = src + (2 * q) * stride + i;
      const uint8_t* r1 = (2 * q + 1 < n) ? r0 + stride : r0;
      const __m512i whv = _mm512_set1_epi32(whi[q]), wlv = _mm512_set1_epi32(wlo[q]);
      __m512i x0, x1, x2, x3;
      pair32(r0, r1, x0, x1);
      pair32(r0 + 32, r1 + 32, x2, x3);
      h0 = _mm512_dpwssd_epi32(h0, x0, whv);
      l0 = _mm512_dpwssd_epi32(l0, x0, wlv);
      h1 = _mm512_dpwssd_epi32(h1, x1, whv);
      l1 = _mm512_dpwssd_epi32(l1, x1, wlv);
      h2 = _mm512_dpwssd_epi32(h2, x2, whv);
      l2 = _mm512_dpwssd_epi32(l2, x2, wlv);
      h3 = _mm512_dpwssd_epi32(h3, x3, whv);
      l3 = _mm512_dpwssd_epi32(l3, x3, wlv);
    }
    store32(dst + i, h0, l0, h1, l1);
    store32(dst + i + 32, h2, l2, h3, l3);
  }
  for (; i + 32 <= row_bytes; i += 32) {
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = round, l1 = round;
    for (int q = 0; q < pairs; ++q) {
      const uint8_t* r0 = src + (2 * q) * stride + i;
      const uint8_t* r1 = (2 * q + 1 < n) ? r0 + stride : r0;
      const __m512i whv = _mm512_set1_epi32(whi[q]), wlv = _mm512_set1_epi32(wlo[q]);
      __m512i x0, x1;
      pair32(r0, r1, x0, x1);
      h0 = _mm512_dpwssd_epi32(h0, x0, whv);
      l0 = _mm512_dpwssd_epi32(l0, x0, wlv);
      h1 = _mm512_dpwssd_epi32(h1, x1, whv);
      l1 = _mm512_dpwssd_epi32(l1, x1, wlv);
    }
    store32(dst + i, h0, l0, h1, l1);
  }
  for (; i + 16 <= row_bytes; i += 16) {
    __m512i h0 = _mm512_setzero_si512(), l0 = round;
    for (int q = 0; q < pairs; ++q) {
      const uint8_t* r0 = src + (2 * q) * stride + i;
      const uint8_t* r1 = (2 * q + 1 < n) ? r0 + stride : r0;
      const __m512i x0 = pair16(r0, r1);
      h0 = _mm512_dpwssd_epi32(h0, x0, _mm512_set1_epi32(whi[q]));
      l0 = _mm512_dpwssd_epi32(l0, x0, _mm512_set1_epi32(wlo[q]));
    }
    store16(dst + i, h0, l0);
  }
  vpass_row_scalar(src, stride, row_bytes, k, n, dst, i);
}
#else
bool cpu_has_avx512vnni() { return false; }
bool cpu_has_avx2() { return false; }
struct HTaps {};
HTaps pack_htaps(const Axis&) { return {}; }
struct HPairs {};
HPairs pack_hpairs(const Axis&) { return {}; }
#endif

bool g_cpu_avx2 = false;  // what the CPU supports
bool g_cpu_vnni = false;  // AVX-512 VNNI (implies g_cpu_avx2)
bool g_use_avx2 = false;  // what the kernels use (tests switch levels to check every path)
bool g_use_vnni = false;  // AVX-512 VNNI hot loops (only with g_use_avx2)

// ---------------------------------------------------------------------------------------------
// One PIL resize with cached taps.

class Resize {
 public:
  Resize() = default;
  // `pillow13_order`: Pillow >= 13's choice of the first pass; false: Pillow < 13's (horizontal first).
  Resize(int in_w, int in_h, int out_w, int out_h, const Filter& filter, bool pillow13_order = true)
      : in_w_(in_w), in_h_(in_h), out_w_(out_w), out_h_(out_h) {
    need_h_ = out_w != in_w;
    need_v_ = out_h != in_h;
    vertical_first_ = pillow13_order && need_h_ && need_v_ && out_h < in_h && (in_h - out_h) > 2 * (in_w - out_w);
    v_ = pil_axis(in_h, out_h, filter);
    row0_ = 0;
    row1_ = in_h;
    if (need_h_) {
      h_ = pil_axis(in_w, out_w, filter);
      htaps_ = pack_htaps(h_);
      hpairs_ = pack_hpairs(h_);
#ifdef VLA_EDGE_X86
      cols_in_.assign(static_cast<size_t>(in_w + 1) * kColBytes + 16, 0);
      cols_out_.assign(static_cast<size_t>(out_w) * kColBytes + 16, 0);
#endif
      if (need_v_ && !vertical_first_) {
        // Like PIL: the horizontal pass only covers the rows the vertical pass reads.
        row0_ = v_.first[0];
        row1_ = v_.first[out_h - 1] + v_.count[out_h - 1];
      }
    }
  }

  int in_w() const { return in_w_; }
  int out_w() const { return out_w_; }
  int out_h() const { return out_h_; }
  bool need_h() const { return need_h_; }
  bool need_v() const { return need_v_; }
  bool vertical_first() const { return vertical_first_; }
  int row0() const { return row0_; }
  int rows() const { return row1_ - row0_; }

  // Horizontal pass of one RGB-interleaved row (`src_end`: end of the readable buffer) -> out_w
  // pixels written with layout `o`.
  void horizontal_row(const uint8_t* row, const uint8_t* src_end, uint8_t* out, PixelLayout o) const {
#ifdef VLA_EDGE_X86
    if (g_use_avx2) { hpass_row_avx2(row, src_end, h_, htaps_, out, o); return; }
#endif
    (void)src_end;
    hpass_row_scalar(row, h_, 0, out_w_, out, o);
  }

  // Horizontal pass of source rows row0..row1 (RGB interleaved, `src_len` bytes in all) into `tmp`,
  // tmp row r = source row row0 + r, written with layout `o` and `row_step` bytes per row.
  void horizontal(const uint8_t* src, size_t src_len, uint8_t* tmp, ptrdiff_t row_step, PixelLayout o) const {
    const ptrdiff_t stride = static_cast<ptrdiff_t>(in_w_) * 3;
    int r = row0_;
#ifdef VLA_EDGE_X86
    if (g_use_avx2) {
      for (; r + kBlockRows <= row1_; r += kBlockRows) {
        transpose_in_avx2(src + r * stride, stride, in_w_, cols_in_.data());
        if (g_use_vnni) hconv_cols_vnni(cols_in_.data(), h_, hpairs_, cols_out_.data());
        else hconv_cols_avx2(cols_in_.data(), h_, hpairs_, cols_out_.data());
        transpose_out_avx2(cols_out_.data(), out_w_, tmp + (r - row0_) * row_step, row_step, o);
      }
    }
#endif
    for (; r < row1_; ++r) horizontal_row(src + r * stride, src + src_len, tmp + (r - row0_) * row_step, o);
  }

  // Output row yy of the vertical pass over `src` (rows of row_bytes, `stride` apart, first row =
  // source row `src_row0`).
  void vertical_row(const uint8_t* src, ptrdiff_t stride, int row_bytes, int src_row0, int yy, uint8_t* dst) const {
    const uint8_t* first = src + (v_.first[yy] - src_row0) * stride;
    const int32_t* k = &v_.k[static_cast<size_t>(yy) * v_.ksize];
#ifdef VLA_EDGE_X86
    if (g_use_vnni) { vpass_row_vnni(first, stride, row_bytes, k, v_.count[yy], dst); return; }
    if (g_use_avx2) { vpass_row_avx2(first, stride, row_bytes, k, v_.count[yy], dst); return; }
#endif
    vpass_row_scalar(first, stride, row_bytes, k, v_.count[yy], dst);
  }

 private:
  int in_w_ = 0, in_h_ = 0, out_w_ = 0, out_h_ = 0;
  bool need_h_ = false, need_v_ = false, vertical_first_ = false;
  int row0_ = 0, row1_ = 0;
  Axis h_, v_;
  HTaps htaps_;
  HPairs hpairs_;
  mutable std::vector<uint8_t> cols_in_, cols_out_;  // column-blocked pass scratch (AVX2)
};

template <typename T>
void convert_row(const uint8_t* src, int n, T* dst) {
#ifdef VLA_EDGE_X86
  if (g_use_avx2) { convert_row_avx2(src, n, dst); return; }
#endif
  convert_row_scalar(src, n, dst);
}

// ---------------------------------------------------------------------------------------------
// Composer: tiles -> canvas (uint8 RGB) -> output (normalised, planar).

struct TileRect {
  int x, y, w, h;
};

class Composer {
 public:
  Composer(const std::vector<std::tuple<int, int, int, int>>& tiles, int canvas_w, int canvas_h, int output,
           const std::string& tile_filter, const std::string& output_filter,
           const std::vector<std::pair<int, int>>& frame_shapes, const std::string& resize_order = "pillow13")
      : canvas_w_(canvas_w), canvas_h_(canvas_h), out_(output) {
    const Filter tf = parse_filter(tile_filter, "layout.tile_filter");
    const Filter of = parse_filter(output_filter, "layout.output_filter");
    if (resize_order != "pillow13" && resize_order != "pillow-pre13") {
      throw py::value_error("layout.resize_order must be 'pillow13' or 'pillow-pre13', got '" + resize_order + "'");
    }
    const bool p13 = resize_order == "pillow13";
    if (canvas_w < 1 || canvas_h < 1 || canvas_w > 16384 || canvas_h > 16384) {
      throw py::value_error("layout canvas " + std::to_string(canvas_w) + "x" + std::to_string(canvas_h) +
                            " must be 1..16384 pixels on each side");
    }
    if (output < 1 || output > 16384) {
      throw py::value_error("layout.output must be 1..16384, got " + std::to_string(output));
    }
    if (tiles.empty()) throw py::value_error("layout.tiles must not be empty");
    if (frame_shapes.size() != tiles.size()) {
      throw py::value_error("frame_shapes has " + std::to_string(frame_shapes.size()) + " entries but layout has " +
                            std::to_string(tiles.size()) + " tiles");
    }
    std::vector<uint8_t> covered(static_cast<size_t>(canvas_w) * canvas_h, 0);
    for (size_t i = 0; i < tiles.size(); ++i) {
      const auto [x, y, w, h] = tiles[i];
      const std::string name = "layout.tiles[" + std::to_string(i) + "]";
      if (w < 1 || h < 1 || x < 0 || y < 0 || x + w > canvas_w || y + h > canvas_h) {
        throw py::value_error(name + " (x=" + std::to_string(x) + ", y=" + std::to_string(y) + ", w=" +
                              std::to_string(w) + ", h=" + std::to_string(h) + ") does not fit the " +
                              std::to_string(canvas_w) + "x" + std::to_string(canvas_h) + " canvas");
      }
      const auto [fh, fw] = frame_shapes[i];
      if (fh < 1 || fw < 1 || fh > 16384 || fw > 16384) {
        throw py::value_error("frame_shapes[" + std::to_string(i) + "] must be (height, width) of 1..16384 pixels");
      }
      rects_.push_back({x, y, w, h});
      shapes_.push_back({fh, fw});
      tiles_.emplace_back(fw, fh, w, h, tf, p13);
      // Horizontal-first: the rows the vertical pass reads; vertical-first: one vertical output row.
      const Resize& rs = tiles_.back();
      tmp_.emplace_back(rs.vertical_first() ? static_cast<size_t>(fw) * 3 + 16
                                            : static_cast<size_t>(rs.rows()) * w * 3 + 16);
      for (int r = y; r < y + h; ++r) std::fill_n(&covered[static_cast<size_t>(r) * canvas_w + x], w, 1);
    }
    clear_canvas_ = std::find(covered.begin(), covered.end(), 0) != covered.end();
    canvas_.assign(static_cast<size_t>(canvas_w) * canvas_h * 3 + 16, 0);
    final_ = Resize(canvas_w, canvas_h, output, output, of, p13);
    plane_rows_ = final_.need_h() ? final_.rows() : canvas_h;
    const int plane_w = final_.need_h() ? output : canvas_w;
    if (final_.vertical_first()) {
      planes_.assign(static_cast<size_t>(canvas_w) * 3 + 16, 0);  // one vertical output row
      row_.assign(static_cast<size_t>(output + 16) * 3, 0);        // three channel rows
    } else {
      planes_.assign(static_cast<size_t>(plane_rows_) * plane_w * 3 + 16, 0);
      row_.assign(static_cast<size_t>(output) + 16, 0);
    }
  }

  int output() const { return out_; }
  size_t n_tiles() const { return rects_.size(); }
  std::vector<std::pair<int, int>> frame_shapes() const { return shapes_; }

  // Validate the frames and return their data pointers (GIL held).
  std::vector<std::pair<const uint8_t*, size_t>> frame_data(const py::list& frames, std::vector<py::array>& keep) const {
    if (frames.size() != rects_.size()) {
      throw py::value_error("frames has " + std::to_string(frames.size()) + " entries but the layout has " +
                            std::to_string(rects_.size()) + " tiles");
    }
    std::vector<std::pair<const uint8_t*, size_t>> ptrs;
    for (size_t i = 0; i < frames.size(); ++i) {
      const std::string name = "frames[" + std::to_string(i) + "]";
      auto a = require_array<uint8_t>(frames[i], name.c_str(), 3);
      const auto [h, w] = shapes_[i];
      if (a.shape(0) != h || a.shape(1) != w || a.shape(2) != 3) {
        throw py::value_error(name + " must have shape (" + std::to_string(h) + ", " + std::to_string(w) +
                              ", 3) as this Composer was built for, got " + shape_str(a));
      }
      keep.push_back(a);
      ptrs.emplace_back(a.data(), static_cast<size_t>(a.size()));
    }
    return ptrs;
  }

  // Stage 1: every tile resized onto the canvas (PIL: resize each view, paste on a black canvas).
  void compose_canvas(const std::vector<std::pair<const uint8_t*, size_t>>& frames) {
    const ptrdiff_t cstride = static_cast<ptrdiff_t>(canvas_w_) * 3;
    if (clear_canvas_) std::fill(canvas_.begin(), canvas_.end(), 0);
    for (size_t i = 0; i < rects_.size(); ++i) {
      const Resize& rs = tiles_[i];
      const TileRect& t = rects_[i];
      const auto [fh, fw] = shapes_[i];
      const uint8_t* src = frames[i].first;
      ptrdiff_t stride = static_cast<ptrdiff_t>(fw) * 3;
      uint8_t* dst = canvas_.data() + t.y * cstride + static_cast<ptrdiff_t>(t.x) * 3;
      if (rs.vertical_first()) {
        uint8_t* vrow = tmp_[i].data();
        for (int yy = 0; yy < t.h; ++yy) {
          rs.vertical_row(src, stride, fw * 3, 0, yy, vrow);
          rs.horizontal_row(vrow, vrow + tmp_[i].size(), dst + yy * cstride, {3, 1});
        }
        continue;
      }
      int src_row0 = 0;
      if (rs.need_h()) {
        rs.horizontal(src, frames[i].second, tmp_[i].data(), static_cast<ptrdiff_t>(t.w) * 3, {3, 1});
        src = tmp_[i].data();
        stride = static_cast<ptrdiff_t>(t.w) * 3;
        src_row0 = rs.row0();
      }
      for (int yy = 0; yy < t.h; ++yy) {
        if (rs.need_v()) {
          rs.vertical_row(src, stride, t.w * 3, src_row0, yy, dst + yy * cstride);
        } else {
          std::memcpy(dst + yy * cstride, src + (yy - src_row0) * stride, static_cast<size_t>(t.w) * 3);
        }
      }
    }
  }

  // Stage 2: canvas -> output x output, per channel plane; `emit(c, yy, row)` receives each
  // finished uint8 row of channel c (RGB order of the canvas).
  template <typename Emit>
  void compose_output(Emit&& emit) {
    const int S = out_;
    if (final_.vertical_first()) {
      const ptrdiff_t cstride = static_cast<ptrdiff_t>(canvas_w_) * 3;
      uint8_t* vrow = planes_.data();  // sized for one canvas row (see the constructor)
      uint8_t* rows3 = row_.data();    // three output rows, S + 16 bytes apart
      const ptrdiff_t step = S + 16;
      for (int yy = 0; yy < S; ++yy) {
        final_.vertical_row(canvas_.data(), cstride, canvas_w_ * 3, 0, yy, vrow);
        final_.horizontal_row(vrow, vrow + planes_.size(), rows3, {1, step});
        for (int c = 0; c < 3; ++c) emit(c, yy, rows3 + c * step);
      }
      return;
    }
    const int plane_w = final_.need_h() ? S : canvas_w_;
    const ptrdiff_t plane = static_cast<ptrdiff_t>(plane_rows_) * plane_w;
    if (final_.need_h()) {
      final_.horizontal(canvas_.data(), canvas_.size(), planes_.data(), plane_w, {1, plane});
    } else {
      for (int r = 0; r < canvas_h_; ++r)
        for (int x = 0; x < canvas_w_; ++x)
          for (int c = 0; c < 3; ++c)
            planes_[c * plane + r * plane_w + x] = canvas_[(static_cast<size_t>(r) * canvas_w_ + x) * 3 + c];
    }
    const int src_row0 = final_.need_h() ? final_.row0() : 0;
    for (int c = 0; c < 3; ++c) {
      const uint8_t* p = planes_.data() + c * plane;
      for (int yy = 0; yy < S; ++yy) {
        if (final_.need_v()) {
          final_.vertical_row(p, plane_w, S, src_row0, yy, row_.data());
          emit(c, yy, row_.data());
        } else {
          emit(c, yy, p + (yy - src_row0) * plane_w);
        }
      }
    }
  }

  template <typename T>
  void compose_into(const std::vector<std::pair<const uint8_t*, size_t>>& frames, T* out, bool bgr) {
    std::lock_guard<std::mutex> lock(mutex_);
    compose_canvas(frames);
    const size_t plane = static_cast<size_t>(out_) * out_;
    compose_output([&](int c, int yy, const uint8_t* row) {
      const int oc = bgr ? 2 - c : c;  // a BGR frame's channel 0 is blue: it lands in output plane 2
      convert_row(row, out_, out + oc * plane + static_cast<size_t>(yy) * out_);
    });
  }

  py::array compose(const py::list& frames, py::handle out_obj, bool bgr) {
    if (!py::isinstance<py::array>(out_obj)) throw py::type_error("out must be a numpy array");
    auto out = py::reinterpret_borrow<py::array>(out_obj);
    const auto dt = out.dtype();
    const bool f32 = dt.kind() == 'f' && dt.itemsize() == 4;
    const bool f16 = dt.kind() == 'f' && dt.itemsize() == 2;
    if (!f32 && !f16) throw py::type_error("out must be float32 or float16, got " + std::string(py::str(dt)));
    if (out.ndim() != 4 || out.shape(0) != 1 || out.shape(1) != 3 || out.shape(2) != out_ || out.shape(3) != out_) {
      throw py::value_error("out must have shape (1, 3, " + std::to_string(out_) + ", " + std::to_string(out_) +
                            "), got " + shape_str(out));
    }
    if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous");
    if (!out.writeable()) throw py::value_error("out must be writeable");
    std::vector<py::array> keep;
    const auto ptrs = frame_data(frames, keep);
    void* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      if (f32) compose_into(ptrs, static_cast<float*>(dst), bgr);
      else compose_into(ptrs, static_cast<uint16_t*>(dst), bgr);
    }
    return out;
  }

  // The canvas (canvas_h, canvas_w, 3) uint8 after stage 1: PIL's pasted canvas, for tests.
  py::array_t<uint8_t> canvas(const py::list& frames) {
    std::vector<py::array> keep;
    const auto ptrs = frame_data(frames, keep);
    py::array_t<uint8_t> res({canvas_h_, canvas_w_, 3});
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      compose_canvas(ptrs);
      std::memcpy(res.mutable_data(), canvas_.data(), static_cast<size_t>(canvas_w_) * canvas_h_ * 3);
    }
    return res;
  }

  // The resized output (S, S, 3) uint8 RGB before normalisation: PIL's final image, for tests.
  py::array_t<uint8_t> compose_uint8(const py::list& frames, bool bgr) {
    std::vector<py::array> keep;
    const auto ptrs = frame_data(frames, keep);
    py::array_t<uint8_t> res({out_, out_, 3});
    uint8_t* d = res.mutable_data();
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      compose_canvas(ptrs);
      compose_output([&](int c, int yy, const uint8_t* row) {
        const int oc = bgr ? 2 - c : c;
        for (int x = 0; x < out_; ++x) d[(static_cast<size_t>(yy) * out_ + x) * 3 + oc] = row[x];
      });
    }
    return res;
  }

 private:
  int canvas_w_, canvas_h_, out_;
  std::vector<TileRect> rects_;
  std::vector<std::pair<int, int>> shapes_;
  std::vector<Resize> tiles_;
  std::vector<std::vector<uint8_t>> tmp_;  // per tile: horizontal pass output
  bool clear_canvas_ = true;
  std::vector<uint8_t> canvas_;  // canvas_h x canvas_w x 3 (+16 bytes slack for vector loads)
  Resize final_;
  int plane_rows_ = 0;
  std::vector<uint8_t> planes_;  // 3 planes after the final horizontal pass (+16 slack)
  std::vector<uint8_t> row_;     // one finished output row of one channel
  std::mutex mutex_;
};

// Plain PIL-style resize of one RGB image, for tests: (H, W, 3) uint8 -> (out_h, out_w, 3) uint8.
py::array_t<uint8_t> resize_rgb(py::handle img_obj, int out_w, int out_h, const std::string& filter,
                                const std::string& order) {
  auto img = require_array<uint8_t>(img_obj, "image", 3);
  if (img.shape(2) != 3) throw py::value_error("image must have shape (H, W, 3), got " + shape_str(img));
  if (out_w < 1 || out_h < 1) throw py::value_error("size must be positive");
  Composer c({{0, 0, out_w, out_h}}, out_w, out_h, 1, filter, "box",
             {{static_cast<int>(img.shape(0)), static_cast<int>(img.shape(1))}}, order);
  py::list frames;
  frames.append(img);
  return c.canvas(frames);
}

}  // namespace

void register_resample(py::module_& m) {
  g_cpu_avx2 = cpu_has_avx2();
  g_cpu_vnni = g_cpu_avx2 && cpu_has_avx512vnni();
  g_use_avx2 = g_cpu_avx2;
  g_use_vnni = g_cpu_vnni;
  init_half_lut();

  auto level = []() { return std::string(g_use_vnni ? "avx512vnni" : (g_use_avx2 ? "avx2" : "scalar")); };
  m.def("simd", level, "Which resampling kernels run: 'avx512vnni', 'avx2' or 'scalar' (identical results).");
  m.def("simd_levels", []() {
    std::vector<std::string> v{"scalar"};
    if (g_cpu_avx2) v.push_back("avx2");
    if (g_cpu_vnni) v.push_back("avx512vnni");
    return v;
  }, "The kernel levels this CPU can run (tests run each).");
  m.def("_set_simd", [level](const std::string& name) {
    if (name != "scalar" && name != "avx2" && name != "avx512vnni")
      throw py::value_error("simd level must be 'scalar', 'avx2' or 'avx512vnni', got '" + name + "'");
    const std::string before = level();
    g_use_avx2 = name != "scalar" && g_cpu_avx2;
    g_use_vnni = name == "avx512vnni" && g_cpu_vnni;
    return before;
  }, py::arg("level"), "Tests only: pick the kernel level (falls back to what the CPU has; not thread-safe); "
                       "returns the old level.");
  m.def("resize_rgb", &resize_rgb, py::arg("image"), py::arg("width"), py::arg("height"), py::arg("filter"),
        py::arg("order") = "pillow13",
        "PIL Image.resize of one (H, W, 3) uint8 image, bit-exact. Allocates; for tests.");

  py::class_<Composer>(m, "Composer", "Cached multi-view composition for one layout and frame sizes.")
      .def(py::init<const std::vector<std::tuple<int, int, int, int>>&, int, int, int, const std::string&,
                    const std::string&, const std::vector<std::pair<int, int>>&, const std::string&>(),
           py::arg("tiles"), py::arg("canvas_w"), py::arg("canvas_h"), py::arg("output"),
           py::arg("tile_filter"), py::arg("output_filter"), py::arg("frame_shapes"),
           py::arg("resize_order") = "pillow13")
      .def("compose", &Composer::compose, py::arg("frames"), py::arg("out"), py::arg("bgr") = false)
      .def("canvas", &Composer::canvas, py::arg("frames"))
      .def("compose_uint8", &Composer::compose_uint8, py::arg("frames"), py::arg("bgr") = false)
      .def_property_readonly("output", &Composer::output)
      .def_property_readonly("frame_shapes", &Composer::frame_shapes);
}

}  // namespace vla_edge
