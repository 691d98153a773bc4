// gpt2lab's own products for x86 CPUs with AVX2, for the few rows of a decode step, where a product
// is bound by reading its weight from memory, with a software prefetch ahead of the reads.
//
// int8_avx2: y = (x quantized per row) times an int8 weight with a float32 scale per output channel,
// plus a float32 bias. Its rows are short (768 bytes in GPT-2 124M) for the hardware prefetchers to
// follow several at once, so the weight is laid out as the kernel reads it, (blocks, chunks, 4, 32)
// by gpt2lab.ops.pack_int8: blocks of four output channels whose rows are interleaved in 32-byte
// chunks, one sequential stream per thread. The rows of x are quantized to int8 each about its center
// with its own scale (row_range: the half range maps to 127, rounding half to even), as
// gpt2lab.ops.int8_linear does for the other kernels. The sums are exact in int32, by AVX2's byte
// products (block_sums_avx2) or, where the CPU has AVX-512 VNNI, by its dot products, four rows of x
// at a time (block_sums_vnni; int8_vnni turns it off: both give the same sums). The float32 epilogue is (((sum * x scale) * weight scale) + x center *
// weight sum) + bias, rounded at each step (built without contraction into FMAs), the order
// gpt2lab.ops.int8_linear's torch._int_mm path takes.
//
// float_avx2: y = x times a float32 weight as it is, plus a float32 bias (no copy: rows of up to a page
// are read one after another, longer ones eight at once; with several rows of x, four channels times
// two rows of x at a time).
//
// float_blocks_avx2: the same product on a copy of the weight laid out as the kernel reads it,
// (blocks, in, 16) by float_blocks: blocks of 16 output channels, each one sequential stream of the
// 16 channels' values at one input position after another (a cache line each), one stream per thread.
// Each line multiplies by one broadcast value of x: no sums across lanes. With several rows of x each
// line is loaded once for four of them (8 FMAs a line, in flight together), and where the CPU has
// AVX-512, from three rows on, once for eight of them (a line in one register, with a prefetch ahead,
// which the four-row AVX2 form does without; float_avx512 turns it off).
//
// attention_avx2: a decode step's attention, one query per row and head over the keys and values of
// the KV cache, read where they lie (strided views of it), in one pass of each query over its keys.
// cache_attention_avx2 writes the step's keys and values into the cache first, in the same call.
//
// causal_attention_avx512: a whole prompt's causal attention on AVX-512 CPUs, every query of every head
// over the keys up to its own, in tiles of six queries by 32 keys (only up to the diagonal).
//
// add_layer_norm: a block's residual add and the LayerNorm after it, in one pass over each row.
//
// gelu_avx2_: GPT-2's tanh-GELU in place, by its sigmoid form with an exponential of its own.
//
// quantize_rows, normalize_rows and scale_rows_: the other int8 kernels' (torch._int_mm, oneDNN's,
// fbgemm's) input scaling or quantization per row, and their output's scaling, one pass each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 4;     // output channels read together
constexpr int64_t kChunk = 32;    // bytes of one AVX2 register
constexpr int64_t kGrain = 4;     // blocks per thread at least: a tiny product is not worth splitting finer
constexpr int64_t kAhead = 1024;  // bytes of the weight prefetched (into L2) ahead of the ones read
// The same in a product of more rows than one pass over a block takes (kRowGroup): each block is then
// read from memory in the first pass and multiplied from L1 in the next, so the weight is read in
// bursts and a prefetch that is to land in time is issued further ahead.
constexpr int64_t kAheadRows = 8192;

inline int32_t sum_lanes(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// How one row of x is quantized to 8 bits: about its center (the midpoint of its smallest and largest
// values), its half range (at least 1e-12) mapping to 127, so the 255 levels span the row's own range
// however lopsided (a GELU's output: from -0.17 to its largest; gpt2lab.ops.row_range). The product
// then adds back the center times each output channel's weight sum (gpt2lab.ops.weight_channels).
struct RowRange {
  float center;
  float half;
};

RowRange row_range(const float* x, int64_t in) {
  __m256 lo8 = _mm256_set1_ps(INFINITY), hi8 = _mm256_set1_ps(-INFINITY);
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    lo8 = _mm256_min_ps(lo8, v);
    hi8 = _mm256_max_ps(hi8, v);
  }
  alignas(32) float lows[8], highs[8];
  _mm256_store_ps(lows, lo8);
  _mm256_store_ps(highs, hi8);
  float lo = *std::min_element(lows, lows + 8), hi = *std::max_element(highs, highs + 8);
  for (; k < in; ++k) {
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
  }
  return {(hi + lo) / 2.f, std::max((hi - lo) / 2.f, 1e-12f)};
}

// (x - center) / scale rounded half to even and kept within 127 (the same correctly rounded operations
// as aten's sub, div, round and clamp), 8 lanes.
inline __m256i quantized8(const float* x, __m256 center8, __m256 scale8) {
  const __m256 rounded = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(x), center8), scale8),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i q = _mm256_cvtps_epi32(rounded);
  return _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
}

inline int32_t quantized(float x, float center, float scale) {
  return std::clamp(static_cast<int32_t>(std::nearbyint((x - center) / scale)), -127, 127);
}

// One row of x quantized: its values (zero past the input's width) and their magnitudes, its scale,
// its center and the sum of its values.
struct QuantizedRow {
  std::vector<int8_t> value;
  std::vector<uint8_t> magnitude;
  float scale;
  float center;
  int32_t total;  // the sum of its values
};

QuantizedRow quantize_row(const float* x, int64_t in, int64_t padded) {
  const RowRange range = row_range(x, in);
  QuantizedRow row{std::vector<int8_t>(padded, 0), std::vector<uint8_t>(padded, 0), range.half / 127.f,
                   range.center, 0};
  const __m256 scale8 = _mm256_set1_ps(row.scale), center8 = _mm256_set1_ps(row.center);
  alignas(32) int32_t q[8];
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), quantized8(x + k, center8, scale8));
    for (int64_t j = 0; j < 8; ++j) {
      row.value[k + j] = static_cast<int8_t>(q[j]);
      row.magnitude[k + j] = static_cast<uint8_t>(q[j] < 0 ? -q[j] : q[j]);
      row.total += q[j];
    }
  }
  for (; k < in; ++k) {
    const int32_t v = quantized(x[k], row.center, row.scale);
    row.value[k] = static_cast<int8_t>(v);
    row.magnitude[k] = static_cast<uint8_t>(v < 0 ? -v : v);
    row.total += v;
  }
  return row;
}

// The rows of x (..., in): every position before its last dimension.
inline int64_t leading_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// The output (..., out) of a product of x (..., in): x's leading dimensions, then `out`.
inline at::Tensor output_of(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  return at::empty(shape, x.options());
}

// The bias's values (null without one), checked: contiguous float32, one per output channel.
const float* bias_values(const std::optional<at::Tensor>& bias, int64_t out) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
              "bias must be contiguous float32 with one value per output channel");
  return bias->data_ptr<float>();
}

// The per-channel constants of an int8 weight (out, in), (2, out) float32
// (gpt2lab.ops.weight_channels): its scales, and the sums of its dequantized rows (the product of a row
// of x's center by the weight).
struct Channels {
  const float* scale;
  const float* sum;
};

Channels channel_values(const at::Tensor& channels, int64_t out) {
  TORCH_CHECK(channels.dim() == 2 && channels.size(0) == 2 && channels.size(1) == out &&
                  channels.scalar_type() == at::kFloat && channels.is_contiguous(),
              "channels must be contiguous (2, out) float32: the weight's scales and its rows' sums");
  return {channels.data_ptr<float>(), channels.data_ptr<float>() + out};
}

// The rows' own values checked: contiguous float32, one per row.
const float* row_values(const at::Tensor& values, int64_t rows, const char* name) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous() && values.numel() == rows, name,
              " must be contiguous float32, one per row");
  return values.data_ptr<float>();
}

