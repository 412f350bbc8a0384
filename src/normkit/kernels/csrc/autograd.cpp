// The layers' eager fast path as a C++ autograd Function (normkit/kernels/_fast.py).
//
// A layer call on a small input (the lab's batches of 2, a ResNet's last stages) is dominated by the
// Python around the kernel: Function.apply, the ctx, the backward's Python frame, a few allocations
// (about 50 us a call here, more than torch's whole GroupNorm). This module does that work in C++:
// one Python call forward (allocation, the fused kernel, the autograd node), none backward.
//
// It uses torch's C++ API (not the stable ABI: autograd is not part of it), so it is built per torch
// and Python version, next to normkit_cpu, and is optional: without it the Python Function runs. It
// never links normkit_cpu: Python hands it the kernels' C entry points (ctypes addresses) once.
//
// It also defines the `normkit_func` ops: the norm and its backward as dispatcher ops with C++ autograd
// kernels, which normkit takes under torch.func transforms (see the section near the end).

#include <ATen/record_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using fwd_t = int32_t (*)(int, const void*, const void*, const void*, void*, void*, int64_t, int64_t, int64_t, int64_t,
                          int64_t, double);
using train_t = int32_t (*)(int, const void*, const void*, const void*, void*, void*, void*, void*, void*, int64_t,
                            int64_t, int64_t, int64_t, double, double, int32_t);
using bwd_t = int32_t (*)(int, const void*, const void*, const void*, const void*, void*, void*, void*, int64_t,
                          int64_t, int64_t, int64_t, int64_t);

using gnact_fwd_t = int32_t (*)(int, const void*, const void*, const void*, const void*, const void*, void*, void*,
                                int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t, double);
using gnact_bwd_t = int32_t (*)(int, const void*, const void*, const void*, const void*, const void*, const void*,
                                const void*, void*, double*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double);
using pstats_t = int32_t (*)(int, const void*, const void*, const void*, const void*, const void*, int64_t, int64_t,
                             int64_t, double, double, void*, void*);
using pstats_bwd_t = int32_t (*)(int, const void*, const void*, const void*, const void*, const void*, int64_t, int64_t,
                                 int64_t, double, const void*, const void*, const void*, const void*, void*, void*,
                                 void*, void*);

fwd_t k_fwd = nullptr;
train_t k_train = nullptr;
bwd_t k_bwd = nullptr;
gnact_fwd_t k_gnact_fwd = nullptr;
gnact_bwd_t k_gnact_bwd = nullptr;
pstats_t k_pstats = nullptr;
pstats_bwd_t k_pstats_bwd = nullptr;

enum Mode : int64_t { BATCH_NCHW = 0, BATCH_CL = 1, GROUP_NCHW = 2, GROUP_CL = 3, CHANNEL_NCHW = 4 };
// what the norm is (for the recomputation); K_LAST: LayerNorm over the trailing dims holding C values
enum Kind : int64_t { K_BATCH = 0, K_GROUP = 1, K_CHANNEL = 2, K_LAST = 3 };

int code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: return -1;
  }
}

// the affine as the kernels read it: contiguous, in the statistics dtype
Tensor affine(const std::optional<Tensor>& p, at::ScalarType acc) {
  if (!p || !p->defined()) return Tensor();
  if (p->scalar_type() == acc && p->is_contiguous()) return *p;
  return p->detach().to(acc).contiguous();
}

void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The norm by ATen's differentiable ops: what create_graph=True differentiates (double backward).
Tensor recompute(const Tensor& x, const Tensor& w, const Tensor& b, int64_t kind, int64_t C, int64_t G, double eps) {
  // (dense: ATen's CPU batch-norm backward misreads a strided weight where the spatial size is 1)
  const std::optional<Tensor> ow = w.defined() ? std::optional<Tensor>(w.contiguous()) : std::nullopt;
  const std::optional<Tensor> ob = b.defined() ? std::optional<Tensor>(b.contiguous()) : std::nullopt;
  if (kind == K_BATCH) return at::batch_norm(x, ow, ob, std::nullopt, std::nullopt, true, 0.0, eps, false);
  if (kind == K_CHANNEL) return at::layer_norm(x.movedim(1, -1), {C}, ow, ob, eps, false).movedim(-1, 1);
  if (kind == K_LAST) {
    int64_t k = 0, d = 1;
    while (d < C && k < x.dim()) d *= x.size(x.dim() - 1 - k++);
    return at::layer_norm(x, x.sizes().slice(x.dim() - k), ow, ob, eps, false);
  }
  return at::group_norm(x, G, ow, ob, eps, false);
}

// A forward already computed (the kernel ran before the node exists, so a batch it hands back never
// creates one): the node only records it. Not a tensor argument, so autograd does not track it.
struct Prepared {
  Tensor y, st;
};

