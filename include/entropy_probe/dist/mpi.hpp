// The communicator seam on Open MPI (link entropy_probe::mpi). Prompts are
// sharded r::world by rank; each parameter buffer is all-reduced as one
// contiguous message (ProbeComponents::allreduce), counts and per-prompt
// statistics as double vectors.
//
// A rank that throws must not leave the others waiting in a collective:
// run_or_abort() turns an exception on any rank into MPI_Abort, which ends
// every rank of the job with the error printed once.
#pragma once

#include "entropy_probe/comm/comm.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/core/log.hpp"

#include <mpi.h>

#include <cstdio>
#include <exception>
#include <span>
#include <vector>

namespace entropy_probe {

namespace detail {
inline void mpi_check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail<Error>("{} failed: {}", call, std::string(msg, static_cast<std::size_t>(len)));
}
}  // namespace detail

// MPI_Init / MPI_Finalize for the lifetime of a program's main().
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      detail::mpi_check(MPI_Init(&argc, &argv), "MPI_Init");
      owner_ = true;
    }
  }
  ~MpiSession() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owner_ && !finalized) MPI_Finalize();
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

 private:
  bool owner_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    detail::mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(comm_, &world_), "MPI_Comm_size");
  }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  void allreduce_sum(std::span<double> values) override {
    if (values.empty()) return;
    detail::mpi_check(
        MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), MPI_DOUBLE, MPI_SUM, comm_),
        "MPI_Allreduce");
    bytes_reduced_ += values.size() * sizeof(double);
    ++allreduce_calls_;
  }
  using Communicator::allreduce_sum;
  void broadcast(std::span<std::int64_t> values, int root) override {
    if (values.empty()) return;
    detail::mpi_check(MPI_Bcast(values.data(), static_cast<int>(values.size()), MPI_INT64_T, root, comm_), "MPI_Bcast");
  }
  void barrier() { detail::mpi_check(MPI_Barrier(comm_), "MPI_Barrier"); }

  // Traffic counters, for the benchmark's message-size accounting.
  std::size_t bytes_reduced() const { return bytes_reduced_; }
  std::size_t allreduce_calls() const { return allreduce_calls_; }

 private:
  MPI_Comm comm_;
  int rank_ = 0, world_ = 1;
  std::size_t bytes_reduced_ = 0, allreduce_calls_ = 0;
};

// Runs fn(); an exception on any rank prints "[rank r] error: ..." and
// aborts the whole job with `exit_code`, so no rank hangs in a collective.
template <class F>
int run_or_abort(F&& fn, int exit_code = 1) {
  try {
    return fn();
  } catch (const std::exception& e) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    std::fprintf(stderr, "[rank %d] error: %s\n", rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    return exit_code;
  }
}

}  // namespace entropy_probe
