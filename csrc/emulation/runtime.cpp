// The fiber scheduler behind cuda_emu.h: one block at a time, one fiber per thread.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <numeric>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace mimac_emu {
namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kCanaryBytes = 4096;
constexpr unsigned char kCanary = 0xA5;
// Shared memory starts as all-ones bytes: NaN in float, half and bfloat16, so a
// read of a slot nobody wrote shows up in the results.
constexpr unsigned char kUninitialised = 0xFF;

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
  // __syncthreads_and: whether a thread voted false at the barrier of generation g,
  // in slot g % 2; cleared when barrier g - 1 is released (every thread read the
  // slot's previous vote, of barrier g - 2, before arriving at barrier g - 1).
  bool voted_false[2] = {false, false};
};

// One cp.async copy in flight: its bytes, read from global memory at issue (the
// source is read-only for the kernel), land in `dst` when its group is waited for.
struct AsyncCopy {
  unsigned char* dst;
  size_t size;
  unsigned char data[16];
};

struct Fiber {
  ThreadState state{};
  ucontext_t context{};
  std::unique_ptr<char[]> stack;
  bool done = false;
  Barrier* waiting = nullptr;  // blocked until waiting->generation != wait_generation
  uint64_t wait_generation = 0;
  const char* wait_name = "";
  size_t calls = 0;  // collective calls since the warp's last barrier
  uint64_t fragment_calls = 0;  // ldmatrix / mma.sync calls of this lane in this block
  std::vector<AsyncCopy> open_copies;                 // issued, not yet committed
  std::deque<std::vector<AsyncCopy>> copy_groups;     // committed, oldest first
};

struct Slot {
  uint64_t a, b;
};

// One ldmatrix / mma.sync of a warp: every lane's operands and tag ((call number << 8) |
// kind); the first lane past the call's warp barrier computes every lane's result. Two
// per warp, alternating by call number: call n + 2 reuses call n's, which every lane
// has read by then (all of them passed call n + 1's barrier).
struct FragmentCall {
  uint64_t tag[kWarp] = {};
  uint64_t done = ~uint64_t{0};  // the call number whose results `out` holds
  unsigned char in[kWarp][40] = {};
  unsigned char out[kWarp][16] = {};
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<FragmentCall> fragment_calls;  // two per warp
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<Slot> slots;  // one per thread
  std::vector<std::vector<Record>> records;  // per warp, reused across phases
  std::vector<size_t> recorded;              // per warp: records in use
  ucontext_t scheduler{};
  Fiber* running = nullptr;
  Body body = nullptr;
  void* kernel = nullptr;
  void* arg = nullptr;
  std::string error;  // non-empty: the launch failed
};

Block* g_block = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
std::map<const void*, int> g_max_smem;
unsigned char* g_smem = nullptr;
size_t g_smem_capacity = 0;
size_t g_launch_smem = 0;  // the running launch's dynamic shared memory
Schedule g_schedule = kInOrder;
uint64_t g_rng = 0;

