// Emulated stand-in for torch's header (see ../../cuda_emu.h): the one stream is the host.
#pragma once
#include "../../cuda_emu.h"

namespace c10 {
namespace cuda {
struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
