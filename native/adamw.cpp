// Fused AdamW over flat host buffers, and its CPython binding (module horizon._native).
//
// Why native: torch's fused CPU AdamW updates master, m and v in one pass, but the bf16 compute copy
// the next host->device load needs is a second pass over the master (and a bf16 gradient a third,
// to upcast it). Here one pass reads master, grad (fp32 or bf16), m and v, and writes master, m, v
// and the bf16 copy: 30 bytes of memory traffic per parameter instead of 40-46.
//
// Numerics: every operation is torch's fused CPU kernel's (FusedAdamKernel.cpp, ADAMW mode, fp32),
// in its order, with its fp32 constants, so master, m and v equal torch._fused_adamw_'s bit for bit.
// One fusion is not in torch's source but in its binary: GCC contracts the vector body's
// `v * beta2 + (1 - beta2) * g * g` into fma((1 - beta2) * g, g, v * beta2) (measured against torch
// 2.13's x86 build), so we write that fma out. (Torch's scalar tail, the last numel % 16 elements,
// is contracted the other way and differs there by an ulp of v; torch.optim.AdamW's single-tensor
// path agrees with the vector body.) Each operation is an IEEE-rounded fp32 operation (fma rounds
// once), so the AVX-512 and AVX2 paths, the scalar fallback and any thread count give identical
// bits. The build uses -ffp-contract=off so the compiler cannot fuse anything this file does not.
// The bf16 copy is torch's vectorised `.to(torch.bfloat16)`: round to nearest even, NaN -> 0xFFFF.
//
// Torch-free by design (DESIGN.md: native/ must not depend on torch headers): the binding takes raw
// addresses from tensor.data_ptr(); horizon/optim/native.py validates the tensors first.

#include "adamw.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