// The fused norm's autograd Function, one class per norm (CRTP) so that its node is named after the norm:
// torch::autograd::CppNode<normkit::BatchNormBackward> in grad_fn.name(), anomaly mode's messages and the
// profiler's backward rows. (A CppNode, not a hand-made Node: compiled autograd traces CppNodes.)
template <class T>
struct FastNorm : public torch::autograd::Function<T> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& w,
                        const std::optional<Tensor>& b, const std::shared_ptr<Prepared>& prep,
                        std::vector<int64_t> spec, double eps) {
    ctx->save_for_backward({x, w ? *w : Tensor(), b ? *b : Tensor(), prep->st});
    ctx->saved_data["spec"] = std::move(spec);
    ctx->saved_data["eps"] = eps;
    return prep->y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    Tensor dy = grads[0];
    if (!dy.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2], &st = saved[3];
    const auto spec = ctx->saved_data["spec"].toIntVector();
    const int64_t mode = spec[0], N = spec[1], C = spec[2], S = spec[3], G = spec[4], kind = spec[5];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = w.defined() && ctx->needs_input_grad(1);
    const bool need_b = b.defined() && ctx->needs_input_grad(2);
    // create_graph=True (or a batched gradient without storage, gradcheck's check_batched_grad):
    // differentiate a differentiable recomputation
    if (at::GradMode::is_enabled() || !dy.has_storage()) {
      std::vector<Tensor> inputs;
      std::vector<int> where;
      if (need_x) inputs.push_back(x), where.push_back(0);
      if (need_w) inputs.push_back(w), where.push_back(1);
      if (need_b) inputs.push_back(b), where.push_back(2);
      if (inputs.empty()) return out;
      const bool create = at::GradMode::is_enabled();
      at::AutoGradMode enable_grad(true);
      const Tensor y = recompute(x, w, b, kind, C, G, ctx->saved_data["eps"].toDouble());
      auto g = torch::autograd::grad({y}, inputs, {dy}, /*retain_graph=*/true, /*create_graph=*/create,
                                     /*allow_unused=*/true);
      for (size_t i = 0; i < g.size(); ++i) out[where[i]] = g[i];
      return out;
    }
    if (!dy.has_storage() || dy.scalar_type() != x.scalar_type() || dy.strides() != x.strides())
      dy = at::empty_like(x).copy_(dy);
    const at::ScalarType acc = st.scalar_type();
    const Tensor wk = affine(w.defined() ? std::optional<Tensor>(w) : std::nullopt, acc);
    Tensor dx = need_x ? at::empty_like(x) : Tensor();
    Tensor dw = need_w ? at::empty({C}, st.options()) : Tensor();
    Tensor db = need_b ? at::empty({C}, st.options()) : Tensor();
    k_bwd(code(x.scalar_type()), dy.data_ptr(), x.data_ptr(), ptr(wk), st.data_ptr(), ptr(dx), ptr(dw), ptr(db), mode,
          N, C, S, G);  // the statistics are the kernel's own: it always succeeds
    out[0] = dx;
    // in the affine's own shape (C values: (C,) for the layers, the normalized shape for K_LAST)
    out[1] = need_w ? (dw.scalar_type() == w.scalar_type() ? dw : dw.to(w.scalar_type())).view(w.sizes()) : Tensor();
    out[2] = need_b ? (db.scalar_type() == b.scalar_type() ? db : db.to(b.scalar_type())).view(b.sizes()) : Tensor();
    return out;
  }
};

}  // namespace

// (outside the anonymous namespace: the names read without "(anonymous namespace)::")
namespace normkit {
struct BatchNormBackward : FastNorm<BatchNormBackward> {};
struct GroupNormBackward : FastNorm<GroupNormBackward> {};
struct LayerNorm2dBackward : FastNorm<LayerNorm2dBackward> {};
struct LayerNormBackward : FastNorm<LayerNormBackward> {};
}  // namespace normkit

namespace {

// Without the GIL while the kernels run (other Python threads go on, as around torch's own ops), when
// the caller holds it: the layers call in from Python; nothing here touches a Python object (what
// calls back into Python, saved-tensor hooks or anomaly mode's stack, takes the GIL itself).
struct NoGil {
  std::optional<pybind11::gil_scoped_release> release;
  NoGil() {
    if (PyGILState_Check()) release.emplace();
  }
};

// the kernel pattern of the last fast_norm call (the tests check which pattern each op runs)
std::atomic<int64_t> last_mode{-1};

// The fused norm: output (an autograd node when any input requires grad), or None when the batch
// needs the general path (statistics outside the kernels' exact range).
Tensor fast_norm(const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b, int64_t mode,
                 int64_t N, int64_t C, int64_t S, int64_t G, int64_t kind, double eps, const std::optional<Tensor>& rm,
                 const std::optional<Tensor>& rv, const std::optional<Tensor>& nbt, double momentum, bool unbiased) {
  // a profiler event named after the norm, with the input shapes (nothing runs while no profiler listens)
  static const char* const names[] = {"normkit::batch_norm", "normkit::group_norm", "normkit::layer_norm_2d",
                                      "normkit::layer_norm"};
  RECORD_FUNCTION(names[kind >= K_BATCH && kind <= K_LAST ? kind : K_LAST],
                  std::vector<c10::IValue>({x, w ? c10::IValue(*w) : c10::IValue(), b ? c10::IValue(*b) : c10::IValue()}));
  NoGil no_gil;
  TORCH_CHECK(k_fwd && k_train && k_bwd, "normkit_autograd: init() was not called");
  TORCH_CHECK(code(x.scalar_type()) >= 0 && x.device().is_cpu(), "normkit_autograd: unsupported input ", x.toString());
  for (const auto* p : {&w, &b})
    TORCH_CHECK(!*p || !(*p)->defined() || ((*p)->device().is_cpu() && (*p)->numel() == C),
                "normkit_autograd: expected a CPU affine of ", C, " values");
  last_mode = mode;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t nsets = mode == BATCH_NCHW || mode == BATCH_CL ? C : (mode == CHANNEL_NCHW ? N * S : N * G);
  auto prep = std::make_shared<Prepared>();
  {
    at::NoGradGuard no_grad;
    const Tensor wk = affine(w, acc), bk = affine(b, acc);
    prep->y = at::empty_like(x);
    prep->st = at::empty({6, nsets}, x.options().dtype(acc));
    int32_t ok;
    if (rm && rm->defined()) {
      ok = k_train(code(x.scalar_type()), x.data_ptr(), ptr(wk), ptr(bk), prep->y.data_ptr(), prep->st.data_ptr(),
                   rm->data_ptr(), rv->data_ptr(), nbt && nbt->defined() ? nbt->data_ptr() : nullptr, mode, N, C, S,
                   eps, momentum, unbiased ? 1 : 0);
    } else {
      ok = k_fwd(code(x.scalar_type()), x.data_ptr(), ptr(wk), ptr(bk), prep->y.data_ptr(), prep->st.data_ptr(), mode,
                 N, C, S, G, eps);
    }
    if (!ok) return Tensor();
  }
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (w && w->defined() && w->requires_grad()) || (b && b->defined() && b->requires_grad()));
  if (!grad) return prep->y;
  std::vector<int64_t> spec{mode, N, C, S, G, kind};
  switch (kind) {
    case K_BATCH: return normkit::BatchNormBackward::apply(x, w, b, prep, std::move(spec), eps);
    case K_GROUP: return normkit::GroupNormBackward::apply(x, w, b, prep, std::move(spec), eps);
    case K_CHANNEL: return normkit::LayerNorm2dBackward::apply(x, w, b, prep, std::move(spec), eps);
    default: return normkit::LayerNormBackward::apply(x, w, b, prep, std::move(spec), eps);
  }
}

// ---- The functional ops' checked entry points ----------------------------------------------------------
// F.group_norm / F.layer_norm / F.layer_norm_2d on a small input: Python's argument checks, the layout
// test and the kernel pattern cost as much as the kernel (about 8 us on a 5 us call). These take the
// Python arguments as they came, make the same checks in C++ and run fast_norm; anything they do not
// accept exactly (a wrong shape or dtype, an odd layout, a non-int group count, ...) returns None, and
// the caller's general path then raises its typed error or computes the unusual case.
namespace py = pybind11;

