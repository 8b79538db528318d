// Vectorised elementwise and row kernels (activations, softmax, layer norm), compiled once per
// SIMD path (include with SP_ISA_NS defined, from exactly one
// source file per path: it also defines that path's entry points). Every element, including a row's tail, goes through
// the same vector code, so results do not depend on where a thread's range starts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/simd.h"
#include "kernels/tensor_ops.h"

namespace sparseprune {
namespace SP_ISA_NS {

// tanh(x) = sign(x) (1 - e^(-2|x|)) / (1 + e^(-2|x|)): no cancellation for large |x|.
inline vf8 tanh8(vf8 x) {
  const vf8 one = splat8(1.0f);
  const vf8 ax = x < splat8(0.0f) ? -x : x;
  const vf8 e = exp8(splat8(-2.0f) * ax);
  const vf8 y = (one - e) / (one + e);
  return x < splat8(0.0f) ? -y : (x != x ? x : y);
}

// e^x over all floats, as torch.exp: exp8 is exact only in [-87, 88] (it clamps outside), so
// beyond that take e^(x/2) squared: overflows to inf above ~88.7, underflows to 0 (via the
// subnormals, with their lost bits) below ~-87.3.
inline vf8 exp8_full(vf8 x) {
  const vf8 ax = x < splat8(0.0f) ? -x : x;
  const vf8 h = exp8(x * splat8(0.5f));
  return ax > splat8(87.0f) ? h * h : exp8(x);
}

template <Activation A>
inline vf8 activate8(vf8 x) {
  const vf8 one = splat8(1.0f);
  if constexpr (A == Activation::relu) return relu8(x);
  if constexpr (A == Activation::relu6) {
    const vf8 r = min8(relu8(x), splat8(6.0f));  // min8(NaN, 6) would give 6: keep NaN, as torch does
    return x != x ? x : r;
  }
  if constexpr (A == Activation::gelu) return splat8(0.5f) * x * (one + erf8(x * splat8(0.70710678118654752f)));
  if constexpr (A == Activation::silu) return x / (one + exp8(-x));
  if constexpr (A == Activation::sigmoid) return one / (one + exp8(-x));
  if constexpr (A == Activation::tanh) return tanh8(x);
  if constexpr (A == Activation::hardswish) return x * min8(max8(x + splat8(3.0f), splat8(0.0f)), splat8(6.0f)) / splat8(6.0f);
  if constexpr (A == Activation::gelu_tanh) {
    // 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)): no cancellation when tanh(u) is near -1 (x < -3).
    const vf8 u = splat8(0.79788456080286536f) * (x + splat8(0.044715f) * x * x * x);  // sqrt(2 / pi)
    return x / (one + exp8_full(splat8(-2.0f) * u));
  }
  if constexpr (A == Activation::hardsigmoid) {
    const vf8 r = min8(max8(x + splat8(3.0f), splat8(0.0f)), splat8(6.0f)) / splat8(6.0f);
    return x != x ? x : r;  // max8/min8 would turn NaN into 0: keep it, as torch does
  }
  if constexpr (A == Activation::sqrt) return sqrt8(x);
  if constexpr (A == Activation::rsqrt) return one / sqrt8(x);
  if constexpr (A == Activation::exp) return exp8_full(x);
  return x;
}

// Affine false: scale 1, shift 0 skipped (x * 1 + 0 would turn -0 into +0: rsqrt(-0) is -inf).
template <Activation A, bool Affine>
inline void map_range(const float* src, float* dst, int64_t n, float scale, float shift) {
  const vf8 vs = splat8(scale), vh = splat8(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    *reinterpret_cast<vf8_unaligned*>(dst + i) = activate8<A>(Affine ? load8(src + i) * vs + vh : load8(src + i));
  if (i < n) {
    float tmp[8] = {0};
    std::copy(src + i, src + n, tmp);
    const vf8 r = activate8<A>(Affine ? load8(tmp) * vs + vh : load8(tmp));
    for (int64_t j = 0; j < n - i; ++j) dst[i + j] = r[j];
  }
}

template <Activation A>
inline void map_range(const float* src, float* dst, int64_t n, float scale, float shift) {
  if (scale == 1.0f && shift == 0.0f) map_range<A, false>(src, dst, n, scale, shift);
  else map_range<A, true>(src, dst, n, scale, shift);
}

inline void activation_map_body(const float* src, float* dst, int64_t n, float scale, float shift, Activation a) {
  switch (a) {
    case Activation::none: map_range<Activation::none>(src, dst, n, scale, shift); break;
    case Activation::relu: map_range<Activation::relu>(src, dst, n, scale, shift); break;
    case Activation::relu6: map_range<Activation::relu6>(src, dst, n, scale, shift); break;
    case Activation::gelu: map_range<Activation::gelu>(src, dst, n, scale, shift); break;
    case Activation::silu: map_range<Activation::silu>(src, dst, n, scale, shift); break;
    case Activation::sigmoid: map_range<Activation::sigmoid>(src, dst, n, scale, shift); break;
    case Activation::tanh: map_range<Activation::tanh>(src, dst, n, scale, shift); break;
    case Activation::hardswish: map_range<Activation::hardswish>(src, dst, n, scale, shift); break;
    case Activation::gelu_tanh: map_range<Activation::gelu_tanh>(src, dst, n, scale, shift); break;
    case Activation::hardsigmoid: map_range<Activation::hardsigmoid>(src, dst, n, scale, shift); break;
    case Activation::sqrt: map_range<Activation::sqrt>(src, dst, n, scale, shift); break;
    case Activation::rsqrt: map_range<Activation::rsqrt>(src, dst, n, scale, shift); break;
    case Activation::exp: map_range<Activation::exp>(src, dst, n, scale, shift); break;
  }
}

// dst[0, len) = softmax of src[0, n_valid), zeros after (n_valid >= 1). src may equal dst.
inline void softmax_row_body(const float* src, float* dst, int64_t n_valid, int64_t len) {
  vf8 vmax = splat8(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n_valid; i += 8) vmax = max8(vmax, load8(src + i));
  float mx = hmax8(vmax);
  for (int64_t j = i; j < n_valid; ++j) mx = src[j] > mx ? src[j] : mx;
  const vf8 vm = splat8(mx);
  vf8 vsum = splat8(0.0f);
  float tail[8] = {0};
  for (i = 0; i + 8 <= n_valid; i += 8) {
    const vf8 e = exp8(load8(src + i) - vm);
    *reinterpret_cast<vf8_unaligned*>(dst + i) = e;
    vsum += e;
  }
  float sum = hsum8(vsum);
  if (i < n_valid) {
    for (int64_t j = 0; j < 8; ++j) tail[j] = i + j < n_valid ? src[i + j] : mx;
    const vf8 e = exp8(load8(tail) - vm);
    for (int64_t j = 0; j < n_valid - i; ++j) sum += (dst[i + j] = e[j]);
  }
  const vf8 inv = splat8(1.0f / sum);
  for (i = 0; i + 8 <= n_valid; i += 8)
    *reinterpret_cast<vf8_unaligned*>(dst + i) = load8(dst + i) * inv;
  for (; i < n_valid; ++i) dst[i] *= inv[0];
  for (i = n_valid; i < len; ++i) dst[i] = 0.0f;
}

// dst = (src - mean) / sqrt(var + eps) * gamma + beta over one row of len >= 1.
inline void layernorm_row_body(const float* src, float* dst, int64_t len, const float* gamma, const float* beta,
                               float eps) {
  vf8 vs = splat8(0.0f);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) vs += load8(src + i);
  double sum = hsum8(vs);
  for (; i < len; ++i) sum += src[i];
  const float mean = static_cast<float>(sum / static_cast<double>(len));
  const vf8 vm = splat8(mean);
  vf8 vq = splat8(0.0f);
  for (i = 0; i + 8 <= len; i += 8) {
    const vf8 d = load8(src + i) - vm;
    vq += d * d;
  }
  double sq = hsum8(vq);
  for (; i < len; ++i) sq += (src[i] - mean) * (src[i] - mean);
  const float inv = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(len) + eps));
  const vf8 vi = splat8(inv);
  for (i = 0; i + 8 <= len; i += 8)
    *reinterpret_cast<vf8_unaligned*>(dst + i) = (load8(src + i) - vm) * vi * load8(gamma + i) + load8(beta + i);
  for (; i < len; ++i) dst[i] = (src[i] - mean) * inv * gamma[i] + beta[i];
}