namespace horizon_native {
namespace {

// Memory modes, a bit mask (the binding's `mode`; kModeAuto picks by size). The kernel is bound by
// memory traffic per core. Measured on a 2-core Sapphire Rapids VM (KVM), 100M params, 2 threads,
// AVX-512 path, medians of alternating runs on a noisy host (the ratios held across runs):
//  - kModeNtOut: non-temporal stores of the bf16 copy, which is only written: no read-for-ownership
//    of its lines. Each 32-element step writes one whole 64-byte line (half-line streaming stores
//    cost twice as much: the write-combining buffer gets flushed partial). ~73 -> ~65 ms.
//    Streaming master/m/v was slower: their lines are already in cache from the loads.
//  - kModePrefetch: software prefetch of master, m, v and grad into L1 kPrefetchL1 elements ahead
//    (2 KiB of each fp32 stream) and into L2 kPrefetchL2 ahead (8 KiB). One core's bandwidth is
//    bounded by the cache lines it keeps in flight: the divides and square roots fill the
//    out-of-order window before loads that far ahead issue, and the hardware prefetchers stop at
//    every 4 KiB page of the five streams. Worth ~10-15%. (prefetchw for the read-modify-write
//    streams measured no better; L2 distances of 4-16 KiB within noise of 8 KiB; 64 KiB worse.)
// Both cost a few percent when the buffers fit in the last-level cache, so auto uses them from
// kLargeNumel on. Torch's fused AdamW (no bf16 copy, 28 B/param) took ~71 ms in the same runs,
// DeepSpeed's CPUAdam ~70 ms, this kernel ~65 ms with the copy (30 B/param), ~60 ms without.
constexpr int kModeNtOut = 1;
constexpr int kModePrefetch = 2;
constexpr int kModeAuto = -1;
constexpr std::int64_t kLargeNumel = std::int64_t(1) << 22;  // auto: both modes from here (16 MiB of fp32)
constexpr std::int64_t kPrefetchL1 = 512;
constexpr std::int64_t kPrefetchL2 = 2048;
// Each thread gets at least this many elements (starting a thread costs tens of microseconds).
constexpr std::int64_t kMinPerThread = std::int64_t(1) << 16;
// The unit of work a thread takes at a time: 128 KiB of each fp32 stream, ~40 us on one core. A
// multiple of 64 elements, so every block but the last is whole 32-element steps on whole lines.
constexpr std::int64_t kBlock = std::int64_t(1) << 15;

// The fp32 constants torch's kernel broadcasts, computed as it computes them (in double, then cast).
struct Consts {
  float decay;          // 1 - lr * weight_decay
  bool apply_decay;     // weight_decay != 0
  float lerp_coeff;     // exp_avg.lerp_(grad, w): w if |w| < 0.5 else w - 1
  bool lerp_small;      // |w| < 0.5: base is exp_avg, else grad
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  bool has_scale;
  float scale;
};

Consts make_consts(const AdamWHyper& hp) {
  Consts k{};
  const double bias_correction1 = 1 - std::pow(hp.beta1, hp.step);
  const double bias_correction2 = 1 - std::pow(hp.beta2, hp.step);
  const double exp_avg_grad_coefficient = 1 - hp.beta1;
  const double exp_avg_sq_grad_coefficient = 1 - hp.beta2;
  const double step_size = hp.lr / bias_correction1;
  k.decay = float(1 - hp.lr * hp.weight_decay);
  k.apply_decay = hp.weight_decay != 0.f;
  const float w = float(exp_avg_grad_coefficient);
  k.lerp_small = std::fabs(w) < 0.5f;
  k.lerp_coeff = k.lerp_small ? w : w - 1.0f;
  k.beta2 = float(hp.beta2);
  k.one_minus_beta2 = float(exp_avg_sq_grad_coefficient);
  k.bc2_sqrt = float(std::sqrt(bias_correction2));
  k.eps = float(hp.eps);
  k.neg_step_size = float(-step_size);
  k.has_scale = hp.has_grad_scale;
  k.scale = float(hp.grad_scale);
  return k;
}

inline float bf16_to_f32(std::uint16_t h) {
  const std::uint32_t bits = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline std::uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0xFFFF;  // what torch's vectorised conversion writes for any NaN
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return std::uint16_t(u >> 16);
}

// One element, torch's operation order: the scalar path, and the vector paths' last < 32 elements.
// In the vector paths std::fma becomes one vfmadd instruction, in the scalar path a call to libm's
// correctly rounded fmaf (slow without hardware FMA, but exact).
inline void update_one(const Consts& k, float& p, float g, float& m, float& v) {
  if (k.has_scale) g = g * k.scale;
  if (k.apply_decay) p = p * k.decay;
  m = std::fma(k.lerp_coeff, g - m, k.lerp_small ? m : g);
  v = std::fma(k.one_minus_beta2 * g, g, v * k.beta2);
  const float denom = std::sqrt(v) / k.bc2_sqrt + k.eps;
  p = p + k.neg_step_size * m / denom;
}

inline float load_grad(const AdamWBuffers& b, std::int64_t i) {
  return b.grad_dtype == kGradBF16 ? bf16_to_f32(static_cast<const std::uint16_t*>(b.grad)[i])
                                   : static_cast<const float*>(b.grad)[i];
}

// always_inline: GCC judges an out-of-line prefetch helper free of side effects and deletes the call.
#define HZ_INLINE inline __attribute__((always_inline))

// Prefetches element j of master, m, v and grad for reading: locality 3 = prefetcht0 (L1), 2 = prefetcht1 (L2).
template <int kLocality>
HZ_INLINE void prefetch_streams(const AdamWBuffers& b, const char* grad_bytes, std::int64_t grad_size, std::int64_t j) {
  __builtin_prefetch(b.master + j, 0, kLocality);
  __builtin_prefetch(b.exp_avg + j, 0, kLocality);
  __builtin_prefetch(b.exp_avg_sq + j, 0, kLocality);
  __builtin_prefetch(grad_bytes + j * grad_size, 0, kLocality);
}

// Called once per 16 elements at i: one 64-byte line of each fp32 stream (half a line of a bf16 gradient).
template <bool kPrefetch>
HZ_INLINE void prefetch_ahead(const AdamWBuffers& b, std::int64_t i, std::int64_t end) {
  if constexpr (kPrefetch) {
    const char* grad_bytes = static_cast<const char*>(b.grad);
    const std::int64_t grad_size = b.grad_dtype == kGradBF16 ? 2 : 4;
    if (i + kPrefetchL2 < end) prefetch_streams<2>(b, grad_bytes, grad_size, i + kPrefetchL2);
    if (i + kPrefetchL1 < end) prefetch_streams<3>(b, grad_bytes, grad_size, i + kPrefetchL1);
  }
}

// The elements after the last whole 32: the same operations one at a time.
inline void range_tail(const AdamWBuffers& b, const Consts& k, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; ++i) {
    update_one(k, b.master[i], load_grad(b, i), b.exp_avg[i], b.exp_avg_sq[i]);
    if (b.compute) b.compute[i] = f32_to_bf16(b.master[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA path: 32 elements an iteration (four ymm of fp32 per stream, one 64-byte line of bf16).

#define HZ_AVX2 __attribute__((target("avx2,fma,f16c")))

struct VConsts {
  __m256 decay, lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, scale;
};

HZ_AVX2 inline __m256 load_grad8(const AdamWBuffers& b, std::int64_t i) {
  if (b.grad_dtype == kGradBF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(b.grad) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(b.grad) + i);
}

// Updates 8 elements at i and returns the new master.
HZ_AVX2 inline __m256 update8(const AdamWBuffers& b, const Consts& k, const VConsts& c, std::int64_t i) {
  __m256 g = load_grad8(b, i);
  __m256 p = _mm256_loadu_ps(b.master + i);
  __m256 m = _mm256_loadu_ps(b.exp_avg + i);
  __m256 v = _mm256_loadu_ps(b.exp_avg_sq + i);
  if (k.has_scale) g = _mm256_mul_ps(g, c.scale);
  if (k.apply_decay) p = _mm256_mul_ps(p, c.decay);
  m = _mm256_fmadd_ps(c.lerp_coeff, _mm256_sub_ps(g, m), k.lerp_small ? m : g);
  v = _mm256_fmadd_ps(_mm256_mul_ps(c.one_minus_beta2, g), g, _mm256_mul_ps(v, c.beta2));
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), c.bc2_sqrt), c.eps);
  p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(c.neg_step_size, m), denom));
  _mm256_storeu_ps(b.exp_avg + i, m);
  _mm256_storeu_ps(b.exp_avg_sq + i, v);
  _mm256_storeu_ps(b.master + i, p);
  return p;
}

