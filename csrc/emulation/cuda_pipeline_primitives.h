// Emulated CUDA header (see cuda_emu.h): cp.async through the pipeline primitives.
#pragma once
#include "cuda_emu.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  ::mimac_emu::async_copy(dst_shared, src_global, size_and_align, zfill);
}
inline void __pipeline_commit() { ::mimac_emu::async_commit(); }
inline void __pipeline_wait_prior(size_t prior) { ::mimac_emu::async_wait(prior); }
