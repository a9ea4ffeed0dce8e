// The watchdog's deadline in Work::wait (src/dist/communicator.h), without MPI: a handle whose
// collective never finishes ends its wait at timeout_s with the watchdog's report (here a
// handler that records and returns, so Work::wait throws instead of aborting); one that finishes
// in time returns, and rethrows the collective's error; no timeout waits as long as it takes.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "dist/communicator.h"

namespace qlora::dist {
namespace {

using Clock = std::chrono::steady_clock;

// A collective that finishes `after` from its creation (never: a negative duration), with or
// without an error; done() never blocks, as the contract requires.
struct TimedState final : Work::State {
  explicit TimedState(std::chrono::milliseconds after, bool fails = false)
      : finish_at(after.count() < 0 ? Clock::time_point::max() : Clock::now() + after),
        fails(fails) {}
  bool done() override { return Clock::now() >= finish_at; }
  void block() override {
    std::this_thread::sleep_until(finish_at);
    if (fails) throw std::runtime_error("the collective failed");
  }
  Clock::time_point finish_at;
  bool fails;
};

std::shared_ptr<TimedState> stamped(std::chrono::milliseconds after, double timeout_s,
                                    std::string* report, bool fails = false) {
  auto s = std::make_shared<TimedState>(after, fails);
  auto w = std::make_shared<Watchdog>();
  w->timeout_s = timeout_s;
  w->expired = [report](const Work::State& st, double waited_s) {
    *report = st.describe() + " after " + std::to_string(waited_s);
  };
  s->watchdog = w;
  s->kind = "all_gather";
  s->seq = 57;
  s->context = std::make_shared<const std::string>("step 3");
  s->detail = "gather of block.2";
  return s;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

TEST(Watchdog, StalledWaitEndsAtTheDeadlineWithItsReport) {
  std::string report;
  Work work(stamped(std::chrono::milliseconds(-1), 0.3, &report));
  const auto t0 = Clock::now();
  try {
    work.wait();
    FAIL() << "a wait on a collective that never finishes returned";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("all_gather #57 (step 3, gather of block.2)"), std::string::npos) << what;
    EXPECT_NE(what.find("dist.timeout_s = 0.3"), std::string::npos) << what;
  }
  const double waited = seconds_since(t0);
  EXPECT_GE(waited, 0.3);
  EXPECT_LT(waited, 1.5) << "the deadline was not kept";
  EXPECT_EQ(report.rfind("all_gather #57 (step 3, gather of block.2) after 0.3", 0), 0u) << report;
}

TEST(Watchdog, WaitThatFinishesInTimeReturnsAndRethrows) {
  std::string report;
  Work ok(stamped(std::chrono::milliseconds(100), 5.0, &report));
  const auto t0 = Clock::now();
  ok.wait();
  EXPECT_GE(seconds_since(t0), 0.09);
  EXPECT_TRUE(report.empty()) << report;

  Work failing(stamped(std::chrono::milliseconds(50), 5.0, &report, /*fails=*/true));
  EXPECT_THROW(failing.wait(), std::runtime_error);
  EXPECT_TRUE(report.empty()) << "an error is not a timeout: " << report;
}

TEST(Watchdog, NoTimeoutWaitsAsLongAsItTakes) {
  std::string report;
  Work work(stamped(std::chrono::milliseconds(400), 0.0, &report));
  const auto t0 = Clock::now();
  work.wait();
  EXPECT_GE(seconds_since(t0), 0.39);
  EXPECT_TRUE(report.empty()) << report;
}

}  // namespace
}  // namespace qlora::dist
