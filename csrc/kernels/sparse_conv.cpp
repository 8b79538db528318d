#include "kernels/sparse_conv.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels/cpu_features.h"
#include "kernels/isa_variants.h"
#include "kernels/partition.h"
#include "kernels/scratch.h"

namespace sparseprune {

SP_DECLARE_ISA_VARIANTS(
    void conv_task_entry(const SparseConvWeights& w, const int32_t* offsets, const float* xph,
                         const float* bias, bool relu, float* yt, int64_t grid_padded, int64_t p0,
                         int64_t width, int64_t o0, int64_t o1);
    void pattern_conv_task_entry(const PatternConvWeights& w, const PatternOffsets& off,
                                 int taps_per_kernel, const float* xph, const float* bias, bool relu,
                                 float* yt, int64_t grid_padded, int64_t p0, int64_t width, int64_t o0,
                                 int64_t o1);)

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether some tap of the kernel reads stride phase `phase` of an axis. A 1x1 kernel of stride 2
// reads one phase of four: the others are neither repacked nor counted in a panel's bytes.
bool phase_read(int64_t phase, int kernel, int dilation, int stride) {
  for (int64_t t = 0; t < kernel; ++t)
    if (t * dilation % stride == phase) return true;
  return false;
}

int64_t phases_read(const ConvShape& s) {
  int64_t rows = 0, cols = 0;
  for (int64_t a = 0; a < s.stride_h; ++a) rows += phase_read(a, s.kernel_h, s.dilation_h, s.stride_h);
  for (int64_t b = 0; b < s.stride_w; ++b) cols += phase_read(b, s.kernel_w, s.dilation_w, s.stride_w);
  return rows * cols;
}

constexpr int64_t kTileFloats = 128;  // grid pixels per task: 2 x 8 vectors of 8, or 8 of 16 (AVX-512 has 32 registers)

}  // namespace