uint64_t next_random() {  // splitmix64: a fixed seed gives a fixed sequence
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// 0..n-1 in the order of the current schedule.
std::vector<size_t> schedule_order(size_t n) {
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  if (g_schedule == kReversed || g_schedule == kWarpsReversed) std::reverse(order.begin(), order.end());
  if (g_schedule == kShuffled) {
    for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
  }
  return order;
}

Fiber& running_fiber() {
  if (g_block == nullptr || g_block->running == nullptr) {
    std::fprintf(stderr, "mimac cuda emulation: a device function ran outside a kernel\n");
    std::abort();
  }
  return *g_block->running;
}

// Every thread of warp w is at a barrier: its collective records start afresh.
void reset_warp(Block& blk, int w) {
  blk.recorded[w] = 0;
  const size_t begin = static_cast<size_t>(w) * kWarp;
  for (size_t t = begin; t < begin + kWarp && t < blk.fibers.size(); ++t) blk.fibers[t].calls = 0;
}

void wait_at(Barrier& b, const char* name, int warp) {
  Fiber& f = running_fiber();
  const uint64_t generation = b.generation;
  if (++b.arrived == b.expected) {  // the last one releases the others
    b.arrived = 0;
    ++b.generation;
    b.voted_false[b.generation % 2] = false;  // the next barrier's slot (read by now)
    if (warp >= 0) {
      reset_warp(*g_block, warp);
    } else {
      for (size_t w = 0; w < g_block->records.size(); ++w) reset_warp(*g_block, static_cast<int>(w));
    }
    // It yields too, so the next sweep runs everyone past the barrier in the
    // schedule's order (rather than this thread first).
    f.waiting = nullptr;
    swapcontext(&f.context, &g_block->scheduler);
    return;
  }
  f.waiting = &b;
  f.wait_generation = generation;
  f.wait_name = name;
  swapcontext(&f.context, &g_block->scheduler);
}

// Bytes of a cp.async destination in flight (all-ones: NaN in float, half and
// bfloat16, so a read before the wait shows up in the results).
constexpr unsigned char kInFlight = 0xFF;

bool copies_pending(const Fiber& f) {
  if (!f.open_copies.empty()) return true;
  return std::any_of(f.copy_groups.begin(), f.copy_groups.end(),
                     [](const std::vector<AsyncCopy>& g) { return !g.empty(); });
}

void fiber_entry() {
  Block& blk = *g_block;
  blk.body(blk.kernel, blk.arg);
  if (copies_pending(*blk.running))
    fail("cp.async copies still in flight when the thread exited (no __pipeline_wait_prior for them)");
  blk.running->done = true;
}  // returns to uc_link: the scheduler

std::string describe_deadlock(const Block& blk) {
  int exited = 0;
  std::map<std::string, int> at;
  for (const Fiber& f : blk.fibers) {
    if (f.done) {
      ++exited;
    } else {
      ++at[f.wait_name];
    }
  }
  std::string msg = "deadlock (barrier divergence) in block (" + std::to_string(blk.fibers[0].state.block_idx.x) +
                    "," + std::to_string(blk.fibers[0].state.block_idx.y) + "," +
                    std::to_string(blk.fibers[0].state.block_idx.z) + "):";
  for (const auto& kv : at) msg += " " + std::to_string(kv.second) + " threads wait at " + kv.first + ";";
  msg += " " + std::to_string(exited) + " have exited";
  return msg;
}

bool runnable(const Fiber& f) {
  return !f.done && (f.waiting == nullptr || f.waiting->generation != f.wait_generation);
}

// Resumes `f` until its next barrier (or its end); false if the launch failed.
bool resume(Block& blk, Fiber& f) {
  f.waiting = nullptr;
  blk.running = &f;
  swapcontext(&blk.scheduler, &f.context);
  blk.running = nullptr;
  return blk.error.empty();
}

// After a sweep over the fibers: "" once all are done, the deadlock when
// none could move, nothing when another sweep is needed.
std::optional<std::string> sweep_outcome(const Block& blk, bool progress) {
  if (std::all_of(blk.fibers.begin(), blk.fibers.end(), [](const Fiber& f) { return f.done; })) return "";
  if (!progress) return describe_deadlock(blk);
  return std::nullopt;
}

// Threads in lockstep: each sweep takes every thread once, in the schedule's
// order, to its next barrier (block or warp).
std::string run_threads(Block& blk) {
  std::vector<size_t> order = schedule_order(blk.fibers.size());
  for (;;) {
    bool progress = false;
    if (g_schedule == kShuffled) order = schedule_order(blk.fibers.size());
    for (const size_t i : order) {
      Fiber& f = blk.fibers[i];
      if (!runnable(f)) continue;
      progress = true;
      if (!resume(blk, f)) return blk.error;
    }
    if (std::optional<std::string> outcome = sweep_outcome(blk, progress)) return *outcome;
  }
}

// One warp at a time: a warp runs through its warp collectives to the next
// block barrier before the next warp starts. Lockstep sweeps keep warps level
// at every warp collective, which hides a missing block barrier between two
// warps that pass the same number of collectives; this order does not.
std::string run_warps(Block& blk) {
  const size_t n = blk.fibers.size();
  std::vector<size_t> warps((n + kWarp - 1) / kWarp);
  std::iota(warps.begin(), warps.end(), size_t{0});
  if (g_schedule == kWarpsReversed) std::reverse(warps.begin(), warps.end());
  for (;;) {
    bool progress = false;
    for (const size_t w : warps) {
      const uint64_t generation = blk.block_barrier.generation;
      for (bool moved = true; moved && blk.block_barrier.generation == generation;) {
        moved = false;
        for (size_t t = w * kWarp; t < std::min(n, (w + 1) * kWarp); ++t) {
          Fiber& f = blk.fibers[t];
          if (!runnable(f)) continue;
          moved = progress = true;
          if (!resume(blk, f)) return blk.error;
        }
      }
      // This warp released the block barrier: start again from the first warp.
      if (blk.block_barrier.generation != generation) break;
    }
    if (std::optional<std::string> outcome = sweep_outcome(blk, progress)) return *outcome;
  }
}

// Runs every fiber of the block to completion; returns the failure, or "".
std::string run_block(Block& blk) {
  return g_schedule == kWarpsInOrder || g_schedule == kWarpsReversed ? run_warps(blk) : run_threads(blk);
}

cudaError_t fail_launch(cudaError_t code, const std::string& message) {
  g_last_error = code;
  g_last_message = message;
  return code;
}

}  // namespace

