// Python entry points of the CPU-emulated CUDA ops (see emulation.py), appended to ops.cu before
// the rewrites so that they reach its forward_cuda / backward_cuda: forward and backward (their
// outputs start as NaN, shim_empty, so any element a kernel fails to write shows up),
// check_launches (launch geometry only) and fault (the checks of shim.h, seen to fire).
#include <torch/extension.h>

namespace localattn::cuda::emulated {

// Deliberately faulty launches, one per check of shim.h, so that a test can see each check
// fire: reads past a tensor, past a shared-memory region into the next one, a misaligned vector
// load, a grid too tall, and dynamic shared memory above 48 KiB without cudaFuncSetAttribute.
template <typename T>
struct FaultShared {
  T* first;
  T* second;
  int64_t bytes;

  FaultShared(unsigned char* base) {
    SharedCarver carve(base);
    first = carve.take<T>(4);
    second = carve.take<T>(4);
    bytes = carve.bytes();
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fault_kernel(Geometry, const T* __restrict__ in, T* __restrict__ out, int kind) {
  extern __shared__ __align__(16) unsigned char shared[];
  const FaultShared<T> s(shared);
  s.first[threadIdx.x % 4] = in[threadIdx.x];
  __syncthreads();
  if (kind == 1 && threadIdx.x == 0) out[0] = s.first[4];  // the first element of `second`
  if (kind == 2 && threadIdx.x == 0) {
    Chunk<T> vector = *reinterpret_cast<const Chunk<T>*>(in + 1);
    out[0] = vector.v[0];
  }
}

void fault(const std::string& kind) {
  // 32 threads read in[0..31]: "global" gives in 31 elements, so thread 31 reads past them.
  const at::Tensor in = at::zeros({kind == "global" ? 31 : 64});
  at::Tensor out = at::zeros({1});
  Geometry g{};
  const int code = kind == "shared" ? 1 : kind == "misaligned" ? 2 : 0;
  const dim3 grid(1, kind == "grid" ? 65536 : 1);
  const int64_t bytes = kind == "attribute" ? 64 * 1024 : FaultShared<float>(nullptr).bytes;
  const auto kernel = fault_kernel<float>;
  kernel<<<grid, 32, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      g, in.data_ptr<float>(), out.data_ptr<float>(), code);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// forward_cuda, then backward_cuda on its outputs, with every launch checked against the
// device's limits but not run: the launch geometry of sizes too large to emulate.
void check_launches(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& rpb, int64_t block_size, double scale, bool symmetric) {
  struct LaunchOnly {
    LaunchOnly() { shim_check_launches_only = true; }
    ~LaunchOnly() { shim_check_launches_only = false; }
  } launch_only;
  const auto [out, lse] = forward_cuda(q, k, v, rpb, block_size, scale, symmetric);
  backward_cuda(out, q, k, v, rpb, out, lse, block_size, scale, symmetric);
}

}  // namespace localattn::cuda::emulated

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &localattn::cuda::forward_cuda);
  m.def("backward", &localattn::cuda::backward_cuda);
  m.def("fault", &localattn::cuda::emulated::fault);
  m.def("check_launches", &localattn::cuda::emulated::check_launches);
}