ConvGeometry conv_geometry(const ConvShape& s, int64_t in_h, int64_t in_w) {
  ConvGeometry g;
  g.in_h = in_h;
  g.in_w = in_w;
  const int64_t hp = in_h + 2 * s.pad_h, wp = in_w + 2 * s.pad_w;
  const int64_t span_h = static_cast<int64_t>(s.dilation_h) * (s.kernel_h - 1) + 1;
  const int64_t span_w = static_cast<int64_t>(s.dilation_w) * (s.kernel_w - 1) + 1;
  if (hp < span_h || wp < span_w)
    throw std::invalid_argument("input of " + std::to_string(in_h) + "x" + std::to_string(in_w) +
                                " is smaller than the (dilated) kernel after padding");
  g.out_h = (hp - span_h) / s.stride_h + 1;
  g.out_w = (wp - span_w) / s.stride_w + 1;
  g.phase_h = ceil_div(hp, s.stride_h);
  g.phase_w = ceil_div(wp, s.stride_w);
  g.plane = g.phase_h * g.phase_w;
  g.grid = g.out_h * g.phase_w;
  g.grid_padded = (g.grid + 7) / 8 * 8;
  // The zero tail lets the last tile of the grid read past the final plane.
  g.image_floats = s.in_channels * s.stride_h * s.stride_w * g.plane + g.grid_padded + kTileFloats;
  if (g.image_floats > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("input too large for 32-bit offsets");
  return g;
}

ConvReadTable conv_read_table(const ConvShape& s, const ConvGeometry& g, const SparseConvWeights& w) {
  const int64_t cin_g = s.in_channels / s.groups, cout_g = s.out_channels / s.groups;
  const int64_t taps = static_cast<int64_t>(s.kernel_h) * s.kernel_w;
  ConvReadTable t;
  t.offsets.resize(static_cast<size_t>(w.row_ptr[s.out_channels]));
  for (int64_t o = 0; o < s.out_channels; ++o) {
    const int64_t group = o / cout_g;
    for (int64_t j = w.row_ptr[o]; j < w.row_ptr[o + 1]; ++j) {
      const int64_t i = group * cin_g + w.tap[j] / taps;
      const int64_t dy = (w.tap[j] % taps) / s.kernel_w * s.dilation_h;
      const int64_t dx = (w.tap[j] % s.kernel_w) * s.dilation_w;
      const int64_t phase = (i * s.stride_h + dy % s.stride_h) * s.stride_w + dx % s.stride_w;
      t.offsets[j] = static_cast<int32_t>(phase * g.plane + (dy / s.stride_h) * g.phase_w + dx / s.stride_w);
    }
  }
  // One tile (kTileFloats grid pixels) reads, per input channel and stride phase, the grid rows it
  // spans plus the kernel's reach below them.
  const int64_t rows = ceil_div(kTileFloats, g.phase_w) + 1 + (s.dilation_h * (s.kernel_h - 1)) / s.stride_h;
  const int64_t channel_bytes = 4 * phases_read(s) * std::min(g.plane, rows * g.phase_w);
  const int64_t per_panel = std::max<int64_t>(1, kConvPanelBytes / std::max<int64_t>(channel_bytes, 1));
  t.n_panels = ceil_div(cin_g, per_panel);
  t.panel_ptr.assign(static_cast<size_t>(s.out_channels * (t.n_panels + 1)), 0);
  for (int64_t o = 0; o < s.out_channels; ++o) {
    int64_t* panels = t.panel_ptr.data() + o * (t.n_panels + 1);
    panels[0] = w.row_ptr[o];
    for (int64_t j = w.row_ptr[o]; j < w.row_ptr[o + 1]; ++j) ++panels[w.tap[j] / taps / per_panel + 1];
    for (int64_t q = 0; q < t.n_panels; ++q) panels[q + 1] += panels[q];
  }
  return t;
}

PatternOffsets pattern_offsets(const ConvShape& s, const ConvGeometry& g, const PatternConvWeights& w,
                               int64_t n_patterns) {
  const int64_t taps = static_cast<int64_t>(s.kernel_h) * s.kernel_w;
  PatternOffsets off;
  off.channel_stride = static_cast<int64_t>(s.stride_h) * s.stride_w * g.plane;
  off.rel.assign(static_cast<size_t>(n_patterns * taps), 0);
  for (int64_t p = 0; p < n_patterns; ++p) {
    for (int64_t k = 0; k < w.pattern_size[p]; ++k) {
      const int64_t t = w.pattern_taps[p * taps + k];
      const int64_t dy = t / s.kernel_w * s.dilation_h, dx = t % s.kernel_w * s.dilation_w;
      const int64_t phase = (dy % s.stride_h) * s.stride_w + dx % s.stride_w;
      off.rel[p * taps + k] =
          static_cast<int32_t>(phase * g.plane + (dy / s.stride_h) * g.phase_w + dx / s.stride_w);
    }
  }
  return off;
}

namespace {

// The loops of one image's convolution run either shared by the enclosing parallel region's team
// (team = true: a worksharing loop without its barrier; callers add barriers where needed) or all
// on the calling thread (team = false: images are spread over the threads instead).
template <class Body>
void share_static(bool team, int64_t n, Body&& body) {
  if (team) {
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

// As share_static with a dynamic schedule (OpenMP takes the schedule only as a literal clause).
template <class Body>
void share_dynamic(bool team, int64_t n, Body&& body) {
  if (team) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic) nowait
#endif
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

void team_barrier(bool team) {
  if (team) {
#ifdef _OPENMP
#pragma omp barrier
#endif
  }
}

// Zero-pads image n and splits it into stride phases. Returns this thread's share of the image's
// probe: NaN when the rows it copied hold a NaN or an infinity (0 * v is NaN exactly for those),
// else 0; every input pixel lands in exactly one phase, so the team's shares cover every pixel
// some output reads.
// Summed over the copied rows while they are in L1, not in a pass of its own over the input.
float repack_image(const ConvShape& s, const ConvGeometry& g, const ConvArgs& a, int64_t n, float* xph, bool team) {
  const float* xn = a.x + n * a.x_stride[0];
  const int64_t phases = static_cast<int64_t>(s.stride_h) * s.stride_w;
  float probe = 0.0f;
  share_static(team, s.in_channels * phases, [&](int64_t cp) {
    const int64_t c = cp / phases, ph_a = (cp % phases) / s.stride_w, ph_b = cp % s.stride_w;
    if (!phase_read(ph_a, s.kernel_h, s.dilation_h, s.stride_h) || !phase_read(ph_b, s.kernel_w, s.dilation_w, s.stride_w))
      return;  // no tap reads it (a pixel there is outside every output's window, as in torch)
    float* dst = xph + cp * g.plane;
    const float* src = xn + c * a.x_stride[1];
    for (int64_t r = 0; r < g.phase_h; ++r) {
      const int64_t in_r = r * s.stride_h + ph_a - s.pad_h;
      float* row = dst + r * g.phase_w;
      if (in_r < 0 || in_r >= g.in_h) {
        std::fill(row, row + g.phase_w, 0.0f);
        continue;
      }
      const float* srow = src + in_r * a.x_stride[2];
      for (int64_t q = 0; q < g.phase_w; ++q) {
        const int64_t in_c = q * s.stride_w + ph_b - s.pad_w;
        row[q] = (in_c >= 0 && in_c < g.in_w) ? srow[in_c * a.x_stride[3]] : 0.0f;
      }
#pragma omp simd reduction(+ : probe)
      for (int64_t q = 0; q < g.phase_w; ++q) probe += row[q] * 0.0f;
    }
  });
  share_static(team, 1, [&](int64_t) { std::fill(xph + s.in_channels * phases * g.plane, xph + g.image_floats, 0.0f); });
  return probe;
}

// NaN when input channel c of image n holds a NaN or an infinity (0 * v is NaN exactly for those),
// else 0. Contiguous rows take a vectorised reduction: a serial float sum over a 56x56x64 image
// would cost more than the convolution's own arithmetic.
float channel_nonfinite_probe(const ConvGeometry& g, const ConvArgs& a, int64_t n, int64_t c) {
  float probe = 0.0f;
  const float* xc = a.x + n * a.x_stride[0] + c * a.x_stride[1];
  for (int64_t r = 0; r < g.in_h; ++r) {
    const float* row = xc + r * a.x_stride[2];
    if (a.x_stride[3] == 1) {
#pragma omp simd reduction(+ : probe)
      for (int64_t q = 0; q < g.in_w; ++q) probe += row[q] * 0.0f;
    } else {
      for (int64_t q = 0; q < g.in_w; ++q) probe += row[q * a.x_stride[3]] * 0.0f;
    }
  }
  return probe;
}

// Dense math multiplies by the zero weights too (0 * inf = NaN); for an image holding a NaN or an
// infinity, recompute its outputs by the plain dense definition so the answer matches dense.
void dense_recompute_image(const ConvShape& s, const ConvGeometry& g, const SparseConvWeights& w,
                           const ConvArgs& a, int64_t n) {
  const int64_t cin_g = s.in_channels / s.groups, cout_g = s.out_channels / s.groups;
  const int64_t taps = static_cast<int64_t>(s.kernel_h) * s.kernel_w;
  std::vector<float> dense(static_cast<size_t>(s.out_channels * cin_g * taps), 0.0f);
  for (int64_t o = 0; o < s.out_channels; ++o)
    for (int64_t j = w.row_ptr[o]; j < w.row_ptr[o + 1]; ++j) dense[o * cin_g * taps + w.tap[j]] = w.values[j];
  const float* xn = a.x + n * a.x_stride[0];
  float* yn = a.y + n * s.out_channels * g.out_h * g.out_w;
  for (int64_t o = 0; o < s.out_channels; ++o) {
    const int64_t group = o / cout_g;
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        double sum = a.bias ? a.bias[o] : 0.0;
        for (int64_t i = 0; i < cin_g; ++i) {
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t r = oh * s.stride_h + (t / s.kernel_w) * s.dilation_h - s.pad_h;
            const int64_t q = ow * s.stride_w + (t % s.kernel_w) * s.dilation_w - s.pad_w;
            if (r < 0 || r >= g.in_h || q < 0 || q >= g.in_w) continue;  // zero padding
            const float v = xn[(group * cin_g + i) * a.x_stride[1] + r * a.x_stride[2] + q * a.x_stride[3]];
            sum += static_cast<double>(dense[(o * cin_g + i) * taps + t]) * v;
          }
        }
        const int64_t at = (o * g.out_h + oh) * g.out_w + ow;
        float out = static_cast<float>(sum);
        if (a.residual) out += a.residual[n * s.out_channels * g.out_h * g.out_w + at];
        if (a.relu && out < 0.0f) out = 0.0f;
        yn[at] = out;
      }
    }
  }
}

}  // namespace

