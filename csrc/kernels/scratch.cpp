#include "kernels/scratch.h"

#include <new>

namespace sparseprune {

float* ScratchBuffer::get(int64_t n_floats) {
  constexpr size_t kAlign = 64;
  if (n_floats > capacity_) {
    const size_t bytes = (static_cast<size_t>(n_floats) * sizeof(float) + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, bytes);
    if (!p) throw std::bad_alloc();
    data_.reset(static_cast<float*>(p));
    capacity_ = n_floats;
  }
  return data_.get();
}

ScratchBuffer& thread_scratch() {
  thread_local ScratchBuffer scratch;
  return scratch;
}

}  // namespace sparseprune
