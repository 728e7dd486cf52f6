// The RMSpropW kernels, one per storage layout and switch combination: the kernel in csrc/cuda/step.cuh,
// its launch in csrc/cuda/launch.cuh.
#include "cuda/launch.cuh"

namespace fusedwd {
namespace cuda {

using namespace cuda_kernels;

template <bool CENTERED, bool HAS_MOMENTUM>
struct Rmspropw {
  template <DType D>
  using Rule = RmspropwRule<D, CENTERED, HAS_MOMENTUM>;
};

cudaError_t rmspropw(const LaunchArgs& a, bool centered, bool has_momentum) {
  if (centered) {
    return has_momentum ? by_layout<Rmspropw<true, true>::Rule>(a)
                        : by_layout<Rmspropw<true, false>::Rule>(a);
  }
  return has_momentum ? by_layout<Rmspropw<false, true>::Rule>(a)
                      : by_layout<Rmspropw<false, false>::Rule>(a);
}

}  // namespace cuda
}  // namespace fusedwd