void sparse_conv2d(const ConvShape& s, const ConvGeometry& g, const SparseConvWeights& w,
                   const int32_t* offsets, const ConvArgs& a, const PatternConvWeights* pattern,
                   const PatternOffsets* pattern_off) {
  if (a.batch <= 0 || s.out_channels <= 0) return;
  const int64_t n_tiles = ceil_div(g.grid_padded, kTileFloats);
  const double work = static_cast<double>(w.row_ptr[s.out_channels]) * g.grid + s.out_channels;  // per image
  // Two ways to use the threads. Images spread over them, each thread convolving whole images
  // alone, when there are enough images to balance them (at most 25% idle): one parallel region
  // and no barrier per image. A ResNet on 32x32 inputs does ~20k multiply-adds per image and
  // layer, so sharing each image between threads paid ~5 us of barriers per image and layer: 2
  // threads ran slower than 1 at batch 64. Otherwise the threads share each image (tiles x
  // channel chunks), one parallel region for the whole batch.
  const int batch_threads = static_cast<int>(std::min<int64_t>(threads_for_work(a.n_threads, work * a.batch), a.batch));
  const bool by_image = batch_threads > 1 && ceil_div(a.batch, batch_threads) * batch_threads * 4 <= a.batch * 5;
  const int threads = by_image ? batch_threads : threads_for_work(a.n_threads, work);
  const bool team = !by_image && threads > 1;
  // Enough tasks to balance the threads of a team even when the image is small (7x7 is one tile).
  const int64_t want_chunks = team ? ceil_div(4 * threads, n_tiles) : 1;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(want_chunks, ceil_div(s.out_channels, 8)));
  const int64_t chunk = ceil_div(s.out_channels, n_chunks);
  const int64_t n_tasks = n_tiles * n_chunks;
  const int64_t scratch_floats = (g.image_floats + 15) / 16 * 16 + s.out_channels * g.grid_padded;
  auto task = SP_ISA_PICK(conv_task_entry);
  auto ptask = SP_ISA_PICK(pattern_conv_task_entry);
  const int taps_per_kernel = s.kernel_h * s.kernel_w;
  // A 1x1, stride-1, unpadded convolution on contiguous NCHW images needs no repacking: the image
  // already is the repacked layout, and when the grid is whole vectors the output is too.
  const bool direct = s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
                      s.pad_h == 0 && s.pad_w == 0 && g.grid == g.grid_padded && a.x_stride[3] == 1 &&
                      a.x_stride[2] == g.in_w && a.x_stride[1] == g.plane;
  // Per image: NaN when it holds a NaN or an infinity (see dense_recompute_image).
  std::vector<float> probes(static_cast<size_t>(a.batch), 0.0f);
  // Image n on the team (team = true) or on this thread alone; xph: repacking scratch.
  auto convolve_image = [&](int64_t n, float* xph, bool team) {
    float* yt = xph + (g.image_floats + 15) / 16 * 16;
    float* yn = a.y + n * s.out_channels * g.out_h * g.out_w;
    const float* src = direct ? a.x + n * a.x_stride[0] : xph;
    float* dst = direct ? yn : yt;
    const float* res = a.residual ? a.residual + n * s.out_channels * g.out_h * g.out_w : nullptr;
    const bool tile_relu = a.relu && !res;  // with a residual, the ReLU comes after the add
    // The direct path reads the input in place: its probe is a pass of its own.
    float probe = 0.0f;
    if (direct)
      share_static(team, s.in_channels, [&](int64_t c) { probe += channel_nonfinite_probe(g, a, n, c); });
    else
      probe = repack_image(s, g, a, n, xph, team);
    if (probe != 0.0f) {  // NaN: rare, so the update may take the lock
#ifdef _OPENMP
#pragma omp critical(sparseprune_conv_probe)
#endif
      probes[static_cast<size_t>(n)] += probe;
    }
    if (!direct) team_barrier(team);  // tasks read rows other threads repacked
    // Each task finishes its outputs: the grid (phase_w columns per row) cropped to the output
    // (out_w columns), with the residual added and the ReLU applied on the way when there is
    // one (the direct path wrote the output in place, so it adds the residual there). Done while
    // the tile is in cache, and without a barrier of its own.
    auto finish = [&](int64_t p0, int64_t width, int64_t o0, int64_t o1) {
      if (direct && !res) return;
      const int64_t end = std::min(p0 + width, g.grid);
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t oh = p0 / g.phase_w; oh * g.phase_w < end; ++oh) {
          const int64_t lo = std::max<int64_t>(p0 - oh * g.phase_w, 0);
          const int64_t hi = std::min<int64_t>(end - oh * g.phase_w, g.out_w);
          if (lo >= hi) continue;
          const float* row = direct ? yn + (o * g.out_h + oh) * g.out_w : yt + o * g.grid_padded + oh * g.phase_w;
          float* out = yn + (o * g.out_h + oh) * g.out_w;
          if (!res) {
            std::copy(row + lo, row + hi, out + lo);
            continue;
          }
          const float* r = res + (o * g.out_h + oh) * g.out_w;
          for (int64_t q = lo; q < hi; ++q) {
            const float v = row[q] + r[q];
            out[q] = a.relu && v < 0.0f ? 0.0f : v;  // NaN stays NaN, as in torch.relu
          }
        }
      }
    };
    share_dynamic(team, n_tasks, [&](int64_t t) {
      const int64_t tile = t / n_chunks, c = t % n_chunks;
      const int64_t p0 = tile * kTileFloats;
      const int64_t width = std::min(kTileFloats, g.grid_padded - p0);
      const int64_t o0 = c * chunk, o1 = std::min(s.out_channels, o0 + chunk);
      if (o0 >= o1) return;
      if (pattern)
        ptask(*pattern, *pattern_off, taps_per_kernel, src, a.bias, tile_relu, dst, g.grid_padded, p0, width, o0, o1);
      else
        task(w, offsets, src, a.bias, tile_relu, dst, g.grid_padded, p0, width, o0, o1);
      finish(p0, width, o0, o1);
    });
    // The next image's repack and tasks reuse xph and yt; after the last image the parallel
    // region's end is the barrier.
    if (n + 1 < a.batch) team_barrier(team);
  };
  if (by_image) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
      float* xph = thread_scratch().get(scratch_floats);  // each thread its own
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t n = 0; n < a.batch; ++n) convolve_image(n, xph, false);
    }
  } else {
    float* xph = thread_scratch().get(scratch_floats);  // shared by the team
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (team)
#endif
    for (int64_t n = 0; n < a.batch; ++n) convolve_image(n, xph, team);
  }
  for (int64_t n = 0; n < a.batch; ++n)
    if (probes[static_cast<size_t>(n)] != probes[static_cast<size_t>(n)]) dense_recompute_image(s, g, w, a, n);
}

}  // namespace sparseprune
