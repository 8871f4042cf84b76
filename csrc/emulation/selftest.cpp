// torch.ops.mimac_emu_selftest: runs the emulation's self-test kernels
// (selftest_kernels.cuh) for tests/kernels/test_cuda_emulation.py;
// torch.ops.mimac_emu.set_schedule: the emulation's thread and block order.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "selftest.h"

namespace {

// Runs `kernel` ("neighbour", "defect", "wmma", "async", "ldmatrix") in one block; raises with the
// emulation's message when the launch fails.
void run(const std::string& kernel, const at::Tensor& in, at::Tensor& out, int64_t variant,
         int64_t threads, int64_t smem_bytes, int64_t smem_attribute) {
  TORCH_CHECK(in.is_cpu() && in.scalar_type() == at::kFloat && in.is_contiguous(), "in: contiguous float32");
  TORCH_CHECK(out.sizes() == in.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "out: like in");
  const int id = kernel == "neighbour" ? 0
                 : kernel == "defect"  ? 1
                 : kernel == "wmma"    ? 2
                 : kernel == "async"   ? 3
                 : kernel == "ldmatrix" ? 4
                                       : -1;
  TORCH_CHECK(id >= 0, "unknown self-test kernel ", kernel);
  MimacEmuArgs args{out.data_ptr<float>(), in.data_ptr<float>(), static_cast<int>(variant)};
  const cudaError_t e = mimac_emu_selftest_launch(id, &args, static_cast<int>(threads),
                                                  static_cast<size_t>(smem_bytes), static_cast<int>(smem_attribute));
  TORCH_CHECK(e == cudaSuccess, "emulated launch failed: ", cudaGetErrorString(e));
}

double tf32(double v) { return nvcuda::wmma::__float_to_tf32(static_cast<float>(v)); }
double ex2_ftz(double v) { return mimac_emu::ex2_approx_ftz(static_cast<float>(v)); }

// The order of blocks and threads for every later launch (see cuda_emu.h).
void set_schedule(int64_t schedule, int64_t seed) {
  TORCH_CHECK(schedule >= 0 && schedule <= 4,
              "schedule must be 0 (in order), 1 (reversed), 2 (shuffled), 3 (warps in order) or 4 "
              "(warps reversed), got ", schedule);
  mimac_emu::set_schedule(static_cast<mimac_emu::Schedule>(schedule), static_cast<uint64_t>(seed));
}

}  // namespace

TORCH_LIBRARY(mimac_emu_selftest, m) {
  m.def("run(str kernel, Tensor input, Tensor(a!) out, int variant, int threads, int smem_bytes, "
        "int smem_attribute) -> ()",
        &run);
  m.def("tf32(float v) -> float", &tf32);
  m.def("ex2_ftz(float v) -> float", &ex2_ftz);
}

// The emulated device's opt-in shared memory per block (see cuda_emu.h).
void set_smem_optin(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "bytes must be positive, got ", bytes);
  mimac_emu::set_smem_optin(static_cast<size_t>(bytes));
}

int64_t tally(const std::string& name) { return mimac_emu::tally_count(name.c_str()); }
void clear_tallies() { mimac_emu::clear_tallies(); }

TORCH_LIBRARY(mimac_emu, m) {
  m.def("set_schedule(int schedule, int seed) -> ()", &set_schedule);
  m.def("set_smem_optin(int bytes) -> ()", &set_smem_optin);
  m.def("tally(str name) -> int", &tally);
  m.def("clear_tallies() -> ()", &clear_tallies);
}
