// O_DIRECT batches through io_uring (raw system calls: no liburing needed at build or run time)
// or a pread/pwrite thread pool. See direct_io.h.
#include "direct_io.h"

#include <fcntl.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace horizon_io {

std::string check_aligned(const std::vector<Request>& requests) {
  for (size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    const auto address = reinterpret_cast<uintptr_t>(r.buffer);
    const char* what = address % kAlignBytes ? "buffer address" : r.nbytes % kAlignBytes ? "length" :
                       r.offset % kAlignBytes ? "file offset" : nullptr;
    if (what != nullptr) {
      return "request " + std::to_string(i) + ": the " + what + " is not a multiple of " +
             std::to_string(kAlignBytes) + " bytes (address " + std::to_string(address) + ", length " +
             std::to_string(r.nbytes) + ", offset " + std::to_string(r.offset) +
             "); O_DIRECT needs aligned buffers, lengths and offsets";
    }
  }
  return "";
}

int open_direct(const char* path, bool create) {
  const int fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  return fd < 0 ? -errno : fd;
}

int transfer_blocking(const Request& r) {
  auto* p = static_cast<char*>(r.buffer);
  uint64_t done = 0;
  while (done < r.nbytes) {
    const ssize_t n = r.op == Op::kRead ? pread(r.fd, p + done, r.nbytes - done, r.offset + done)
                                        : pwrite(r.fd, p + done, r.nbytes - done, r.offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return r.op == Op::kRead ? ENODATA : ENOSPC;  // end of file / no progress
    done += static_cast<uint64_t>(n);
  }
  return 0;
}

void Batch::finish(int errno_value, int64_t request_index) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (errno_value != 0 && completion_.errno_value == 0) completion_ = {errno_value, request_index};
  if (--remaining_ == 0) cv_.notify_all();
}

Completion Batch::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [this] { return remaining_ == 0; });
  return completion_;
}

bool Batch::done() {
  std::lock_guard<std::mutex> lock(mutex_);
  return remaining_ == 0;
}

// -- io_uring -----------------------------------------------------------------------------------

struct Engine::Uring {
  int fd = -1;
  unsigned depth = 0;
  void* sq_ring = MAP_FAILED;
  void* cq_ring = MAP_FAILED;
  size_t sq_ring_bytes = 0, cq_ring_bytes = 0, sqes_bytes = 0;
  io_uring_sqe* sqes = static_cast<io_uring_sqe*>(MAP_FAILED);
  unsigned *sq_tail = nullptr, *sq_mask = nullptr, *sq_array = nullptr;
  unsigned *cq_head = nullptr, *cq_tail = nullptr, *cq_mask = nullptr;
  io_uring_cqe* cqes = nullptr;

  ~Uring() {
    if (sqes != MAP_FAILED) munmap(sqes, sqes_bytes);
    if (cq_ring != MAP_FAILED && cq_ring != sq_ring) munmap(cq_ring, cq_ring_bytes);
    if (sq_ring != MAP_FAILED) munmap(sq_ring, sq_ring_bytes);
    if (fd >= 0) close(fd);
  }
};

namespace {

// Whether the ring supports IORING_OP_READ and IORING_OP_WRITE (Linux >= 5.6; older kernels lack the probe too).
bool supports_read_write(int ring_fd) {
  constexpr unsigned kOps = 256;
  std::vector<char> storage(sizeof(io_uring_probe) + kOps * sizeof(io_uring_probe_op), 0);
  auto* probe = reinterpret_cast<io_uring_probe*>(storage.data());
  if (syscall(__NR_io_uring_register, ring_fd, IORING_REGISTER_PROBE, probe, kOps) < 0) return false;
  auto supported = [probe](unsigned op) {
    return op <= probe->last_op && (probe->ops[op].flags & IO_URING_OP_SUPPORTED);
  };
  return supported(IORING_OP_READ) && supported(IORING_OP_WRITE);
}

// Sets up a ring, or returns null when the kernel refuses (too old, io_uring_disabled, seccomp).
std::unique_ptr<Engine::Uring> setup_uring(unsigned entries) {
  io_uring_params params;
  std::memset(&params, 0, sizeof(params));
  auto ring = std::make_unique<Engine::Uring>();
  ring->fd = static_cast<int>(syscall(__NR_io_uring_setup, entries, &params));
  if (ring->fd < 0 || !supports_read_write(ring->fd)) return nullptr;
  ring->depth = params.sq_entries;
  ring->sq_ring_bytes = params.sq_off.array + params.sq_entries * sizeof(unsigned);
  ring->cq_ring_bytes = params.cq_off.cqes + params.cq_entries * sizeof(io_uring_cqe);
  const bool single = params.features & IORING_FEAT_SINGLE_MMAP;
  if (single) ring->sq_ring_bytes = ring->cq_ring_bytes = std::max(ring->sq_ring_bytes, ring->cq_ring_bytes);
  ring->sq_ring = mmap(nullptr, ring->sq_ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring->fd,
                       IORING_OFF_SQ_RING);
  if (ring->sq_ring == MAP_FAILED) return nullptr;
  ring->cq_ring = single ? ring->sq_ring
                         : mmap(nullptr, ring->cq_ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                                ring->fd, IORING_OFF_CQ_RING);
  if (ring->cq_ring == MAP_FAILED) return nullptr;
  ring->sqes_bytes = params.sq_entries * sizeof(io_uring_sqe);
  ring->sqes = static_cast<io_uring_sqe*>(mmap(nullptr, ring->sqes_bytes, PROT_READ | PROT_WRITE,
                                               MAP_SHARED | MAP_POPULATE, ring->fd, IORING_OFF_SQES));
  if (ring->sqes == MAP_FAILED) return nullptr;
  auto* sq = static_cast<char*>(ring->sq_ring);
  auto* cq = static_cast<char*>(ring->cq_ring);
  ring->sq_tail = reinterpret_cast<unsigned*>(sq + params.sq_off.tail);
  ring->sq_mask = reinterpret_cast<unsigned*>(sq + params.sq_off.ring_mask);
  ring->sq_array = reinterpret_cast<unsigned*>(sq + params.sq_off.array);
  ring->cq_head = reinterpret_cast<unsigned*>(cq + params.cq_off.head);
  ring->cq_tail = reinterpret_cast<unsigned*>(cq + params.cq_off.tail);
  ring->cq_mask = reinterpret_cast<unsigned*>(cq + params.cq_off.ring_mask);
  ring->cqes = reinterpret_cast<io_uring_cqe*>(cq + params.cq_off.cqes);
  return ring;
}

}  // namespace