// Round-to-nearest-even bf16 bits of 8 floats in the low 16 bits of each 32-bit lane; NaN -> 0xFFFF.
HZ_AVX2 inline __m256i bf16_bits8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  __m256i t = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  t = _mm256_add_epi32(t, _mm256_set1_epi32(0x7FFF));
  t = _mm256_add_epi32(t, u);
  t = _mm256_srli_epi32(t, 16);
  const __m256 ordered = _mm256_cmp_ps(x, x, _CMP_ORD_Q);
  return _mm256_blendv_epi8(_mm256_set1_epi32(0xFFFF), t, _mm256_castps_si256(ordered));
}

template <bool kOut, int kMode>
HZ_AVX2 void range_avx2_impl(const AdamWBuffers& buffers, const Consts& k, std::int64_t begin, std::int64_t end) {
  const AdamWBuffers b = buffers;  // a local copy: the vector stores cannot alias its pointers
  constexpr bool kOutNT = kOut && (kMode & kModeNtOut) != 0;
  constexpr bool kPrefetch = (kMode & kModePrefetch) != 0;
  const VConsts c{_mm256_set1_ps(k.decay), _mm256_set1_ps(k.lerp_coeff), _mm256_set1_ps(k.beta2),
                  _mm256_set1_ps(k.one_minus_beta2), _mm256_set1_ps(k.bc2_sqrt), _mm256_set1_ps(k.eps),
                  _mm256_set1_ps(k.neg_step_size), _mm256_set1_ps(k.scale)};
  std::int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    prefetch_ahead<kPrefetch>(b, i, end);
    prefetch_ahead<kPrefetch>(b, i + 16, end);
    __m256 p[4];
    for (int q = 0; q < 4; ++q) p[q] = update8(b, k, c, i + 8 * q);
    if constexpr (kOut) {
      // packus interleaves 128-bit lanes: [a0-3 b0-3 | a4-7 b4-7]; the permute restores a0-7 b0-7.
      const __m256i lo = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits8(p[0]), bf16_bits8(p[1])), 0xD8);
      const __m256i hi = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits8(p[2]), bf16_bits8(p[3])), 0xD8);
      __m256i* dst = reinterpret_cast<__m256i*>(b.compute + i);
      if constexpr (kOutNT) {  // both halves of one 64-byte line back to back: one full-line write
        _mm256_stream_si256(dst, lo);
        _mm256_stream_si256(dst + 1, hi);
      } else {
        _mm256_storeu_si256(dst, lo);
        _mm256_storeu_si256(dst + 1, hi);
      }
    }
  }
  range_tail(b, k, i, end);
  if constexpr (kOutNT) _mm_sfence();  // the streamed bf16 copy is visible before the caller reads it
}

