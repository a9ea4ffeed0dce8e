// The row kernels of fused_rows.h in plain C++ (any x86-64 or other CPU), and the runtime choice
// among the compiled variants.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "model/fused_rows.inc"

namespace qlora::model::fused {
extern const RowKernels kRowKernels_generic;
const RowKernels kRowKernels_generic = {"generic", rms_norm_fwd, rms_norm_bwd, rope, glu_fwd, glu_bwd};
}  // namespace qlora::model::fused

namespace qlora::model::fused {
#if defined(QLORA_FUSED_ROWS_X86)
extern const RowKernels kRowKernels_avx2;
extern const RowKernels kRowKernels_avx512;
#endif

namespace {
const RowKernels* g_override = nullptr;
}  // namespace

const RowKernels* row_kernels(Isa isa) {
  if (isa == Isa::generic) return &kRowKernels_generic;
#if defined(QLORA_FUSED_ROWS_X86)
  if (isa == Isa::avx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &kRowKernels_avx2
                                                                             : nullptr;
  if (isa == Isa::avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
               ? &kRowKernels_avx512
               : nullptr;
#endif
  return nullptr;
}

const RowKernels& row_kernels_best() {
  if (g_override != nullptr) return *g_override;
  static const RowKernels* best = [] {
    for (Isa isa : {Isa::avx512, Isa::avx2})
      if (const RowKernels* k = row_kernels(isa)) return k;
    return &kRowKernels_generic;
  }();
  return *best;
}

void set_row_kernels_override(const RowKernels* k) { g_override = k; }

}  // namespace qlora::model::fused
