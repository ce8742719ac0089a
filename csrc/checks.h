// Argument checks of the compiled layer, shared by every C++/CUDA kernel of the eenet ops.
// The Python layer's copy is eenet_kernels/checks.py; tests/test_bad_inputs.py holds both to
// the same exception type and message: "eenet.<op>: <argument> ...", with TypeError for
// dtypes, IndexError for out-of-range indices, ValueError otherwise. Checks run in the same
// order as there: metadata first (no data read), then values (CPU tensors only).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace eenet {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// A finite threshold with the 9 significant digits that round-trip a float32 ("%.9g", as
// the Python checks print it), so that a value just above NEVER_EXIT does not read "1".
inline std::string real_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

inline std::string layout_name(at::Layout l) {
  switch (l) {
    case at::kSparse: return "sparse_coo";
    case at::kSparseCsr: return "sparse_csr";
    case at::kSparseCsc: return "sparse_csc";
    case at::kSparseBsr: return "sparse_bsr";
    case at::kSparseBsc: return "sparse_bsc";
    case at::kMkldnn: return "_mkldnn";
    case at::kJagged: return "jagged";
    default: return "strided";
  }
}

inline void check_dense(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "eenet.", op, ": ", name,
                    " must be a dense (strided) tensor, got layout ", layout_name(t.layout()));
  TORCH_CHECK_VALUE(!t.is_quantized(), "eenet.", op, ": ", name,
                    " must be a dense (strided) tensor, got a quantized tensor");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  check_dense(op, name, t);
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  std::string names;
  for (auto a : allowed) names += (names.empty() ? "" : ", ") + dtype_name(a);
  TORCH_CHECK_TYPE(false, "eenet.", op, ": ", name, " must have dtype in (", names, "), got ",
                   dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Device& device, const char* ref = "feats") {
  TORCH_CHECK_VALUE(t.device() == device, "eenet.", op, ": ", name, " is on ", t.device(),
                    " but ", ref, " is on ", device, "; all tensors must share one device");
}

inline bool is_policy(const std::string& p) {
  return p == "max_prob" || p == "entropy" || p == "patience" || p == "eenet";
}