// 0: contiguous, 1: channels-last (4-d or 5-d), -1: anything else
int layout_of(const Tensor& x) {
  if (x.is_contiguous()) return 0;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return 1;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return 1;
  return -1;
}

// An affine argument as the functional checks accept it: None, or a CPU tensor of `shape` with x's dtype
// (float32 for a half x), contiguous when `contiguous`. False for anything else.
bool affine_arg(py::handle h, const Tensor& x, at::IntArrayRef shape, bool contiguous, std::optional<Tensor>& out) {
  if (h.is_none()) return true;
  if (!THPVariable_Check(h.ptr())) return false;
  const Tensor& t = THPVariable_Unpack(h.ptr());
  const at::ScalarType xd = x.scalar_type(), pd = t.scalar_type();
  if (!t.device().is_cpu() || t.sizes() != shape || (contiguous && !t.is_contiguous())) return false;
  if (pd != xd && !(pd == at::kFloat && (xd == at::kHalf || xd == at::kBFloat16))) return false;
  out = t;
  return true;
}

// eps as the functional checks accept it (a finite float >= 0); -1 for anything else
double eps_arg(py::handle h) {
  if (!PyFloat_CheckExact(h.ptr())) return -1.0;
  const double e = PyFloat_AS_DOUBLE(h.ptr());
  return std::isfinite(e) && e >= 0.0 ? e : -1.0;
}

// a Python int (not a bool) in [1, 2^62], or -1
int64_t int_arg(py::handle h) {
  if (!PyLong_CheckExact(h.ptr())) return -1;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow || v < 1 || v > (1LL << 62)) {
    PyErr_Clear();
    return -1;
  }
  return static_cast<int64_t>(v);
}

// The input: a CPU tensor of a kernel dtype with elements, or nullptr
const Tensor* input_arg(py::handle h) {
  if (!THPVariable_Check(h.ptr())) return nullptr;
  const Tensor& x = THPVariable_Unpack(h.ptr());
  if (code(x.scalar_type()) < 0 || !x.device().is_cpu() || x.numel() == 0 || !x.has_storage()) return nullptr;
  return &x;
}

py::object wrap(const Tensor& y) {
  if (!y.defined()) return py::none();
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(y));
}

int64_t spatial(const Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return s;
}

// the C++ node runs with both affine tensors or neither (a lone one: the caller's Python Function)
py::object run(const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b, int64_t mode, int64_t N,
               int64_t C, int64_t S, int64_t G, int64_t kind, double eps) {
  if (w.has_value() != b.has_value()) return py::none();
  return wrap(fast_norm(x, w, b, mode, N, C, S, G, kind, eps, std::nullopt, std::nullopt, std::nullopt, -1.0, false));
}

// normkit.functional.group_norm(x, num_groups, weight, bias, eps) on (N, C, *spatial), NCHW or channels-last
py::object group_norm_checked(py::handle xh, py::handle gh, py::handle wh, py::handle bh, py::handle eh) {
  const Tensor* xp = input_arg(xh);
  if (!xp || xp->dim() < 3) return py::none();
  const Tensor& x = *xp;
  const int lay = layout_of(x);
  const int64_t G = int_arg(gh), C = x.size(1), S = spatial(x);
  const double eps = eps_arg(eh);
  if (lay < 0 || G < 1 || G > C || C % G != 0 || (C / G) * S < 2 || eps < 0.0) return py::none();
  std::optional<Tensor> w, b;
  if (!affine_arg(wh, x, {C}, false, w) || !affine_arg(bh, x, {C}, false, b)) return py::none();
  return run(x, w, b, lay == 1 ? GROUP_CL : GROUP_NCHW, x.size(0), C, S, G, K_GROUP, eps);
}

// normkit.functional.layer_norm(x, normalized_shape, weight, bias, eps) on a contiguous x
py::object layer_norm_checked(py::handle xh, py::handle sh, py::handle wh, py::handle bh, py::handle eh) {
  const Tensor* xp = input_arg(xh);
  if (!xp || !xp->is_contiguous()) return py::none();
  const Tensor& x = *xp;
  std::vector<int64_t> shape;
  if (PyLong_CheckExact(sh.ptr())) {
    shape.push_back(int_arg(sh));
  } else if (PyTuple_Check(sh.ptr()) || PyList_Check(sh.ptr())) {  // a tuple, torch.Size or list of ints
    for (py::handle item : sh) shape.push_back(int_arg(item));
  } else {
    return py::none();
  }
  const int64_t k = static_cast<int64_t>(shape.size());
  if (k == 0 || k > x.dim()) return py::none();
  int64_t D = 1;
  for (int64_t i = 0; i < k; ++i) {
    if (shape[i] != x.size(x.dim() - k + i)) return py::none();
    D *= shape[i];
  }
  const double eps = eps_arg(eh);
  if (D < 2 || eps < 0.0) return py::none();
  std::optional<Tensor> w, b;
  if (!affine_arg(wh, x, shape, true, w) || !affine_arg(bh, x, shape, true, b)) return py::none();
  // rows of D values: a GroupNorm with one group over D channels
  return run(x, w, b, GROUP_NCHW, x.numel() / D, D, 1, 1, K_LAST, eps);
}

// normkit.functional.layer_norm_2d(x, weight, bias, eps) (over the channels) on (N, C, *spatial)
py::object layer_norm_2d_checked(py::handle xh, py::handle wh, py::handle bh, py::handle eh) {
  const Tensor* xp = input_arg(xh);
  if (!xp || xp->dim() < 3) return py::none();
  const Tensor& x = *xp;
  const int lay = layout_of(x);
  const int64_t C = x.size(1), N = x.size(0), S = spatial(x);
  const double eps = eps_arg(eh);
  if (lay < 0 || C < 2 || eps < 0.0) return py::none();
  std::optional<Tensor> w, b;
  if (!affine_arg(wh, x, {C}, false, w) || !affine_arg(bh, x, {C}, false, b)) return py::none();
  if (lay == 1) return run(x, w, b, GROUP_NCHW, N * S, C, 1, 1, K_CHANNEL, eps);  // rows of C values
  return run(x, w, b, CHANNEL_NCHW, N, C, S, 1, K_CHANNEL, eps);
}