// One plane of max or average pooling (count_include_pad), padding inside the input's bounds
// only: per output row, each kernel tap updates a run of outputs from a strided run of inputs,
// without branches, so the compiler vectorises the run.
// SW > 0: the column stride as a compile-time constant (1 and 2 vectorise); 0: `sw` at run time.
template <int SW>
inline void pool_plane_strided(const float* __restrict src, float* __restrict dst, int64_t H, int64_t W, int64_t OH,
                               int64_t OW, int kh, int kw, int sh, int sw_runtime, int ph, int pw, bool is_max) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  const float inv_area = 1.0f / static_cast<float>(kh * kw);
  for (int64_t oh = 0; oh < OH; ++oh) {
    float* __restrict out = dst + oh * OW;
    for (int64_t ow = 0; ow < OW; ++ow) out[ow] = is_max ? -INFINITY : 0.0f;
    for (int dy = 0; dy < kh; ++dy) {
      const int64_t r = oh * sh + dy - ph;
      if (r < 0 || r >= H) continue;
      const float* __restrict row = src + r * W;
      for (int dx = 0; dx < kw; ++dx) {
        const int64_t off = dx - pw;
        const int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
        // (W - 1 - off) < 0: no output reads inside the row (division would truncate toward zero).
        const int64_t hi = W - 1 - off < 0 ? 0 : std::min<int64_t>(OW, (W - 1 - off) / sw + 1);
        const float* __restrict in = row + off;
        if (is_max) {
          for (int64_t ow = lo; ow < hi; ++ow) {
            const float v = in[ow * sw];
            out[ow] = (v > out[ow] || v != v) ? v : out[ow];  // NaN wins, as in torch
          }
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) out[ow] += in[ow * sw];
        }
      }
    }
    if (!is_max)
      for (int64_t ow = 0; ow < OW; ++ow) out[ow] *= inv_area;
  }
}