// Checks shared by exit_score and exit_score_write (metadata only, no host sync).
inline void check_exit_score_args(const char* op, const at::Tensor& feats,
                                  const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::string& policy, double threshold,
                                  const std::optional<at::Tensor>& prev_scores,
                                  const std::optional<at::Tensor>& prev_preds,
                                  const std::optional<at::Tensor>& sched_weight, bool use_vote,
                                  double sched_bias) {
  TORCH_CHECK_VALUE(is_policy(policy), "eenet.", op,
                    ": policy must be one of ('max_prob', 'entropy', 'patience', 'eenet'), got '",
                    policy, "'");
  check_dtype(op, "feats", feats, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(feats.dim() == 2 || feats.dim() == 3, "eenet.", op,
                    ": feats must be 2-D (N, D) or 3-D (N, D, S), got a ", feats.dim(),
                    "-D tensor of shape ", shape_str(feats.sizes()));
  const int64_t n = feats.size(0), d = feats.size(1);
  TORCH_CHECK_VALUE(d >= 1, "eenet.", op, ": feats must have D >= 1 features, got D = 0");
  TORCH_CHECK_VALUE(feats.dim() == 2 || feats.size(2) >= 1, "eenet.", op,
                    ": feats must have S >= 1 positions to pool over, got S = 0");
  const auto device = feats.device();
  check_same_device(op, "weight", weight, device);
  check_dtype(op, "weight", weight, {feats.scalar_type()});
  TORCH_CHECK_VALUE(weight.dim() == 2, "eenet.", op, ": weight must be 2-D (C, D), got a ",
                    weight.dim(), "-D tensor of shape ", shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(1) == d, "eenet.", op, ": weight must have shape (C, ", d,
                    ") to match feats' D = ", d, ", got ", shape_str(weight.sizes()));
  const int64_t c = weight.size(0);
  TORCH_CHECK_VALUE(c >= 2, "eenet.", op, ": weight must have C >= 2 classes, got C = ", c);
  if (bias) {
    check_same_device(op, "bias", *bias, device);
    check_dtype(op, "bias", *bias, {feats.scalar_type()});
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c, "eenet.", op,
                      ": bias must have shape (", c, ",) to match weight, got ",
                      shape_str(bias->sizes()));
  }
  TORCH_CHECK_VALUE(std::isfinite(threshold), "eenet.", op, ": threshold must be finite, got ",
                    threshold);
  if (policy == "patience") {
    TORCH_CHECK_VALUE(threshold >= 0, "eenet.", op,
                      ": threshold must be >= 0 for policy 'patience', got ",
                      real_str(threshold));
  } else {
    // 1 + 2^-23: NEVER_EXIT of eenet_kernels/checks.py, the threshold of a closed exit
    TORCH_CHECK_VALUE(threshold >= 0 && threshold <= 1.0 + 0x1p-23, "eenet.", op,
                      ": threshold must lie in [0, 1] (or be NEVER_EXIT, a closed exit) for "
                      "policy '", policy, "', got ", real_str(threshold));
  }
  TORCH_CHECK_VALUE(!use_vote || policy == "eenet", "eenet.", op,
                    ": use_vote applies only to policy 'eenet', got policy '", policy, "'");
  int64_t history = -1;
  if (policy == "eenet") {
    TORCH_CHECK_VALUE(prev_scores.has_value(), "eenet.", op,
                      ": prev_scores is required for policy 'eenet' (shape (N, k), k earlier "
                      "exits)");
    check_same_device(op, "prev_scores", *prev_scores, device);
    check_dtype(op, "prev_scores", *prev_scores, {at::kFloat});
    TORCH_CHECK_VALUE(prev_scores->dim() == 2, "eenet.", op,
                      ": prev_scores must be 2-D (N, k), got a ", prev_scores->dim(),
                      "-D tensor of shape ", shape_str(prev_scores->sizes()));
    TORCH_CHECK_VALUE(prev_scores->size(0) == n, "eenet.", op, ": prev_scores must have N = ", n,
                      " rows to match feats, got ", prev_scores->size(0));
    history = prev_scores->size(1);
    TORCH_CHECK_VALUE(sched_weight.has_value(), "eenet.", op,
                      ": sched_weight is required for policy 'eenet'");
    check_same_device(op, "sched_weight", *sched_weight, device);
    check_dtype(op, "sched_weight", *sched_weight, {at::kFloat});
    const int64_t want = c + 2 + history + (use_vote ? 1 : 0);
    TORCH_CHECK_VALUE(sched_weight->dim() == 1 && sched_weight->size(0) == want, "eenet.", op,
                      ": sched_weight must have shape (", want, ",) = C + 2 + k",
                      use_vote ? " + 1 (vote)" : "", " with C = ", c, ", k = ", history,
                      ", got ", shape_str(sched_weight->sizes()));
    // (NaN fails too) the kernels add it in float32
    TORCH_CHECK_VALUE(std::abs(sched_bias) <= static_cast<double>(std::numeric_limits<float>::max()),
                      "eenet.", op, ": sched_bias must be finite in float32, got ", sched_bias);
  }
  if (policy == "patience" || use_vote) {
    TORCH_CHECK_VALUE(prev_preds.has_value(), "eenet.", op, ": prev_preds is required for ",
                      use_vote ? "the vote feature" : "policy patience",
                      " (shape (N, k), k earlier exits)");
    check_same_device(op, "prev_preds", *prev_preds, device);
    check_dtype(op, "prev_preds", *prev_preds, {at::kInt, at::kLong});
    TORCH_CHECK_VALUE(prev_preds->dim() == 2, "eenet.", op,
                      ": prev_preds must be 2-D (N, k), got a ", prev_preds->dim(),
                      "-D tensor of shape ", shape_str(prev_preds->sizes()));
    TORCH_CHECK_VALUE(prev_preds->size(0) == n, "eenet.", op, ": prev_preds must have N = ", n,
                      " rows to match feats, got ", prev_preds->size(0));
    TORCH_CHECK_VALUE(history < 0 || prev_preds->size(1) == history, "eenet.", op,
                      ": prev_preds must have k = ", history,
                      " columns to match prev_scores, got ", prev_preds->size(1));
  }
}

// Output-buffer checks of exit_score_write (metadata only).
inline bool byte_spans_overlap(const at::Tensor& a, const at::Tensor& b);

