// TensorBoard event files: protobuf wire encoding by hand (varint, fixed64, fixed32 and
// length-delimited fields) and TFRecord framing with CRC-32C.
#include "train/tensorboard.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace qlora::train {

namespace {

void put_varint(std::string& s, uint64_t v) {
  while (v >= 0x80) {
    s.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  s.push_back(static_cast<char>(v));
}
void put_tag(std::string& s, int field, int wire) { put_varint(s, (static_cast<uint64_t>(field) << 3) | wire); }
void put_fixed64(std::string& s, int field, double v) {
  put_tag(s, field, 1);
  char b[8];
  std::memcpy(b, &v, 8);  // little-endian host (x86-64, aarch64)
  s.append(b, 8);
}
void put_fixed32(std::string& s, int field, float v) {
  put_tag(s, field, 5);
  char b[4];
  std::memcpy(b, &v, 4);
  s.append(b, 4);
}
void put_bytes(std::string& s, int field, const std::string& bytes) {
  put_tag(s, field, 2);
  put_varint(s, bytes.size());
  s += bytes;
}

double wall_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

uint32_t masked(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

}  // namespace

uint32_t crc32c(const uint8_t* data, size_t n) {
  static const auto table = [] {
    std::vector<uint32_t> t(256);
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
  return crc ^ 0xffffffffu;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  path_ = dir + "/events.out.tfevents." + std::to_string(static_cast<int64_t>(wall_time())) + "." +
          host + ".qlora_dist";
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) throw std::runtime_error(path_ + ": cannot be written");
  std::string e;
  put_fixed64(e, 1, wall_time());
  put_bytes(e, 3, "brain.Event:2");  // file_version
  record(e);
  out_.flush();
}

void TensorBoardWriter::scalars(int64_t step,
                                const std::vector<std::pair<std::string, double>>& values) {
  std::string summary;
  for (const auto& [tag, value] : values) {
    std::string v;
    put_bytes(v, 1, tag);                             // Summary.Value.tag
    put_fixed32(v, 2, static_cast<float>(value));     // Summary.Value.simple_value
    put_bytes(summary, 1, v);                         // Summary.value (repeated)
  }
  std::string e;
  put_fixed64(e, 1, wall_time());  // Event.wall_time
  put_tag(e, 2, 0);                // Event.step
  put_varint(e, static_cast<uint64_t>(step));
  put_bytes(e, 5, summary);        // Event.summary
  record(e);
  out_.flush();
  if (!out_) throw std::runtime_error(path_ + ": write failed");
}

void TensorBoardWriter::record(const std::string& data) {
  const uint64_t len = data.size();
  uint8_t header[12];
  std::memcpy(header, &len, 8);
  const uint32_t len_crc = masked(crc32c(header, 8));
  std::memcpy(header + 8, &len_crc, 4);
  const uint32_t data_crc =
      masked(crc32c(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  out_.write(reinterpret_cast<const char*>(header), 12);
  out_.write(data.data(), static_cast<std::streamsize>(data.size()));
  out_.write(reinterpret_cast<const char*>(&data_crc), 4);
  if (!out_) throw std::runtime_error(path_ + ": write failed");
}

}  // namespace qlora::train