const ThreadState& current() { return running_fiber().state; }

void sync_block() { wait_at(g_block->block_barrier, "__syncthreads", -1); }

int sync_block_and(int predicate) {
  Barrier& b = g_block->block_barrier;
  const uint64_t generation = b.generation;
  if (!predicate) b.voted_false[generation % 2] = true;
  wait_at(b, "__syncthreads_and", -1);
  return b.voted_false[generation % 2] ? 0 : 1;
}

void sync_warp() {
  const int w = running_fiber().state.warp;
  wait_at(g_block->warp_barriers[w], "a warp collective", w);
}

Record& next_record(bool& first) {
  Fiber& f = running_fiber();
  const int w = f.state.warp;
  std::vector<Record>& recs = g_block->records[w];
  size_t& used = g_block->recorded[w];
  const size_t i = f.calls++;
  first = i == used;
  if (i > used) fail("a lane made more collective calls than the first lane of its warp");
  if (first) {
    if (used == recs.size()) recs.emplace_back();
    ++used;
  }
  return recs[i];
}

void* warp_slot(int lane) {
  const Fiber& f = running_fiber();
  const size_t t = static_cast<size_t>(f.state.warp) * kWarp + lane;
  if (t >= g_block->slots.size()) fail("a warp collective read a lane that does not exist (partial warp)");
  return &g_block->slots[t];
}

void fail(const char* what) {
  Fiber& f = running_fiber();
  const ThreadState& s = f.state;
  g_block->error = std::string(what) + " (block " + std::to_string(s.block_idx.x) + "," +
                   std::to_string(s.block_idx.y) + "," + std::to_string(s.block_idx.z) + ", thread " +
                   std::to_string(s.thread_idx.x) + ")";
  swapcontext(&f.context, &g_block->scheduler);  // never resumed
  std::abort();
}

