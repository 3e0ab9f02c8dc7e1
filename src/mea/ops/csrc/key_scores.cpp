// The two products of a decode step's read of a quantized cache (KIVI layout, `mea.ops.kvquant`), straight from
// the stored codes: key logits q . K^T (`key_scores`) and the value sums p @ V (`value_sums`, below).
//
// Keys: token t of group j (`group_size` consecutive tokens) dequantizes feature d as k_td = c_td s_jd + z_jd, so
//     q . k_t = sum_d (q_d s_jd) c_td + sum_d q_d z_jd.
// The scale folds into the query once per group (E values per query row) and the zero point into one constant
// per group and row; the inner loop widens codes to float32 in registers and accumulates in float32: no
// buffer of converted keys. Each code load serves all R query rows. The per-token dot products leave one
// vector of partial sums per token and row; 16 of them are reduced together by a transpose-and-add tree
// (15 two-source shuffles and adds) instead of 16 horizontal sums.
//
// Portable C++ (GCC >= 12 / Clang vector extensions): the compiler maps the 16-float vectors onto the
// machine's registers (one AVX512 register, two AVX2 ones, ...). Compiled at first use on the user's machine.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t W = 16;  // floats per vector, and tokens per reduction tile
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef uint8_t vb __attribute__((vector_size(W)));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf load_f(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vb load_b(const uint8_t* p) {
  vb v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16 bytes to 16 floats. GCC turns the generic conversion into one scalar op per lane, so x86 gets the
// zero-extending instructions by name; everything else, the compiler's own lowering.
inline vf widen(vb x) {
#if defined(__AVX512F__)
  __m128i b;
  std::memcpy(&b, &x, sizeof(b));
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  vf v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#elif defined(__AVX2__)
  __m128i b;
  std::memcpy(&b, &x, sizeof(b));
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  vf v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  return __builtin_convertvector(__builtin_convertvector(x, vi), vf);
#endif
}

// out[t] = sum of the lanes of a[t], t < 16: pairs of vectors are merged level by level, each level halving
// the lanes that hold one token's partial sums (8, 4, 2, 1).
inline vf reduce16(const vf* a) {
  vf b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Half to float, 16 at a time (the scales and zero points): F16C where the machine has it.
inline vf load_h(const c10::Half* p) {
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  vf v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  vf v;
  for (int64_t i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// The dot products of one token's codes with the R scaled query rows, as 16-lane partial sums (summed by
// `reduce16`). Byte layout (`pack`): 8 bits, one code per byte; 4 bits, byte i holds feature i in its low
// nibble and feature i + E/2 in its high one.

// E = 16 NC features known at compile time: the token's codes widened once into NC registers.
template <int NC>
struct FixedDot {
  int64_t rows, bits;
  void operator()(const uint8_t* c, const float* qs, vf* part, float*) const {
    vf x[NC];
    if (bits == 8) {
      for (int i = 0; i < NC; ++i) x[i] = widen(load_b(c + i * W));
    } else {
      for (int i = 0; i < NC / 2; ++i) {
        vb b = load_b(c + i * W);
        x[i] = widen(b & 15);
        x[NC / 2 + i] = widen(b >> 4);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* q = qs + r * NC * W;
      vf a = load_f(q) * x[0], b{};
      for (int i = 1; i < NC; i += 2) {
        b += load_f(q + i * W) * x[i];
        if (i + 1 < NC) a += load_f(q + (i + 1) * W) * x[i + 1];
      }
      part[r * W] = a + b;
    }
  }
};

// Any E: the codes widened into a buffer of E floats, whole vectors then the rest one by one.
struct AnyDot {
  int64_t rows, bits, features;
  void operator()(const uint8_t* c, const float* qs, vf* part, float* cf) const {  // cf: scratch, E floats
    const int64_t e = features, half = e / 2;
    const int64_t vec = bits == 8 ? e / W * W : half / W * W;  // features (8 bit) or bytes (4 bit) in vectors
    if (bits == 8) {
      for (int64_t d = 0; d < vec; d += W) {
        vf x = widen(load_b(c + d));
        std::memcpy(cf + d, &x, sizeof(x));
      }
      for (int64_t d = vec; d < e; ++d) cf[d] = c[d];
    } else {
      for (int64_t i = 0; i < vec; i += W) {
        vb x = load_b(c + i);
        vf lo = widen(x & 15), hi = widen(x >> 4);
        std::memcpy(cf + i, &lo, sizeof(lo));
        std::memcpy(cf + half + i, &hi, sizeof(hi));
      }
      for (int64_t i = vec; i < half; ++i) {
        cf[i] = c[i] & 15;
        cf[half + i] = c[i] >> 4;
      }
    }
    const int64_t whole = e / W * W;
    for (int64_t r = 0; r < rows; ++r) {
      const float* q = qs + r * e;
      vf acc{};
      float rest = 0.f;
      for (int64_t d = 0; d < whole; d += W) acc += load_f(q + d) * load_f(cf + d);
      for (int64_t d = whole; d < e; ++d) rest += q[d] * cf[d];
      acc[0] += rest;
      part[r * W] = acc;
    }
  }
};

struct Problem {
  const float* q;  // (B, G, R, E) contiguous
  const uint8_t* codes;
  const c10::Half *scale, *zero;
  float* scores;
  int64_t batch, heads, rows, features, bits, group_size, groups;
  int64_t code_strides[3], scale_strides[3], zero_strides[3], score_strides[3];  // batch, head, token (or row)
};

// Groups [begin, end) of all (batch, head) pairs: per group, the scaled queries qs = q * s_j (R x E) and the
// zero-point constants zc = q . z_j (R), then 16 tokens at a time, their R x 16 partial-sum vectors reduced
// into 16 logits per row.
template <class Dot>
void score_groups(const Problem& p, const Dot& dot, int64_t begin, int64_t end) {
  const int64_t r_n = p.rows, e = p.features, g_size = p.group_size;
  std::vector<float> qs(r_n * e), zc(r_n), scratch(e);
  std::vector<vf> part(r_n * W);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t j = item % p.groups, bg = item / p.groups, g = bg % p.heads, b = bg / p.heads;
    const float* qb = p.q + (b * p.heads + g) * r_n * e;
    const c10::Half* s = p.scale + b * p.scale_strides[0] + g * p.scale_strides[1] + j * p.scale_strides[2];
    const c10::Half* z = p.zero + b * p.zero_strides[0] + g * p.zero_strides[1] + j * p.zero_strides[2];
    const int64_t whole = e / W * W;
    for (int64_t r = 0; r < r_n; ++r) {
      const float* qr = qb + r * e;
      vf acc{};
      float constant = 0.f;
      for (int64_t d = 0; d < whole; d += W) {
        vf qv = load_f(qr + d), sq = qv * load_h(s + d);
        std::memcpy(qs.data() + r * e + d, &sq, sizeof(sq));
        acc += qv * load_h(z + d);
      }
      for (int64_t d = whole; d < e; ++d) {
        qs[r * e + d] = qr[d] * static_cast<float>(s[d]);
        constant += qr[d] * static_cast<float>(z[d]);
      }
      for (int64_t i = 0; i < W; ++i) constant += acc[i];
      zc[r] = constant;
    }
    const uint8_t* c = p.codes + b * p.code_strides[0] + g * p.code_strides[1] + j * g_size * p.code_strides[2];
    float* out = p.scores + b * p.score_strides[0] + g * p.score_strides[1] + j * g_size;
    for (int64_t t0 = 0; t0 < g_size; t0 += W) {
      const int64_t tile = std::min(W, g_size - t0);
      for (int64_t t = 0; t < tile; ++t) dot(c + (t0 + t) * p.code_strides[2], qs.data(), part.data() + t, scratch.data());
      for (int64_t t = tile; t < W; ++t)
        for (int64_t r = 0; r < r_n; ++r) part[r * W + t] = vf{};
      for (int64_t r = 0; r < r_n; ++r) {
        vf sums = reduce16(part.data() + r * W);
        float* o = out + r * p.score_strides[2] + t0;
        for (int64_t t = 0; t < tile; ++t) o[t] = sums[t] + zc[r];
      }
    }
  }
}

template <class Dot>
void run(const Problem& p, const Dot& dot) {
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, p.group_size * p.rows * p.features));
  at::parallel_for(0, p.batch * p.heads * p.groups, grain,
                   [&](int64_t begin, int64_t end) { score_groups(p, dot, begin, end); });
}

// ---- values: out += p @ V from per-token quantized value planes ------------------------------------------
//
// Token t's value feature d dequantizes as v_td = c_td s_t,grp(d) + z_t,grp(d), so for query row r
//     sum_t p_rt v_td = sum_t (p_rt s_t,grp) c_td + sum_t p_rt z_t,grp.
// The scale folds into the probabilities (w_rt = p_rt s_t, once per token, row and plane) and the zero point
// into one constant per row and plane. Codes come straight from the stored planes (`mea.ops.kvquant.to_planes`:
// W features per plane, token-major, byte j holding features j and j + W/2; an 8-bit code is two planes, high
// then low nibble, recombined into bytes before widening). Each widened token serves a block of rows held in
// registers. Work items are (batch, head, plane, chunk of VALUE_CHUNK tokens); their partial sums are added in
// chunk order afterwards, so the result does not depend on the number of threads.

constexpr int64_t VALUE_CHUNK = 1024;  // tokens per work item

struct ValueProblem {
  const uint8_t* codes;
  const c10::Half *scale, *zero;
  float* out;
  int64_t batch, heads, rows, width, blocks, tokens, chunks, group_size, nibbles;
  int64_t p_strides[3], code_strides[4], scale_strides[3], zero_strides[3], out_strides[3];  // .., token/row
};

// One token's codes of one block of W = 32 HV features, widened into 2 HV vectors: vector k holds features
// 16 k .. 16 k + 15 (the low nibbles of the plane's bytes, then the high ones). NIB = 2: 8-bit codes, the
// high-nibble plane at c, the low-nibble one at c + next.
template <int HV, int NIB>
inline void widen_token(const uint8_t* c, int64_t next, vf* x) {
  for (int i = 0; i < HV; ++i) {
    vb a = load_b(c + i * W), lo, hi;
    if (NIB == 2) {
      vb l = load_b(c + next + i * W);
      lo = ((a & 15) << 4) | (l & 15);
      hi = (a & 0xF0) | (l >> 4);
    } else {
      lo = a & 15;
      hi = a >> 4;
    }
    x[i] = widen(lo);
    x[HV + i] = widen(hi);
  }
}

// acc (RB rows x W) = sum over n tokens of w[r][t] * codes_t, the RB x 2 HV accumulators in registers.
template <int HV, int NIB, int RB>
void value_rows(const uint8_t* c, int64_t token_stride, int64_t next, int64_t n, const float* w, float* acc) {
  constexpr int NV = 2 * HV;
  vf a[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < NV; ++k) a[r][k] = vf{};
  for (int64_t t = 0; t < n; ++t) {
    vf x[NV];
    widen_token<HV, NIB>(c + t * token_stride, next, x);
    for (int r = 0; r < RB; ++r) {
      const float wr = w[r * VALUE_CHUNK + t];
      for (int k = 0; k < NV; ++k) a[r][k] += wr * x[k];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < NV; ++k) std::memcpy(acc + r * NV * W + k * W, &a[r][k], sizeof(vf));
}

#if defined(__AVX512F__)
constexpr int ROW_BLOCK = 6;  // rows per pass: 6 x 4 accumulators of 16 floats and 4 of codes in 32 registers
#else
constexpr int ROW_BLOCK = 2;
#endif

template <int HV, int NIB>
void value_passes(const uint8_t* c, int64_t token_stride, int64_t next, int64_t n, int64_t rows, const float* w,
                  float* acc) {
  constexpr int64_t width = 32 * HV;
  int64_t r = 0;
  for (; r + ROW_BLOCK <= rows; r += ROW_BLOCK)
    value_rows<HV, NIB, ROW_BLOCK>(c, token_stride, next, n, w + r * VALUE_CHUNK, acc + r * width);
  switch (rows - r) {  // the rest in one pass
    case 5: return value_rows<HV, NIB, 5>(c, token_stride, next, n, w + r * VALUE_CHUNK, acc + r * width);
    case 4: return value_rows<HV, NIB, 4>(c, token_stride, next, n, w + r * VALUE_CHUNK, acc + r * width);
    case 3: return value_rows<HV, NIB, 3>(c, token_stride, next, n, w + r * VALUE_CHUNK, acc + r * width);
    case 2: return value_rows<HV, NIB, 2>(c, token_stride, next, n, w + r * VALUE_CHUNK, acc + r * width);
    case 1: return value_rows<HV, NIB, 1>(c, token_stride, next, n, w + r * VALUE_CHUNK, acc + r * width);
    default: return;
  }
}

// Any plane width (W not a multiple of 32): one code at a time.
template <int NIB>
void value_scalar(const uint8_t* c, int64_t token_stride, int64_t next, int64_t n, int64_t rows, int64_t width,
                  const float* w, float* acc) {
  const int64_t half = width / 2;
  std::fill(acc, acc + rows * width, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* ct = c + t * token_stride;
    for (int64_t j = 0; j < half; ++j) {
      const int a = ct[j];
      const int l = NIB == 2 ? ct[next + j] : 0;
      const float lo = NIB == 2 ? ((a & 15) << 4 | (l & 15)) : (a & 15);
      const float hi = NIB == 2 ? ((a & 0xF0) | (l >> 4)) : (a >> 4);
      for (int64_t r = 0; r < rows; ++r) {
        acc[r * width + j] += w[r * VALUE_CHUNK + t] * lo;
        acc[r * width + half + j] += w[r * VALUE_CHUNK + t] * hi;
      }
    }
  }
}

// Work items [begin, end): each writes its R x W partial sums (zero-point term included) into partial.
template <typename P, int HV, int NIB>
void value_items(const ValueProblem& v, const P* p, float* partial, int64_t begin, int64_t end) {
  const int64_t r_n = v.rows, width = v.width;
  std::vector<float> w(r_n * VALUE_CHUNK), sf(VALUE_CHUNK), zf(VALUE_CHUNK), zsum(r_n);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = item % v.chunks, bgf = item / v.chunks, f = bgf % v.blocks, bg = bgf / v.blocks;
    const int64_t g = bg % v.heads, b = bg / v.heads;
    const int64_t t0 = chunk * VALUE_CHUNK, n = std::min(VALUE_CHUNK, v.tokens - t0);
    const int64_t grp = f * width / v.group_size;
    const c10::Half* s = v.scale + b * v.scale_strides[0] + g * v.scale_strides[1] + t0 * v.scale_strides[2] + grp;
    const c10::Half* z = v.zero + b * v.zero_strides[0] + g * v.zero_strides[1] + t0 * v.zero_strides[2] + grp;
    for (int64_t t = 0; t < n; ++t) {
      sf[t] = static_cast<float>(s[t * v.scale_strides[2]]);
      zf[t] = static_cast<float>(z[t * v.zero_strides[2]]);
    }
    for (int64_t r = 0; r < r_n; ++r) {
      const P* pr = p + b * v.p_strides[0] + g * v.p_strides[1] + r * v.p_strides[2] + t0;
      float* wr = w.data() + r * VALUE_CHUNK;
      float constant = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        const float pt = static_cast<float>(pr[t]);
        wr[t] = pt * sf[t];
        constant += pt * zf[t];
      }
      zsum[r] = constant;
    }
    const uint8_t* c = v.codes + b * v.code_strides[0] + g * v.code_strides[1] + f * v.nibbles * v.code_strides[2] +
                       t0 * v.code_strides[3];
    float* acc = partial + item * r_n * width;
    if (HV)
      value_passes<HV, NIB>(c, v.code_strides[3], v.code_strides[2], n, r_n, w.data(), acc);
    else
      value_scalar<NIB>(c, v.code_strides[3], v.code_strides[2], n, r_n, width, w.data(), acc);
    for (int64_t r = 0; r < r_n; ++r)
      for (int64_t j = 0; j < width; ++j) acc[r * width + j] += zsum[r];
  }
}

template <typename P, int HV, int NIB>
void run_values(const ValueProblem& v, const P* p) {
  const int64_t per_item = v.rows * v.width, units = v.batch * v.heads * v.blocks;
  at::Tensor partial = at::empty({units * v.chunks * per_item}, at::kFloat);
  float* part = partial.data_ptr<float>();
  at::parallel_for(0, units * v.chunks, 1,
                   [&](int64_t begin, int64_t end) { value_items<P, HV, NIB>(v, p, part, begin, end); });
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {  // chunks added in order: thread-independent
    for (int64_t u = begin; u < end; ++u) {
      const int64_t f = u % v.blocks, bg = u / v.blocks, g = bg % v.heads, b = bg / v.heads;
      for (int64_t r = 0; r < v.rows; ++r) {
        float* o = v.out + b * v.out_strides[0] + g * v.out_strides[1] + r * v.out_strides[2] + f * v.width;
        for (int64_t chunk = 0; chunk < v.chunks; ++chunk) {
          const float* a = part + (u * v.chunks + chunk) * per_item + r * v.width;
          for (int64_t j = 0; j < v.width; ++j) o[j] += a[j];
        }
      }
    }
  });
}

template <typename P>
void dispatch_values(const ValueProblem& v, const P* p) {
  const bool two = v.nibbles == 2;
  switch (v.width) {  // the plane widths of real models, unrolled; anything else, one code at a time
    case 64: return two ? run_values<P, 2, 2>(v, p) : run_values<P, 2, 1>(v, p);
    case 32: return two ? run_values<P, 1, 2>(v, p) : run_values<P, 1, 1>(v, p);
    default: return two ? run_values<P, 0, 2>(v, p) : run_values<P, 0, 1>(v, p);
  }
}

}  // namespace

