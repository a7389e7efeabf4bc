#pragma once
// Runtime choice of the instruction set for hot CPU loops. The extension is compiled for the x86-64
// baseline (SSE2, 4 floats per register) so that one wheel runs everywhere; a kernel whose inner
// loops vectorise well is instantiated a second time with AVX2 codegen (8 floats per register) and
// picked at run time when the CPU has it. Both instances run the same source, so the CPU tests cover
// the arithmetic of either.
//
//   template <...> void work(...);                        // the generic kernel
//   template <...> DYNAMASK_AVX2 void work_avx2(...) { work(...); }   // flattened: work is inlined
//   if (cpu_has_avx2()) work_avx2(...); else work(...);
#include <cstdlib>

namespace dynamask {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// flatten inlines every call in the body, so the whole kernel is generated for AVX2.
#define DYNAMASK_AVX2 __attribute__((target("avx2,fma"), flatten))
// DYNAMASK_NO_AVX2=1 in the environment forces the baseline instances (the tests compare the two).
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("DYNAMASK_NO_AVX2") == nullptr;
  return has;
}
#else
#define DYNAMASK_AVX2
inline bool cpu_has_avx2() { return false; }
#endif

}  // namespace dynamask
