// The emulation's self-test kernels (selftest_kernels.cuh) as seen from selftest.cpp.
#pragma once
#include "cuda_emu.h"

struct MimacEmuArgs {
  float* out;
  const float* in;
  int variant;
};

// kernel: 0 neighbour, 1 defect, 2 wmma, 3 async, 4 ldmatrix (variants in selftest_kernels.cuh); one block.
extern "C" cudaError_t mimac_emu_selftest_launch(int kernel, const MimacEmuArgs* args, int threads,
                                                 size_t smem_bytes, int smem_attribute);
