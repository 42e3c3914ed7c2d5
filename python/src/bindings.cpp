// entropy_probe._core: the library for the Python package (python/entropy_probe/).
//
// The probe runs through the code of `entropy-probe run` (examples/cli/):
// parse_run_args reads the options (the package passes Checkpoint.run's
// keyword options as the command's arguments, so names, defaults and checks
// are the command's), probe_loaded runs the probe and result_json makes the
// result, so the package and the command give the same numbers and keys.
//
// Library exceptions become entropy_probe.InputError / UsageError (both
// ValueError) and entropy_probe.Error (RuntimeError) with the library's
// message. The log sink forwards to Python's logger "entropy_probe"; every
// call that may log releases the GIL, and the sink takes it back.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>
#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/io/result_json.hpp>
#include <entropy_probe/sample/sampling.hpp>

#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "loaded.hpp"
#include "run_command.hpp"

namespace nb = nanobind;
namespace ep = entropy_probe;

namespace {

using ep_py::Batch;

#if defined(ENTROPY_PROBE_PYTHON_CUDA)
constexpr bool kHasCuda = true;  // cuda.cu is linked in
#else
constexpr bool kHasCuda = false;
#endif

PyObject* g_error = nullptr;        // entropy_probe.Error(RuntimeError)
PyObject* g_input_error = nullptr;  // entropy_probe.InputError(Error, ValueError)
PyObject* g_usage_error = nullptr;  // entropy_probe.UsageError(Error, ValueError)

// ---- batches -----------------------------------------------------------------------------------

using I64Array = nb::ndarray<const std::int64_t, nb::c_contig, nb::device::cpu>;
using F64Array = nb::ndarray<const double, nb::c_contig, nb::device::cpu>;

std::string shape_of(std::size_t ndim, const std::int64_t* shape) {
  std::string s = "[";
  for (std::size_t d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + "]";
}

template <class A>
void check_shape(const std::string& name, const char* key, const A& a, const std::vector<ep::index_t>& want,
                 const char* dims) {
  bool ok = a.ndim() == want.size();
  for (std::size_t d = 0; ok && d < want.size(); ++d) ok = static_cast<ep::index_t>(a.shape(d)) == want[d];
  if (!ok) {
    std::vector<std::int64_t> got(a.ndim());
    for (std::size_t d = 0; d < a.ndim(); ++d) got[d] = static_cast<std::int64_t>(a.shape(d));
    ep::fail<ep::InputError>("{}: '{}' has shape {}, expected {} {}", name, key, shape_of(got.size(), got.data()), dims,
                             shape_of(want.size(), want.data()));
  }
}

// "[b,g,t]" of flat index k, as the batch-file reader writes it.
template <class A>
std::string index_of(const A& a, std::size_t k) {
  ep::Shape shape(a.ndim());
  for (std::size_t d = 0; d < a.ndim(); ++d) shape[d] = static_cast<ep::index_t>(a.shape(d));
  return ep::hf::detail::index_str(shape, static_cast<ep::index_t>(k));
}

std::vector<std::int32_t> int32s(const std::string& name, const char* key, const I64Array& a) {
  std::vector<std::int32_t> out(a.size());
  for (std::size_t k = 0; k < a.size(); ++k) {
    const std::int64_t x = a.data()[k];
    if (x < std::numeric_limits<std::int32_t>::min() || x > std::numeric_limits<std::int32_t>::max())
      ep::fail<ep::InputError>("{}: {}{} = {} is outside the int32 range", name, key, index_of(a, k), x);
    out[k] = static_cast<std::int32_t>(x);
  }
  return out;
}

std::vector<double> doubles(const F64Array& a) { return std::vector<double>(a.data(), a.data() + a.size()); }

// The batch from arrays (the Python side has already made them int64 / float64
// and contiguous, after checking their kinds); shapes are checked here, values
// by TokenBatch::validate when a model runs on it.
Batch batch_from_arrays(const std::string& name, const I64Array& sequences, const I64Array& attention_mask,
                        const I64Array& prompt_lens, const F64Array& advantages,
                        const std::optional<F64Array>& max_lengths, const std::optional<F64Array>& rewards,
                        const std::optional<I64Array>& position_ids) {
  Batch out{{}, name};
  ep::TokenBatch& b = out.batch;
  if (sequences.ndim() != 3)
    ep::fail<ep::InputError>("{}: 'sequences' has {} dimensions, expected 3 [B, G, T]", name, sequences.ndim());
  b.B = static_cast<ep::index_t>(sequences.shape(0));
  b.G = static_cast<ep::index_t>(sequences.shape(1));
  b.T = static_cast<ep::index_t>(sequences.shape(2));
  const std::vector<ep::index_t> bgt{b.B, b.G, b.T}, bg{b.B, b.G}, bs{b.B};
  check_shape(name, "attention_mask", attention_mask, bgt, "[B, G, T] =");
  check_shape(name, "prompt_lens", prompt_lens, bs, "[B] =");
  check_shape(name, "advantages", advantages, bg, "[B, G] =");
  b.sequences = int32s(name, "sequences", sequences);
  b.attention_mask.resize(attention_mask.size());
  for (std::size_t k = 0; k < attention_mask.size(); ++k) {
    const std::int64_t m = attention_mask.data()[k];
    if (m != 0 && m != 1)
      ep::fail<ep::InputError>("{}: attention_mask{} = {} is not 0 or 1", name, index_of(attention_mask, k), m);
    b.attention_mask[k] = static_cast<std::uint8_t>(m);
  }
  b.prompt_lens = int32s(name, "prompt_lens", prompt_lens);
  b.advantages = doubles(advantages);
  if (max_lengths) {
    check_shape(name, "max_lengths", *max_lengths, bs, "[B] =");
    b.max_lengths = doubles(*max_lengths);
  }
  if (rewards) {
    check_shape(name, "rewards", *rewards, bg, "[B, G] =");
    b.rewards = doubles(*rewards);
  }
  if (position_ids) {
    check_shape(name, "position_ids", *position_ids, bgt, "[B, G, T] =");
    b.position_ids = int32s(name, "position_ids", *position_ids);
  }
  return out;
}

// A numpy array owning a copy of `v`, of shape `shape`.
template <class Out, class In>
nb::object numpy_array(const std::vector<In>& v, std::vector<std::size_t> shape) {
  auto* data = new std::vector<Out>(v.begin(), v.end());
  nb::capsule owner(data, [](void* p) noexcept { delete static_cast<std::vector<Out>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, Out>(data->data(), shape.size(), shape.data(), owner));
}

// The batch-file keys (integers as int64, floats as float64, as save_batch writes them).
nb::dict batch_arrays(const Batch& self) {
  const ep::TokenBatch& b = self.batch;
  const auto B = static_cast<std::size_t>(b.B), G = static_cast<std::size_t>(b.G), T = static_cast<std::size_t>(b.T);
  nb::dict d;
  d["sequences"] = numpy_array<std::int64_t>(b.sequences, {B, G, T});
  d["attention_mask"] = numpy_array<std::int64_t>(b.attention_mask, {B, G, T});
  d["prompt_lens"] = numpy_array<std::int64_t>(b.prompt_lens, {B});
  d["advantages"] = numpy_array<double>(b.advantages, {B, G});
  if (b.max_lengths) d["max_lengths"] = numpy_array<double>(*b.max_lengths, {B});
  if (b.rewards) d["rewards"] = numpy_array<double>(*b.rewards, {B, G});
  if (b.position_ids) d["position_ids"] = numpy_array<std::int64_t>(*b.position_ids, {B, G, T});
  return d;
}

// ---- checkpoints -------------------------------------------------------------------------------

class Checkpoint {
 public:
  Checkpoint(const std::string& path, const std::string& dtype, const std::string& device)
      : path_(path), dtype_(dtype), device_(device) {
    if (dtype != "f32" && dtype != "f64")
      ep::fail<ep::UsageError>("Checkpoint: dtype must be 'f32' or 'f64', got '{}'", dtype);
    if (device == "cuda") {
#if defined(ENTROPY_PROBE_PYTHON_CUDA)
      loaded_ = ep_py::load_on_cuda(path, dtype);
#else
      ep::fail<ep::UsageError>(
          "Checkpoint: device 'cuda': this build of the entropy_probe package has no CUDA support (it was "
          "built with ENTROPY_PROBE_CUDA=OFF, the default; on a machine with the CUDA toolkit, `pip install . "
          "-C cmake.define.ENTROPY_PROBE_CUDA=ON` builds one, see docs/python.md)");
#endif
    } else if (device == "cpu") {
      if (dtype == "f32")
        loaded_ = std::make_unique<ep_py::LoadedT<float, ep::CpuBackend>>(path, dtype);
      else
        loaded_ = std::make_unique<ep_py::LoadedT<double, ep::CpuBackend>>(path, dtype);
    } else {
      ep::fail<ep::UsageError>("Checkpoint: device must be 'cpu' or 'cuda', got '{}'", device);
    }
  }
  // `args`: the arguments of `entropy-probe run` (CHECKPOINT_DIR --e-batch NAME --u-batch NAME [OPTIONS]).
  std::string run(const Batch& E, const Batch& U, const std::vector<std::string>& args) {
    return loaded_->run(E, U, ep_run::parse_run_args(args));
  }
  Batch sample(const std::vector<std::vector<std::int32_t>>& prompts, const ep::SamplingConfig& c) {
    return loaded_->sample(prompts, c);
  }
  const std::string& path() const { return path_; }
  const std::string& dtype() const { return dtype_; }
  const std::string& device() const { return device_; }
  std::string model_type() const { return loaded_->model_type(); }
  ep::index_t vocab_size() { return loaded_->vocab_size(); }

 private:
  std::string path_, dtype_, device_;
  std::unique_ptr<ep_py::Loaded> loaded_;
};

// ---- logging -----------------------------------------------------------------------------------

int python_level(ep::LogLevel l) {
  switch (l) {
    case ep::LogLevel::debug:
      return 10;
    case ep::LogLevel::info:
      return 20;
    case ep::LogLevel::warning:
      return 30;
    default:
      return 40;
  }
}

void forward_to_python_logging(ep::LogLevel level, std::string_view msg) {
  nb::gil_scoped_acquire gil;
  try {
    nb::module_::import_("logging")
        .attr("getLogger")("entropy_probe")
        .attr("log")(python_level(level), nb::str(msg.data(), msg.size()));
  } catch (nb::python_error& e) {
    e.discard_as_unraisable("entropy_probe log sink");  // a broken handler must not fail the probe
  }
}

// The library's threshold from Python's (logging.DEBUG = 10, INFO = 20, ...),
// so messages Python would drop are not even formatted.
void set_level_from_python(int py_level) {
  ep::set_log_level(py_level <= 10   ? ep::LogLevel::debug
                    : py_level <= 20 ? ep::LogLevel::info
                    : py_level <= 30 ? ep::LogLevel::warning
                    : py_level <= 40 ? ep::LogLevel::error
                                     : ep::LogLevel::off);
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "entropy_probe's C++ library (use the entropy_probe package, not this module)";

  g_error = PyErr_NewException("entropy_probe.Error", PyExc_RuntimeError, nullptr);
  nb::object input_bases = nb::make_tuple(nb::handle(g_error), nb::handle(PyExc_ValueError));
  g_input_error = PyErr_NewException("entropy_probe.InputError", input_bases.ptr(), nullptr);
  g_usage_error = PyErr_NewException("entropy_probe.UsageError", input_bases.ptr(), nullptr);
  m.attr("Error") = nb::handle(g_error);
  m.attr("InputError") = nb::handle(g_input_error);
  m.attr("UsageError") = nb::handle(g_usage_error);
  // Most derived first; anything else falls through to nanobind's own translation.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const ep::InputError& e) {
      PyErr_SetString(g_input_error, e.what());
    } catch (const ep::UsageError& e) {
      PyErr_SetString(g_usage_error, e.what());
    } catch (const ep_cli::UsageFailure& e) {
      PyErr_SetString(g_usage_error, e.what());
    } catch (const ep::Error& e) {
      PyErr_SetString(g_error, e.what());
    } catch (const ep_run::DeviceUnavailable& e) {  // device "cuda" and no GPU
      PyErr_SetString(g_error, e.what());
    }
  });

