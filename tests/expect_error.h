// Helpers shared by the GoogleTest files: what a call that must fail threw.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <stdexcept>
#include <string>

namespace qlora::testing {

// The message of the std::invalid_argument that `f` must throw ("" and a failure if none).
inline std::string invalid_argument_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected std::invalid_argument, got: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected std::invalid_argument, nothing thrown";
  return "";
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace qlora::testing
