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

}  // namespace cuda
}  // namespace fusedwd
