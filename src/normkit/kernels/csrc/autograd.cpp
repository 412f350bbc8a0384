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

#include <torch/extension.h>

#include <cstdint>
#include <optional>

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

fwd_t k_fwd = nullptr;
train_t k_train = nullptr;
bwd_t k_bwd = nullptr;

enum Mode : int64_t { BATCH_NCHW = 0, BATCH_CL = 1, GROUP_NCHW = 2, GROUP_CL = 3, CHANNEL_NCHW = 4 };
enum Kind : int64_t { K_BATCH = 0, K_GROUP = 1, K_CHANNEL = 2 };  // what the norm is (for the recomputation)

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
  const std::optional<Tensor> ow = w.defined() ? std::optional<Tensor>(w) : std::nullopt;
  const std::optional<Tensor> ob = b.defined() ? std::optional<Tensor>(b) : std::nullopt;
  if (kind == K_BATCH) return at::batch_norm(x, ow, ob, std::nullopt, std::nullopt, true, 0.0, eps, false);
  if (kind == K_CHANNEL) return at::layer_norm(x.movedim(1, -1), {C}, ow, ob, eps, false).movedim(-1, 1);
  return at::group_norm(x, G, ow, ob, eps, false);
}

// A forward already computed (the kernel ran before the node exists, so a batch it hands back never
// creates one): the node only records it. Not a tensor argument, so autograd does not track it.
struct Prepared {
  Tensor y, st;
};

struct FastNorm : public torch::autograd::Function<FastNorm> {
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
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate a differentiable recomputation
      std::vector<Tensor> inputs;
      std::vector<int> where;
      if (need_x) inputs.push_back(x), where.push_back(0);
      if (need_w) inputs.push_back(w), where.push_back(1);
      if (need_b) inputs.push_back(b), where.push_back(2);
      if (inputs.empty()) return out;
      const Tensor y = recompute(x, w, b, kind, C, G, ctx->saved_data["eps"].toDouble());
      auto g = torch::autograd::grad({y}, inputs, {dy}, /*retain_graph=*/true, /*create_graph=*/true,
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
    out[1] = need_w ? (dw.scalar_type() == w.scalar_type() ? dw : dw.to(w.scalar_type())) : Tensor();
    out[2] = need_b ? (db.scalar_type() == b.scalar_type() ? db : db.to(b.scalar_type())) : Tensor();
    return out;
  }
};

// The fused norm: output (an autograd node when any input requires grad), or None when the batch
// needs the general path (statistics outside the kernels' exact range).
Tensor fast_norm(const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b, int64_t mode,
                 int64_t N, int64_t C, int64_t S, int64_t G, int64_t kind, double eps, const std::optional<Tensor>& rm,
                 const std::optional<Tensor>& rv, const std::optional<Tensor>& nbt, double momentum, bool unbiased) {
  TORCH_CHECK(k_fwd && k_train && k_bwd, "normkit_autograd: init() was not called");
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
  return FastNorm::apply(x, w, b, prep, std::vector<int64_t>{mode, N, C, S, G, kind}, eps);
}

void init(int64_t fwd, int64_t train, int64_t bwd) {
  k_fwd = reinterpret_cast<fwd_t>(fwd);
  k_train = reinterpret_cast<train_t>(train);
  k_bwd = reinterpret_cast<bwd_t>(bwd);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init, "the fused kernels' C entry points (addresses)");
  m.def("fast_norm", &fast_norm,
        "the fused norm as one autograd node: output, or None when the batch needs the general path");
}
