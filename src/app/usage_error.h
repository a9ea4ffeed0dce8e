// The one usage-error type of the binary: a command line that does not parse or an option value
// that is not allowed. main turns it into one line and exit status 2 (errors in the files a user
// hands us are other exceptions: exit status 1).
#pragma once

#include <stdexcept>

namespace qlora::app {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace qlora::app