// quantize_rows: each row of x (rows, in) float32 quantized to 8 bits about its center (row_range), as
// gpt2lab.ops.int8_linear's torch._int_mm and oneDNN kernels take it: (q, scales (rows, 1), centers
// (rows, 1)), q int8, or with offset 128 uint8 q + 128 (oneDNN's zero point). One pass over each row
// to find its range, one to quantize it, 32 values at a time; the same values as aten's amin, amax,
// sub, div, round and clamp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t offset) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (rows, in) float32");
  TORCH_CHECK(offset == 0 || offset == 128, "offset must be 0 (int8) or 128 (uint8)");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1);
  at::Tensor q = at::empty({rows, in}, xc.options().dtype(offset == 0 ? at::kChar : at::kByte));
  at::Tensor scales = at::empty({rows, 1}, xc.options()), centers = at::empty({rows, 1}, xc.options());
  const float* xp = xc.data_ptr<float>();
  uint8_t* qp = static_cast<uint8_t*>(q.data_ptr());
  float* sp = scales.data_ptr<float>();
  float* cp = centers.data_ptr<float>();
  const __m256i shift = _mm256_set1_epi32(static_cast<int32_t>(offset));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs interleave 128-bit lanes
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * in;
      uint8_t* qr = qp + r * in;
      const RowRange range = row_range(xr, in);
      const float scale = sp[r] = range.half / 127.f, center = cp[r] = range.center;
      const __m256 scale8 = _mm256_set1_ps(scale), center8 = _mm256_set1_ps(center);
      int64_t k = 0;
      for (; k + 32 <= in; k += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; ++j) v[j] = _mm256_add_epi32(quantized8(xr + k + 8 * j, center8, scale8), shift);
        const __m256i pairs01 = _mm256_packs_epi32(v[0], v[1]), pairs23 = _mm256_packs_epi32(v[2], v[3]);
        const __m256i bytes = offset == 0 ? _mm256_packs_epi16(pairs01, pairs23) : _mm256_packus_epi16(pairs01, pairs23);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), _mm256_permutevar8x32_epi32(bytes, order));
      }
      for (; k < in; ++k) qr[k] = static_cast<uint8_t>(quantized(xr[k], center, scale) + offset);
    }
  });
  return {q, scales, centers};
}

// normalize_rows: each row of x (rows, in) float32 about its center over its half range (row_range), as
// gpt2lab.ops.int8_linear's fbgemm kernel takes it: ((x - center) / half, halves (rows, 1), centers
// (rows, 1)), in one pass over each row for its range and one for the rest (the same values as aten's
// amin, amax, sub and div).
std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (rows, in) float32");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1);
  at::Tensor y = at::empty_like(xc);
  at::Tensor halves = at::empty({rows, 1}, xc.options()), centers = at::empty({rows, 1}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* hp = halves.data_ptr<float>();
  float* cp = centers.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * in;
      float* yr = yp + r * in;
      const RowRange range = row_range(xr, in);
      const float half = hp[r] = range.half, center = cp[r] = range.center;
      const __m256 half8 = _mm256_set1_ps(half), center8 = _mm256_set1_ps(center);
      int64_t k = 0;
      for (; k + 8 <= in; k += 8)
        _mm256_storeu_ps(yr + k, _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + k), center8), half8));
      for (; k < in; ++k) yr[k] = (xr[k] - center) / half;
    }
  });
  return {y, halves, centers};
}

// scale_rows_: a product's output y (rows, out) of 8-bit inputs, int32 sums (converted to float32 in
// their own memory) or float32 ones that carry the weight's scales already (`scaled`: oneDNN's), to
// (((y * row_scales[r]) * scale[c]) + centers[r] * sum[c]) + bias[c] (scale and sum: `channels`),
// rounded at each step as aten's mul_, mul_, mul, add_ and add_ round them; the bias optional. Returns
// y's memory as float32.
at::Tensor scale_rows_(at::Tensor& y, const at::Tensor& row_scales, const at::Tensor& centers,
                       const at::Tensor& channels, bool scaled, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && (y.scalar_type() == at::kInt || y.scalar_type() == at::kFloat),
              "y must be contiguous (rows, out) int32 or float32");
  const int64_t rows = y.size(0), out = y.size(1);
  const float* rs = row_values(row_scales, rows, "row_scales");
  const float* rc = row_values(centers, rows, "centers");
  const Channels ch = channel_values(channels, out);
  const float* b = bias_values(bias, out);
  const bool sums = y.scalar_type() == at::kInt;
  float* yp = static_cast<float*>(y.data_ptr());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* yr = yp + r * out;
      const __m256 rs8 = _mm256_set1_ps(rs[r]), rc8 = _mm256_set1_ps(rc[r]);
      int64_t c = 0;
      for (; c + 8 <= out; c += 8) {
        __m256 v = sums ? _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(yr + c)))
                        : _mm256_loadu_ps(yr + c);
        v = _mm256_mul_ps(v, rs8);
        if (!scaled) v = _mm256_mul_ps(v, _mm256_loadu_ps(ch.scale + c));
        v = _mm256_add_ps(v, _mm256_mul_ps(rc8, _mm256_loadu_ps(ch.sum + c)));
        if (b != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(b + c));
        _mm256_storeu_ps(yr + c, v);
      }
      for (; c < out; ++c) {
        int32_t sum;
        std::memcpy(&sum, yr + c, sizeof sum);
        float v = (sums ? static_cast<float>(sum) : yr[c]) * rs[r];
        if (!scaled) v = v * ch.scale[c];
        v = v + rc[r] * ch.sum[c];
        if (b != nullptr) v = v + b[c];
        yr[c] = v;
      }
    }
  });
  return sums ? y.view(at::kFloat) : y;
}

// One block's four sums of a row of x by AVX2: each 32-byte chunk multiplies by the sign trick of the
// unsigned-by-signed byte product, |x| times (w with x's sign), whose 16-bit pair sums (at most 2 x 127
// x 127) never saturate, then sums them in int32.
void block_sums_avx2(const int8_t* first, int64_t chunks, const int8_t* v, const uint8_t* m, int32_t* sums) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kBlock] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                         _mm256_setzero_si256()};
  const int8_t* p = first;
  for (int64_t k = 0; k < chunks * kChunk; k += kChunk, p += kBlock * kChunk) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kAhead), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + 64), _MM_HINT_T1);
    const __m256i xm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + k));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + k));
    for (int j = 0; j < kBlock; ++j) {
      const __m256i wj = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * kChunk));
      const __m256i pairs = _mm256_maddubs_epi16(xm, _mm256_sign_epi8(wj, xv));
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs, ones));
    }
  }
  for (int j = 0; j < kBlock; ++j) sums[j] = sum_lanes(acc[j]);
}

// The same four sums by AVX-512 VNNI's unsigned-by-signed byte dot product, 64 bytes (two channels'
// chunks) per instruction: the weight offset to unsigned (w ^ 0x80 = w + 128) times x, less 128 times
// the sum of x's values (`total`). Exact in int32 (at most 255 x 127 per byte pair): the same sums.
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

VNNI inline __m512i unsigned_chunks(const int8_t* w) {  // 64 bytes of the weight, each + 128 as unsigned
  return _mm512_xor_si512(_mm512_loadu_si512(w), _mm512_set1_epi8(static_cast<char>(0x80)));
}

VNNI inline __m512i row_chunk(const int8_t* v, int64_t k) {  // x's chunk k in both halves
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + k * kChunk)));
}

// The four channels' sums from the accumulators of channels 0, 1 (a01's halves) and 2, 3 (a23's), all
// four at once: the 128-bit quarters of each channel side by side, then each quarter summed within.
VNNI inline void vnni_sums(__m512i a01, __m512i a23, int32_t total, int32_t* sums) {
  const __m512i even = _mm512_shuffle_i64x2(a01, a23, 0x88);  // quarters 0 and 2 of each: channels 0 to 3
  const __m512i odd = _mm512_shuffle_i64x2(a01, a23, 0xDD);   // quarters 1 and 3
  __m512i s = _mm512_add_epi32(even, odd);                     // quarter c: four partial sums of channel c
  s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC));
  s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_CDAB));  // every lane of quarter c: its sum
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);  // lane 0 of each quarter
  const __m128i four = _mm512_castsi512_si128(_mm512_permutexvar_epi32(firsts, s));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(sums), _mm_sub_epi32(four, _mm_set1_epi32(128 * total)));
}

VNNI void block_sums_vnni(const int8_t* first, int64_t chunks, const int8_t* v, int32_t total, int32_t* sums) {
  __m512i a01 = _mm512_setzero_si512(), a23 = _mm512_setzero_si512();  // even chunks: channels 0, 1 and 2, 3
  __m512i b01 = _mm512_setzero_si512(), b23 = _mm512_setzero_si512();  // odd chunks
  const int8_t* p = first;
  int64_t k = 0;
  for (; k + 2 <= chunks; k += 2, p += 2 * kBlock * kChunk) {
    for (int64_t line = 0; line < 4; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + line * 64), _MM_HINT_T1);
    }
    const __m512i x0 = row_chunk(v, k), x1 = row_chunk(v, k + 1);
    a01 = _mm512_dpbusd_epi32(a01, unsigned_chunks(p), x0);
    a23 = _mm512_dpbusd_epi32(a23, unsigned_chunks(p + 64), x0);
    b01 = _mm512_dpbusd_epi32(b01, unsigned_chunks(p + 128), x1);
    b23 = _mm512_dpbusd_epi32(b23, unsigned_chunks(p + 192), x1);
  }
  if (k < chunks) {
    const __m512i x0 = row_chunk(v, k);
    a01 = _mm512_dpbusd_epi32(a01, unsigned_chunks(p), x0);
    a23 = _mm512_dpbusd_epi32(a23, unsigned_chunks(p + 64), x0);
  }
  vnni_sums(_mm512_add_epi32(a01, b01), _mm512_add_epi32(a23, b23), total, sums);
}