// scores[..., :Q] (float32, (B, G, R, S)) = q (float32, (B, G, R, E)) . the Q keys held as codes (uint8,
// (B, G, Q, E * bits / 8)) with float16 scales and zero points (B, G, Q / group_size, E).
void key_scores(const torch::Tensor& q, const torch::Tensor& codes, const torch::Tensor& scale,
                const torch::Tensor& zero, torch::Tensor& scores, int64_t bits, int64_t group_size) {
  TORCH_CHECK(q.dim() == 4 && codes.dim() == 4 && scale.dim() == 4 && zero.dim() == 4 && scores.dim() == 4,
              "key_scores: 4-D tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && scores.scalar_type() == at::kFloat, "key_scores: float32 q and scores");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "key_scores: uint8 codes");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf, "key_scores: float16 scales");
  TORCH_CHECK(bits == 8 || bits == 4, "key_scores: 4 or 8 bits");
  const int64_t b_n = q.size(0), g_n = q.size(1), r_n = q.size(2), e = q.size(3), n = codes.size(2);
  TORCH_CHECK(q.is_contiguous(), "key_scores: contiguous q");
  TORCH_CHECK(codes.size(3) * 8 / bits == e && codes.stride(3) == 1, "key_scores: codes (B, G, Q, E * bits / 8)");
  TORCH_CHECK(n % group_size == 0 && scale.size(2) == n / group_size && scale.size(3) == e && scale.stride(3) == 1 &&
              zero.sizes() == scale.sizes() && zero.stride(3) == 1, "key_scores: scales (B, G, Q / group_size, E)");
  TORCH_CHECK(scores.size(2) == r_n && scores.size(3) >= n && scores.stride(3) == 1, "key_scores: scores (B, G, R, >= Q)");
  TORCH_CHECK(bits == 8 || e % 2 == 0, "key_scores: even E at 4 bits");
  Problem p{q.data_ptr<float>(), codes.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(), zero.data_ptr<c10::Half>(),
            scores.data_ptr<float>(), b_n, g_n, r_n, e, bits, group_size, n / group_size,
            {codes.stride(0), codes.stride(1), codes.stride(2)}, {scale.stride(0), scale.stride(1), scale.stride(2)},
            {zero.stride(0), zero.stride(1), zero.stride(2)}, {scores.stride(0), scores.stride(1), scores.stride(2)}};
  const int64_t nc = e % (bits == 8 ? W : 2 * W) == 0 ? e / W : 0;  // 16-float vectors of codes per token
  switch (nc) {  // the head sizes of real models, unrolled; anything else, the general loop
    case 2: return run(p, FixedDot<2>{r_n, bits});
    case 4: return run(p, FixedDot<4>{r_n, bits});
    case 8: return run(p, FixedDot<8>{r_n, bits});
    case 16: return run(p, FixedDot<16>{r_n, bits});
    default: return run(p, AnyDot{r_n, bits, e});
  }
}

// out (float32, (B, G, R, E)) += p (float32 or bfloat16, (B, G, R, Q)) @ the Q values held as planes (uint8,
// (B, G, E / W * bits / 4, Q, W / 2), `to_planes`) with float16 scales and zero points (B, G, Q, E / group_size),
// group_size a multiple of the plane width W (one scale per token and plane).
void value_sums(const torch::Tensor& p, const torch::Tensor& codes, const torch::Tensor& scale,
                const torch::Tensor& zero, torch::Tensor& out, int64_t bits, int64_t group_size) {
  TORCH_CHECK(p.dim() == 4 && codes.dim() == 5 && scale.dim() == 4 && zero.dim() == 4 && out.dim() == 4,
              "value_sums: p, scales, out 4-D and codes 5-D");
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16, "value_sums: float32 or bfloat16 p");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "value_sums: float32 out");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "value_sums: uint8 codes");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf, "value_sums: float16 scales");
  TORCH_CHECK(bits == 8 || bits == 4, "value_sums: 4 or 8 bits");
  const int64_t b_n = p.size(0), g_n = p.size(1), r_n = p.size(2), n = p.size(3), e = out.size(3);
  const int64_t width = 2 * codes.size(4), nibbles = bits / 4;
  TORCH_CHECK(p.stride(3) == 1 && codes.stride(4) == 1 && scale.stride(3) == 1 && zero.stride(3) == 1 &&
              out.stride(3) == 1, "value_sums: unit stride along the last dimension");
  TORCH_CHECK(codes.size(0) == b_n && codes.size(1) == g_n && codes.size(3) == n && e % width == 0 &&
              codes.size(2) == e / width * nibbles, "value_sums: codes (B, G, E / W * bits / 4, Q, W / 2)");
  TORCH_CHECK(group_size % width == 0 && e % group_size == 0 && scale.size(2) == n &&
              scale.size(3) == e / group_size && zero.sizes() == scale.sizes(),
              "value_sums: scales (B, G, Q, E / group_size), group_size a multiple of the plane width");
  TORCH_CHECK(out.size(0) == b_n && out.size(1) == g_n && out.size(2) == r_n, "value_sums: out (B, G, R, E)");
  ValueProblem v{codes.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(), zero.data_ptr<c10::Half>(),
                 out.data_ptr<float>(), b_n, g_n, r_n, width, e / width, n, (n + VALUE_CHUNK - 1) / VALUE_CHUNK,
                 group_size, nibbles, {p.stride(0), p.stride(1), p.stride(2)},
                 {codes.stride(0), codes.stride(1), codes.stride(2), codes.stride(3)},
                 {scale.stride(0), scale.stride(1), scale.stride(2)}, {zero.stride(0), zero.stride(1), zero.stride(2)},
                 {out.stride(0), out.stride(1), out.stride(2)}};
  if (n == 0) return;
  if (p.scalar_type() == at::kFloat)
    dispatch_values(v, p.data_ptr<float>());
  else
    dispatch_values(v, p.data_ptr<c10::BFloat16>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_scores", &key_scores, "q . K^T from per-channel quantized key codes, into scores[..., :Q]");
  m.def("value_sums", &value_sums, "out += p @ V from per-token quantized value planes");
}
