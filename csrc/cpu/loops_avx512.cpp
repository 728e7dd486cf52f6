// The CPU loops for the avx512 variant; its compiler flags are set in setup.py.
#define FUSEDWD_ISA_NS avx512
#include "loops.h"

FUSEDWD_DEFINE_KERNELS()