// ---------------------------------------------------------------------------------------------
// AVX-512 path (where the CPU has it): the same operations on zmm, 32 elements an iteration.
// Bitwise the same results; measured ~3-5% faster than the AVX2 path at 100M params (fewer uops
// per element leave the out-of-order window more room for loads in flight).

#define HZ_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12's AVX-512 headers trip -Wmaybe-uninitialized (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

struct VConsts512 {
  __m512 decay, lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, scale;
};

// Updates 16 elements at i and returns the new master.
HZ_AVX512 inline __m512 update16(const AdamWBuffers& b, const Consts& k, const VConsts512& c, std::int64_t i) {
  __m512 g;
  if (b.grad_dtype == kGradBF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(b.grad) + i));
    g = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    g = _mm512_loadu_ps(static_cast<const float*>(b.grad) + i);
  }
  __m512 p = _mm512_loadu_ps(b.master + i);
  __m512 m = _mm512_loadu_ps(b.exp_avg + i);
  __m512 v = _mm512_loadu_ps(b.exp_avg_sq + i);
  if (k.has_scale) g = _mm512_mul_ps(g, c.scale);
  if (k.apply_decay) p = _mm512_mul_ps(p, c.decay);
  m = _mm512_fmadd_ps(c.lerp_coeff, _mm512_sub_ps(g, m), k.lerp_small ? m : g);
  v = _mm512_fmadd_ps(_mm512_mul_ps(c.one_minus_beta2, g), g, _mm512_mul_ps(v, c.beta2));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), c.bc2_sqrt), c.eps);
  p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(c.neg_step_size, m), denom));
  _mm512_storeu_ps(b.exp_avg + i, m);
  _mm512_storeu_ps(b.exp_avg_sq + i, v);
  _mm512_storeu_ps(b.master + i, p);
  return p;
}

// bf16 bits of 16 floats as bf16_bits8 computes them, narrowed to 16 bits (vpmovdw; the values fit).
HZ_AVX512 inline __m256i bf16_bits16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  __m512i t = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  t = _mm512_add_epi32(_mm512_add_epi32(t, _mm512_set1_epi32(0x7FFF)), u);
  t = _mm512_srli_epi32(t, 16);
  t = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_set1_epi32(0xFFFF), t);
  return _mm512_cvtepi32_epi16(t);
}

template <bool kOut, int kMode>
HZ_AVX512 void range_avx512_impl(const AdamWBuffers& buffers, const Consts& k, std::int64_t begin, std::int64_t end) {
  const AdamWBuffers b = buffers;  // a local copy: the vector stores cannot alias its pointers
  constexpr bool kOutNT = kOut && (kMode & kModeNtOut) != 0;
  constexpr bool kPrefetch = (kMode & kModePrefetch) != 0;
  const VConsts512 c{_mm512_set1_ps(k.decay), _mm512_set1_ps(k.lerp_coeff), _mm512_set1_ps(k.beta2),
                     _mm512_set1_ps(k.one_minus_beta2), _mm512_set1_ps(k.bc2_sqrt), _mm512_set1_ps(k.eps),
                     _mm512_set1_ps(k.neg_step_size), _mm512_set1_ps(k.scale)};
  std::int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    prefetch_ahead<kPrefetch>(b, i, end);
    prefetch_ahead<kPrefetch>(b, i + 16, end);
    const __m512 p0 = update16(b, k, c, i);
    const __m512 p1 = update16(b, k, c, i + 16);
    if constexpr (kOut) {  // one 64-byte line of bf16
      const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_bits16(p0)), bf16_bits16(p1), 1);
      if constexpr (kOutNT) _mm512_stream_si512(reinterpret_cast<__m512i*>(b.compute + i), line);
      else _mm512_storeu_si512(b.compute + i, line);
    }
  }
  range_tail(b, k, i, end);
  if constexpr (kOutNT) _mm_sfence();
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ---------------------------------------------------------------------------------------------
// Dispatch on the memory mode and on whether there is a bf16 copy to write.

using RangeFn = void (*)(const AdamWBuffers&, const Consts&, std::int64_t, std::int64_t);

template <int kMode>
void range_avx2(const AdamWBuffers& b, const Consts& k, std::int64_t begin, std::int64_t end) {
  if (b.compute) range_avx2_impl<true, kMode>(b, k, begin, end); else range_avx2_impl<false, kMode>(b, k, begin, end);
}

