// The SGDW kernels, one per storage layout and switch combination: the kernel in csrc/cuda/step.cuh,
// its launch in csrc/cuda/launch.cuh.
#include "cuda/launch.cuh"

namespace fusedwd {
namespace cuda {

using namespace cuda_kernels;

template <bool HAS_MOMENTUM, bool NESTEROV>
struct Sgdw {
  template <DType D>
  using Rule = SgdwRule<D, HAS_MOMENTUM, NESTEROV>;
};

cudaError_t sgdw(const LaunchArgs& a, bool has_momentum, bool nesterov) {
  // nesterov needs momentum (validated in Python): without it d = g either way
  if (!has_momentum) return by_layout<Sgdw<false, false>::Rule>(a);
  return nesterov ? by_layout<Sgdw<true, true>::Rule>(a) : by_layout<Sgdw<true, false>::Rule>(a);
}

}  // namespace cuda
}  // namespace fusedwd