// The same for R rows of x at once (2 to kRowGroup), each chunk of the weight loaded and offset once
// for all R, their 2R accumulators in registers. More rows at a time take no less time per row: the
// multiply-adds, not the loads, bound a product of four rows or more (eight rows run as two groups).
constexpr int64_t kRowGroup = 4;

template <int64_t R>
VNNI void block_sums_vnni_rows(const int8_t* first, int64_t chunks, const QuantizedRow* qx, int32_t (*sums)[kBlock],
                               int64_t ahead) {
  static_assert(2 <= R && R <= kRowGroup, "2 to kRowGroup rows");
  __m512i a01[R], a23[R];
  for (int64_t r = 0; r < R; ++r) a01[r] = a23[r] = _mm512_setzero_si512();
  const int8_t* p = first;
  for (int64_t k = 0; k < chunks; ++k, p += kBlock * kChunk) {
    _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p + ahead + 64), _MM_HINT_T1);
    const __m512i w01 = unsigned_chunks(p), w23 = unsigned_chunks(p + 64);
    for (int64_t r = 0; r < R; ++r) {
      const __m512i x = row_chunk(qx[r].value.data(), k);
      a01[r] = _mm512_dpbusd_epi32(a01[r], w01, x);
      a23[r] = _mm512_dpbusd_epi32(a23[r], w23, x);
    }
  }
  for (int64_t r = 0; r < R; ++r) vnni_sums(a01[r], a23[r], qx[r].total, sums[r]);
}

// One block's sums for the n rows of x at qx (1 to kRowGroup) by VNNI, the weight prefetched `ahead`
// bytes ahead where n > 1.
VNNI void block_sums_vnni_group(int64_t n, const int8_t* first, int64_t chunks, const QuantizedRow* qx,
                                int32_t (*sums)[kBlock], int64_t ahead) {
  switch (n) {
    case 1: return block_sums_vnni(first, chunks, qx[0].value.data(), qx[0].total, sums[0]);
    case 2: return block_sums_vnni_rows<2>(first, chunks, qx, sums, ahead);
    case 3: return block_sums_vnni_rows<3>(first, chunks, qx, sums, ahead);
    case 4: return block_sums_vnni_rows<4>(first, chunks, qx, sums, ahead);
  }
  TORCH_CHECK(false, "1 to ", kRowGroup, " rows at a time, got ", n);
}

// Whether int8_avx2 takes the VNNI path: where the CPU has AVX-512 VNNI, unless int8_vnni turned it off.
bool int8_uses_vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");

// int8_vnni: whether int8_avx2 takes the VNNI path, after setting it where `enable` is given (only on
// a CPU that has AVX-512 VNNI); the two paths give the same sums.
bool int8_vnni(std::optional<bool> enable) {
  if (enable.has_value()) {
    TORCH_CHECK(!*enable || (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")),
                "this CPU has no AVX-512 VNNI");
    int8_uses_vnni = *enable;
  }
  return int8_uses_vnni;
}

// One block's four outputs y[o..o+3] of a row of x from its int32 sums: (((sum * x scale) * weight
// scale) + x center * weight sum) + bias, four channels in one register where all four are real (each
// operation rounded as the scalar one), one by one in the last block of a padded weight.
inline void block_outputs(const int32_t* sums, const QuantizedRow& row, const Channels& ch, const float* b, int64_t o,
                          int64_t out, float* y) {
  if (o + kBlock <= out) {
    __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sums))),
                          _mm_set1_ps(row.scale));
    v = _mm_mul_ps(v, _mm_loadu_ps(ch.scale + o));
    v = _mm_add_ps(v, _mm_mul_ps(_mm_set1_ps(row.center), _mm_loadu_ps(ch.sum + o)));
    _mm_storeu_ps(y + o, b == nullptr ? v : _mm_add_ps(v, _mm_loadu_ps(b + o)));
    return;
  }
  for (int64_t j = 0; o + j < out; ++j) {
    float value = static_cast<float>(sums[j]) * row.scale;
    value = value * ch.scale[o + j];
    value = value + row.center * ch.sum[o + j];
    y[o + j] = b == nullptr ? value : value + b[o + j];
  }
}

at::Tensor int8_avx2(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channels,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x must be (..., in) float32");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == kBlock && weight.size(3) == kChunk &&
                  weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be int8 laid out as (blocks, chunks, 4, 32) by gpt2lab.ops.pack_int8");
  TORCH_CHECK(channels.dim() == 2, "channels must be (2, out): the weight's scales and its rows' sums");
  const int64_t rows = leading_rows(x), in = x.size(-1), out = channels.size(1);
  const int64_t blocks = weight.size(0), chunks = weight.size(1), padded = chunks * kChunk;
  TORCH_CHECK(in <= padded && padded < in + kChunk, "x has ", in, " columns, the weight ", padded, " padded");
  TORCH_CHECK(out <= blocks * kBlock && blocks * kBlock < out + kBlock, "channels has ", out,
              " channels, the weight ", blocks * kBlock, " padded");
  const Channels ch = channel_values(channels, out);
  const float* b = bias_values(bias, out);
  const at::Tensor xc = x.contiguous();
  std::vector<QuantizedRow> qx;
  for (int64_t r = 0; r < rows; ++r) qx.push_back(quantize_row(xc.data_ptr<float>() + r * in, in, padded));

  at::Tensor y = output_of(x, out);
  const int8_t* w = weight.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const bool vnni = int8_uses_vnni;
  const int64_t ahead = rows > kRowGroup ? kAheadRows : kAhead;
  at::parallel_for(0, blocks, kGrain, [&](int64_t begin, int64_t end) {
    int32_t sums[kRowGroup][kBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int8_t* first = w + block * chunks * kBlock * kChunk;
      for (int64_t r = 0; r < rows;) {  // past the first rows the block's weights come from L1
        const int64_t n = vnni ? std::min(rows - r, kRowGroup) : 1;
        if (vnni) {
          block_sums_vnni_group(n, first, chunks, &qx[r], sums, ahead);
        } else {
          block_sums_avx2(first, chunks, qx[r].value.data(), qx[r].magnitude.data(), sums[0]);
        }
        for (int64_t i = 0; i < n; ++i, ++r) {
          block_outputs(sums[i], qx[r], ch, b, block * kBlock, out, yp + r * out);
        }
      }
    }
  });
  return y;
}

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// N output channels from `row0` (each `in` long) times R rows of x (`in` apart), plus the bias (b may
// be null), into R rows of y (`out` apart). Each 8-lane chunk of a channel's row is loaded once for
// the R rows.
template <int64_t N, int64_t R = 1>
inline void float_channels(const float* row0, const float* x, int64_t in, const float* b, float* y,
                           int64_t out = 0) {
  constexpr int64_t kLanes = 8, kAheadValues = 256;  // 1 KiB ahead in each row
  __m256 acc[N * R];  // [j * R + r]: channel j, row r
#pragma GCC unroll 8
  for (int i = 0; i < N * R; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t whole = in / kLanes * kLanes;
  for (int64_t k = 0; k < whole; k += kLanes) {
    if (k % 16 == 0)  // a cache line of each row
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) _mm_prefetch(reinterpret_cast<const char*>(row0 + j * in + k + kAheadValues), _MM_HINT_T1);
    __m256 xv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * in + k);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const __m256 wv = _mm256_loadu_ps(row0 + j * in + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[j * R + r] = _mm256_fmadd_ps(wv, xv[r], acc[j * R + r]);
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    const float* row = row0 + j * in;
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * in;
      float sum = sum_lanes(acc[j * R + r]);
      for (int64_t k = whole; k < in; ++k) sum += row[k] * xr[k];
      y[r * out + j] = b == nullptr ? sum : sum + b[j];
    }
  }
}

// One output channel's row (`in` long) times one row of x: a sequential read of the row into four
// float32 sums of eight lanes, then across them.
inline float float_row(const float* row, const float* xr, int64_t in) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= in; k += 32)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 8 * u), _mm256_loadu_ps(xr + k + 8 * u), acc[u]);
  for (; k + 8 <= in; k += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(xr + k), acc[0]);
  float sum = sum_lanes(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; k < in; ++k) sum += row[k] * xr[k];
  return sum;
}

constexpr int64_t kShortRow = 4096;  // bytes: rows up to a page long are read one after another

