// The communicator seam: the probe reduces sums and counts through this, so a
// distributed implementation (MPI, NCCL) slots in without touching the math.
// Prompts are sharded r::world by rank (DESIGN.md section 3, 'Distributed').
#pragma once

#include "entropy_probe/core/config.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace entropy_probe {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // In-place sum over ranks.
  virtual void allreduce_sum(std::span<double> values) = 0;
  // Rank `root`'s values to every rank (sampled prompt indices, seeds).
  virtual void broadcast(std::span<std::int64_t> values, int root) = 0;

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