// normkit.functional.batch_norm with batch statistics (training, or no running statistics): a tuple
// (output, running_mean, running_var, num_batches_tracked), the running statistics updated copies when
// training with them (the functional contract: never written in place); None: the general path.
py::object batch_norm_checked(py::handle xh, py::handle rmh, py::handle rvh, py::handle wh, py::handle bh,
                              py::handle th, py::handle mh, py::handle eh, py::handle nh, py::handle uh) {
  const Tensor* xp = input_arg(xh);
  if (!xp || xp->dim() < 2) return py::none();
  const Tensor& x = *xp;
  const int lay = layout_of(x);
  if (lay < 0 || (th.ptr() != Py_True && th.ptr() != Py_False) || (uh.ptr() != Py_True && uh.ptr() != Py_False))
    return py::none();
  const bool training = th.ptr() == Py_True, unbiased = uh.ptr() == Py_True;
  const int64_t N = x.size(0), C = x.size(1), S = spatial(x);
  const double eps = eps_arg(eh);
  double momentum = -1.0;  // None: a cumulative average
  if (!mh.is_none()) {
    if (!PyFloat_CheckExact(mh.ptr())) return py::none();
    momentum = PyFloat_AS_DOUBLE(mh.ptr());
    if (!(momentum >= 0.0 && momentum <= 1.0)) return py::none();
  }
  if (eps < 0.0) return py::none();
  std::optional<Tensor> w, b, rm, rv;
  if (!affine_arg(wh, x, {C}, false, w) || !affine_arg(bh, x, {C}, false, b) || !affine_arg(rmh, x, {C}, true, rm) ||
      !affine_arg(rvh, x, {C}, true, rv) || rm.has_value() != rv.has_value())
    return py::none();
  if (rm && !training) {
    // The running statistics' affine map: ATen's batch_norm, as the general path calls it, for running
    // statistics of x's dtype, or float32 statistics and affine for a half x (ATen's mixed-dtype path, which
    // keeps the half input for the backward). (The channels-last input with a size-1 dim, spatial or the
    // batch, whose gradient ATen's CPU backward gets wrong, takes the general path: functional/batch_norm.py,
    // _aten_eval_grad_hazard; so does a half x with any other mix of dtypes.)
    const at::ScalarType xt = x.scalar_type();
    const auto f32 = [](const std::optional<Tensor>& p) { return !p || p->scalar_type() == at::kFloat; };
    const bool same = rm->scalar_type() == xt && rv->scalar_type() == xt;
    if (!same && !((xt == at::kHalf || xt == at::kBFloat16) && f32(rm) && f32(rv) && f32(w) && f32(b)))
      return py::none();
    // Only the input needs a gradient (a frozen BatchNorm): ATen's node would keep all of x for the
    // affine's gradients; the general path's x * scale + shift keeps the scale alone.
    if (x.requires_grad() && at::GradMode::is_enabled() && !(w && w->requires_grad()) && !(b && b->requires_grad()))
      return py::none();
    if (lay != 0 && x.requires_grad() && at::GradMode::is_enabled() && x.dim() > 2) {
      for (int64_t d = 0; d < x.dim(); ++d)
        if (x.size(d) == 1) return py::none();
    }
    // (dense affines: ATen's CPU backward misreads a strided weight where the spatial size is 1)
    if (w && !w->is_contiguous()) w = w->contiguous();
    if (b && !b->is_contiguous()) b = b->contiguous();
    Tensor y;
    {
      NoGil no_gil;
      y = at::batch_norm(x, w, b, rm, rv, false, 0.0, eps, false);
    }
    return py::make_tuple(wrap(y), rmh, rvh, nh);
  }
  if (N * S < 2) return py::none();
  const bool update = training && rm.has_value();
  std::optional<Tensor> nbt;
  if (!nh.is_none()) {
    if (!THPVariable_Check(nh.ptr())) return py::none();
    nbt = THPVariable_Unpack(nh.ptr());
  }
  if (momentum < 0.0 && !nbt) return py::none();  // a cumulative average needs the counter: the general path says so
  if (w.has_value() != b.has_value()) return py::none();
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (update && (rm->scalar_type() != acc || rv->scalar_type() != acc)) return py::none();
  if (update && nbt && (nbt->scalar_type() != at::kLong || !nbt->device().is_cpu() || nbt->numel() != 1))
    return py::none();
  const int64_t mode = x.dim() == 2 || lay == 1 ? BATCH_CL : BATCH_NCHW;
  if (!update) {
    const Tensor y = fast_norm(x, w, b, mode, N, C, S, 1, K_BATCH, eps, std::nullopt, std::nullopt, std::nullopt,
                               momentum, unbiased);
    if (!y.defined()) return py::none();
    return py::make_tuple(wrap(y), rmh, rvh, nh);
  }
  std::optional<Tensor> rm2, rv2, nbt2;
  {
    at::NoGradGuard no_grad;
    rm2 = rm->clone();
    rv2 = rv->clone();
    if (nbt) nbt2 = nbt->clone();
  }
  const Tensor y = fast_norm(x, w, b, mode, N, C, S, 1, K_BATCH, eps, rm2, rv2, nbt2, momentum, unbiased);
  if (!y.defined()) return py::none();
  return py::make_tuple(wrap(y), wrap(*rm2), wrap(*rv2), nbt2 ? wrap(*nbt2) : py::none());
}

// ---- GroupNorm (no affine) + Proxy Norm's activation (GroupNormProxyAct2d) ----------------------------
enum Act : int64_t { A_RELU = 0, A_LEAKY = 1, A_IDENT = 7 };

Tensor act_of(const Tensor& a, int64_t act, double slope) {
  if (act == A_RELU) return at::relu(a);
  if (act == A_LEAKY) return at::leaky_relu(a, slope);
  return a;
}

