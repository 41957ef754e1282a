// Stand-ins for the CUDA built-ins and runtime calls the sources of csrc/localattn/cuda use, so
// that the same kernel and launcher code runs on the CPU (see emulation.py), and checks that a
// GPU would only report as a crash:
//
// * Threads: one std::thread per CUDA thread, a std::barrier per thread block for __syncthreads
//   and one per warp for shuffles, a mutex for atomics. Blocks run one after another.
// * Memory: every pointer of the kernels is a Checked<T> (emulation.py rewrites the pointer
//   types): it carries the bounds of what it points into, a global tensor [data, data + numel)
//   or one region of the shared-memory layout (SharedCarver::take), and every access through
//   it checks that all its bytes lie inside and are aligned for the access (16 bytes for the
//   Chunk vectors). A bad access is recorded, goes to a scratch buffer instead (so the block
//   runs on without deadlocking its barriers), and fails the launch. AddressSanitizer cannot do
//   this: it misses reads inside an allocation (a torch tensor's neighbour, the next region of
//   shared memory, the 16-byte row padding).
// * Launches: the limits of an H100/H200 (grid y and z <= 65535, x <= 2^31-1, no empty grid,
//   at most __launch_bounds__ threads, dynamic shared memory above 48 KiB only after
//   cudaFuncSetAttribute raised the kernel's limit, at most 227 KiB). A launch that breaks one
//   does not run and C10_CUDA_KERNEL_LAUNCH_CHECK raises, as on the GPU.
// * Shared memory starts as 0xFF bytes (NaN patterns) and outputs as NaN (shim_empty), so that
//   reading anything the kernel did not write shows up.
#pragma once
#include <ATen/ATen.h>

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim;

// Checked memory ----------------------------------------------------------------------------

// The bytes a pointer may touch, and what to call them in a report.
struct ShimSpan {
  const char* name = nullptr;
  uintptr_t begin = 0, end = 0;
};

// Faults of the launch in progress: the first one described, and how many there were.
struct ShimFaults {
  std::mutex mutex;
  std::string first;
  int64_t count = 0;
};
inline ShimFaults shim_faults;

inline void shim_fault(const std::string& what) {
  std::lock_guard<std::mutex> lock(shim_faults.mutex);
  if (shim_faults.count++ == 0) {
    std::ostringstream where;
    where << what << " in block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z
          << "), thread " << threadIdx.x;
    shim_faults.first = where.str();
  }
}

// Where a faulting access goes instead, so that the kernel runs on to its end.
inline unsigned char* shim_scratch() {
  alignas(64) static thread_local unsigned char scratch[256];
  return scratch;
}

// What a Checked pointer holds, and its checks.
class ShimPointer {
 public:
  // The object of type U here (a scalar, or a 16-byte-aligned Chunk vector), after checking that
  // all its bytes lie in the span and that it is aligned for U.
  template <typename U>
  U* as() const {
    const bool inside = address_ >= span_.begin && address_ + sizeof(U) <= span_.end;
    const bool aligned = address_ % alignof(U) == 0;
    if (address_ == 0 || !inside || !aligned) {
      std::ostringstream what;
      what << (address_ == 0 ? "null" : !inside ? "out-of-bounds" : "misaligned") << " access of "
           << sizeof(U) << " bytes (alignment " << alignof(U) << ") at byte offset "
           << static_cast<intptr_t>(address_ - span_.begin) << " of '"
           << (span_.name ? span_.name : "?") << "' (" << span_.end - span_.begin << " bytes)";
      shim_fault(what.str());
      return reinterpret_cast<U*>(shim_scratch());
    }
    return reinterpret_cast<U*>(address_);
  }

  uintptr_t address() const { return address_; }
  ShimSpan span() const { return span_; }

 protected:
  ShimPointer() = default;
  ShimPointer(uintptr_t address, ShimSpan span) : address_(address), span_(span) {}

  uintptr_t address_ = 0;
  ShimSpan span_;
};

template <typename T>
class Checked;

// Checked<T> derives from Checked<const T>, so that a function template taking Checked<const T>
// deduces T from a Checked<T> argument, as one taking const T* does from a T*.
template <typename T>
using ShimCheckedBase = std::conditional_t<std::is_const_v<T>, ShimPointer, Checked<const T>>;

