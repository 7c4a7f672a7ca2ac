// O_DIRECT file I/O for the SSD tier: batches of aligned reads and writes completed by io_uring
// (probed at run time) or by a thread pool of pread/pwrite. Torch-free and Python-free; the
// CPython binding is native/direct_io_module.cpp.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace horizon_io {

constexpr uint64_t kAlignBytes = 4096;  // buffer address, length and file offset of every request

enum class Op { kRead = 0, kWrite = 1 };

struct Request {
  Op op;
  int fd;
  void* buffer;
  uint64_t nbytes;
  uint64_t offset;
};

// What a batch ended with: errno_value 0 on success; otherwise the first failure's errno and the
// index of its request in the batch (a short transfer that cannot progress reports ENODATA/ENOSPC).
struct Completion {
  int errno_value = 0;
  int64_t request_index = -1;
};

// Returns an empty string when every request is aligned, else what is wrong with the first bad one.
std::string check_aligned(const std::vector<Request>& requests);

// Opens ``path`` with O_DIRECT (read-write, created with mode 0644 when ``create``); -errno on failure.
int open_direct(const char* path, bool create);

class Batch;

class Engine {
 public:
  // ``num_workers`` pread/pwrite threads, or with ``use_uring`` one io_uring of ``queue_depth``
  // entries when the kernel allows it (else the threads). Requests are split into ``chunk_bytes``.
  Engine(int num_workers, bool use_uring, int queue_depth, uint64_t chunk_bytes);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues every request of the batch at once; the caller waits on the returned batch.
  std::shared_ptr<Batch> submit(const std::vector<Request>& requests);
  const char* backend() const { return uring_ != nullptr ? "io_uring" : "threads"; }

  struct Uring;  // the mapped submission and completion rings (direct_io.cpp)

 private:
  struct Chunk {
    std::shared_ptr<Batch> batch;
    Request request;
    int64_t index;
  };

  void thread_loop();
  void uring_loop();
  bool pop(Chunk* out, bool block);

  uint64_t chunk_bytes_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Chunk> queue_;
  bool stopping_ = false;
  std::unique_ptr<Uring> uring_;
  std::vector<std::thread> workers_;
};

class Batch {
 public:
  explicit Batch(int64_t num_chunks) : remaining_(num_chunks) {}
  void finish(int errno_value, int64_t request_index);
  Completion wait();
  bool done();

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int64_t remaining_;
  Completion completion_;
};

// Runs one request to completion with pread/pwrite (retrying short transfers); returns 0 or errno.
int transfer_blocking(const Request& r);

}  // namespace horizon_io
