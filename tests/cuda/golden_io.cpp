// Loading the golden checkpoints through entropy_probe::hf for the parity
// tests, compiled by the host compiler (see checkpoint_parity.hpp).
#include "checkpoint_parity.hpp"

#include <entropy_probe/io/hf.hpp>

namespace ep_parity {

template <class T>
GoldenModel<T> golden_model(const std::string& dir) {
  return hf::load_model<T>(dir);
}
template <class T>
AdamState<T> golden_adam_state(const std::string& path, const Registry<T>& registry) {
  return hf::load_adam_state(path, registry);
}
TokenBatch golden_batch(const std::string& path) { return hf::load_batch(path); }

template GoldenModel<double> golden_model<double>(const std::string&);
template GoldenModel<float> golden_model<float>(const std::string&);
template AdamState<double> golden_adam_state<double>(const std::string&, const Registry<double>&);
template AdamState<float> golden_adam_state<float>(const std::string&, const Registry<float>&);

}  // namespace ep_parity