template <typename T>
class Checked : public ShimCheckedBase<T> {
 public:
  Checked() = default;
  Checked(std::nullptr_t) {}
  Checked(T* pointer, ShimSpan span)
      : ShimCheckedBase<T>(reinterpret_cast<uintptr_t>(pointer), span) {}

  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  Checked operator+(I offset) const {
    return Checked(this->address_ + static_cast<intptr_t>(offset) * sizeof(T), this->span_);
  }
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  Checked operator-(I offset) const {
    return *this + (-static_cast<intptr_t>(offset));
  }
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  Checked& operator+=(I offset) {
    return *this = *this + offset;
  }
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  T& operator[](I index) const {
    return *(*this + index).template as<T>();
  }
  T& operator*() const { return *this->template as<T>(); }
  bool operator==(std::nullptr_t) const { return this->address_ == 0; }
  bool operator!=(std::nullptr_t) const { return this->address_ != 0; }

  // The `count` elements of type U at byte `offset`, as a span of their own: one region of the
  // shared-memory layout, carved from the whole.
  template <typename U>
  Checked<U> narrow(int64_t offset, int64_t count) const {
    const uintptr_t begin = this->address_ + offset, end = begin + count * sizeof(U);
    const ShimSpan& whole = this->span_;
    if (begin < whole.begin || end > whole.end || begin % alignof(U) != 0) {
      std::ostringstream what;
      what << "a shared region at bytes [" << begin - whole.begin << ", " << end - whole.begin
           << ") lies outside the " << whole.end - whole.begin << " bytes of '"
           << (whole.name ? whole.name : "?") << "' or is misaligned";
      shim_fault(what.str());
      return Checked<U>(reinterpret_cast<U*>(shim_scratch()), {"scratch", 0, 0});
    }
    return Checked<U>(reinterpret_cast<U*>(begin), {whole.name, begin, end});
  }

  Checked named(const char* name) const {
    return Checked(this->address_, {name, this->span_.begin, this->span_.end});
  }

 protected:
  Checked(uintptr_t address, ShimSpan span) : ShimCheckedBase<T>(address, span) {}
  template <typename>
  friend class Checked;
};

// reinterpret_cast<Chunk<T>*>(p) on a checked pointer: the vector at p, bounds and alignment
// checked.
template <typename C, typename T>
C* shim_chunk(const Checked<T>& p) {
  return p.template as<C>();
}

// A region of the shared-memory layout, named after the field it is assigned to.
template <typename T>
Checked<T> shim_named(const char* name, const Checked<T>& region) {
  return region == nullptr ? region : region.named(name);
}

// tensor.data_ptr<T>() as a kernel argument: the tensor's elements and nothing around them.
template <typename T>
Checked<T> shim_global(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_contiguous(), "emulated launch: ", name, " is not contiguous");
  T* data = tensor.data_ptr<T>();
  return Checked<T>(data, {name, reinterpret_cast<uintptr_t>(data),
                           reinterpret_cast<uintptr_t>(data + tensor.numel())});
}

// Outputs start as NaN, so that any element the kernels fail to write shows up.
template <typename... Args>
at::Tensor shim_empty_like(Args&&... args) {
  return at::empty_like(std::forward<Args>(args)...).fill_(NAN);
}
template <typename... Args>
at::Tensor shim_empty(Args&&... args) {
  return at::empty(std::forward<Args>(args)...).fill_(NAN);
}

// Thread blocks --------------------------------------------------------------------------------

struct ShimBlock {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> slots;
  unsigned char* shared;
  int64_t shared_bytes;
};

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

// extern __shared__ unsigned char shared[]: the block's dynamic shared memory, as one span.
inline Checked<unsigned char> shim_shared_memory() {
  unsigned char* base = shim_block->shared;
  return Checked<unsigned char>(base, {"dynamic shared memory", reinterpret_cast<uintptr_t>(base),
                                       reinterpret_cast<uintptr_t>(base + shim_block->shared_bytes)});
}

// The CUDA runtime, as an H100/H200 answers ----------------------------------------------------

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrReservedSharedMemoryPerBlock,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

constexpr int64_t kShimSharedOptin = 232448;      // 227 KiB per block, after opting in
constexpr int64_t kShimSharedPerSm = 233472;      // 228 KiB per multiprocessor
constexpr int64_t kShimSharedReserved = 1024;     // reserved by the system per block
constexpr int64_t kShimSharedDefault = 48 * 1024;  // dynamic limit without cudaFuncSetAttribute

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kShimSharedOptin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = kShimSharedPerSm; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = kShimSharedReserved; break;
  }
  return cudaSuccess;
}

