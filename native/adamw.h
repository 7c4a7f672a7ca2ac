// Fused AdamW over one unit's flat host buffers: torch-free, Python-free kernel API.
//
// One pass reads the fp32 master, the gradient (fp32 or bf16), Adam's m and v, and writes the
// master, m, v and (optionally) the bf16 compute copy the next host->device copy sends.
// The arithmetic follows torch's fused CPU AdamW (aten/src/ATen/native/cpu/FusedAdamKernel.cpp,
// ADAMW mode, fp32) operation for operation, so results match torch._fused_adamw_ bit for bit.
#pragma once

#include <cstdint>

namespace horizon_native {

enum GradDtype : int { kGradF32 = 0, kGradBF16 = 1 };

// Which instruction-set path runs the kernel. kIsaAuto picks the best one the CPU supports.
enum Isa : int { kIsaAuto = 0, kIsaScalar = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

struct AdamWHyper {
  double step;          // the step count after this update (1 for the first update), as torch's state_step
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;  // decoupled: master *= 1 - lr * weight_decay
  bool has_grad_scale;  // multiply the gradient by grad_scale first (global-norm clipping)
  double grad_scale;
};

struct AdamWBuffers {
  float* master;             // fp32, updated in place
  const void* grad;          // fp32 or bf16 (see grad_dtype), read only
  float* exp_avg;            // fp32, updated in place
  float* exp_avg_sq;         // fp32, updated in place
  std::uint16_t* compute;    // bf16 bits of the new master, or nullptr for none
  std::int64_t numel;
  int grad_dtype;            // GradDtype
};

// The best path this CPU supports (kIsaAvx512: AVX-512F + AVX2 + FMA + F16C; kIsaAvx2: AVX2 + FMA +
// F16C; else kIsaScalar).
int best_isa();

// true when `isa` (not kIsaAuto) can run on this CPU.
bool isa_supported(int isa);

// Runs the update over [0, numel) on `num_threads` threads (1 = inline on the caller's thread),
// which take blocks of 32768 elements from a shared counter. Results do not depend on
// the thread count or the path. `isa` must be kIsaAuto or a supported path.
void fused_adamw(const AdamWBuffers& buf, const AdamWHyper& hp, int num_threads, int isa);

// The same with an explicit memory mode (for benchmarks and tests): -1 picks by size, else a mask of
// 1 (non-temporal stores of the bf16 copy) and 2 (software prefetch). Results never depend on it.
void fused_adamw_mode(const AdamWBuffers& buf, const AdamWHyper& hp, int num_threads, int isa, int mode);

// fp32 -> bf16 bits as torch's vectorised `.to(torch.bfloat16)`: round to nearest even, every NaN -> 0xFFFF.
std::uint16_t bf16_from_f32(float x);

}  // namespace horizon_native
