// Stand-ins for the CUDA built-ins the kernels of csrc/localattn/cuda use, so that the same
// kernel source runs on the CPU (see emulation.py): one std::thread per CUDA thread, a
// std::barrier per thread block for __syncthreads and one per warp for shuffles, a mutex for
// atomics, and shared memory filled with 0xFF bytes (NaN patterns) so that reading anything the
// kernel did not write shows up. Blocks run one after another.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

struct ShimBlock {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> slots;
  unsigned char* shared;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim;
inline thread_local ShimBlock* shim_block = nullptr;
inline std::mutex shim_atomic_mutex;

inline void __syncthreads() { shim_block->block_barrier->arrive_and_wait(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int offset) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double* slot = shim_block->slots.data() + warp * 32;
  slot[lane] = static_cast<double>(v);
  shim_block->warp_barriers[warp]->arrive_and_wait();
  const V result = static_cast<V>(slot[lane ^ offset]);
  shim_block->warp_barriers[warp]->arrive_and_wait();
  return result;
}

template <typename V>
inline V atomicAdd(V* address, V value) {
  std::lock_guard<std::mutex> lock(shim_atomic_mutex);
  const V old = *address;
  *address = old + value;
  return old;
}

inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

inline unsigned char* shim_shared_memory() { return shim_block->shared; }

template <typename... KernelArgs, typename... Args>
void shim_launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, int64_t bytes,
                 Args... args) {
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      ShimBlock block;
      block.block_barrier = std::make_unique<std::barrier<>>(threads);
      for (int w = 0; w < threads / 32; ++w)
        block.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      block.slots.resize(threads);
      std::vector<unsigned char> memory(bytes + 16, 0xFF);  // garbage: NaN patterns
      block.shared = reinterpret_cast<unsigned char*>(
          (reinterpret_cast<uintptr_t>(memory.data()) + 15) / 16 * 16);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          blockDim = dim3(threads);
          shim_block = &block;
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}