template <int kMode>
void range_avx512(const AdamWBuffers& b, const Consts& k, std::int64_t begin, std::int64_t end) {
  if (b.compute) range_avx512_impl<true, kMode>(b, k, begin, end); else range_avx512_impl<false, kMode>(b, k, begin, end);
}

void range_scalar(const AdamWBuffers& b, const Consts& k, std::int64_t begin, std::int64_t end) {
  range_tail(b, k, begin, end);
}

RangeFn pick_range(int isa, int mode) {
  static constexpr RangeFn kAvx2[4] = {range_avx2<0>, range_avx2<1>, range_avx2<2>, range_avx2<3>};
  static constexpr RangeFn kAvx512[4] = {range_avx512<0>, range_avx512<1>, range_avx512<2>, range_avx512<3>};
  if (isa == kIsaAvx512) return kAvx512[mode & 3];
  if (isa == kIsaAvx2) return kAvx2[mode & 3];
  return range_scalar;
}

// The memory mode to run: the requested one (auto: everything from kLargeNumel on), less the
// non-temporal stores where the bf16 copy is not 64-byte aligned (with it aligned, every 32-element
// step writes one whole aligned line, as blocks start at multiples of kBlock elements).
int memory_mode(const AdamWBuffers& b, int requested) {
  int mode = requested == kModeAuto ? (b.numel >= kLargeNumel ? kModeNtOut | kModePrefetch : 0) : requested;
  if (!b.compute || (reinterpret_cast<std::uintptr_t>(b.compute) & 63) != 0) mode &= ~kModeNtOut;
  return mode;
}

int detect_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return kIsaAvx512;
  return avx2 ? kIsaAvx2 : kIsaScalar;
}

}  // namespace

int best_isa() {
  static const int isa = detect_isa();
  return isa;
}

bool isa_supported(int isa) {
  return isa == kIsaScalar || (isa == kIsaAvx2 && best_isa() >= kIsaAvx2) ||
         (isa == kIsaAvx512 && best_isa() == kIsaAvx512);
}

std::uint16_t bf16_from_f32(float x) { return f32_to_bf16(x); }

void fused_adamw_mode(const AdamWBuffers& buf, const AdamWHyper& hp, int num_threads, int isa, int mode) {
  const std::int64_t n = buf.numel;
  if (n <= 0) return;
  const Consts k = make_consts(hp);
  if (isa == kIsaAuto) isa = best_isa();
  const RangeFn range = pick_range(isa, memory_mode(buf, mode));

  const std::int64_t threads = std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, n / kMinPerThread));
  if (threads <= 1) {
    range(buf, k, 0, n);
    return;
  }
  // Threads take kBlock-element blocks in order from a shared counter, not fixed shares: a thread the
  // scheduler takes off its core (the engine's copy thread wants it) just takes fewer blocks, and the
  // update ends when the work is done, not when its slowest fixed share is.
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  std::atomic<std::int64_t> next{0};
  auto work = [&] {
    for (std::int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next.fetch_add(1, std::memory_order_relaxed)) {
      range(buf, k, b * kBlock, std::min(n, b * kBlock + kBlock));
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(std::size_t(threads - 1));
  for (std::int64_t t = 1; t < threads; ++t) {
    try {
      workers.emplace_back(work);
    } catch (const std::exception&) {
      break;  // the threads started, and this one, take every block
    }
  }
  work();
  for (auto& w : workers) w.join();
}

void fused_adamw(const AdamWBuffers& buf, const AdamWHyper& hp, int num_threads, int isa) {
  fused_adamw_mode(buf, hp, num_threads, isa, kModeAuto);
}

}  // namespace horizon_native

// ---------------------------------------------------------------------------------------------
// CPython binding: module horizon._native (plain C API, no pybind11, no torch).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

const char kFusedAdamwDoc[] =
    "fused_adamw(master, grad, exp_avg, exp_avg_sq, compute, numel, grad_dtype, step, lr, beta1, beta2,\n"
    "            eps, weight_decay, has_grad_scale, grad_scale, num_threads, isa=0, mode=-1)\n\n"
    "One fused AdamW pass over flat host buffers given by address (tensor.data_ptr()).\n"
    "master, exp_avg, exp_avg_sq: fp32; grad: fp32 (grad_dtype 0) or bf16 (1), read only; compute:\n"
    "bf16 output of the new master, or 0 for none. isa: 0 auto, 1 scalar, 2 avx2, 3 avx512. mode: -1 auto (by\n"
    "size), else a mask: 1 non-temporal stores of the bf16 copy, 2 software prefetch (vector paths; results\n"
    "never depend on isa, mode or num_threads). The GIL is released.\n"
    "The caller guarantees the buffers hold numel elements and do not overlap.";