// Each kernel's dynamic shared-memory limit, as cudaFuncSetAttribute set it.
inline std::mutex shim_attribute_mutex;
inline std::map<const void*, int64_t> shim_shared_limits;

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int value) {
  if (value < 0 || value > kShimSharedOptin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(shim_attribute_mutex);
  shim_shared_limits[kernel] = value;
  return cudaSuccess;
}

inline int64_t shim_shared_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(shim_attribute_mutex);
  const auto found = shim_shared_limits.find(kernel);
  return found == shim_shared_limits.end() ? kShimSharedDefault : found->second;
}

#define C10_CUDA_CHECK(expression)                                                   \
  do {                                                                               \
    const cudaError_t shim_error = (expression);                                     \
    TORCH_CHECK(shim_error == cudaSuccess, "CUDA error (emulated): invalid argument, " \
                #expression);                                                        \
  } while (0)

// What cudaGetLastError would return after the last launch ("" for success).
inline thread_local std::string shim_last_error;

inline void shim_check_last_launch() {
  std::string error;
  std::swap(error, shim_last_error);
  TORCH_CHECK(error.empty(), "CUDA error (emulated): ", error);
}
#define C10_CUDA_KERNEL_LAUNCH_CHECK() shim_check_last_launch()

namespace c10::cuda {
inline int current_device() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

// The launch configuration errors a GPU reports (cudaErrorInvalidConfiguration and friends), or
// "" when the launch may run.
inline std::string shim_launch_error(const void* kernel, int max_threads, dim3 grid, int threads,
                                     int64_t bytes) {
  std::ostringstream error;
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 ||
      grid.z > 65535) {
    error << "invalid configuration argument: grid (" << grid.x << ", " << grid.y << ", "
          << grid.z << ") outside [1, 2^31-1] x [1, 65535] x [1, 65535]";
  } else if (threads < 1 || threads > max_threads) {
    error << "too many resources requested for launch: " << threads
          << " threads, __launch_bounds__ " << max_threads;
  } else if (threads % 32 != 0) {
    // Not a CUDA error, but __shfl_xor_sync with a full mask in a partial warp is undefined.
    error << "partial warp: " << threads << " threads per block";
  } else if (bytes > shim_shared_limit(kernel)) {
    error << "invalid argument: " << bytes << " bytes of dynamic shared memory, the kernel's limit is "
          << shim_shared_limit(kernel) << " (cudaFuncSetAttribute raises it above 48 KiB)";
  }
  return error.str();
}

inline void shim_run_block(const std::function<void()>& body, dim3 block_index, int threads,
                           int64_t bytes) {
  ShimBlock block;
  block.block_barrier = std::make_unique<std::barrier<>>(threads);
  for (int w = 0; w < threads / 32; ++w)
    block.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  block.slots.resize(threads);
  std::vector<unsigned char> memory(bytes + 16, 0xFF);  // garbage: NaN patterns
  block.shared = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(memory.data()) + 15) / 16 * 16);
  block.shared_bytes = bytes;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(t);
      blockIdx = block_index;
      blockDim = dim3(threads);
      shim_block = &block;
      body();
    });
  }
  for (auto& thread : pool) thread.join();
}

// When set, launches are checked (shim_launch_error) but not run: for sizes too large to emulate.
inline thread_local bool shim_check_launches_only = false;

// kernel<<<grid, threads, bytes>>>(args...) of a kernel declared __launch_bounds__(max_threads).
// Stops at the first block with a faulty access; C10_CUDA_KERNEL_LAUNCH_CHECK then raises.
template <typename... KernelArgs, typename... Args>
void shim_launch(void (*kernel)(KernelArgs...), int max_threads, dim3 grid, int threads,
                 int64_t bytes, Args... args) {
  shim_last_error =
      shim_launch_error(reinterpret_cast<const void*>(kernel), max_threads, grid, threads, bytes);
  if (!shim_last_error.empty() || shim_check_launches_only) return;
  shim_faults.count = 0;
  const std::function<void()> body = [&] { kernel(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        shim_run_block(body, dim3(bx, by, bz), threads, bytes);
        if (shim_faults.count > 0) {
          shim_last_error = "an illegal memory access was encountered: " + shim_faults.first +
                            " (" + std::to_string(shim_faults.count) + " faulty accesses in this block)";
          return;
        }
      }
    }
  }
}
