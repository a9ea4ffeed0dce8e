// The CUDA kernel library links against NCCL, and the NCCL library found at run time is the
// version whose headers we compiled against (major.minor). ncclGetVersion needs no GPU and no
// driver, so this runs on the GPU-less CI machines too.
#include <gtest/gtest.h>

#include "quant4_cuda.h"

namespace qlora::kernels {
namespace {

// NCCL_VERSION(X,Y,Z) is X*1000+Y*100+Z up to 2.8 and X*10000+Y*100+Z from 2.9 on;
// returns X*100+Y either way.
int major_minor(int code) {
  if (code >= 10000) return code / 10000 * 100 + code % 10000 / 100;
  return code / 1000 * 100 + code % 1000 / 100;
}

TEST(NcclLink, LinkedVersionMatchesHeaders) {
  const int linked = nccl_linked_version();
  const int header = nccl_header_version();
  ASSERT_GT(linked, 0) << "ncclGetVersion returned " << linked;
  EXPECT_EQ(major_minor(linked), major_minor(header))
      << "linked NCCL " << linked << ", headers " << header;
}

}  // namespace
}  // namespace qlora::kernels