// The float32 product for the few rows of a decode step: x times a float32 weight as it is, (out, in)
// contiguous, plus the bias. Rows of up to a page are read one after another, so each thread reads one
// sequential stream; longer rows eight output channels together, eight streams with a prefetch ahead
// in each (on the family-25 EPYC each form was the faster one there: docs/benchmarks.md, item 15). With
// several rows of x, two of them at a time take each group's channels four by four, every 8-lane chunk
// of a channel loaded once for both.
at::Tensor float_avx2(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr int64_t kRows = 8;
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x must be (..., in) float32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be (out, in) contiguous float32");
  const int64_t rows = leading_rows(x), in = x.size(-1), out = weight.size(0);
  TORCH_CHECK(weight.size(1) == in, "x has ", in, " columns, the weight ", weight.size(1));
  const float* b = bias_values(bias, out);
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::Tensor y = output_of(x, out);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (out + kRows - 1) / kRows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * kRows, n = std::min(kRows, out - first);
      const float* bias_at = b == nullptr ? nullptr : b + first;
      int64_t r = 0;
      if (n == kRows)  // two rows at a time, four channels each time: past the first the weights come from cache
        for (; r + 2 <= rows; r += 2)
          for (int64_t half = 0; half < kRows; half += 4)
            float_channels<4, 2>(w + (first + half) * in, xp + r * in, in, bias_at ? bias_at + half : nullptr,
                                 yp + r * out + first + half, out);
      for (; r < rows; ++r) {
        if (in * static_cast<int64_t>(sizeof(float)) <= kShortRow) {
          for (int64_t j = 0; j < n; ++j) {
            const float sum = float_row(w + (first + j) * in, xp + r * in, in);
            yp[r * out + first + j] = bias_at == nullptr ? sum : sum + bias_at[j];
          }
        } else if (n == kRows) {
          float_channels<kRows>(w + first * in, xp + r * in, in, bias_at, yp + r * out + first);
        } else {
          for (int64_t j = 0; j < n; ++j)
            float_channels<1>(w + (first + j) * in, xp + r * in, in, bias_at ? bias_at + j : nullptr,
                              yp + r * out + first + j);
        }
      }
    }
  });
  return y;
}

constexpr int64_t kFloatBlock = 16;  // output channels of a float32 block: one cache line at each input position

// The 16 outputs of one block (`block` points at its (in, 16) values) times R rows of x (`in` apart),
// plus the bias (b may be null), the first n of them written to each row of y (`out` apart). Each
// line of the block is loaded once for the R rows and multiplied by each row's broadcast value: 4 / R
// input positions a round, each into accumulators of its own, so that 8 FMAs are in flight and none
// waits for the last.
template <int64_t R>
inline void float_block(const float* block, const float* x, int64_t in, const float* b, float* y, int64_t out,
                        int64_t n) {
  constexpr int kRound = 4 / R;
  __m256 lo[kRound * R], hi[kRound * R];  // [u * R + r]: input position u of the round, row r
#pragma GCC unroll 8
  for (int i = 0; i < kRound * R; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  const float* p = block;
  int64_t k = 0;
  for (; k + kRound <= in; k += kRound, p += kRound * kFloatBlock) {
#pragma GCC unroll 4
    for (int u = 0; u < kRound; ++u) {
      const __m256 w_lo = _mm256_loadu_ps(p + u * kFloatBlock), w_hi = _mm256_loadu_ps(p + u * kFloatBlock + 8);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * in + k + u);
        lo[u * R + r] = _mm256_fmadd_ps(w_lo, xv, lo[u * R + r]);
        hi[u * R + r] = _mm256_fmadd_ps(w_hi, xv, hi[u * R + r]);
      }
    }
  }
  for (; k < in; ++k, p += kFloatBlock) {
    const __m256 w_lo = _mm256_loadu_ps(p), w_hi = _mm256_loadu_ps(p + 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * in + k);
      lo[r] = _mm256_fmadd_ps(w_lo, xv, lo[r]);
      hi[r] = _mm256_fmadd_ps(w_hi, xv, hi[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    __m256 l = lo[r], h = hi[r];  // the round's sums, pairwise: (0 + 1) + (2 + 3)
    if constexpr (kRound == 4) {
      l = _mm256_add_ps(_mm256_add_ps(lo[r], lo[R + r]), _mm256_add_ps(lo[2 * R + r], lo[3 * R + r]));
      h = _mm256_add_ps(_mm256_add_ps(hi[r], hi[R + r]), _mm256_add_ps(hi[2 * R + r], hi[3 * R + r]));
    } else if constexpr (kRound == 2) {
      l = _mm256_add_ps(lo[r], lo[R + r]);
      h = _mm256_add_ps(hi[r], hi[R + r]);
    }
    float sum[kFloatBlock];
    _mm256_storeu_ps(sum, l);
    _mm256_storeu_ps(sum + 8, h);
    for (int64_t j = 0; j < n; ++j) y[r * out + j] = b == nullptr ? sum[j] : sum[j] + b[j];
  }
}

#define AVX512 __attribute__((target("avx512f")))
constexpr int64_t kWideAhead = 2048;  // bytes of the weight prefetched (into L1) ahead of float_block_wide's reads

// float_block for R rows (up to 8) on AVX-512: a block's line at each input position is one register,
// multiplied by each row's value broadcast in the same instruction, so that eight rows need eight
// accumulators and a block is read once for all of them, with a prefetch ahead of the reads (on into
// the next block). Each row's sum runs over the input positions in order, as float_block<4>'s does.
template <int64_t R>
AVX512 void float_block_wide(const float* block, const float* x, int64_t in, const float* b, float* y, int64_t out,
                             int64_t n) {
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const float* p = block;
  for (int64_t k = 0; k < in; ++k, p += kFloatBlock) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + kWideAhead, _MM_HINT_T0);
    const __m512 w = _mm512_loadu_ps(p);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * in + k]), acc[r]);
  }
  const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);  // the block's real channels
  const __m512 bias = b == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes, b);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(y + r * out, lanes, b == nullptr ? acc[r] : _mm512_add_ps(acc[r], bias));
}

// A block's outputs for every row of x, eight rows a pass (the rows past the first eight from cache).
AVX512 void float_block_wide_rows(const float* block, const float* x, int64_t rows, int64_t in, const float* b,
                                  float* y, int64_t out, int64_t n) {
  for (int64_t r = 0; r < rows; r += 8) {
    const float* xr = x + r * in;
    float* yr = y + r * out;
    switch (std::min<int64_t>(rows - r, 8)) {
      case 8: float_block_wide<8>(block, xr, in, b, yr, out, n); break;
      case 7: float_block_wide<7>(block, xr, in, b, yr, out, n); break;
      case 6: float_block_wide<6>(block, xr, in, b, yr, out, n); break;
      case 5: float_block_wide<5>(block, xr, in, b, yr, out, n); break;
      case 4: float_block_wide<4>(block, xr, in, b, yr, out, n); break;
      case 3: float_block_wide<3>(block, xr, in, b, yr, out, n); break;
      case 2: float_block_wide<2>(block, xr, in, b, yr, out, n); break;
      default: float_block_wide<1>(block, xr, in, b, yr, out, n);
    }
  }
}

constexpr int64_t kWideRows = 3;  // float_blocks_avx2 takes float_block_wide from this many rows
// Whether it does: where the CPU has AVX-512, unless float_avx512 turned it off.
bool float_uses_avx512 = __builtin_cpu_supports("avx512f");

// float_avx512: whether float_blocks_avx2 takes its AVX-512 path for kWideRows rows or more, after
// setting it where `enable` is given (only on a CPU that has AVX-512). The paths round alike where
// the AVX2 one takes four rows a pass.
bool float_avx512(std::optional<bool> enable) {
  if (enable.has_value()) {
    TORCH_CHECK(!*enable || __builtin_cpu_supports("avx512f"), "this CPU has no AVX-512");
    float_uses_avx512 = *enable;
  }
  return float_uses_avx512;
}

// The float32 product for the few rows of a decode step on the weight laid out by float_blocks:
// (blocks, in, 16), `out` channels of it real (the rest zero padding). The threads take whole blocks;
// each block is read from memory once, for four rows of x at a time (then two, then one), the rows
// past the first four from cache; on AVX-512 for up to eight rows at a time from kWideRows rows.
at::Tensor float_blocks_avx2(const at::Tensor& x, const at::Tensor& blocked, const std::optional<at::Tensor>& bias,
                             int64_t out) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x must be (..., in) float32");
  TORCH_CHECK(blocked.dim() == 3 && blocked.size(2) == kFloatBlock && blocked.scalar_type() == at::kFloat &&
                  blocked.is_contiguous(),
              "weight must be float32 laid out as (blocks, in, 16) by gpt2lab.ops.copy_weight");
  const int64_t rows = leading_rows(x), in = x.size(-1), nblocks = blocked.size(0);
  TORCH_CHECK(blocked.size(1) == in, "x has ", in, " columns, the weight ", blocked.size(1));
  TORCH_CHECK(out > (nblocks - 1) * kFloatBlock && out <= nblocks * kFloatBlock, "a weight of ", nblocks,
              " blocks of 16 output channels cannot have ", out);
  const float* b = bias_values(bias, out);
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* w = blocked.data_ptr<float>();
  at::Tensor y = output_of(x, out);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, nblocks, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kFloatBlock, n = std::min(kFloatBlock, out - first);
      const float* wb = w + block * in * kFloatBlock;
      const float* bb = b == nullptr ? nullptr : b + first;
      if (rows >= kWideRows && float_uses_avx512) {
        float_block_wide_rows(wb, xp, rows, in, bb, yp + first, out, n);
        continue;
      }
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) float_block<4>(wb, xp + r * in, in, bb, yp + r * out + first, out, n);
      for (; r + 2 <= rows; r += 2) float_block<2>(wb, xp + r * in, in, bb, yp + r * out + first, out, n);
      if (r < rows) float_block<1>(wb, xp + r * in, in, bb, yp + r * out + first, out, n);
    }
  });
  return y;
}

