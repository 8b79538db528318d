#include "kernels/dense_conv.h"

#include <algorithm>
#include <stdexcept>

#include "kernels/gemm.h"
#include "kernels/partition.h"

namespace sparseprune {

std::shared_ptr<const DenseConv> DenseConv::make(const ConvShape& s, const float* weight, const float* bias) {
  if (s.groups < 1 || s.in_channels % s.groups || s.out_channels % s.groups || s.in_channels < 1 ||
      s.out_channels < 1 || s.kernel_h < 1 || s.kernel_w < 1 || s.stride_h < 1 || s.stride_w < 1 ||
      s.dilation_h < 1 || s.dilation_w < 1 || s.pad_h < 0 || s.pad_w < 0)
    throw std::invalid_argument("dense conv: bad shape");
  auto c = std::make_shared<DenseConv>();
  c->shape_ = s;
  const int64_t k = s.in_channels / s.groups * s.kernel_h * s.kernel_w;
  c->weight_.assign(weight, weight + s.out_channels * k);
  if (bias) c->bias_.assign(bias, bias + s.out_channels);
  return c;
}

std::shared_ptr<const DenseConv> DenseConv::from_sparse(const PackedConv& sparse) {
  const ConvShape& s = sparse.shape();
  const int64_t k = s.in_channels / s.groups * s.kernel_h * s.kernel_w;  // taps of one filter
  const std::vector<int64_t>& ptr = sparse.row_ptr();
  const std::vector<int64_t> taps = sparse.taps();
  const std::vector<float>& values = sparse.values();
  std::vector<float> weight(static_cast<size_t>(s.out_channels * k), 0.0f);
  for (int64_t o = 0; o < s.out_channels; ++o)
    for (int64_t j = ptr[o]; j < ptr[o + 1]; ++j) weight[o * k + taps[j]] += values[j];
  return make(s, weight.data(), sparse.bias().empty() ? nullptr : sparse.bias().data());
}

namespace {

// Panel columns are output pixels [ow0, ow0 + width) of output row oh, of one image and group
// (panels never straddle rows, so each panel row reads one input row at a constant stride); row
// k = (i, dy, dx) holds the input each pixel's tap reads, 0 in the padding. packed[k * 16 + j].
void pack_im2col_panel(const ConvShape& s, const ConvGeometry& g, const float* xg, int64_t oh, int64_t ow0,
                       int64_t width, float* packed) {
  const int64_t cin_g = s.in_channels / s.groups;
  const int64_t sw = s.stride_w;
  int64_t k = 0;
  for (int64_t i = 0; i < cin_g; ++i) {
    const float* xc = xg + i * g.in_h * g.in_w;
    for (int dy = 0; dy < s.kernel_h; ++dy) {
      const int64_t r = oh * s.stride_h + dy * s.dilation_h - s.pad_h;
      const float* row = xc + r * g.in_w;
      for (int dx = 0; dx < s.kernel_w; ++dx, ++k) {
        float* dst = packed + k * kGemmPanel;
        const int64_t c0 = ow0 * sw + dx * s.dilation_w - s.pad_w;
        int64_t j = 0;
        if (r < 0 || r >= g.in_h) {
          // a padding row: all zeros
        } else if (c0 >= 0 && c0 + (width - 1) * sw < g.in_w) {  // inside the row: no checks
          if (sw == 1) {
            for (; j < width; ++j) dst[j] = row[c0 + j];
          } else {
            for (; j < width; ++j) dst[j] = row[c0 + j * sw];
          }
        } else {
          for (; j < width; ++j) {
            const int64_t c = c0 + j * sw;
            dst[j] = (c >= 0 && c < g.in_w) ? row[c] : 0.0f;
          }
        }
        for (; j < kGemmPanel; ++j) dst[j] = 0.0f;
      }
    }
  }
}

// The same for pixels [n0, n0 + width) in row-major output order, which may span rows: for small
// outputs (7x7) where whole-row panels would leave most of each panel empty.
void pack_im2col_span(const ConvShape& s, const ConvGeometry& g, const float* xg, int64_t n0, int64_t width,
                      float* packed) {
  int64_t base_r[kGemmPanel], base_c[kGemmPanel];
  for (int64_t j = 0; j < kGemmPanel; ++j) {
    const int64_t n = n0 + std::min(j, width - 1);
    base_r[j] = (n / g.out_w) * s.stride_h - s.pad_h;
    base_c[j] = (n % g.out_w) * s.stride_w - s.pad_w;
  }
  const int64_t cin_g = s.in_channels / s.groups;
  int64_t k = 0;
  for (int64_t i = 0; i < cin_g; ++i) {
    const float* xc = xg + i * g.in_h * g.in_w;
    for (int dy = 0; dy < s.kernel_h; ++dy) {
      for (int dx = 0; dx < s.kernel_w; ++dx, ++k) {
        float* dst = packed + k * kGemmPanel;
        for (int64_t j = 0; j < kGemmPanel; ++j) {
          const int64_t r = base_r[j] + dy * s.dilation_h, c = base_c[j] + dx * s.dilation_w;
          dst[j] = (j < width && r >= 0 && r < g.in_h && c >= 0 && c < g.in_w) ? xc[r * g.in_w + c] : 0.0f;
        }
      }
    }
  }
}

}  // namespace

void DenseConv::run(const ConvGeometry& g, const float* x, int64_t batch, float* y, int n_threads) const {
  const ConvShape& s = shape_;
  const int64_t cin_g = s.in_channels / s.groups, cout_g = s.out_channels / s.groups;
  const int64_t K = cin_g * s.kernel_h * s.kernel_w, HW = g.out_h * g.out_w;
  // Whole-row panels (cheap packing) unless rows are so short that panels would be mostly empty.
  const bool by_rows = g.out_w >= 12;
  const int64_t row_panels = (g.out_w + kGemmPanel - 1) / kGemmPanel;
  const int64_t panels = by_rows ? g.out_h * row_panels : (HW + kGemmPanel - 1) / kGemmPanel;
  const int64_t tasks = batch * s.groups * panels;
  if (tasks <= 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(
      threads_for_work(n_threads, static_cast<double>(batch) * s.out_channels * HW * K), tasks));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> panel(static_cast<size_t>(K * kGemmPanel));  // per thread
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t p = t % panels, grp = (t / panels) % s.groups, n = t / (panels * s.groups);
      const float* xg = x + (n * s.in_channels + grp * cin_g) * g.in_h * g.in_w;
      int64_t n0, width;
      if (by_rows) {
        const int64_t oh = p / row_panels, ow0 = p % row_panels * kGemmPanel;
        width = std::min(kGemmPanel, g.out_w - ow0);
        n0 = oh * g.out_w + ow0;
        pack_im2col_panel(s, g, xg, oh, ow0, width, panel.data());
      } else {
        n0 = p * kGemmPanel;
        width = std::min(kGemmPanel, HW - n0);
        pack_im2col_span(s, g, xg, n0, width, panel.data());
      }
      gemm_panels(weight_.data() + grp * cout_g * K, K, panel.data(), cout_g, width, K, 1.0f, nullptr,
                  y + (n * s.out_channels + grp * cout_g) * HW + n0, HW, 0, 1,
                  bias_.empty() ? nullptr : bias_.data() + grp * cout_g);
    }
  }
}

}  // namespace sparseprune