// `inputs`: the op's optional tensor arguments by name (bias, prev_scores, prev_preds,
// sched_weight), which no output may overlap, as feats, weight, row_index and the other
// outputs: the kernels read the inputs while they write the outputs.
inline void check_exit_write_args(
    const at::Tensor& feats, const at::Tensor& weight, const at::Tensor& row_index,
    int64_t exit_index, const at::Tensor& out_logits, const at::Tensor& out_score,
    const at::Tensor& out_exit,
    std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>> inputs) {
  const char* op = "exit_score_write";
  const auto device = feats.device();
  const int64_t n = feats.size(0), c = weight.size(0);
  check_same_device(op, "row_index", row_index, device);
  check_same_device(op, "out_logits", out_logits, device);
  check_same_device(op, "out_score", out_score, device);
  check_same_device(op, "out_exit", out_exit, device);
  check_dtype(op, "row_index", row_index, {at::kInt, at::kLong});
  TORCH_CHECK_VALUE(row_index.dim() == 1 && row_index.size(0) == n, "eenet.", op,
                    ": row_index must have shape (", n, ",) to match feats, got ",
                    shape_str(row_index.sizes()));
  check_dtype(op, "out_score", out_score, {at::kFloat});
  TORCH_CHECK_VALUE(out_score.dim() == 1, "eenet.", op,
                    ": out_score must be 1-D (N0,), got a ", out_score.dim(),
                    "-D tensor of shape ", shape_str(out_score.sizes()));
  const int64_t n0 = out_score.size(0);
  check_dtype(op, "out_exit", out_exit, {at::kInt, at::kLong});
  TORCH_CHECK_VALUE(out_exit.dim() == 1 && out_exit.size(0) == n0, "eenet.", op,
                    ": out_exit must have shape (", n0, ",) like out_score, got ",
                    shape_str(out_exit.sizes()));
  const int64_t top = out_exit.scalar_type() == at::kInt
                          ? std::numeric_limits<int32_t>::max()
                          : std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(exit_index >= 0 && exit_index <= top, "eenet.", op,
                    ": exit_index must lie in [0, ", top, "] (out_exit is ",
                    dtype_name(out_exit.scalar_type()), "), got ", exit_index);
  if (out_logits.dim() == 2) {
    check_dtype(op, "out_logits", out_logits, {at::kFloat, at::kHalf, at::kBFloat16});
    TORCH_CHECK_VALUE(out_logits.size(0) == n0 && out_logits.size(1) == c, "eenet.", op,
                      ": out_logits must have shape (", n0, ", ", c, ") (logits) or (", n0,
                      ",) (predictions), got ", shape_str(out_logits.sizes()));
  } else if (out_logits.dim() == 1) {
    check_dtype(op, "out_logits", out_logits, {at::kInt, at::kLong});
    TORCH_CHECK_VALUE(out_logits.size(0) == n0, "eenet.", op, ": out_logits must have shape (",
                      n0, ", ", c, ") (logits) or (", n0, ",) (predictions), got ",
                      shape_str(out_logits.sizes()));
  } else {
    TORCH_CHECK_VALUE(false, "eenet.", op,
                      ": out_logits must be 2-D (N0, C) logits or 1-D (N0,) predictions, got a ",
                      out_logits.dim(), "-D tensor");
  }
  TORCH_CHECK_VALUE(out_logits.is_contiguous(), "eenet.", op, ": out_logits must be contiguous");
  TORCH_CHECK_VALUE(out_score.is_contiguous(), "eenet.", op, ": out_score must be contiguous");
  TORCH_CHECK_VALUE(out_exit.is_contiguous(), "eenet.", op, ": out_exit must be contiguous");
  std::vector<std::pair<const char*, const at::Tensor*>> readers{{"feats", &feats},
                                                                 {"weight", &weight}};
  for (const auto& [name, t] : inputs)
    if (t->has_value()) readers.emplace_back(name, &t->value());
  readers.emplace_back("row_index", &row_index);
  const std::pair<const char*, const at::Tensor*> outputs[] = {
      {"out_logits", &out_logits}, {"out_score", &out_score}, {"out_exit", &out_exit}};
  for (size_t i = 0; i < 3; ++i) {
    for (const auto& [other, u] : readers)
      TORCH_CHECK_VALUE(!byte_spans_overlap(*outputs[i].second, *u), "eenet.", op, ": ",
                        outputs[i].first, " overlaps ", other, "; pass a separate buffer");
    for (size_t j = 0; j < i; ++j)
      TORCH_CHECK_VALUE(!byte_spans_overlap(*outputs[i].second, *outputs[j].second), "eenet.",
                        op, ": ", outputs[i].first, " overlaps ", outputs[j].first,
                        "; pass a separate buffer");
  }
}