// 8 rows of 8 values (row r at from + r * stride) written as 8 rows of 8 (column c at to + c * to_stride).
inline void transpose_8x8(const float* from, int64_t stride, float* to, int64_t to_stride = kFloatBlock) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(from + i * stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(to + i * to_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(to + (i + 4) * to_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// A float32 weight (out, in) as float_blocks_avx2 reads it: (out / 16, in, 16), block j holding
// output channels 16j..16j+15 at each input position in turn; zero-padded to whole blocks.
at::Tensor float_blocks(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "weight must be (out, in) float32");
  const at::Tensor w = weight.contiguous();
  const int64_t out = w.size(0), in = w.size(1), nblocks = (out + kFloatBlock - 1) / kFloatBlock;
  at::Tensor laid = at::empty({nblocks, in, kFloatBlock}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = laid.data_ptr<float>();
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      float* to = dst + block * in * kFloatBlock;
      const int64_t first = block * kFloatBlock, n = std::min(kFloatBlock, out - first);
      int64_t k = 0;
      if (n == kFloatBlock)  // whole blocks: two 8 x 8 tiles at a time, transposed in registers
        for (; k + 8 <= in; k += 8, to += 8 * kFloatBlock)
          for (int64_t half = 0; half < 2; ++half) transpose_8x8(src + (first + 8 * half) * in + k, in, to + 8 * half);
      for (; k < in; ++k, to += kFloatBlock) {
        for (int64_t j = 0; j < n; ++j) to[j] = src[(first + j) * in + k];
        for (int64_t j = n; j < kFloatBlock; ++j) to[j] = 0.0f;
      }
    }
  });
  return laid;
}

// out += p * v over n values.
inline void add_scaled(float* out, float p, const float* v, int64_t n) {
  const __m256 p8 = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(p8, _mm256_loadu_ps(v + d), _mm256_loadu_ps(out + d)));
  for (; d < n; ++d) out[d] += p * v[d];
}

// softmax(q k^T / sqrt(hs)) v of one query (qr) over S keys at kr + j * k_step and their values at
// vr + j * v_step, only those keys that seen(j) admits, into out (hs values); score: room for S. The
// scores' largest is subtracted before exp, the values summed with the unnormalized weights, then divided.
template <typename Seen>
inline void attend(const float* qr, const float* kr, int64_t k_step, const float* vr, int64_t v_step, int64_t S,
                   int64_t hs, float scale, Seen seen, float* score, float* out) {
  float largest = -INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    score[j] = -INFINITY;
    if (seen(j)) {  // the key times the query: one channel of a product
      float_channels<1>(kr + j * k_step, qr, hs, nullptr, &score[j]);
      score[j] *= scale;
    }
    largest = std::max(largest, score[j]);
  }
  float total = 0.f;
  std::fill(out, out + hs, 0.f);
  for (int64_t j = 0; j < S; ++j) {
    const float p = std::exp(score[j] - largest);
    total += p;
    if (p != 0.f) add_scaled(out, p, vr + j * v_step, hs);
  }
  for (int64_t d = 0; d < hs; ++d) out[d] /= total;
}

// (row, head) tasks per thread at least: about 32K multiply-adds each, so a short cache runs on one thread
inline int64_t attention_grain(int64_t S, int64_t hs) {
  return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, 2 * S * hs));
}

void check_one_query(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "q must be (B, nh, 1, hs), k and v (B, nkv, S, hs)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k and v must be float32");
  const int64_t nh = q.size(1), nkv = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) && nkv > 0 && nh % nkv == 0,
              "k and v must be (B, nkv, S, hs) with nh a multiple of nkv; got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k and v need unit stride in hs");
}

// softmax(q k^T / sqrt(hs), masked) v for one query per row and head: q (B, nh, 1, hs), k and v
// (B, nkv, S, hs) with unit stride in hs and any other strides (views of the KV cache), the mask
// boolean and broadcastable to (B, 1, 1, S) (true: attend) or none. Query head h reads kv head
// h / (nh / nkv), as SDPA's enable_gqa. Each (row, head) is one task.
at::Tensor attention_avx2(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask) {
  check_one_query(q, k, v);
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(3), S = k.size(2), group = nh / k.size(1);
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "the mask must be boolean");
    m = mask->expand({B, 1, 1, S});
  }
  const bool* mp = mask.has_value() ? m.data_ptr<bool>() : nullptr;
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  at::Tensor y = at::empty({B, nh, 1, hs}, q.options());
  float* yp = y.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  at::parallel_for(0, B * nh, attention_grain(S, hs), [&](int64_t begin, int64_t end) {
    std::vector<float> score(S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nh, h = task % nh, g = h / group;
      auto seen = [&](int64_t j) { return mp == nullptr || mp[b * m.stride(0) + j * m.stride(3)]; };
      attend(qp + b * q.stride(0) + h * q.stride(1), kp + b * k.stride(0) + g * k.stride(1), k.stride(2),
             vp + b * v.stride(0) + g * v.stride(1), v.stride(2), S, hs, scale, seen, score.data(), yp + task * hs);
    }
  });
  return y;
}

// A decode step's attention with its KV-cache write, in one call: the new keys and values k, v
// (B, nkv, 1, hs) are written at slot t % size of k_cache and v_cache (B, nkv, size, hs, contiguous)
// and times[slot] = t (times: the time step each slot holds, -1 empty); then each row's query per
// head (q (B, nh, 1, hs)) attends over the first `slots` slots, those whose time step s the row sees
// from t, as gpt2lab.kv_cache.attention_mask says: 0 <= s <= t, s > t - window (with a window), and
// s >= pad[b] or s == t (with left padding). (B, nh, 1, hs) out.
at::Tensor cache_attention_avx2(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, at::Tensor& times, const at::Tensor& t, int64_t slots,
                                const std::optional<at::Tensor>& pad, std::optional<int64_t> window) {
  check_one_query(q, k, v);
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(3), nkv = k.size(1), group = nh / nkv;
  TORCH_CHECK(k.size(2) == 1, "one new key and value per row and kv head, got k ", k.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B &&
                  k_cache.size(1) == nkv && k_cache.size(3) == hs && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "the caches must be contiguous float32 (B, nkv, size, hs) matching k; got ", k_cache.sizes());
  const int64_t size = k_cache.size(2);
  TORCH_CHECK(times.dim() == 1 && times.size(0) == size && times.scalar_type() == at::kLong && times.is_contiguous(),
              "times must be contiguous int64 with one entry per cache slot");
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong, "t must be one int64 time step");
  TORCH_CHECK(0 < slots && slots <= size, "slots must be in 1..", size, ", got ", slots);
  const int64_t now = t.data_ptr<int64_t>()[0];  // a CPU tensor: read, not dispatched as item() would be
  TORCH_CHECK(now >= 0, "the time step must be >= 0, got ", now);
  const int64_t* padp = nullptr;
  at::Tensor pc;
  if (pad.has_value()) {
    pc = pad->contiguous();
    TORCH_CHECK(pc.scalar_type() == at::kLong && pc.numel() == B, "pad must hold one int64 per row");
    padp = pc.data_ptr<int64_t>();
  }
  const int64_t slot = now % size;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < nkv; ++g) {
      const int64_t at_slot = ((b * nkv + g) * size + slot) * hs;
      std::memcpy(kc + at_slot, k.data_ptr<float>() + b * k.stride(0) + g * k.stride(1), hs * sizeof(float));
      std::memcpy(vc + at_slot, v.data_ptr<float>() + b * v.stride(0) + g * v.stride(1), hs * sizeof(float));
    }
  }
  int64_t* tp = times.data_ptr<int64_t>();
  tp[slot] = now;
  const int64_t oldest = window.has_value() ? now - *window : -1;  // seen: later than this
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  at::Tensor y = at::empty({B, nh, 1, hs}, q.options());
  float* yp = y.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  at::parallel_for(0, B * nh, attention_grain(slots, hs), [&](int64_t begin, int64_t end) {
    std::vector<float> score(slots);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nh, h = task % nh, g = h / group;
      const int64_t first = padp == nullptr ? 0 : padp[b];
      auto seen = [&](int64_t j) {
        const int64_t s = tp[j];
        return s >= 0 && s <= now && s > oldest && (s >= first || s == now);
      };
      const int64_t head = (b * nkv + g) * size * hs;
      attend(qp + b * q.stride(0) + h * q.stride(1), kc + head, hs, vc + head, hs, slots, hs, scale, seen,
             score.data(), yp + task * hs);
    }
  });
  return y;
}