inline void pool_plane_body(const float* src, float* dst, int64_t H, int64_t W, int64_t OH, int64_t OW, int kh, int kw,
                            int sh, int sw, int ph, int pw, bool is_max) {
  if (sw == 1) pool_plane_strided<1>(src, dst, H, W, OH, OW, kh, kw, sh, sw, ph, pw, is_max);
  else if (sw == 2) pool_plane_strided<2>(src, dst, H, W, OH, OW, kh, kw, sh, sw, ph, pw, is_max);
  else pool_plane_strided<0>(src, dst, H, W, OH, OW, kh, kw, sh, sw, ph, pw, is_max);
}

// One depthwise output plane: out = bias + sum over the kept taps of value * (padded input shifted
// by the tap), each tap one pass over the output rows (vectorised for strides 1 and 2).
template <int SW>
inline void depthwise_plane_strided(const float* __restrict padded, int64_t padded_w, const int32_t* taps,
                                    const float* values, int64_t n_taps, int kernel_w, int dil_h, int dil_w,
                                    int stride_h, int sw_runtime, int64_t out_h, int64_t out_w, float bias,
                                    float* __restrict out) {
  const int64_t sw = SW > 0 ? SW : sw_runtime;
  // Tap offsets once per plane; then per output row, 8 outputs at a time in a register across
  // all taps (one store per vector, not one per tap).
  int64_t offset[64];
  const int64_t n = n_taps < 64 ? n_taps : 64;  // DepthwiseConv refuses kernels of more taps
  int64_t max_col = 0;  // the largest column offset of a tap
  for (int64_t t = 0; t < n; ++t) {
    const int64_t col = (taps[t] % kernel_w) * dil_w;
    offset[t] = (taps[t] / kernel_w) * dil_h * padded_w + col;
    max_col = col > max_col ? col : max_col;
  }
  for (int64_t oh = 0; oh < out_h; ++oh) {
    float* __restrict row = out + oh * out_w;
    const float* __restrict base = padded + oh * stride_h * padded_w;
    int64_t ow = 0;
    if (SW == 1) {
      for (; ow + 8 <= out_w; ow += 8) {
        vf8 acc = splat8(bias);
        for (int64_t t = 0; t < n; ++t) acc += splat8(values[t]) * load8(base + offset[t] + ow);
        *reinterpret_cast<vf8_unaligned*>(row + ow) = acc;
      }
    } else if (SW == 2) {  // 16 consecutive inputs, even lanes kept
      // Both 8-wide loads must stay inside the padded row (the odd lanes are read, not used).
      for (; ow + 8 <= out_w && max_col + 2 * ow + 16 <= padded_w; ow += 8) {
        vf8 acc = splat8(bias);
        for (int64_t t = 0; t < n; ++t) {
          const float* p = base + offset[t] + 2 * ow;
          // __builtin_shufflevector (constant lane indices) is understood by gcc >= 12 and clang.
          acc += splat8(values[t]) * __builtin_shufflevector(load8(p), load8(p + 8), 0, 2, 4, 6, 8, 10, 12, 14);
        }
        *reinterpret_cast<vf8_unaligned*>(row + ow) = acc;
      }
    }
    for (; ow < out_w; ++ow) {
      float acc = bias;
      for (int64_t t = 0; t < n; ++t) acc += values[t] * base[offset[t] + ow * sw];
      row[ow] = acc;
    }
  }
}

