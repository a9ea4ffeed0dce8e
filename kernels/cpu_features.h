// What the running CPU offers beyond the baseline, checked at run time (cpuid). Dependency-free,
// so that the configuration code (and its fuzz harness) can ask it.
#pragma once

namespace qlora::kernels {

// bf16 matrix products in hardware, checked at run time (cpuid, cached): AVX512_BF16 (with the
// OS saving AVX-512 state) or AMX-BF16 (with the OS saving tile state). The name of what was
// found ("AVX512_BF16", "AMX-BF16", "AVX512_BF16 and AMX-BF16"), or "" when neither.
const char* cpu_bf16_feature();

}  // namespace qlora::kernels