// The layer by ATen's differentiable ops (normkit.functional.proxy_norm_act's definition): what
// create_graph=True differentiates.
Tensor gn_proxy_recompute(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pb, const Tensor& pw,
                          const Tensor& u, int64_t G, double eps, int64_t act, double slope, double peps) {
  const Tensor y = at::group_norm(x, G, std::nullopt, std::nullopt, eps, false);
  const Tensor yt = (pw + 1.0).unsqueeze(1) * u.unsqueeze(0) + pb.unsqueeze(1);
  const Tensor z = act_of(w.unsqueeze(1) * yt + b.unsqueeze(1), act, slope);
  const Tensor m = z.mean(1);
  const Tensor r = at::rsqrt((z - m.unsqueeze(1)).square().mean(1) + peps);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  const Tensor out = (act_of(w.view(shape) * y + b.view(shape), act, slope) - m.view(shape)) * r.view(shape);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

template <class T>
struct GNProxy : public torch::autograd::Function<T> {
  // prep: out, the GroupNorm statistics, the proxy mean and 1/std, already computed
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pb,
                        const Tensor& pw, const std::shared_ptr<std::vector<Tensor>>& prep, std::vector<int64_t> spec,
                        std::vector<double> fspec) {
    const auto& P = *prep;  // out, st, m, r, u
    ctx->save_for_backward({x, w, b, pb, pw, P[1], P[2], P[3], P[4]});
    ctx->saved_data["spec"] = std::move(spec);
    ctx->saved_data["fspec"] = std::move(fspec);
    return P[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    Tensor dout = grads[0];
    if (!dout.defined()) return out;
    auto sv = ctx->get_saved_variables();
    const Tensor &x = sv[0], &w = sv[1], &b = sv[2], &pb = sv[3], &pw = sv[4], &st = sv[5], &m = sv[6], &r = sv[7],
                 &u = sv[8];
    const auto spec = ctx->saved_data["spec"].toIntVector();  // mode, N, C, S, G, act
    const auto fs = ctx->saved_data["fspec"].toDoubleVector();  // eps, slope, peps
    const int64_t mode = spec[0], N = spec[1], C = spec[2], S = spec[3], G = spec[4], act = spec[5];
    if (at::GradMode::is_enabled() || !dout.has_storage()) {  // create_graph=True: the differentiable composite
      // only what needs a gradient: grad() refuses an input outside the graph (a frozen parameter,
      // an input without requires_grad)
      std::vector<Tensor> inputs;
      std::vector<int> where;
      const Tensor* all[] = {&x, &w, &b, &pb, &pw};
      for (int i = 0; i < 5; ++i)
        if (ctx->needs_input_grad(i)) inputs.push_back(*all[i]), where.push_back(i);
      if (inputs.empty()) return out;
      const bool create = at::GradMode::is_enabled();
      at::AutoGradMode enable_grad(true);
      const Tensor y = gn_proxy_recompute(x, w, b, pb, pw, u, G, fs[0], act, fs[1], fs[2]);
      auto g = torch::autograd::grad({y}, inputs, {dout}, true, create, true);
      for (size_t i = 0; i < g.size(); ++i) out[where[i]] = g[i];
      return out;
    }
    if (dout.scalar_type() != x.scalar_type() || dout.strides() != x.strides()) dout = at::empty_like(x).copy_(dout);
    const int dt = m.scalar_type() == at::kDouble ? 1 : 0;
    Tensor dx = ctx->needs_input_grad(0) ? at::empty_like(x) : Tensor();
    Tensor sums = at::empty({4, C}, x.options().dtype(at::kDouble));
    k_gnact_bwd(code(x.scalar_type()), dout.data_ptr(), x.data_ptr(), w.data_ptr(), b.data_ptr(), m.data_ptr(),
                r.data_ptr(), st.data_ptr(), ptr(dx), sums.data_ptr<double>(), mode, N, C, S, G, act, fs[1]);
    Tensor dw = at::empty({C}, m.options()), db = at::empty({C}, m.options()), dpb = at::empty({C}, m.options()),
           dpw = at::empty({C}, m.options());
    // the proxy statistics' backward, then the activation step's own parameter sums: in the parameters'
    // dtype, as ATen would (a dozen small ATen ops here cost more than the layer's kernels at small sizes)
    auto params = [&](auto o) {
      using O = decltype(o);
      const double* sp = sums.data_ptr<double>();
      const O* rp = r.data_ptr<O>();
      std::vector<O> gm(static_cast<size_t>(C)), gr(gm.size());
      for (int64_t c = 0; c < C; ++c) {
        gm[c] = -(static_cast<O>(sp[2 * C + c]) * rp[c]);
        gr[c] = static_cast<O>(sp[3 * C + c]);
      }
      k_pstats_bwd(dt, w.data_ptr(), b.data_ptr(), pb.data_ptr(), pw.data_ptr(), u.data_ptr(), u.size(0), C, act,
                   fs[1], m.data_ptr(), r.data_ptr(), gm.data(), gr.data(), dw.data_ptr(), db.data_ptr(),
                   dpb.data_ptr(), dpw.data_ptr());
      O* gw = dw.data_ptr<O>();
      O* gb = db.data_ptr<O>();
      for (int64_t c = 0; c < C; ++c) {
        gw[c] += static_cast<O>(sp[c]);
        gb[c] += static_cast<O>(sp[C + c]);
      }
    };
    if (dt)
      params(double{});
    else
      params(float{});
    out[0] = dx;
    out[1] = dw;
    out[2] = db;
    out[3] = dpb;
    out[4] = dpw;
    return out;
  }
};

}  // namespace

namespace normkit {
struct GroupNormProxyActBackward : GNProxy<GroupNormProxyActBackward> {};
}  // namespace normkit

namespace {

// GroupNorm (no affine) + Proxy Norm's activation, or None (the general path). u: the quadrature points
// in the parameters' dtype; w, b, pb, pw: (C,) contiguous, that dtype.
Tensor gn_proxy_act(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pb, const Tensor& pw,
                    const Tensor& u, int64_t mode, int64_t N, int64_t C, int64_t S, int64_t G, double eps, int64_t act,
                    double slope, double peps) {
  RECORD_FUNCTION("normkit::group_norm_proxy_act", std::vector<c10::IValue>({x, w, b, pb, pw}));
  NoGil no_gil;
  TORCH_CHECK(k_gnact_fwd && k_pstats, "normkit_autograd: init() was not called");
  TORCH_CHECK(code(x.scalar_type()) >= 0 && x.device().is_cpu(), "normkit_autograd: unsupported input ", x.toString());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "normkit_autograd: parameters must be float32 or float64, got ", w.scalar_type());
  for (const Tensor* p : {&w, &b, &pb, &pw, &u})
    TORCH_CHECK(p->scalar_type() == w.scalar_type() && p->is_contiguous() && p->dim() == 1 && p->device().is_cpu(),
                "normkit_autograd: parameters and points must be contiguous 1-d CPU tensors of one dtype");
  TORCH_CHECK(w.size(0) == C && b.size(0) == C && pb.size(0) == C && pw.size(0) == C, "normkit_autograd: expected ",
              C, " channels");
  auto prep = std::make_shared<std::vector<Tensor>>(5);
  auto& P = *prep;
  {
    at::NoGradGuard no_grad;
    const int dt = w.scalar_type() == at::kDouble ? 1 : 0;
    P[2] = at::empty({C}, w.options());
    P[3] = at::empty({C}, w.options());
    k_pstats(dt, w.data_ptr(), b.data_ptr(), pb.data_ptr(), pw.data_ptr(), u.data_ptr(), u.size(0), C, act, slope,
             peps, P[2].data_ptr(), P[3].data_ptr());
    P[0] = at::empty_like(x);
    P[1] = at::empty({6, N * G}, w.options());
    if (!k_gnact_fwd(code(x.scalar_type()), x.data_ptr(), w.data_ptr(), b.data_ptr(), P[2].data_ptr(),
                     P[3].data_ptr(), P[0].data_ptr(), P[1].data_ptr(), mode, N, C, S, G, eps, act, slope))
      return Tensor();
    P[4] = u;
  }
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad() || b.requires_grad() ||
                                                   pb.requires_grad() || pw.requires_grad());
  if (!grad) return P[0];
  return normkit::GroupNormProxyActBackward::apply(x, w, b, pb, pw, prep, std::vector<int64_t>{mode, N, C, S, G, act},
                        std::vector<double>{eps, slope, peps});
}