// The entry points the dispatcher (tensor_ops.cpp) calls, one set per SIMD path.
void activation_map_entry(const float* src, float* dst, int64_t n, float scale, float shift, Activation a) {
  activation_map_body(src, dst, n, scale, shift, a);
}
void softmax_row_entry(const float* src, float* dst, int64_t n_valid, int64_t len) {
  softmax_row_body(src, dst, n_valid, len);
}
void layernorm_row_entry(const float* src, float* dst, int64_t len, const float* gamma, const float* beta, float eps) {
  layernorm_row_body(src, dst, len, gamma, beta, eps);
}
void pool_plane_entry(const float* src, float* dst, int64_t H, int64_t W, int64_t OH, int64_t OW, int kh, int kw,
                      int sh, int sw, int ph, int pw, bool is_max) {
  pool_plane_body(src, dst, H, W, OH, OW, kh, kw, sh, sw, ph, pw, is_max);
}
void depthwise_plane_entry(const float* padded, int64_t padded_w, const int32_t* taps, const float* values,
                           int64_t n_taps, int kernel_w, int dil_h, int dil_w, int stride_h, int stride_w,
                           int64_t out_h, int64_t out_w, float bias, float* out) {
  if (stride_w == 1)
    depthwise_plane_strided<1>(padded, padded_w, taps, values, n_taps, kernel_w, dil_h, dil_w, stride_h, 1, out_h,
                               out_w, bias, out);
  else if (stride_w == 2)
    depthwise_plane_strided<2>(padded, padded_w, taps, values, n_taps, kernel_w, dil_h, dil_w, stride_h, 2, out_h,
                               out_w, bias, out);
  else
    depthwise_plane_strided<0>(padded, padded_w, taps, values, n_taps, kernel_w, dil_h, dil_w, stride_h, stride_w,
                               out_h, out_w, bias, out);
}

}  // namespace SP_ISA_NS
}  // namespace sparseprune