PyObject* py_fused_adamw(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"master", "grad", "exp_avg", "exp_avg_sq", "compute", "numel", "grad_dtype",
                                 "step", "lr", "beta1", "beta2", "eps", "weight_decay", "has_grad_scale",
                                 "grad_scale", "num_threads", "isa", "mode", nullptr};
  unsigned long long master, grad, exp_avg, exp_avg_sq, compute;
  long long numel;
  int grad_dtype, has_grad_scale, num_threads, isa = horizon_native::kIsaAuto, mode = -1;
  double step, lr, beta1, beta2, eps, weight_decay, grad_scale;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKKKKLiddddddpdi|ii:fused_adamw", const_cast<char**>(kwlist),
                                   &master, &grad, &exp_avg, &exp_avg_sq, &compute, &numel, &grad_dtype, &step,
                                   &lr, &beta1, &beta2, &eps, &weight_decay, &has_grad_scale, &grad_scale,
                                   &num_threads, &isa, &mode)) {
    return nullptr;
  }
  if (numel < 0) return PyErr_Format(PyExc_ValueError, "numel must be >= 0, got %lld", numel);
  if (grad_dtype != horizon_native::kGradF32 && grad_dtype != horizon_native::kGradBF16)
    return PyErr_Format(PyExc_ValueError, "grad_dtype must be 0 (fp32) or 1 (bf16), got %d", grad_dtype);
  if (num_threads < 1) return PyErr_Format(PyExc_ValueError, "num_threads must be >= 1, got %d", num_threads);
  if (isa != horizon_native::kIsaAuto && !horizon_native::isa_supported(isa))
    return PyErr_Format(PyExc_ValueError, "isa %d is not supported on this CPU (0 auto, 1 scalar, 2 avx2, 3 avx512)", isa);
  if (mode < -1 || mode > 3) return PyErr_Format(PyExc_ValueError, "mode must be -1..3, got %d", mode);
  if (numel > 0 && (!master || !grad || !exp_avg || !exp_avg_sq))
    return PyErr_Format(PyExc_ValueError, "a null buffer address was given for %lld elements", numel);

  horizon_native::AdamWBuffers buf{};
  buf.master = reinterpret_cast<float*>(static_cast<std::uintptr_t>(master));
  buf.grad = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(grad));
  buf.exp_avg = reinterpret_cast<float*>(static_cast<std::uintptr_t>(exp_avg));
  buf.exp_avg_sq = reinterpret_cast<float*>(static_cast<std::uintptr_t>(exp_avg_sq));
  buf.compute = reinterpret_cast<std::uint16_t*>(static_cast<std::uintptr_t>(compute));
  buf.numel = numel;
  buf.grad_dtype = grad_dtype;
  horizon_native::AdamWHyper hp{step, lr, beta1, beta2, eps, weight_decay, has_grad_scale != 0, grad_scale};

  bool failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    horizon_native::fused_adamw_mode(buf, hp, num_threads, isa, mode);
  } catch (...) {
    failed = true;
  }
  Py_END_ALLOW_THREADS
  if (failed) return PyErr_Format(PyExc_RuntimeError, "fused_adamw failed in native code");
  Py_RETURN_NONE;
}

PyObject* py_best_isa(PyObject*, PyObject*) {
  switch (horizon_native::best_isa()) {
    case horizon_native::kIsaAvx512: return PyUnicode_FromString("avx512");
    case horizon_native::kIsaAvx2: return PyUnicode_FromString("avx2");
    default: return PyUnicode_FromString("scalar");
  }
}

PyMethodDef kMethods[] = {
    {"fused_adamw", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_fused_adamw)),
     METH_VARARGS | METH_KEYWORDS, kFusedAdamwDoc},
    {"best_isa", py_best_isa, METH_NOARGS, "The kernel path auto picks on this CPU: 'avx512', 'avx2' or 'scalar'."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "horizon._native",
                       "Horizon's native kernels (torch-free): fused CPU AdamW over flat buffers.", -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&kModule); }