void async_copy(void* dst, const void* src, size_t size, size_t zfill) {
  if (size != 4 && size != 8 && size != 16) fail("__pipeline_memcpy_async: size must be 4, 8 or 16 bytes");
  if (zfill > size) fail("__pipeline_memcpy_async: zfill larger than the copy");
  auto* d = static_cast<unsigned char*>(dst);
  if (d < g_smem || d + size > g_smem + g_smem_capacity)
    fail("__pipeline_memcpy_async: destination outside the dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % size != 0)
    fail(("__pipeline_memcpy_async: shared destination not " + std::to_string(size) + "-byte aligned").c_str());
  if (reinterpret_cast<uintptr_t>(src) % size != 0)
    fail(("__pipeline_memcpy_async: global source not " + std::to_string(size) + "-byte aligned").c_str());
  AsyncCopy c{d, size, {}};
  std::memcpy(c.data, src, size - zfill);
  std::memset(c.data + (size - zfill), 0, zfill);
  std::memset(d, kInFlight, size);
  running_fiber().open_copies.push_back(c);
}

void async_commit() {
  Fiber& f = running_fiber();
  f.copy_groups.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}

void async_wait(size_t prior) {
  Fiber& f = running_fiber();
  while (f.copy_groups.size() > prior) {
    for (const AsyncCopy& c : f.copy_groups.front()) {
      for (size_t i = 0; i < c.size; ++i) {
        if (c.dst[i] != kInFlight)
          fail("shared memory written while a cp.async copy into it was in flight");
      }
      std::memcpy(c.dst, c.data, c.size);
    }
    f.copy_groups.pop_front();
  }
}

size_t g_smem_optin = kSm80Smem;

void set_smem_optin(size_t bytes) { g_smem_optin = bytes < kMaxSmem ? bytes : kMaxSmem; }
size_t smem_optin() { return g_smem_optin; }

namespace {
std::map<std::string, int64_t> g_tallies;
}  // namespace

void tally(const char* name) { ++g_tallies[name]; }
int64_t tally_count(const char* name) {
  const auto it = g_tallies.find(name);
  return it == g_tallies.end() ? 0 : it->second;
}
void clear_tallies() { g_tallies.clear(); }

namespace {
constexpr uint64_t kLdmatrix = 1, kLdmatrixTrans = 2, kMmaF16 = 3, kMmaBf16 = 4;

// This lane's part of a fragment call: its `bytes` of operands in, one warp barrier,
// then the call's record with every lane's operands; `first` is true for the lane that
// computes every lane's result (the first past the barrier, before any lane runs on),
// after checking that all 32 lanes made this same call (else the warp diverged).
FragmentCall& fragment_call(const void* operands, size_t bytes, uint64_t kind, const char* what,
                            bool& first) {
  Fiber& f = running_fiber();
  const int lane = f.state.lane;
  const uint64_t n = f.fragment_calls++;
  FragmentCall& call = g_block->fragment_calls[2 * static_cast<size_t>(f.state.warp) + (n & 1)];
  std::memcpy(call.in[lane], operands, bytes);
  call.tag[lane] = (n << 8) | kind;
  sync_warp();
  first = call.done != n;
  if (first) {
    for (int l = 0; l < kWarp; ++l) {
      if (call.tag[l] != ((n << 8) | kind))
        fail((std::string(what) + ": lane " + std::to_string(l) +
              " is not at the same instruction (the warp diverged)").c_str());
    }
    call.done = n;
  }
  return call;
}

float half_of(uint32_t reg, int half, bool bf16) {
  const auto v = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return bf16 ? bf16_to_float(v) : half_to_float(v);
}

struct MmaOperands {
  uint32_t a[4], b[2];
  float c[4];
};
static_assert(sizeof(MmaOperands) <= sizeof(FragmentCall::in[0]), "operands fit");
}  // namespace

void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
  const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
  bool first = false;
  FragmentCall& call = fragment_call(&row, sizeof(row), trans ? kLdmatrixTrans : kLdmatrix, what, first);
  if (first) {
    const unsigned char* rows[kWarp];
    for (int l = 0; l < kWarp; ++l) {
      std::memcpy(&rows[l], call.in[l], sizeof(rows[l]));
      if (reinterpret_cast<uintptr_t>(rows[l]) % 16 != 0)
        fail((std::string(what) + ": row address of lane " + std::to_string(l) + " not 16-byte aligned").c_str());
      if (rows[l] < g_smem || rows[l] + 16 > g_smem + g_launch_smem)
        fail((std::string(what) + ": row address of lane " + std::to_string(l) +
              " outside the dynamic shared memory").c_str());
    }
    // Lane l (g = l / 4, t = l % 4) receives in register i matrix i's elements (g, 2t),
    // (g, 2t + 1), or with .trans (2t, g), (2t + 1, g); row j of matrix i is at lane 8i + j.
    for (int l = 0; l < kWarp; ++l) {
      const int g = l / 4, t = l % 4;
      uint32_t regs[4];
      for (int i = 0; i < 4; ++i) {
        uint16_t v[2];
        for (int e = 0; e < 2; ++e) {
          const int row = trans ? 2 * t + e : g, col = trans ? g : 2 * t + e;
          std::memcpy(&v[e], rows[8 * i + row] + 2 * col, 2);
        }
        regs[i] = static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 16);
      }
      std::memcpy(call.out[l], regs, sizeof(regs));
    }
  }
  std::memcpy(r, call.out[current().lane], 4 * sizeof(uint32_t));
}

void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], bool bf16) {
  MmaOperands mine{};
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, c, sizeof(mine.c));
  bool first = false;
  FragmentCall& call = fragment_call(&mine, sizeof(mine), bf16 ? kMmaBf16 : kMmaF16,
                                     bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", first);
  if (first) {
    MmaOperands ops[kWarp];
    for (int l = 0; l < kWarp; ++l) std::memcpy(&ops[l], call.in[l], sizeof(MmaOperands));
    for (int l = 0; l < kWarp; ++l) {
      const int g = l / 4, t = l % 4;
      float out[4];
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
        float acc = ops[l].c[e];
        for (int k = 0; k < 16; ++k) {
          // A(row, k): lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8);
          // B(k, col): lane 4 col + (k % 8) / 2, register (k >= 8); k odd: the high half
          const float av = half_of(ops[4 * (row % 8) + (k % 8) / 2].a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)],
                                   k % 2, bf16);
          const float bv = half_of(ops[4 * col + (k % 8) / 2].b[k >= 8 ? 1 : 0], k % 2, bf16);
          acc = fmaf(av, bv, acc);
        }
        out[e] = acc;
      }
      std::memcpy(call.out[l], out, sizeof(out));
    }
  }
  std::memcpy(d, call.out[current().lane], 4 * sizeof(float));
}

