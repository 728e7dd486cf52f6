// The CPU loops for the avx2 variant; its compiler flags are set in setup.py.
#define FUSEDWD_ISA_NS avx2
#include "loops.h"

FUSEDWD_DEFINE_KERNELS()
