#pragma once
// Runtime choice of the instruction set for hot CPU loops. The extension is compiled for the x86-64
// baseline (SSE2, 4 floats per register) so that one wheel runs everywhere; a kernel whose inner
// loops vectorise well is instantiated again with AVX2 codegen (8 floats per register) and with
// AVX-512 codegen (16 floats per register), and the widest one the CPU has is picked at run time.
// Every instance runs the same source, so the CPU tests cover the arithmetic of each
// (tests/test_cpu_isa.py runs every instance the machine supports).
//
//   template <...> void work(...);                               // the generic kernel
//   template <...> DYNAMASK_AVX2 void work_avx2(...) { work(...); }      // flattened: work is inlined
//   template <...> DYNAMASK_AVX512 void work_avx512(...) { work(...); }
//   switch (cpu_isa()) { case Isa::kAvx512: ...; case Isa::kAvx2: ...; default: work(...); }
//
// Environment (read once per process): DYNAMASK_NO_AVX512=1 caps the choice at AVX2;
// DYNAMASK_NO_AVX2=1 forces the baseline (and so also rules out AVX-512).
#include <cstdlib>

namespace dynamask {

enum class Isa { kBaseline, kAvx2, kAvx512 };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// flatten inlines every call in the body, so the whole kernel is generated for the target.
#define DYNAMASK_AVX2 __attribute__((target("avx2,fma"), flatten))
#if defined(__clang__)
#define DYNAMASK_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), flatten))
#else
// GCC otherwise keeps auto-vectorised loops at 256 bits on AVX-512 targets; the loops here are short
// channel runs (16-64 floats) with no frequency-heavy instructions, so full-width registers pay.
#define DYNAMASK_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512"), flatten))
#endif

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("DYNAMASK_NO_AVX2") == nullptr;
  return has;
}

inline bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && std::getenv("DYNAMASK_NO_AVX512") == nullptr;
  return has;
}
#else
#define DYNAMASK_AVX2
#define DYNAMASK_AVX512
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_avx512() { return false; }
#endif

// The widest instance this process uses.
inline Isa cpu_isa() { return cpu_has_avx512() ? Isa::kAvx512 : cpu_has_avx2() ? Isa::kAvx2 : Isa::kBaseline; }

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

}  // namespace dynamask
