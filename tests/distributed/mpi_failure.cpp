// Run under mpirun -np 2: rank 1 gets a bad E batch. Its error must end the
// whole job (non-zero exit, message printed) instead of leaving rank 0
// waiting in the first all-reduce.
#include "../support/tiny_models.hpp"

#include <entropy_probe/dist/mpi.hpp>
#include <entropy_probe/probe/probe.hpp>

using namespace entropy_probe;

int main(int argc, char** argv) {
  MpiSession mpi(argc, argv);
  return run_or_abort([&] {
    MpiCommunicator comm;
    auto model = ep_test::tiny_gpt2<double>(1);
    TokenBatch E = ep_test::random_batch(4, 2, 8, 11, 1), U = ep_test::random_batch(4, 2, 8, 11, 2);
    if (comm.rank() == 1) E.sequences[5] = 999;  // outside the vocabulary, on one rank only
    OfflineEntropyProbe probe(model, ProbeConfig{}, &comm);
    auto st = ep_test::random_adam_state(probe.registry(), 1);
    probe.run(E, U, st);
    return 0;
  });
}