// Every metadata check of an exit_score_write call, as each backend makes it before it runs:
// the exit_score arguments, then the write arguments (no input may overlap an output).
inline void check_exit_score_write_call(
    const at::Tensor& feats, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::string& policy, double threshold, const std::optional<at::Tensor>& prev_scores,
    const std::optional<at::Tensor>& prev_preds, const std::optional<at::Tensor>& sched_weight,
    bool use_vote, double sched_bias, const at::Tensor& row_index, int64_t exit_index,
    const at::Tensor& out_logits, const at::Tensor& out_score, const at::Tensor& out_exit) {
  check_exit_score_args("exit_score_write", feats, weight, bias, policy, threshold,
                        prev_scores, prev_preds, sched_weight, use_vote, sched_bias);
  check_exit_write_args(feats, weight, row_index, exit_index, out_logits, out_score, out_exit,
                        {{"bias", &bias},
                         {"prev_scores", &prev_scores},
                         {"prev_preds", &prev_preds},
                         {"sched_weight", &sched_weight}});
}

// Value checks of the exit ops (CPU tensors): sched_weight finite; row_index values in
// [0, n0) and distinct. `rows` is row_index as contiguous int64.
inline void check_exit_values(const char* op, const at::Tensor* sched_weight,
                              const at::Tensor* rows, int64_t n0) {
  if (sched_weight != nullptr) {
    const at::Tensor w = sched_weight->contiguous();
    const float* p = w.data_ptr<float>();
    for (int64_t i = 0; i < w.numel(); ++i)
      TORCH_CHECK_VALUE(std::isfinite(p[i]), "eenet.", op, ": sched_weight must be finite, got ",
                        p[i], " at position ", i);
  }
  if (rows == nullptr) return;
  const int64_t* r = rows->data_ptr<int64_t>();
  const int64_t n = rows->numel();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(r[i] >= 0 && r[i] < n0, "eenet.", op, ": row_index values must lie in [0, ",
                      n0, "), got ", r[i], " at position ", i);
  if (n < 2) return;
  std::vector<int64_t> first(n0, -1);
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK_VALUE(first[r[j]] < 0, "eenet.", op, ": row_index values must be distinct, got ",
                      r[j], " at positions ", first[r[j]], " and ", j);
    first[r[j]] = j;
  }
}

// The float32 threshold the kernels compare the float32 scores with: the smallest float32
// >= threshold (>= 0, checked), so that score >= t32 holds exactly where score >= threshold
// does; a positive threshold below the smallest normal float32 is raised to it (a device
// flushing denormals would read it as 0). eenet_kernels/checks.py: threshold_as_float32.
inline float threshold_as_float(double threshold) {
  constexpr float tiny = std::numeric_limits<float>::min();
  if (threshold <= 0.0) return 0.0f;
  if (threshold < static_cast<double>(tiny)) return tiny;
  if (threshold > static_cast<double>(std::numeric_limits<float>::max()))
    return std::numeric_limits<float>::infinity();
  float t32 = static_cast<float>(threshold);
  if (static_cast<double>(t32) < threshold)
    t32 = std::nextafter(t32, std::numeric_limits<float>::infinity());
  return t32;
}