// causal_attention_avx512: softmax(q k^T / sqrt(hs), causal) v of a whole prompt, every query of every
// head (B, H, T, hs) over the keys up to its own (keys and values (B, Hkv, T, hs), H a multiple of Hkv:
// grouped queries), read where they lie (strided views of the fused q, k, v product), on AVX-512. Each
// (row, head) is one task: its keys transposed once to (hs, keys) so that a tile of scores is six
// queries times 32 keys of broadcast products (no sums across lanes), the tiles only up to the
// diagonal; each query's scores to exact softmax weights (its largest subtracted, exp of its own),
// then six queries' outputs times the values together, divided by the weights' sums. The output is
// written (B, T, H, hs), heads side by side as the projection after it reads them, and returned as the
// (B, H, T, hs) view of it.
constexpr int64_t kCausalRows = 6;  // queries of a tile
constexpr int64_t kKeyTile = 32;    // keys of a score tile: two registers

// e^z for z <= 0 or -inf: z = n ln 2 + r (ln 2 in two parts), e^r by its Taylor series to r^7, times 2^n
// by scalef. z is first kept at -150 or above, where e^z rounds to 0 already (far below it the
// reduction to r would lose all accuracy); a NaN stays one.
AVX512 inline __m512 exp512(__m512 z) {
  z = _mm512_max_ps(_mm512_set1_ps(-150.0f), z);  // the second operand where either is NaN: z
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), z);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// The scores s (R, tiles * 32) of R queries (q + r * q_step) by the keys of kt (hs, step), tile by tile.
template <int R>
AVX512 void score_tiles(const float* q, int64_t q_step, const float* kt, int64_t step, int64_t hs, int64_t tiles,
                        float* s) {
  for (int64_t t = 0; t < tiles; ++t) {
    __m512 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float* kp = kt + t * kKeyTile;
    for (int64_t d = 0; d < hs; ++d, kp += step) {
      const __m512 k0 = _mm512_loadu_ps(kp), k1 = _mm512_loadu_ps(kp + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 qd = _mm512_set1_ps(q[r * q_step + d]);
        acc[r][0] = _mm512_fmadd_ps(qd, k0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(qd, k1, acc[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(s + r * step + t * kKeyTile, acc[r][0]);
      _mm512_storeu_ps(s + r * step + t * kKeyTile + 16, acc[r][1]);
    }
  }
}

// Query i's scores s[0, i] in place to e^((s - largest) scale), and s(i, keys) to 0; returns 1 / their sum.
AVX512 float causal_weights(float* s, int64_t i, int64_t keys, float scale) {
  const int64_t n = i + 1;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1);
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
  if (j < n) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s + j));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(m) * scale), factor = _mm512_set1_ps(scale);
  __m512 total = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), factor, shift));
    total = _mm512_add_ps(total, e);
    _mm512_storeu_ps(s + j, e);
  }
  if (j < n) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, s + j), factor, shift)));
    total = _mm512_add_ps(total, e);
    _mm512_storeu_ps(s + j, e);  // zeros past the query's own key
    j += 16;
  }
  for (; j < keys; ++j) s[j] = 0.f;
  return 1.0f / _mm512_reduce_add_ps(total);
}

// o (R rows at o + r * o_step) = the weights p (R, keys; rows step apart) times the values (v + j *
// v_step), row r times inv[r]: 64 channels at a time (4 registers a query), then 16.
template <int R>
AVX512 void weighted_values(const float* p, int64_t step, const float* v, int64_t v_step, int64_t keys, int64_t hs,
                            const float* inv, float* o, int64_t o_step) {
  int64_t c = 0;
  for (; c + 64 <= hs; c += 64) {
    __m512 acc[R][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    const float* vp = v + c;
    for (int64_t j = 0; j < keys; ++j, vp += v_step) {
      const __m512 v0 = _mm512_loadu_ps(vp), v1 = _mm512_loadu_ps(vp + 16), v2 = _mm512_loadu_ps(vp + 32),
                   v3 = _mm512_loadu_ps(vp + 48);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_set1_ps(p[r * step + j]);
        acc[r][0] = _mm512_fmadd_ps(w, v0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w, v1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(w, v2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(w, v3, acc[r][3]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u)
        _mm512_storeu_ps(o + r * o_step + c + 16 * u, _mm512_mul_ps(acc[r][u], _mm512_set1_ps(inv[r])));
  }
  for (; c < hs; c += 16) {
    __m512 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const float* vp = v + c;
    for (int64_t j = 0; j < keys; ++j, vp += v_step) {
      const __m512 v0 = _mm512_loadu_ps(vp);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * step + j]), v0, acc[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(o + r * o_step + c, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r])));
  }
}

// R queries from `first` on: their scores over keys [0, first + R) (in whole tiles), weights, outputs.
template <int R>
AVX512 void causal_queries(const float* q, int64_t q_step, const float* kt, int64_t step, const float* v,
                           int64_t v_step, int64_t first, int64_t hs, float scale, float* s, float* o, int64_t o_step) {
  const int64_t keys = first + R;
  score_tiles<R>(q, q_step, kt, step, hs, (keys + kKeyTile - 1) / kKeyTile, s);
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = causal_weights(s + r * step, first + r, keys, scale);
  weighted_values<R>(s, step, v, v_step, keys, hs, inv, o, o_step);
}

// One head's T queries, kCausalRows at a time; kt: its keys transposed, (hs, step); s: (kCausalRows, step).
AVX512 void causal_head(const float* q, int64_t q_step, const float* kt, int64_t step, const float* v,
                        int64_t v_step, int64_t T, int64_t hs, float scale, float* s, float* o, int64_t o_step) {
  for (int64_t i = 0; i < T; i += kCausalRows) {
    const float* qi = q + i * q_step;
    float* oi = o + i * o_step;
    switch (std::min(kCausalRows, T - i)) {
      case 6: causal_queries<6>(qi, q_step, kt, step, v, v_step, i, hs, scale, s, oi, o_step); break;
      case 5: causal_queries<5>(qi, q_step, kt, step, v, v_step, i, hs, scale, s, oi, o_step); break;
      case 4: causal_queries<4>(qi, q_step, kt, step, v, v_step, i, hs, scale, s, oi, o_step); break;
      case 3: causal_queries<3>(qi, q_step, kt, step, v, v_step, i, hs, scale, s, oi, o_step); break;
      case 2: causal_queries<2>(qi, q_step, kt, step, v, v_step, i, hs, scale, s, oi, o_step); break;
      default: causal_queries<1>(qi, q_step, kt, step, v, v_step, i, hs, scale, s, oi, o_step);
    }
  }
}

at::Tensor causal_attention_avx512(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "this CPU has no AVX-512");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be (B, heads, T, head size)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k and v must be float32");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hs = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == T && k.size(3) == hs,
              "k and v must be (B, kv heads, T, head size) as q is (B, heads, T, head size)");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "the query heads (", H, ") must be a multiple of the key heads (", Hkv, ")");
  TORCH_CHECK(hs % 16 == 0, "the head size must be a multiple of 16, got ", hs);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "each head's values must be contiguous");
  at::Tensor out = at::empty({B, T, H, hs}, q.options());
  const int64_t step = (T + kKeyTile - 1) / kKeyTile * kKeyTile;  // keys padded to whole tiles
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(hs * step, 0.f), s(kCausalRows * step);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, g = h / (H / Hkv);
      const float* kh = kp + b * k.stride(0) + g * k.stride(1);
      const int64_t ks = k.stride(2);
      int64_t j = 0;
      for (; j + 8 <= T; j += 8)  // 8 keys by 8 of their values at a time, transposed in registers
        for (int64_t d = 0; d < hs; d += 8) transpose_8x8(kh + j * ks + d, ks, kt.data() + d * step + j, step);
      for (; j < T; ++j)
        for (int64_t d = 0; d < hs; ++d) kt[d * step + j] = kh[j * ks + d];
      causal_head(qp + b * q.stride(0) + h * q.stride(1), q.stride(2), kt.data(), step,
                  vp + b * v.stride(0) + g * v.stride(1), v.stride(2), T, hs, scale, s.data(),
                  op + (b * T * H + h) * hs, H * hs);
    }
  });
  return out.transpose(1, 2);
}

