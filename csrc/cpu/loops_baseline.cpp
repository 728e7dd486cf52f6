// The CPU loops for the baseline variant; its compiler flags are set in setup.py.
#define FUSEDWD_ISA_NS baseline
#include "loops.h"

FUSEDWD_DEFINE_KERNELS()
