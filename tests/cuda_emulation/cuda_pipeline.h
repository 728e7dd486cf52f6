// The asynchronous-copy functions are emulated in cuda_runtime.h, beside this file.
#pragma once
#include "cuda_runtime.h"
