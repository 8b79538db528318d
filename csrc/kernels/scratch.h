// Per-thread scratch memory for kernels that repack activations.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

namespace sparseprune {

// A growable, cache-line-aligned float buffer. One per calling thread (thread_local), so
// concurrent calls from several Python threads never share scratch memory.
class ScratchBuffer {
 public:
  // At least n_floats floats, 64-byte aligned; the contents are unspecified.
  float* get(int64_t n_floats);

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t capacity_ = 0;
};

// The calling thread's buffer.
ScratchBuffer& thread_scratch();

}  // namespace sparseprune
