// aoti_run: runs an early-exit model exported by eenet.runtime.package_engine (a .pt2 package
// compiled ahead of time by AOTInductor) from C++, as a C++ server does - no Python in the
// process - and checks it against the outputs that Engine(net, policy, mode="compact") gave
// in Python on the same inputs (examples/cpp/make_package.py writes both files).
//
//   aoti_run <loop.pt2> <cases.pt> [repeats]
//
// cases.pt is torch.save of {"cases": [{"inputs": [x, *row_inputs], "logits", "exit_index",
// "score"}, ...]}, read with torch::jit::pickle_load. For every case: the exit indices must be
// equal, the logits and scores within 1e-5 (absolute); the run is then timed (median of
// `repeats` calls, default 20, after 3 warm-up calls; informational). Prints one line per
// check and returns non-zero on any mismatch (1) or error (2).
//
// The ops: the package's generated code calls eenet::exit_score_write and eenet::compact_out
// by name through the dispatcher, so libeenet_ops.so must be loaded, and its ops
// registered, before the package runs. This program is linked through eenet::ops (the
// library with --no-as-needed, examples/cpp/README.md), which loads it before main(); the
// lookup below fails early, with a clear message, if it did not.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr double kTol = 1e-5;
int failures = 0;

void report(const std::string& what, bool ok, const std::string& detail) {
  std::cout << (ok ? "  ok        " : "  MISMATCH  ") << what;
  if (!detail.empty()) std::cout << " (" << detail << ")";
  std::cout << "\n";
  if (!ok) ++failures;
}

std::string describe(const at::Tensor& t) {
  std::ostringstream o;
  o << t.scalar_type() << t.sizes();
  return o.str();
}

bool same_kind(const at::Tensor& got, const at::Tensor& want, std::string& detail) {
  if (got.sizes() == want.sizes() && got.scalar_type() == want.scalar_type()) return true;
  detail = "got " + describe(got) + ", want " + describe(want);
  return false;
}

void check_close(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  std::string detail;
  bool ok = same_kind(got, want, detail);
  if (ok && want.numel() > 0) {
    const double diff = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
    ok = diff <= kTol;  // false for NaN too
    std::ostringstream o;
    o << "max |diff| " << std::scientific << std::setprecision(2) << diff;
    detail = o.str();
  }
  report(what, ok, detail);
}

void check_equal(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  std::string detail;
  bool ok = same_kind(got, want, detail);
  if (ok) {
    ok = at::equal(got, want);
    std::ostringstream o;
    const at::Tensor counts = at::bincount(want);
    o << "expected rows per exit [";
    for (int64_t i = 0; i < counts.numel(); ++i) o << (i ? ", " : "") << counts[i].item<int64_t>();
    o << "]";
    if (!ok) o << ", " << at::ne(got, want).sum().item<int64_t>() << " rows differ";
    detail = o.str();
  }
  report(what, ok, detail);
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

at::Tensor field(const c10::Dict<c10::IValue, c10::IValue>& d, const std::string& key) {
  if (!d.contains(key)) throw std::runtime_error("case without '" + key + "'");
  return d.at(key).toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " <loop.pt2> <cases.pt> [repeats]\n";
    return 2;
  }
  const std::string package = argv[1], cases_path = argv[2];
  const int repeats = argc == 4 ? std::max(1, std::stoi(argv[3])) : 20;
  try {
    // the ops the package calls must be registered first (see the top of this file)
    c10::Dispatcher::singleton().findSchemaOrThrow("eenet::exit_score_write", "");
    c10::Dispatcher::singleton().findSchemaOrThrow("eenet::compact_out", "");
    // no autograd state for the outputs: how a server runs inference
    c10::InferenceMode inference;

    const c10::IValue loaded = torch::jit::pickle_load(read_file(cases_path));
    const c10::List<c10::IValue> cases = loaded.toGenericDict().at("cases").toList();

    // extracts the package into a temporary directory and loads its compiled model
    torch::inductor::AOTIModelPackageLoader loader(package);
    std::cout << "aoti_run: loaded " << package << " (" << cases.size() << " cases, "
              << at::get_num_threads() << " threads)\n";

    for (const c10::IValue& entry : cases) {
      const auto c = entry.toGenericDict();
      std::vector<at::Tensor> inputs;
      for (const c10::IValue& t : c.at("inputs").toListRef()) inputs.push_back(t.toTensor());
      const int64_t rows = inputs.at(0).size(0);
      std::cout << "batch of " << rows << " rows, x " << describe(inputs[0]) << "\n";

      const std::vector<at::Tensor> out = loader.run(inputs);
      if (out.size() != 3) {
        report("outputs [logits, exit_index, score]", false,
               "got " + std::to_string(out.size()) + " outputs");
        continue;
      }
      check_equal("exit_index", out[1], field(c, "exit_index"));
      check_close("logits", out[0], field(c, "logits"));
      check_close("score", out[2], field(c, "score"));

      // timing (informational): median of `repeats` calls after a warm-up
      for (int i = 0; i < 3; ++i) loader.run(inputs);
      std::vector<double> us;
      for (int i = 0; i < repeats; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        loader.run(inputs);
        const auto t1 = std::chrono::steady_clock::now();
        us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
      std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
      std::cout << "  time      median " << std::fixed << std::setprecision(1)
                << us[us.size() / 2] << " us per run of " << rows << " rows (" << repeats
                << " runs)\n" << std::defaultfloat;
    }
  } catch (const c10::Error& e) {
    std::cerr << "aoti_run: ERROR: " << e.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "aoti_run: ERROR: " << e.what() << "\n";
    return 2;
  }
  if (failures > 0) {
    std::cout << "aoti_run: " << failures << " mismatch(es)\n";
    return 1;
  }
  std::cout << "aoti_run: OK\n";
  return 0;
}