// Conservative aliasing test: intersecting byte ranges in memory (strided and expanded
// tensors included, where at::get_overlap_status gives up). Ranges are compared by address,
// so two storages over one buffer (two from_blob / from_numpy / DLPack views of it) are
// caught too; tensors without data (meta) overlap only within one storage.
inline bool byte_spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  const void* data_a = a.storage().data();
  const void* data_b = b.storage().data();
  if ((data_a == nullptr || data_b == nullptr) &&
      a.storage().unsafeGetStorageImpl() != b.storage().unsafeGetStorageImpl()) {
    return false;
  }
  auto span = [](const at::Tensor& t, const void* data) {
    int64_t extent = 0;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const int64_t start = static_cast<int64_t>(reinterpret_cast<intptr_t>(data)) +
                          t.storage_offset() * t.element_size();
    return std::make_pair(start, start + (extent + 1) * t.element_size());
  };
  const auto [a0, a1] = span(a, data_a);
  const auto [b0, b1] = span(b, data_b);
  return a0 < b1 && b0 < a1;
}

inline void check_compact_args(const char* op, const at::Tensor& keep, at::TensorList src,
                               const std::optional<at::TensorList>& dst) {
  check_dtype(op, "keep", keep, {at::kBool});
  TORCH_CHECK_VALUE(keep.dim() == 1, "eenet.", op, ": keep must be 1-D (N,), got a ", keep.dim(),
                    "-D tensor of shape ", shape_str(keep.sizes()));
  const int64_t n = keep.size(0);
  const auto device = keep.device();
  for (size_t i = 0; i < src.size(); ++i) {
    check_dense(op, "src[" + std::to_string(i) + "]", src[i]);
    TORCH_CHECK_VALUE(src[i].dim() >= 1 && src[i].size(0) == n, "eenet.", op, ": src[", i,
                      "] must have N = ", n, " rows like keep, got shape ",
                      shape_str(src[i].sizes()));
    TORCH_CHECK_VALUE(src[i].device() == device, "eenet.", op, ": src[", i, "] is on ",
                      src[i].device(), " but keep is on ", device,
                      "; all tensors must share one device");
  }
  if (!dst) return;
  TORCH_CHECK_VALUE(dst->size() == src.size(), "eenet.", op,
                    ": dst must hold one buffer per src tensor: ", src.size(), " src, ",
                    dst->size(), " dst");
  for (size_t i = 0; i < src.size(); ++i) {
    const auto& s = src[i];
    const auto& d = (*dst)[i];
    check_dense(op, "dst[" + std::to_string(i) + "]", d);
    TORCH_CHECK_VALUE(d.device() == device, "eenet.", op, ": dst[", i, "] is on ", d.device(),
                      " but keep is on ", device, "; all tensors must share one device");
    TORCH_CHECK_TYPE(d.scalar_type() == s.scalar_type(), "eenet.", op, ": dst[", i,
                     "] must have the dtype of src[", i, "] (", dtype_name(s.scalar_type()),
                     "), got ", dtype_name(d.scalar_type()));
    bool shape_ok = d.dim() == s.dim() && d.size(0) >= n;
    for (int64_t j = 1; shape_ok && j < s.dim(); ++j) shape_ok = d.size(j) == s.size(j);
    std::string tail;
    for (int64_t j = 1; j < s.dim(); ++j) tail += ", " + std::to_string(s.size(j));
    TORCH_CHECK_VALUE(shape_ok, "eenet.", op, ": dst[", i, "] must have shape (>= ", n, tail,
                      ") to hold src[", i, "] of shape ", shape_str(s.sizes()), ", got ",
                      shape_str(d.sizes()));
    TORCH_CHECK_VALUE(d.is_contiguous(), "eenet.", op, ": dst[", i, "] must be contiguous");
  }
  // after the per-buffer checks, as in eenet_kernels/checks.py: the kernels read keep and
  // every src while they write
  for (size_t i = 0; i < dst->size(); ++i) {
    const auto& d = (*dst)[i];
    TORCH_CHECK_VALUE(!byte_spans_overlap(d, keep), "eenet.", op, ": dst[", i,
                      "] overlaps keep; pass a separate buffer");
    for (size_t j = 0; j < src.size(); ++j)
      TORCH_CHECK_VALUE(!byte_spans_overlap(d, src[j]), "eenet.", op, ": dst[", i,
                        "] overlaps src[", j,
                        "]; compaction into its own source is not supported, pass a separate "
                        "buffer");
    for (size_t j = 0; j < i; ++j)
      TORCH_CHECK_VALUE(!byte_spans_overlap(d, (*dst)[j]), "eenet.", op, ": dst[", i,
                        "] overlaps dst[", j, "]; pass a separate buffer");
  }
}

}  // namespace eenet