Engine::Engine(int num_workers, bool use_uring, int queue_depth, uint64_t chunk_bytes)
    : chunk_bytes_(std::max<uint64_t>(kAlignBytes, chunk_bytes / kAlignBytes * kAlignBytes)) {
  if (use_uring) uring_ = setup_uring(static_cast<unsigned>(std::max(1, queue_depth)));
  if (uring_ != nullptr) {
    workers_.emplace_back([this] { uring_loop(); });
    return;
  }
  for (int i = 0; i < std::max(1, num_workers); ++i) workers_.emplace_back([this] { thread_loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;  // the workers drain the queue first: no batch is left unfinished
  }
  ready_.notify_all();
  for (auto& w : workers_) w.join();
}

std::shared_ptr<Batch> Engine::submit(const std::vector<Request>& requests) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    for (uint64_t at = 0; at < r.nbytes; at += chunk_bytes_) {
      const uint64_t n = std::min(chunk_bytes_, r.nbytes - at);
      chunks.push_back({nullptr, {r.op, r.fd, static_cast<char*>(r.buffer) + at, n, r.offset + at},
                        static_cast<int64_t>(i)});
    }
  }
  auto batch = std::make_shared<Batch>(static_cast<int64_t>(chunks.size()) + 1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& c : chunks) {
      c.batch = batch;
      queue_.push_back(std::move(c));
    }
  }
  ready_.notify_all();
  batch->finish(0, -1);  // the +1 above: an empty batch is complete at once
  return batch;
}

bool Engine::pop(Chunk* out, bool block) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (block) ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
  if (queue_.empty()) return false;
  *out = std::move(queue_.front());
  queue_.pop_front();
  return true;
}

void Engine::thread_loop() {
  Chunk chunk;
  while (pop(&chunk, true)) {
    chunk.batch->finish(transfer_blocking(chunk.request), chunk.index);
    chunk.batch.reset();
  }
}

void Engine::uring_loop() {
  Uring& ring = *uring_;
  std::vector<Chunk> slots(ring.depth);
  std::vector<unsigned> free_slots;
  for (unsigned i = 0; i < ring.depth; ++i) free_slots.push_back(ring.depth - 1 - i);
  for (;;) {
    unsigned to_submit = 0;
    Chunk chunk;
    while (!free_slots.empty() && pop(&chunk, free_slots.size() == ring.depth && to_submit == 0)) {
      const unsigned slot = free_slots.back();
      free_slots.pop_back();
      const unsigned tail = *ring.sq_tail;
      const unsigned index = tail & *ring.sq_mask;
      io_uring_sqe* sqe = &ring.sqes[index];
      std::memset(sqe, 0, sizeof(*sqe));
      sqe->opcode = chunk.request.op == Op::kRead ? IORING_OP_READ : IORING_OP_WRITE;
      sqe->fd = chunk.request.fd;
      sqe->addr = reinterpret_cast<uint64_t>(chunk.request.buffer);
      sqe->len = static_cast<uint32_t>(chunk.request.nbytes);
      sqe->off = chunk.request.offset;
      sqe->user_data = slot;
      ring.sq_array[index] = index;
      __atomic_store_n(ring.sq_tail, tail + 1, __ATOMIC_RELEASE);
      slots[slot] = std::move(chunk);
      ++to_submit;
    }
    const unsigned in_flight = ring.depth - static_cast<unsigned>(free_slots.size());
    if (in_flight == 0) return;  // pop() returned false while blocking: stopping with an empty queue
    const long rc = syscall(__NR_io_uring_enter, ring.fd, to_submit, 1, IORING_ENTER_GETEVENTS, nullptr, 0);
    if (rc < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
      for (unsigned i = 0; i < ring.depth; ++i) {  // the ring is unusable: fail what it holds
        if (slots[i].batch == nullptr) continue;
        slots[i].batch->finish(errno, slots[i].index);
        slots[i].batch.reset();
        free_slots.push_back(i);
      }
      continue;
    }
    unsigned head = *ring.cq_head;
    while (head != __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE)) {
      const io_uring_cqe& cqe = ring.cqes[head & *ring.cq_mask];
      Chunk& done = slots[cqe.user_data];
      int error = cqe.res < 0 ? -cqe.res : 0;
      if (error == 0 && static_cast<uint64_t>(cqe.res) < done.request.nbytes) {
        Request rest = done.request;  // a short transfer: finish the remainder synchronously
        rest.buffer = static_cast<char*>(rest.buffer) + cqe.res;
        rest.nbytes -= cqe.res;
        rest.offset += cqe.res;
        error = transfer_blocking(rest);
      }
      done.batch->finish(error, done.index);
      done.batch.reset();
      free_slots.push_back(static_cast<unsigned>(cqe.user_data));
      ++head;
    }
    __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
  }
}

}  // namespace horizon_io