// x + delta and its layer norm, (x + delta - mean) / sqrt(variance + eps) * weight + bias over the last
// dimension, in one pass over each row: the residual add and the LayerNorm after it in a pre-norm block.
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& delta,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat && x.sizes() == delta.sizes(),
              "x and delta must be float32 of one shape");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && weight.numel() == n &&
                  bias.numel() == n && weight.is_contiguous() && bias.is_contiguous(),
              "weight and bias must be contiguous float32 of ", n, " values");
  const at::Tensor xc = x.contiguous(), dc = delta.contiguous();
  at::Tensor sum = at::empty_like(xc), normed = at::empty_like(xc);
  const int64_t rows = n == 0 ? 0 : xc.numel() / n;
  const float *xp = xc.data_ptr<float>(), *dp = dc.data_ptr<float>();
  const float *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *np = normed.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* s = sp + r * n;
      __m256 total8 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        const __m256 si = _mm256_add_ps(_mm256_loadu_ps(xp + r * n + i), _mm256_loadu_ps(dp + r * n + i));
        _mm256_storeu_ps(s + i, si);
        total8 = _mm256_add_ps(total8, si);
      }
      float total = sum_lanes(total8);
      for (; i < n; ++i) total += (s[i] = xp[r * n + i] + dp[r * n + i]);
      const float mean = total / static_cast<float>(n);
      const __m256 mean8 = _mm256_set1_ps(mean);
      __m256 square8 = _mm256_setzero_ps();
      for (i = 0; i + 8 <= n; i += 8) {
        const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(s + i), mean8);
        square8 = _mm256_add_ps(square8, _mm256_mul_ps(c, c));
      }
      float squares = sum_lanes(square8);
      for (; i < n; ++i) squares += (s[i] - mean) * (s[i] - mean);
      const float rstd = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
      const __m256 rstd8 = _mm256_set1_ps(rstd);
      for (i = 0; i + 8 <= n; i += 8) {
        const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), mean8), rstd8);
        _mm256_storeu_ps(np + r * n + i,
                         _mm256_add_ps(_mm256_mul_ps(c, _mm256_loadu_ps(w + i)), _mm256_loadu_ps(b + i)));
      }
      for (; i < n; ++i) np[r * n + i] = (s[i] - mean) * rstd * w[i] + b[i];
    }
  });
  return {sum, normed};
}

// One linear layer of decode_block, by kernel: 0 float_avx2 on the weight as it is, 1 float_blocks_avx2 on
// its blocked copy, 2 int8_avx2 on its int8 blocks with their scales (gpt2lab.ops.NATIVE_PRODUCTS).
at::Tensor product(int64_t kernel, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& bias, int64_t out) {
  switch (kernel) {
    case 0:
      return float_avx2(x, weight, bias);
    case 1:
      return float_blocks_avx2(x, weight, bias, out);
    case 2:
      TORCH_CHECK(scale.has_value(), "an int8 product needs its channels' scales and sums");
      return int8_avx2(x, weight, *scale, bias);
  }
  TORCH_CHECK(false, "unknown product kernel ", kernel);
}

// e^z for z in [-87, 88] (callers clamp): z = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, so
// that n ln 2 is exact), e^r by its Taylor series to r^7 (truncation under 1e-8 relative), times 2^n
// put into the exponent bits.
inline __m256 exp_avx2(__m256 z) {
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(z, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), z);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// GPT-2's tanh-GELU of 8 values, as y sigmoid(2u) = y / (1 + e^(-2u)), u = sqrt(2 / pi) (y + 0.044715
// y^3). The exponent is clamped to exp_avx2's range (a NaN in y stays one: it is y that is divided);
// past it the GELU is y, or a value within 1e-37 of 0.
inline __m256 gelu8(__m256 y) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), _mm256_mul_ps(y, y)), y, y);
  __m256 z = _mm256_mul_ps(inner, _mm256_set1_ps(-2 * 0.7978845608f));
  z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_avx2(z)));
}

// gelu8 over a contiguous float32 y in place, 8 values at a time, the last few by a masked load and
// store (the same arithmetic: a value's result does not depend on where it lies); threads share long
// outputs.
void gelu_avx2_(at::Tensor& y) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous(), "y must be contiguous float32");
  float* data = y.data_ptr<float>();
  at::parallel_for(0, y.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) _mm256_storeu_ps(data + i, gelu8(_mm256_loadu_ps(data + i)));
    if (i < end) {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(end - i)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_maskstore_ps(data + i, mask, gelu8(_mm256_maskload_ps(data + i, mask)));
    }
  });
}

// GPT-2's tanh-GELU over y in place, in the form gpt2lab.ops.tanh_gelu_ names: "tanh" (aten's gelu),
// "sigmoid" (y sigmoid(2u), u = sqrt(2 / pi) (y + 0.044715 y^3), with the same aten operations) or
// "avx2" (gelu_avx2_).
void tanh_gelu_(at::Tensor& y, c10::string_view form) {
  if (form == "tanh") {
    at::gelu_(y, "tanh");
    return;
  }
  if (form == "avx2") {
    gelu_avx2_(y);
    return;
  }
  TORCH_CHECK(form == "sigmoid", "GELU form must be tanh, sigmoid or avx2, got ", form);
  at::Tensor t = at::square(y);
  at::addcmul_out(t, y, t, y, 0.044715);
  y.mul_(t.mul_(2 * std::sqrt(2 / M_PI)).sigmoid_());
}

// One eager decode step (one new token per row) of a pre-norm GPT block, the operations its Python
// forward runs, in one call: x (B, 1, C) + attention(ln_1(x)), then that + mlp(ln_2(that)). The
// products (in order: the attention's fused q, k, v, its output, the MLP's first with its GELU, its
// second) run the kernels `kernels` name on `weights` (`scales` for int8), the attention
// cache_attention_avx2 over the KV cache (n_head query heads; no rotary positions). Equal to the
// Python forward with the same kernels: the same functions in the same order.
at::Tensor decode_block(const at::Tensor& x, at::TensorList norms, double eps, at::IntArrayRef kernels,
                        at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                        const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef outs, int64_t n_head,
                        at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& times, const at::Tensor& t,
                        int64_t slots, const std::optional<at::Tensor>& pad, std::optional<int64_t> window,
                        c10::string_view gelu) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "x must be (B, 1, C): one new token per row");
  TORCH_CHECK(norms.size() == 4 && kernels.size() == 4 && weights.size() == 4 && scales.size() == 4 &&
                  biases.size() == 4 && outs.size() == 4,
              "a block has two LayerNorms (weight, bias) and four products");
  TORCH_CHECK(k_cache.dim() == 4, "the caches must be (B, nkv, size, hs)");
  const int64_t B = x.size(0), C = x.size(2), nkv = k_cache.size(1), hs = k_cache.size(3);
  auto linear = [&](int64_t i, const at::Tensor& in) {
    return product(kernels[i], in, weights[i], scales.get(i), biases.get(i), outs[i]);
  };
  const at::Tensor h = at::layer_norm(x, {C}, norms[0], norms[1], eps);
  const at::Tensor heads = linear(0, h).view({B, 1, n_head + 2 * nkv, hs}).transpose(1, 2);
  const at::Tensor y = cache_attention_avx2(heads.narrow(1, 0, n_head), heads.narrow(1, n_head, nkv),
                                            heads.narrow(1, n_head + nkv, nkv), k_cache, v_cache, times, t, slots,
                                            pad, window);
  auto [sum, normed] = add_layer_norm(x, linear(1, y.view({B, 1, n_head * hs})), norms[2], norms[3], eps);
  at::Tensor hidden = linear(2, normed);
  tanh_gelu_(hidden, gelu);
  return sum + linear(3, hidden);
}

// A model's blocks as its eager decode steps run them, each with the arguments of decode_block that do
// not change from step to step (gpt2lab.model.GPT, once every block is planned: Block.plan): its
// layer norms, products, heads, KV cache (and whether it rolls), window and GELU form, in order.
struct DecodeBlocks : torch::CustomClassHolder {
  struct Block {
    std::vector<at::Tensor> norms;
    double eps;
    std::vector<int64_t> kernels;
    std::vector<at::Tensor> weights;
    c10::List<std::optional<at::Tensor>> scales, biases;
    std::vector<int64_t> outs;
    int64_t n_head;
    at::Tensor k_cache, v_cache, times;
    bool rolls;
    std::optional<int64_t> window;
    std::string gelu;
  };
  std::vector<Block> blocks;
  // The model's last LayerNorm and its lm_head's product after the blocks (set_head): decode_logits's.
  struct Head {
    std::vector<at::Tensor> norm;
    double eps;
    int64_t kernel;
    at::Tensor weight;
    std::optional<at::Tensor> scale, bias;
    int64_t out, vocab;
  };
  std::optional<Head> head;
  // The model's token and position embedding tables before the blocks (set_embeddings): decode_logits's.
  struct Embeddings {
    at::Tensor wte, wpe;
  };
  std::optional<Embeddings> embeddings;