void init(int64_t fwd, int64_t train, int64_t bwd, int64_t gnact_fwd, int64_t gnact_bwd, int64_t pstats,
          int64_t pstats_bwd) {
  k_fwd = reinterpret_cast<fwd_t>(fwd);
  k_train = reinterpret_cast<train_t>(train);
  k_bwd = reinterpret_cast<bwd_t>(bwd);
  k_gnact_fwd = reinterpret_cast<gnact_fwd_t>(gnact_fwd);
  k_gnact_bwd = reinterpret_cast<gnact_bwd_t>(gnact_bwd);
  k_pstats = reinterpret_cast<pstats_t>(pstats);
  k_pstats_bwd = reinterpret_cast<pstats_bwd_t>(pstats_bwd);
}

// ---- torch.func: the norm as dispatcher ops with a C++ autograd kernel ----------------------------------
// Under a torch.func transform an autograd.Function runs through torch's custom_function_call: argument
// binding, pytree flattening and a class generated per transform level, all Python (about 0.25 ms per
// Function per call, two per norm under grad: more than a small norm's arithmetic). torch's own norms
// are dispatcher ops whose derivative is a C++ autograd kernel, which functorch's grad levels run at no
// such cost. These ops do the same for normkit's norm (normkit/ops/_func_ops.py registers their backend
// kernels, the kernels' dispatch in Python, and their vmap rules): `norm` and `norm_backward` record C++
// nodes; the backward's node calls back into Python for its own derivative (a composite's vjp). A torch::autograd::Function
// cannot serve (functorch refuses C++ Functions: it disables grad mode around their forward), so the
// nodes are recorded as ATen's generated kernels record theirs. No forward-mode rule: a jvp transform
// takes the Python Functions (analytic jvp), and these ops refuse a tangent rather than drop it.
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using NodePtr = decltype(torch::autograd::Edge::function);  // shared_ptr (torch <= 2.11) or intrusive_ptr

template <class T>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

using OptT = std::optional<Tensor>;
using norm_sig = std::tuple<Tensor, Tensor>(const Tensor&, const OptT&, const OptT&, const OptT&, c10::IntArrayRef,
                                            double);
using bwd_sig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&,
                                                   const Tensor&, c10::IntArrayRef, double, std::array<bool, 3>);
const c10::TypedOperatorHandle<norm_sig>& norm_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("normkit_func::norm", "").typed<norm_sig>();
  return op;
}
const c10::TypedOperatorHandle<bwd_sig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("normkit_func::norm_backward", "").typed<bwd_sig>();
  return op;
}
// the backward's derivative: normkit.ops.library._double_backward (torch.func.vjp of the composite: run
// from the engine, as a Python Function's backward is, not from a kernel inside functorch's dispatch)
// (a leaked pointer: a static object would be destroyed after the interpreter, at exit)
pybind11::object* double_backward_fn = nullptr;

OptT opt(const Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }
Tensor val(const OptT& t) { return t ? *t : Tensor(); }

void no_tangent(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    TORCH_CHECK(!t->defined() || !t->_fw_grad(/*level=*/0).defined(), "normkit_func::", op,
                " has no forward-mode derivative: normkit runs its Python Function under jvp and forward AD "
                "(this op was called directly with a dual tensor)");
}

struct NormNode : public Node {
  SavedVariable x, w, b, mask, stats;
  std::vector<int64_t> dims;
  double eps = 0.0;
  std::string name() const override { return "NormkitNormBackward"; }
  void release_variables() override {
    for (auto* v : {&x, &w, &b, &mask, &stats}) v->reset_data();
  }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(3);
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const Tensor ww = w.unpack(), bb = b.unpack();
    std::array<bool, 3> needs{task_should_compute_output(0), ww.defined() && task_should_compute_output(1),
                              bb.defined() && task_should_compute_output(2)};
    if (!needs[0] && !needs[1] && !needs[2]) return out;
    auto [dx, dw, db] = bwd_op().call(dy, x.unpack(), opt(ww), opt(bb), opt(mask.unpack()), stats.unpack(), dims, eps,
                                      needs);
    if (needs[0]) out[0] = dx;
    if (needs[1]) out[1] = dw;
    if (needs[2]) out[2] = db;
    return out;
  }
};

std::tuple<Tensor, Tensor> norm_autograd(c10::DispatchKeySet ks, const Tensor& x, const OptT& w, const OptT& b,
                                         const OptT& mask, c10::IntArrayRef dims, double eps) {
  const Tensor W = val(w), B = val(b);
  no_tangent("norm", {&x, &W, &B});
  NodePtr node;
  NormNode* n = nullptr;
  if (torch::autograd::compute_requires_grad(x, W, B)) {
    node = make_node<NormNode>();
    n = static_cast<NormNode*>(node.get());
    n->set_next_edges(torch::autograd::collect_next_edges(x, W, B));
    n->x = SavedVariable(x, false);
    n->w = SavedVariable(W, false);
    n->b = SavedVariable(B, false);
    n->mask = SavedVariable(val(mask), false);
    n->dims = dims.vec();
    n->eps = eps;
  }
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return norm_op().redispatch(ks & c10::after_autograd_keyset, x, w, b, mask, dims, eps);
  }();
  if (n) {
    torch::autograd::set_history(std::get<0>(out), node);
    n->stats = SavedVariable(std::get<1>(out), false);
  }
  return out;
}

