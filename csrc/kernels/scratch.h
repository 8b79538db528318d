// Per-thread scratch memory for kernels that repack activations, and the plan's arena.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

namespace sparseprune {

// A growable, cache-line-aligned float buffer. One per calling thread (thread_local), so
// concurrent calls from several Python threads never share scratch memory. It only grows (a
// service does not pay fresh page faults on every request) until release() gives it back.
class ScratchBuffer {
 public:
  // At least n_floats floats, 64-byte aligned; the contents are unspecified.
  float* get(int64_t n_floats);
  // Frees the memory now (the next get() allocates again).
  void release();
  int64_t capacity_bytes() const { return capacity_ * static_cast<int64_t>(sizeof(float)); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t capacity_ = 0;
};

// The calling thread's buffer for kernel repacking (CSR/BSR linear, sparse conv).
ScratchBuffer& thread_scratch();
// The calling thread's plan arena (every buffer of a Plan::run, batch * floats per sample).
ScratchBuffer& thread_arena();
// Bytes both buffers of the calling thread hold now.
int64_t thread_scratch_bytes();
// Frees both buffers of the calling thread (policy in sparseprune/runtime/limits.py).
void release_thread_scratch();

}  // namespace sparseprune