  m.attr("_has_cuda") = kHasCuda;
  ep::set_log_sink(forward_to_python_logging);
  m.def("_set_log_level", &set_level_from_python);

  nb::class_<Batch>(m, "_Batch")
      .def_static(
          "load",
          [](const std::string& path) {
            return Batch{ep::hf::load_batch(path), path};
          },
          nb::call_guard<nb::gil_scoped_release>())
      .def_static("from_arrays", &batch_from_arrays, nb::arg("name"), nb::arg("sequences"), nb::arg("attention_mask"),
                  nb::arg("prompt_lens"), nb::arg("advantages"), nb::arg("max_lengths").none(),
                  nb::arg("rewards").none(), nb::arg("position_ids").none())
      .def(
          "save", [](const Batch& b, const std::string& path) { ep::hf::save_batch(b.batch, path); },
          nb::call_guard<nb::gil_scoped_release>())
      .def("arrays", &batch_arrays)
      .def_prop_ro("name", [](const Batch& b) { return b.name; });

  nb::class_<Checkpoint>(m, "_Checkpoint")
      .def(nb::init<const std::string&, const std::string&, const std::string&>(),
           nb::call_guard<nb::gil_scoped_release>())
      .def("run", &Checkpoint::run, nb::call_guard<nb::gil_scoped_release>())
      .def(
          "sample",
          [](Checkpoint& c, const std::vector<std::vector<std::int32_t>>& prompts, ep::index_t G,
             ep::index_t max_new_tokens, double temperature, ep::index_t top_k, double top_p,
             std::vector<std::int32_t> stop_tokens, std::uint64_t seed) {
            return c.sample(prompts, {G, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed});
          },
          nb::arg("prompts"), nb::arg("G"), nb::arg("max_new_tokens"), nb::arg("temperature"), nb::arg("top_k"),
          nb::arg("top_p"), nb::arg("stop_tokens"), nb::arg("seed"), nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("path", &Checkpoint::path)
      .def_prop_ro("dtype", &Checkpoint::dtype)
      .def_prop_ro("device", &Checkpoint::device)
      .def_prop_ro("model_type", &Checkpoint::model_type)
      .def_prop_ro("vocab_size", &Checkpoint::vocab_size);

  m.def(
      "grpo_advantages",
      [](const F64Array& rewards, bool scale_by_std, double eps) {
        if (rewards.ndim() != 2)
          ep::fail<ep::UsageError>("grpo_advantages: rewards must be [B, G], got {} dimensions", rewards.ndim());
        const auto B = static_cast<ep::index_t>(rewards.shape(0)), G = static_cast<ep::index_t>(rewards.shape(1));
        const std::vector<double> adv = ep::grpo_advantages(doubles(rewards), B, G, scale_by_std, eps);
        return numpy_array<double>(adv, {rewards.shape(0), rewards.shape(1)});
      },
      nb::arg("rewards"), nb::arg("scale_by_std") = false, nb::arg("eps") = 1e-6);
}