void register_dynamic_smem(unsigned char* base, size_t size) {
  g_smem = base;
  g_smem_capacity = size;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > g_smem_optin)
    return fail_launch(cudaErrorInvalidValue,
                       "cudaFuncSetAttribute: " + std::to_string(bytes) +
                           " bytes of dynamic shared memory exceed " +
                           (g_smem_optin == kSm80Smem ? std::string("sm_80's") : std::string("the device's")) +
                           " maximum of " + std::to_string(g_smem_optin));
  g_max_smem[kernel] = bytes;
  return cudaSuccess;
}

void set_schedule(Schedule schedule, uint64_t seed) {
  g_schedule = schedule;
  g_rng = seed;
}

cudaError_t last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t launch(const void* kernel, Body body, void* arg, dim3 grid, dim3 block, size_t smem) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    return fail_launch(cudaErrorInvalidConfiguration, "invalid grid or block dimensions");
  const auto it = g_max_smem.find(kernel);
  const size_t limit = it == g_max_smem.end() ? kDefaultSmem : static_cast<size_t>(it->second);
  if (smem > limit)
    return fail_launch(cudaErrorInvalidValue,
                       std::to_string(smem) + " bytes of dynamic shared memory requested, the kernel allows " +
                           std::to_string(limit) + " (cudaFuncSetAttribute raises it)");
  if (g_smem == nullptr || smem + kCanaryBytes > g_smem_capacity)
    return fail_launch(cudaErrorLaunchFailure, "no dynamic shared memory registered");
  if (g_block != nullptr) return fail_launch(cudaErrorLaunchFailure, "nested launch");
  g_last_message.clear();

  Block blk;
  blk.body = body;
  blk.kernel = const_cast<void*>(kernel);
  blk.arg = arg;
  blk.fibers.resize(threads);
  blk.slots.resize(threads);
  const int warps = static_cast<int>((threads + kWarp - 1) / kWarp);
  for (Fiber& f : blk.fibers) f.stack.reset(new char[kStackBytes]);
  g_block = &blk;
  std::string error;
  const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  for (const size_t b : schedule_order(blocks)) {
    if (!error.empty()) break;
    const unsigned bx = static_cast<unsigned>(b % grid.x);
    const unsigned by = static_cast<unsigned>(b / grid.x % grid.y);
    const unsigned bz = static_cast<unsigned>(b / grid.x / grid.y);
    g_launch_smem = smem;
    std::memset(g_smem, kUninitialised, smem);
    std::memset(g_smem + smem, kCanary, kCanaryBytes);
    blk.block_barrier = Barrier{static_cast<int>(threads), 0, 0};
    blk.warp_barriers.assign(warps, Barrier{});
    blk.records.resize(warps);
    blk.recorded.assign(warps, 0);
    blk.fragment_calls.assign(2 * static_cast<size_t>(warps), FragmentCall{});
    for (size_t t = 0; t < threads; ++t) blk.warp_barriers[t / kWarp].expected += 1;
    for (size_t t = 0; t < threads; ++t) {
      Fiber& f = blk.fibers[t];
      f.done = false;
      f.waiting = nullptr;
      f.calls = 0;
      f.fragment_calls = 0;
      f.open_copies.clear();
      f.copy_groups.clear();
      f.state.thread_idx = dim3(static_cast<unsigned>(t % block.x),
                                static_cast<unsigned>(t / block.x % block.y),
                                static_cast<unsigned>(t / (block.x * block.y)));
      f.state.block_idx = dim3(bx, by, bz);
      f.state.block_dim = block;
      f.state.grid_dim = grid;
      f.state.lane = static_cast<int>(t % kWarp);
      f.state.warp = static_cast<int>(t / kWarp);
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &blk.scheduler;
      makecontext(&f.context, fiber_entry, 0);
    }
    error = run_block(blk);
    for (size_t i = 0; i < kCanaryBytes && error.empty(); ++i) {
      if (g_smem[smem + i] != kCanary)
        error = "write past the " + std::to_string(smem) + " bytes of dynamic shared memory (byte " +
                std::to_string(smem + i) + ") in block (" + std::to_string(bx) + "," +
                std::to_string(by) + "," + std::to_string(bz) + ")";
    }
  }
  g_block = nullptr;
  if (!error.empty()) return fail_launch(cudaErrorLaunchFailure, error);
  return cudaSuccess;
}

