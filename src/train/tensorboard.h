// TensorBoard event files written directly (no TensorFlow, no protobuf library): a TFRecord file
// of Event protocol buffers, each scalar as Event{wall_time, step, summary{value{tag,
// simple_value}}}. Record framing: uint64 length, uint32 masked CRC-32C of the length, the bytes,
// uint32 masked CRC-32C of the bytes (masked = rotate-right-15 of the CRC + 0xa282ead8).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace qlora::train {

uint32_t crc32c(const uint8_t* data, size_t nbytes);

class TensorBoardWriter {
 public:
  // Creates dir (if needed) and dir/events.out.tfevents.<seconds>.<host>.qlora_dist, starting
  // with the file-version event TensorBoard expects.
  explicit TensorBoardWriter(const std::string& dir);
  const std::string& path() const { return path_; }
  void scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  void flush() { out_.flush(); }

 private:
  void record(const std::string& event_bytes);
  std::string path_;
  std::ofstream out_;
};

}  // namespace qlora::train
