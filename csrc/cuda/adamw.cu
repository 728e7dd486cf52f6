// The AdamW kernels, one per storage layout and amsgrad: the kernel in csrc/cuda/step.cuh,
// its launch in csrc/cuda/launch.cuh.
#include "cuda/launch.cuh"

namespace fusedwd {
namespace cuda {

using namespace cuda_kernels;

template <bool AMSGRAD>
struct AdamW {
  template <DType D>
  using Rule = AdamWRule<D, AMSGRAD>;
};

cudaError_t adamw(const LaunchArgs& a, bool amsgrad) {
  return amsgrad ? by_layout<AdamW<true>::Rule>(a) : by_layout<AdamW<false>::Rule>(a);
}

cudaError_t probe(int device) {
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (device != current && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(
      &attributes, step_kernel<Layout<DType::F32, DType::F32, false, false>, AdamWRule<DType::F32, false>, false>);
  if (device != current) {
    const cudaError_t restored = cudaSetDevice(current);
    if (err == cudaSuccess) err = restored;
  }
  return err;
}

}  // namespace cuda
}  // namespace fusedwd
