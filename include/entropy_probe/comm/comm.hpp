// The communicator seam: the probe reduces sums and counts through this, so a
// distributed implementation (MPI, NCCL) slots in without touching the math.
// Prompts are sharded r::world by rank (docs/math.md, (j) Distributed).
//
// Host values (counts, per-prompt statistics, broadcasts) go through
// allreduce_sum / broadcast. A parameter buffer of a device backend goes
// through allreduce_sum_device as one contiguous buffer in device memory: the
// default stages it through the host, a device-aware communicator (NCCL,
// dist/nccl.hpp) reduces it where it lies.
#pragma once

#include "entropy_probe/core/config.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace entropy_probe {

// A contiguous buffer of doubles in a device backend's memory, with that
// backend's copies to and from the host, so that a communicator can stage it
// without knowing the backend. `backend` is the backend's name (B::name), for
// a communicator that can reduce only some backends' memory in place.
struct DeviceDoubles {
  double* data = nullptr;
  std::size_t size = 0;
  const char* backend = "";
  void (*download)(double* host, const double* device, std::size_t n) = nullptr;  // returns when the copy is done
  void (*upload)(double* device, const double* host, std::size_t n) = nullptr;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // In-place sum over ranks.
  virtual void allreduce_sum(std::span<double> values) = 0;
  // Rank `root`'s values to every rank (sampled prompt indices, seeds).
  virtual void broadcast(std::span<std::int64_t> values, int root) = 0;
  // In-place sum over ranks of a buffer in device memory. The default copies
  // it to the host, calls allreduce_sum and copies it back (one message).
  virtual void allreduce_sum_device(const DeviceDoubles& values) {
    if (values.size == 0) return;
    std::vector<double> host(values.size);
    values.download(host.data(), values.data, values.size);
    allreduce_sum(std::span<double>(host));
    values.upload(values.data, host.data(), values.size);
  }

  // The prompt indices this rank owns: r, r + world, r + 2 world, ...
  std::vector<index_t> shard(index_t n) const {
    std::vector<index_t> idx;
    for (index_t i = rank(); i < n; i += world()) idx.push_back(i);
    return idx;
  }
  double allreduce_sum(double v) {
    allreduce_sum(std::span<double>(&v, 1));
    return v;
  }
};

// One process: every reduction is the identity.
class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world() const override { return 1; }
  void allreduce_sum(std::span<double>) override {}
  void broadcast(std::span<std::int64_t>, int) override {}
  using Communicator::allreduce_sum;
};

}  // namespace entropy_probe
