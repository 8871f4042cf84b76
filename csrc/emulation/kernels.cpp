// The CUDA kernels of csrc/cuda, and the emulation's self-test kernels, compiled
// for the CPU emulation (cuda_emu.h).
#include "cuda_emu.h"

namespace {
// The kernels' `extern __shared__ unsigned char smem[]` (in this same unnamed
// namespace) names this array: the dynamic shared memory of the running block,
// with room past the sm_80 maximum for a canary that catches overflowing writes.
alignas(128) unsigned char smem[mimac_emu::kMaxSmem + 4096];
const bool kRegistered = (mimac_emu::register_dynamic_smem(smem, sizeof(smem)), true);
}  // namespace

#include "../cuda/contrastive_kernels.cu"
#include "selftest_kernels.cuh"
