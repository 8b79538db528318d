#include "kernels/scratch.h"

#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace sparseprune {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugePageMin = size_t{256} << 10;
}  // namespace

float* ScratchBuffer::get(int64_t n_floats) {
  if (n_floats > capacity_) {
    // Large buffers get 2 MiB pages where the OS offers them: the batched kernels read rows of
    // the packed activations in random order, and with 4 KiB pages most reads would miss the TLB.
    const size_t want = static_cast<size_t>(n_floats) * sizeof(float);
    const size_t align = want >= kHugePageMin ? kHugePage : 64;
    const size_t bytes = (want + align - 1) / align * align;
    void* p = std::aligned_alloc(align, bytes);
    if (!p) throw std::bad_alloc();
#ifdef __linux__
    if (align == kHugePage) madvise(p, bytes, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
    data_.reset(static_cast<float*>(p));
    capacity_ = n_floats;
  }
  return data_.get();
}

void ScratchBuffer::release() {
  data_.reset();
  capacity_ = 0;
}

ScratchBuffer& thread_scratch() {
  thread_local ScratchBuffer scratch;
  return scratch;
}

ScratchBuffer& thread_arena() {
  thread_local ScratchBuffer arena;
  return arena;
}

int64_t thread_scratch_bytes() { return thread_scratch().capacity_bytes() + thread_arena().capacity_bytes(); }

void release_thread_scratch() {
  thread_scratch().release();
  thread_arena().release();
}

}  // namespace sparseprune