float half_to_float(uint16_t h) {
  static const std::vector<float> table = [] {  // software half conversions are slow
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) {
      const uint16_t bits = static_cast<uint16_t>(i);
      _Float16 v;
      std::memcpy(&v, &bits, 2);
      t[i] = static_cast<float>(v);
    }
    return t;
  }();
  return table[h];
}

uint16_t float_to_half(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

}  // namespace mimac_emu

namespace nvcuda {
namespace wmma {
namespace detail {

void check_pointer(const char* what, const void* ptr, unsigned ldm, size_t elem_bytes, bool uniform) {
  using namespace ::mimac_emu;
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    fail((std::string(what) + ": pointer not 32-byte aligned").c_str());
  if ((ldm * elem_bytes) % 16 != 0)
    fail((std::string(what) + ": ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes").c_str());
  if (!uniform) return;
  unsigned char key[1 + sizeof(ptr) + sizeof(ldm)] = {'L'};
  std::memcpy(key + 1, &ptr, sizeof(ptr));
  std::memcpy(key + 1 + sizeof(ptr), &ldm, sizeof(ldm));
  bool first = false;
  Record& rec = next_record(first);
  if (first) {
    rec.key.assign(key, key + sizeof(key));
  } else if (rec.key.size() != sizeof(key) || std::memcmp(rec.key.data(), key, sizeof(key)) != 0) {
    fail((std::string(what) + ": lanes of one warp passed different pointers or strides").c_str());
  }
}

bool reuse_mma(const void* parts[3], const size_t sizes[3], void* d, size_t d_bytes, bool& first,
               ::mimac_emu::Record*& rec) {
  using namespace ::mimac_emu;
  rec = &next_record(first);
  const size_t total = 1 + sizes[0] + sizes[1] + sizes[2];
  if (first) {
    rec->key.resize(total);
    rec->key[0] = 'M';
    size_t off = 1;
    for (int i = 0; i < 3; ++i) {
      std::memcpy(rec->key.data() + off, parts[i], sizes[i]);
      off += sizes[i];
    }
    return false;
  }
  if (rec->key.size() != total || rec->key[0] != 'M')
    fail("mma_sync: the lanes of one warp diverged (another collective call at this point in lane 0)");
  size_t off = 1;
  for (int i = 0; i < 3; ++i) {
    if (std::memcmp(rec->key.data() + off, parts[i], sizes[i]) != 0) return false;  // compute our own
    off += sizes[i];
  }
  if (rec->value.size() != d_bytes) return false;
  std::memcpy(d, rec->value.data(), d_bytes);
  return true;
}

void check_uniform_fragment(const char* what, const void* data, size_t bytes) {
  using namespace ::mimac_emu;
  const int lane = current().lane;
  auto* mine = static_cast<uint64_t*>(warp_slot(lane));
  mine[0] = reinterpret_cast<uintptr_t>(data);
  sync_warp();
  const void* first = reinterpret_cast<const void*>(static_cast<const uint64_t*>(warp_slot(0))[0]);
  const bool same = std::memcmp(first, data, bytes) == 0;
  sync_warp();
  if (!same) fail((std::string(what) + ": the lanes of one warp hold different fragments").c_str());
}

}  // namespace detail
}  // namespace wmma
}  // namespace nvcuda

const char* cudaGetErrorString(cudaError_t e) {
  static std::string text;
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: text = "invalid argument"; break;
    case cudaErrorInvalidConfiguration: text = "invalid configuration argument"; break;
    case cudaErrorLaunchOutOfResources: text = "too many resources requested for launch"; break;
    case cudaErrorLaunchFailure: text = "unspecified launch failure"; break;
    default: text = "unknown error"; break;
  }
  if (!mimac_emu::g_last_message.empty()) text += " [emulation: " + mimac_emu::g_last_message + "]";
  return text.c_str();
}
