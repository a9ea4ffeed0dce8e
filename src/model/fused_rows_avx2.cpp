// The row kernels of fused_rows.h compiled for avx2 (flags: src/model/CMakeLists.txt).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "model/fused_rows.inc"

namespace qlora::model::fused {
extern const RowKernels kRowKernels_avx2;
const RowKernels kRowKernels_avx2 = {"avx2", rms_norm_fwd, rms_norm_bwd, rope, glu_fwd, glu_bwd};
}  // namespace qlora::model::fused
