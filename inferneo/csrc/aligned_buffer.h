// Scratch buffers for the native kernels, aligned to a cache line.
//
// new[] and std::vector hand out 16-byte-aligned memory, so every 64-byte row of such a buffer (a zmm load or store,
// a row of an AMX tile) straddles two cache lines. Read and written whole, those rows cost two line accesses each:
// on a Xeon with AMX one chunk of the GGUF tile products (6 blocks of K, 16 rows) took 356 ns on buffers 16 bytes
// off a line against 132 ns on aligned ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace inferneo_buffers {

constexpr std::size_t kLineBytes = 64;

struct FreeAligned {
  void operator()(void* p) const { std::free(p); }
};

// n elements of T, the first at a cache-line boundary (n = 0 gives a valid, empty buffer).
template <typename T>
using AlignedBuffer = std::unique_ptr<T[], FreeAligned>;

// A buffer that the kernel writes in full before reading: no zero-fill (for the GGUF panels, a quarter megabyte a
// call and thread).
template <typename T>
AlignedBuffer<T> uninitialized(int64_t n) {
  const std::size_t bytes = (sizeof(T) * static_cast<std::size_t>(std::max<int64_t>(n, 1)) + kLineBytes - 1) /
                            kLineBytes * kLineBytes;
  void* p = std::aligned_alloc(kLineBytes, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedBuffer<T>(static_cast<T*>(p));
}

// The same, filled with zero bytes.
template <typename T>
AlignedBuffer<T> zeroed(int64_t n) {
  AlignedBuffer<T> buffer = uninitialized<T>(n);
  std::memset(static_cast<void*>(buffer.get()), 0, sizeof(T) * static_cast<std::size_t>(std::max<int64_t>(n, 0)));
  return buffer;
}

// A std::allocator whose blocks start at a cache line, for vectors that vector code loads and stores whole lines of.
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}  // NOLINT: converting, as allocators are
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kLineBytes}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{kLineBytes}); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};

template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

}  // namespace inferneo_buffers