// the backward's own derivative (double backward, hessian, third order): double_backward_fn
struct NormBackwardNode : public Node {
  SavedVariable dy, x, w, b, mask, stats;
  std::vector<int64_t> dims;
  double eps = 0.0;
  std::array<bool, 3> needs{};
  std::string name() const override { return "NormkitNormBackwardBackward"; }
  void release_variables() override {
    for (auto* v : {&dy, &x, &w, &b, &mask, &stats}) v->reset_data();
  }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(3);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return out;
    const Tensor ww = w.unpack();
    TORCH_CHECK(double_backward_fn, "normkit_autograd: set_double_backward() was not called");
    Tensor gdy, gx, gw;
    {
      pybind11::gil_scoped_acquire gil;
      std::tie(gdy, gx, gw) =
          (*double_backward_fn)(opt(grads[0]), opt(grads[1]), opt(grads[2]), dy.unpack(), x.unpack(), opt(ww),
                             opt(b.unpack()), opt(mask.unpack()), stats.unpack(), dims, eps, needs)
              .cast<std::tuple<Tensor, Tensor, Tensor>>();
    }
    if (task_should_compute_output(0)) out[0] = gdy;
    if (task_should_compute_output(1)) out[1] = gx;
    if (ww.defined() && task_should_compute_output(2)) out[2] = gw;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> norm_backward_autograd(c10::DispatchKeySet ks, const Tensor& dy, const Tensor& x,
                                                          const OptT& w, const OptT& b, const OptT& mask,
                                                          const Tensor& stats, c10::IntArrayRef dims, double eps,
                                                          std::array<bool, 3> needs) {
  const Tensor W = val(w);
  no_tangent("norm_backward", {&dy, &x, &W});
  NodePtr node;
  NormBackwardNode* n = nullptr;
  if (torch::autograd::compute_requires_grad(dy, x, W)) {
    node = make_node<NormBackwardNode>();
    n = static_cast<NormBackwardNode*>(node.get());
    n->set_next_edges(torch::autograd::collect_next_edges(dy, x, W));
    n->dy = SavedVariable(dy, false);
    n->x = SavedVariable(x, false);
    n->w = SavedVariable(W, false);
    n->b = SavedVariable(val(b), false);
    n->mask = SavedVariable(val(mask), false);
    n->stats = SavedVariable(stats, false);
    n->dims = dims.vec();
    n->eps = eps;
    n->needs = needs;
  }
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return bwd_op().redispatch(ks & c10::after_autograd_keyset, dy, x, w, b, mask, stats, dims, eps, needs);
  }();
  if (n) {
    // every output gets the node (one not computed is an empty tensor; its gradient is never used)
    for (const Tensor* t : {&std::get<0>(out), &std::get<1>(out), &std::get<2>(out)})
      torch::autograd::set_history(*t, node);
  }
  return out;
}


// ---- GroupNorm (no affine) + Proxy Norm's activation: GroupNormProxyAct2d's step, the same op pair ----------
// `gn_proxy_act` returns (out, stats, m, r): the output, the norm's saved statistics (empty where the kernels
// handed the batch to the reference) and the proxy statistics; only `out` is differentiable (w.r.t. x, weight,
// bias, proxy_bias, proxy_weight; the points are a buffer). Its backward returns the five gradients (an empty
// tensor for one not asked for); the backward's own derivative is Python's (gn_proxy_double_backward_fn).
struct GNPConfig {
  int64_t groups = 0, act = 0;
  double eps = 0.0, slope = 0.0, peps = 0.0;
};
using gnp_sig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, int64_t, double, int64_t,
                                                           double, double);
using gnp_bwd_sig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, int64_t, double, int64_t, double, double, std::array<bool, 5>);
const c10::TypedOperatorHandle<gnp_sig>& gnp_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("normkit_func::gn_proxy_act", "").typed<gnp_sig>();
  return op;
}
const c10::TypedOperatorHandle<gnp_bwd_sig>& gnp_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("normkit_func::gn_proxy_act_backward", "")
                             .typed<gnp_bwd_sig>();
  return op;
}
pybind11::object* gnp_double_backward_fn = nullptr;  // normkit.kernels._func._gnp_double_backward (leaked)

// What both GN + proxy nodes save: the step's inputs, its statistics and its configuration.
struct GNPSaved {
  SavedVariable x, w, b, pb, pw, u, stats, m, r;
  GNPConfig cfg;
  void save_inputs(const Tensor& x_, const Tensor& w_, const Tensor& b_, const Tensor& pb_, const Tensor& pw_,
                   const Tensor& u_, const GNPConfig& cfg_) {
    x = SavedVariable(x_, false);
    w = SavedVariable(w_, false);
    b = SavedVariable(b_, false);
    pb = SavedVariable(pb_, false);
    pw = SavedVariable(pw_, false);
    u = SavedVariable(u_, false);
    cfg = cfg_;
  }
  void save_stats(const Tensor& stats_, const Tensor& m_, const Tensor& r_) {
    stats = SavedVariable(stats_, false);
    m = SavedVariable(m_, false);
    r = SavedVariable(r_, false);
  }
  void reset() {
    for (auto* v : {&x, &w, &b, &pb, &pw, &u, &stats, &m, &r}) v->reset_data();
  }
};

struct GNProxyNode : public Node {
  GNPSaved s;
  std::string name() const override { return "NormkitGNProxyActBackward"; }
  void release_variables() override { s.reset(); }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(5);
    if (!grads[0].defined()) return out;
    std::array<bool, 5> needs{};
    bool any = false;
    for (size_t i = 0; i < 5; ++i) any |= needs[i] = task_should_compute_output(i);
    if (!any) return out;
    const GNPConfig& c = s.cfg;
    auto got = gnp_bwd_op().call(grads[0], s.x.unpack(), s.w.unpack(), s.b.unpack(), s.pb.unpack(), s.pw.unpack(),
                                 s.u.unpack(), s.stats.unpack(), s.m.unpack(), s.r.unpack(), c.groups, c.eps, c.act,
                                 c.slope, c.peps, needs);
    const std::array<Tensor, 5> all{std::get<0>(got), std::get<1>(got), std::get<2>(got), std::get<3>(got),
                                    std::get<4>(got)};
    for (size_t i = 0; i < 5; ++i)
      if (needs[i]) out[i] = all[i];
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> gnp_autograd(c10::DispatchKeySet ks, const Tensor& x, const Tensor& w,
                                                        const Tensor& b, const Tensor& pb, const Tensor& pw,
                                                        const Tensor& u, int64_t groups, double eps, int64_t act,
                                                        double slope, double peps) {
  no_tangent("gn_proxy_act", {&x, &w, &b, &pb, &pw});
  NodePtr node;
  GNProxyNode* n = nullptr;
  if (torch::autograd::compute_requires_grad(x, w, b, pb, pw)) {
    node = make_node<GNProxyNode>();
    n = static_cast<GNProxyNode*>(node.get());
    n->set_next_edges(torch::autograd::collect_next_edges(x, w, b, pb, pw));
    n->s.save_inputs(x, w, b, pb, pw, u, GNPConfig{groups, act, eps, slope, peps});
  }
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gnp_op().redispatch(ks & c10::after_autograd_keyset, x, w, b, pb, pw, u, groups, eps, act, slope, peps);
  }();
  if (n) {
    torch::autograd::set_history(std::get<0>(out), node);
    n->s.save_stats(std::get<1>(out), std::get<2>(out), std::get<3>(out));
  }
  return out;
}