  void set_embeddings(at::Tensor wte, at::Tensor wpe) {
    TORCH_CHECK(wte.dim() == 2 && wpe.dim() == 2 && wte.size(1) == wpe.size(1), "wte and wpe must be (n, C) tables");
    embeddings = Embeddings{std::move(wte), std::move(wpe)};
  }

  void set_head(std::vector<at::Tensor> norm, double eps, int64_t kernel, at::Tensor weight,
                std::optional<at::Tensor> scale, std::optional<at::Tensor> bias, int64_t out, int64_t vocab) {
    TORCH_CHECK(norm.size() == 2 && 0 < vocab && vocab <= out, "a head has a LayerNorm (weight, bias) and vocab <= out");
    head = Head{std::move(norm), eps, kernel, std::move(weight), std::move(scale), std::move(bias), out, vocab};
  }

  void add(std::vector<at::Tensor> norms, double eps, std::vector<int64_t> kernels, std::vector<at::Tensor> weights,
           c10::List<std::optional<at::Tensor>> scales, c10::List<std::optional<at::Tensor>> biases,
           std::vector<int64_t> outs, int64_t n_head, at::Tensor k_cache, at::Tensor v_cache, at::Tensor times,
           bool rolls, std::optional<int64_t> window, std::string gelu) {
    blocks.push_back({std::move(norms), eps, std::move(kernels), std::move(weights), std::move(scales),
                      std::move(biases), std::move(outs), n_head, std::move(k_cache), std::move(v_cache),
                      std::move(times), rolls, window, std::move(gelu)});
  }
};

// One eager decode step of x (B, 1, C) at time step t through each of `blocks` in turn, by decode_block
// with the block's kept arguments; a block attends over the written slots of its cache (`filled`,
// where known and the cache does not roll), else over all of them, as gpt2lab.kv_cache.KVCache.slots.
// It writes each block's KV cache, which its schema cannot say (the caches are inside `blocks`): an
// eager op, never traced.
at::Tensor decode_blocks(const c10::intrusive_ptr<DecodeBlocks>& blocks, const at::Tensor& x, const at::Tensor& t,
                         std::optional<int64_t> filled, const std::optional<at::Tensor>& pad) {
  at::Tensor y = x;
  for (DecodeBlocks::Block& b : blocks->blocks) {
    const int64_t slots = filled.has_value() && !b.rolls ? *filled : b.k_cache.size(2);
    y = decode_block(y, b.norms, b.eps, b.kernels, b.weights, b.scales, b.biases, b.outs, b.n_head, b.k_cache,
                     b.v_cache, b.times, t, slots, pad, b.window, b.gelu);
  }
  return y;
}

// A decode step from the new tokens idx (B, 1) at time step t to their next-token logits (B, 1, vocab):
// the tokens' and their positions' embeddings (`blocks`' set_embeddings; a left-padded row's position is
// t less its padding, at least 0), decode_blocks, then the model's last LayerNorm and lm_head product
// (set_head), by the functions the model's Python forward calls (at::embedding, the sum, at::layer_norm,
// the product, the first `vocab` columns), in its order.
at::Tensor decode_logits(const c10::intrusive_ptr<DecodeBlocks>& blocks, const at::Tensor& idx, const at::Tensor& t,
                         std::optional<int64_t> filled, const std::optional<at::Tensor>& pad) {
  TORCH_CHECK(blocks->head.has_value() && blocks->embeddings.has_value(),
              "decode_logits needs the blocks' head and embeddings (DecodeBlocks.set_head, set_embeddings)");
  TORCH_CHECK(idx.dim() == 2 && idx.size(1) == 1, "idx must be (B, 1): one new token per row");
  const DecodeBlocks::Head& head = *blocks->head;
  const DecodeBlocks::Embeddings& embeddings = *blocks->embeddings;
  at::Tensor pos = t.unsqueeze(0);  // (1, 1): every row's position, or each row's own (B, 1) after padding
  if (pad.has_value()) pos = (pos - pad->unsqueeze(1)).clamp_min(0);
  const at::Tensor x = at::embedding(embeddings.wte, idx) + at::embedding(embeddings.wpe, pos);
  const at::Tensor y = decode_blocks(blocks, x, t, filled, pad);
  const at::Tensor h = at::layer_norm(y, {y.size(-1)}, head.norm[0], head.norm[1], head.eps);
  const at::Tensor logits = product(head.kernel, h, head.weight, head.scale, head.bias, head.out);
  return head.vocab == head.out ? logits : logits.narrow(-1, 0, head.vocab);
}

// The int8 weight (out, in) as int8_avx2 reads it: (out / 4, in / 32, 4, 32), each block of 4 output
// channels one stream of their rows' 32-byte chunks in turn; zero-padded to whole blocks and chunks
// (zeros add nothing to a sum).
at::Tensor blocks(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "weight must be (out, in) int8");
  const at::Tensor w = weight.contiguous();
  const int64_t out = w.size(0), in = w.size(1);
  const int64_t blocks = (out + kBlock - 1) / kBlock, chunks = (in + kChunk - 1) / kChunk;
  at::Tensor laid = at::empty({blocks, chunks, kBlock, kChunk}, w.options());
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = laid.data_ptr<int8_t>();
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t j = 0; j < kBlock; ++j) {
          int8_t* to = dst + ((block * chunks + c) * kBlock + j) * kChunk;
          const int64_t o = block * kBlock + j, from = c * kChunk;
          const int64_t n = o < out ? std::min<int64_t>(kChunk, in - from) : 0;
          if (n > 0) std::memcpy(to, src + o * in + from, n);
          if (n < kChunk) std::memset(to + n, 0, kChunk - n);
        }
      }
    }
  });
  return laid;
}

}  // namespace

TORCH_LIBRARY(gpt2lab_native, m) {
  m.def("int8_avx2(Tensor x, Tensor weight, Tensor channels, Tensor? bias) -> Tensor");
  m.def("int8_vnni(bool? enable) -> bool", &int8_vnni);  // no tensors: not dispatched by device
  m.def("float_avx512(bool? enable) -> bool", &float_avx512);  // nor this
  m.def("float_avx2(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("float_blocks_avx2(Tensor x, Tensor weight, Tensor? bias, int out) -> Tensor");
  m.def("quantize_rows(Tensor x, int offset) -> (Tensor, Tensor, Tensor)");
  m.def("normalize_rows(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("scale_rows_(Tensor(a!) y, Tensor row_scales, Tensor centers, Tensor channels, bool scaled, Tensor? bias) -> Tensor(a!)");
  m.def("blocks(Tensor weight) -> Tensor");
  m.def("float_blocks(Tensor weight) -> Tensor");
  m.def("attention_avx2(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  m.def(
      "cache_attention_avx2(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) times, "
      "Tensor t, int slots, Tensor? pad, int? window) -> Tensor");
  m.def("causal_attention_avx512(Tensor q, Tensor k, Tensor v) -> Tensor");
  m.def("add_layer_norm(Tensor x, Tensor delta, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)");
  m.def("gelu_avx2_(Tensor(a!) y) -> ()");
  m.def(
      "decode_block(Tensor x, Tensor[] norms, float eps, int[] kernels, Tensor[] weights, Tensor?[] scales, "
      "Tensor?[] biases, int[] outs, int n_head, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) times, Tensor t, "
      "int slots, Tensor? pad, int? window, str gelu) -> Tensor");
  m.class_<DecodeBlocks>("DecodeBlocks")
      .def(torch::init<>())
      .def("add", &DecodeBlocks::add)
      .def("set_head", &DecodeBlocks::set_head)
      .def("set_embeddings", &DecodeBlocks::set_embeddings);
  m.def(
      "decode_blocks(__torch__.torch.classes.gpt2lab_native.DecodeBlocks blocks, Tensor x, Tensor t, int? filled, "
      "Tensor? pad) -> Tensor");
  m.def(
      "decode_logits(__torch__.torch.classes.gpt2lab_native.DecodeBlocks blocks, Tensor idx, Tensor t, int? filled, "
      "Tensor? pad) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2lab_native, CPU, m) {
  m.impl("int8_avx2", &int8_avx2);
  m.impl("float_avx2", &float_avx2);
  m.impl("float_blocks_avx2", &float_blocks_avx2);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("normalize_rows", &normalize_rows);
  m.impl("scale_rows_", &scale_rows_);
  m.impl("blocks", &blocks);
  m.impl("float_blocks", &float_blocks);
  m.impl("attention_avx2", &attention_avx2);
  m.impl("cache_attention_avx2", &cache_attention_avx2);
  m.impl("causal_attention_avx512", &causal_attention_avx512);
  m.impl("add_layer_norm", &add_layer_norm);
  m.impl("gelu_avx2_", &gelu_avx2_);
  m.impl("decode_block", &decode_block);
  m.impl("decode_blocks", &decode_blocks);
  m.impl("decode_logits", &decode_logits);
}
