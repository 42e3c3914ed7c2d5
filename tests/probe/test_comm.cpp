// The communicator seam for parameter buffers (comm/comm.hpp,
// allreduce_param_buffer in probe/components.hpp): a buffer's flat storage
// leaves as one message, reduced in place; a host backend's through allreduce_sum, a device
// backend's through allreduce_sum_device, whose default stages it through
// the host (one copy each way) and which a device-aware communicator (NCCL)
// overrides. EmulatedDeviceBackend stands in for a device backend.
#include "../cuda/emulated_backend.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/probe/components.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

using namespace entropy_probe;
using Emulated = ep_parity::EmulatedDeviceBackend;

namespace {

// Two pretend ranks holding the same values, so a sum doubles every value.
// Records the size and the address of every host message.
class Doubling : public Communicator {
 public:
  int rank() const override { return 0; }
  int world() const override { return 2; }
  void allreduce_sum(std::span<double> v) override {
    host_messages.push_back(v.size());
    host_data.push_back(v.data());
    for (double& x : v) x *= 2;
  }
  using Communicator::allreduce_sum;
  void broadcast(std::span<std::int64_t>, int) override {}
  std::vector<std::size_t> host_messages;
  std::vector<const double*> host_data;
};

// As Doubling, and sums device memory where it lies, as NcclCommunicator
// does (the emulated device's memory is host memory, so it can here).
class DeviceDoubling final : public Doubling {
 public:
  void allreduce_sum_device(const DeviceDoubles& v) override {
    device_messages.push_back(v.size);
    device_data.push_back(v.data);
    backends.emplace_back(v.backend);
    for (std::size_t i = 0; i < v.size; ++i) v.data[i] *= 2;
  }
  std::vector<std::size_t> device_messages;
  std::vector<const double*> device_data;
  std::vector<std::string> backends;
};

template <class B>
std::vector<double> flatten(const ParamBuffer<double, B>& buf) {
  std::vector<double> out;
  for (index_t i = 0; i < buf.size(); ++i)
    if (const auto* t = buf.entry(i)) {
      const auto h = t->to_host();
      out.insert(out.end(), h.begin(), h.end());
    }
  return out;
}

std::vector<double> doubled(std::vector<double> v) {
  for (double& x : v) x *= 2;
  return v;
}

}  // namespace

TEST_CASE("comm: a host backend's parameter buffer is all-reduced as one host message", "[comm]") {
  auto model = ep_test::tiny_gpt2<double>(3, true);
  auto reg = Registry<double>::build(model);
  auto buf = params_to_buffer<double>(reg);
  const std::vector<double> before = flatten(buf);
  DeviceDoubling comm;
  allreduce_param_buffer(comm, buf);
  // One call on the flat storage itself: every parameter plus its slot's padding.
  CHECK(comm.host_messages == std::vector<std::size_t>{buf.flat().size()});
  CHECK(comm.host_data == std::vector<const double*>{buf.flat().data()});
  CHECK(buf.flat().size() >= static_cast<std::size_t>(reg.numel()));
  CHECK(comm.device_messages.empty());
  CHECK(flatten(buf) == doubled(before));  // every entry in its place
}

TEST_CASE("comm: a device backend's parameter buffer goes through allreduce_sum_device as one message", "[comm]") {
  nn::Gpt2LMHeadModel<double, Emulated> model(ep_test::tiny_gpt2_config(), ep_test::tiny_lora(true), 3);
  auto reg = Registry<double, Emulated>::build(model);
  const auto n = zeros_like_params<double>(reg).flat().size();  // every slot with its padding

  SECTION("a device-aware communicator reduces it in place") {
    auto buf = params_to_buffer<double>(reg);
    const std::vector<double> before = flatten(buf);
    DeviceDoubling comm;
    allreduce_param_buffer(comm, buf);
    CHECK(comm.device_messages == std::vector<std::size_t>{n});
    CHECK(comm.device_data == std::vector<const double*>{buf.flat().data()});  // in place
    CHECK(comm.backends == std::vector<std::string>{"emulated"});
    CHECK(comm.host_messages.empty());
    CHECK(flatten(buf) == doubled(before));
  }
  SECTION("the default stages it through the host: one host message") {
    auto buf = params_to_buffer<double>(reg);
    const std::vector<double> before = flatten(buf);
    Doubling comm;
    allreduce_param_buffer(comm, buf);
    CHECK(comm.host_messages == std::vector<std::size_t>{n});
    CHECK(flatten(buf) == doubled(before));
  }
  SECTION("absent entries travel as zeros and stay absent") {
    auto buf = params_to_buffer<double>(reg);
    const ParamId gone = reg.entry(1).id;
    const auto gone_numel = static_cast<std::size_t>(reg.entry(1).param->value.numel());
    buf.erase(gone);
    const std::vector<double> before = flatten(buf);
    DeviceDoubling comm;
    allreduce_param_buffer(comm, buf);
    CHECK(comm.device_messages == std::vector<std::size_t>{n});
    CHECK(buf.find(gone) == nullptr);
    CHECK(flatten(buf) == doubled(before));
    const auto slot = buf.flat().subspan(static_cast<std::size_t>(buf.offset(1)), gone_numel);
    CHECK(std::vector<double>(slot.begin(), slot.end()) == std::vector<double>(gone_numel, 0.0));
  }
}

TEST_CASE("comm: the sums of both phases on a device backend reach the device hook", "[comm]") {
  nn::Gpt2LMHeadModel<double, Emulated> model(ep_test::tiny_gpt2_config(), ep_test::tiny_lora(true), 3);
  auto reg = Registry<double, Emulated>::build(model);
  const TokenBatch E = ep_test::random_batch(4, 2, 8, 11, 5);
  DeviceDoubling comm;
  ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{}, comm);
  (void)c.accumulate_sum_X(E);
  (void)c.accumulate_sum_Y(E);
  // One device message per phase holding every buffer, and nothing else: the
  // nonzero-gradient check counts on the reduced sum.
  CHECK(comm.device_messages == std::vector<std::size_t>(2, zeros_like_params<double>(reg).flat().size()));
  CHECK(comm.host_messages.empty());
}