struct GNProxyBackwardNode : public Node {
  GNPSaved s;
  SavedVariable dout;
  std::array<bool, 5> needs{};
  std::string name() const override { return "NormkitGNProxyActBackwardBackward"; }
  void release_variables() override {
    s.reset();
    dout.reset_data();
  }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(6);
    bool any = false;
    for (const Tensor& g : grads) any |= g.defined();
    if (!any) return out;
    TORCH_CHECK(gnp_double_backward_fn, "normkit_autograd: set_gn_proxy_double_backward() was not called");
    const GNPConfig& c = s.cfg;
    std::vector<Tensor> got;
    {
      pybind11::gil_scoped_acquire gil;
      got = (*gnp_double_backward_fn)(opt(grads[0]), opt(grads[1]), opt(grads[2]), opt(grads[3]), opt(grads[4]),
                                      dout.unpack(), s.x.unpack(), s.w.unpack(), s.b.unpack(), s.pb.unpack(),
                                      s.pw.unpack(), s.u.unpack(), s.stats.unpack(), s.m.unpack(), s.r.unpack(),
                                      c.groups, c.eps, c.act, c.slope, c.peps, needs)
                .cast<std::vector<Tensor>>();
    }
    TORCH_CHECK(got.size() == 6, "normkit_autograd: the GN + proxy double backward returned ", got.size(),
                " tensors, expected 6");
    for (size_t i = 0; i < 6; ++i)
      if (task_should_compute_output(i)) out[i] = got[i];
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gnp_backward_autograd(
    c10::DispatchKeySet ks, const Tensor& dout, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pb,
    const Tensor& pw, const Tensor& u, const Tensor& stats, const Tensor& m, const Tensor& r, int64_t groups,
    double eps, int64_t act, double slope, double peps, std::array<bool, 5> needs) {
  no_tangent("gn_proxy_act_backward", {&dout, &x, &w, &b, &pb, &pw});
  NodePtr node;
  GNProxyBackwardNode* n = nullptr;
  if (torch::autograd::compute_requires_grad(dout, x, w, b, pb, pw)) {
    node = make_node<GNProxyBackwardNode>();
    n = static_cast<GNProxyBackwardNode*>(node.get());
    n->set_next_edges(torch::autograd::collect_next_edges(dout, x, w, b, pb, pw));
    n->dout = SavedVariable(dout, false);
    n->s.save_inputs(x, w, b, pb, pw, u, GNPConfig{groups, act, eps, slope, peps});
    n->s.save_stats(stats, m, r);
    n->needs = needs;
  }
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gnp_bwd_op().redispatch(ks & c10::after_autograd_keyset, dout, x, w, b, pb, pw, u, stats, m, r, groups,
                                   eps, act, slope, peps, needs);
  }();
  if (n) {
    for (Tensor* t : {&std::get<0>(out), &std::get<1>(out), &std::get<2>(out), &std::get<3>(out), &std::get<4>(out)})
      torch::autograd::set_history(*t, node);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(normkit_func, m) {
  m.def("norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? mask, int[] dims, float eps) -> (Tensor, Tensor)");
  m.def(
      "norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? mask, Tensor stats, int[] dims, "
      "float eps, bool[3] needs) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gn_proxy_act(Tensor x, Tensor weight, Tensor bias, Tensor proxy_bias, Tensor proxy_weight, Tensor points, "
      "int groups, float eps, int act, float slope, float proxy_eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gn_proxy_act_backward(Tensor dout, Tensor x, Tensor weight, Tensor bias, Tensor proxy_bias, "
      "Tensor proxy_weight, Tensor points, Tensor stats, Tensor m, Tensor r, int groups, float eps, int act, "
      "float slope, float proxy_eps, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normkit_func, Autograd, m) {
  m.impl("norm", norm_autograd);
  m.impl("norm_backward", norm_backward_autograd);
  m.impl("gn_proxy_act", gnp_autograd);
  m.impl("gn_proxy_act_backward", gnp_backward_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init, "the fused kernels' C entry points (addresses)");
  m.def("set_double_backward", [](pybind11::object f) { double_backward_fn = new pybind11::object(std::move(f)); },
        "the Python function normkit_func::norm_backward's node calls for its own derivative");
  m.def("set_gn_proxy_double_backward",
        [](pybind11::object f) { gnp_double_backward_fn = new pybind11::object(std::move(f)); },
        "the Python function normkit_func::gn_proxy_act_backward's node calls for its own derivative");
  m.def("fast_norm", &fast_norm,
        "the fused norm as one autograd node: output, or None when the batch needs the general path");
  m.def("last_mode", []() { return last_mode.load(); }, "the kernel pattern of the last fast_norm call (for tests)");
  m.def("group_norm_checked", &group_norm_checked,
        "normkit.functional.group_norm's arguments checked and run, or None (the general path)");
  m.def("layer_norm_checked", &layer_norm_checked,
        "normkit.functional.layer_norm's arguments checked and run, or None (the general path)");
  m.def("batch_norm_checked", &batch_norm_checked,
        "normkit.functional.batch_norm's arguments checked and run with batch statistics, or None");
  m.def("layer_norm_2d_checked", &layer_norm_2d_checked,
        "normkit.functional.layer_norm_2d's arguments checked and run, or None (the general path)");
  m.def("gn_proxy_act", &gn_proxy_act,
        "GroupNorm + Proxy Norm's activation as one autograd node: output, or None (the general path)");
}
