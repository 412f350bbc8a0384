"""torch.fx plumbing shared by the surgery tools: a tracer that keeps norm layers whole, module paths."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import operator
import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.modules.lazy import LazyModuleMixin

from .._errors import NormError
from ..nn._inspect import ACT_FUNCTIONS, ACT_METHODS, BN_KINDS, NormInfo, describe_norm, is_activation_module
from ..nn.proxy_norm import ProxyNormAct

__all__ = [
    "NormTracer",
    "call_counts",
    "check_model",
    "deepcopy_model",
    "module_paths",
    "probe_input",
    "possible_ranks",
    "propagate_shapes",
    "replace_module",
    "run_failure",
    "trace",
]


_FUNCTIONAL_NORMS = {
    F.batch_norm: "F.batch_norm",
    F.instance_norm: "F.instance_norm",
    F.group_norm: "F.group_norm",
    F.layer_norm: "F.layer_norm",
    F.rms_norm: "F.rms_norm",
    F.local_response_norm: "F.local_response_norm",
    torch.batch_norm: "torch.batch_norm",
    torch.instance_norm: "torch.instance_norm",
    torch.group_norm: "torch.group_norm",
    torch.layer_norm: "torch.layer_norm",
}


def functional_norms(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """``(graph node, function)`` for each norm the traced forward calls as a function
    (``F.batch_norm(x, ...)``): the model-wide tools change modules, so they report these as left."""
    return [
        (n.name, _FUNCTIONAL_NORMS[n.target])  # type: ignore[index]
        for n in graph.nodes
        if n.op == "call_function" and n.target in _FUNCTIONAL_NORMS
    ]


def parametrized_reason(m: nn.Module, doing: str) -> str:
    """Why a tool leaves a layer whose tensors are parametrized (``torch.nn.utils.parametrize``)."""
    names = ", ".join(m.parametrizations)  # type: ignore[union-attr]
    return (
        f"its {names} is parametrized (torch.nn.utils.parametrize), which {doing} it would drop; remove "
        "the parametrization first (parametrize.remove_parametrizations(layer, name))"
    )


def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The eager module inside what ``torch.compile`` returned, else None (without importing dynamo)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod  # type: ignore[no-any-return]
    return None


def uncompiled(model: nn.Module, op: str) -> nn.Module:
    """``model``, or the eager module inside a ``torch.compile``-d one, with a warning that the result is
    not compiled (the tools trace and rebuild the eager module; compile what they return)."""
    inner = compiled_inner(model)
    if inner is None:
        return model
    warnings.warn(
        f"{op}: the model is a torch.compile'd module; {op} works on the eager module inside it "
        "(model._orig_mod) and returns that, not compiled: call torch.compile on the result",
        stacklevel=3,
    )
    return inner


def check_model(model: object, op: str, *, lazy: str = "all") -> nn.Module:
    """The model-wide tools' shared check of ``model``; returns it.

    Raises ``TypeError`` for a non-``nn.Module`` and for a TorchScript module (``torch.jit.script`` /
    ``torch.jit.trace``: its submodules are compiled code the tools cannot see into or replace), and
    :class:`NormError` naming the first lazy layer (``torch.nn.LazyBatchNorm2d``, ``LazyConv2d`` ...)
    whose parameters are still uninitialized. ``lazy="norms"`` checks only lazy norm layers (for a tool
    that touches nothing else), ``lazy="all"`` every lazy module.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{op}: scripted modules (torch.jit.script / torch.jit.trace, here {type(model).__name__}) are "
            "not supported; pass the eager nn.Module they were made from (and script it afterwards)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if not isinstance(m, LazyModuleMixin):
            continue
        if lazy == "norms" and not isinstance(m, nn.modules.batchnorm._LazyNormBase):
            continue
        if m.has_uninitialized_params():  # type: ignore[operator]
            where = f"layer '{name}'" if name else "the model"
            raise NormError(
                f"{op}: {where} ({type(m).__name__}) is a lazy layer whose parameters are not initialized "
                "yet (no shape); run one forward pass through the model first, so that it gets its shape"
            )
    return model


def deepcopy_model(model: nn.Module, op: str) -> nn.Module:
    """``copy.deepcopy(model)``, also for layers under the old hook-based ``torch.nn.utils.weight_norm``.

    Such a layer keeps its weight as a computed (non-leaf) tensor, which deepcopy refuses; the copy gets
    it detached (its pre-hook recomputes it at every forward anyway). Anything else deepcopy refuses
    raises :class:`NormError` saying so.
    """
    computed: list[tuple[nn.Module, str, Tensor]] = []
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            name = getattr(hook, "name", None)
            w = getattr(m, name, None) if isinstance(name, str) else None
            if type(hook).__name__ == "WeightNorm" and isinstance(w, Tensor) and not w.is_leaf:
                computed.append((m, name, w))  # type: ignore[arg-type]
    try:
        for m, name, w in computed:
            setattr(m, name, w.detach())
        return copy.deepcopy(model)
    except RuntimeError as exc:
        raise NormError(
            f"{op}: the model cannot be deep-copied ({exc}); if it uses the old hook-based "
            "torch.nn.utils.weight_norm, call torch.nn.utils.remove_weight_norm first or use "
            "torch.nn.utils.parametrizations.weight_norm"
        ) from exc
    finally:
        for m, name, w in computed:
            setattr(m, name, w)


class _ShapeProp(ShapeProp):
    """fx's ShapeProp, remembering the node that failed."""

    failed: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception:
            self.failed = n
            raise


def run_failure(
    op: str,
    what: str,
    exc: BaseException,
    *,
    node: torch.fx.Node | None = None,
    modules: Mapping[str, nn.Module] | None = None,
    probed: bool = False,
) -> NormError:
    """The :class:`NormError` for a model that failed on an input: where (the layer, when known), the
    underlying error (not fx's wrapper around it), and the fix (pass ``example_input``)."""
    root: BaseException = exc
    while root.__cause__ is not None and str(root).startswith("ShapeProp error"):
        root = root.__cause__  # fx's "ShapeProp error for: node=..." wraps the real error
    where = ""
    if node is not None:
        mod = (modules or {}).get(str(node.target)) if node.op == "call_module" else None
        if mod is not None:
            where = f" in layer '{node.target}' ({type(mod).__name__})"
        else:
            where = f" in {node.op} {getattr(node.target, '__name__', node.target)}"
    msg = str(root).strip().splitlines()[0] if str(root).strip() else ""
    fix = (
        "the probe is only a guess shaped for the model's first layer, not the input size the rest of the "
        "model expects: pass example_input=<a batch the model accepts>"
        if probed
        else "pass an example_input the model accepts"
    )
    return NormError(f"{op}: the model failed on the {what}{where}: {type(root).__name__}: {msg}; {fix}")


def propagate_shapes(
    gm: torch.fx.GraphModule, args: tuple[Any, ...], op: str, what: str, *, probed: bool = False
) -> None:
    """Run fx's ShapeProp on ``args`` (no grad); its failure becomes :class:`NormError` naming the failing
    layer, the underlying error (``mat1 and mat2 shapes cannot be multiplied ...``) and the fix.

    ShapeProp prints the traceback of a failing node to stderr before raising; that print is swallowed,
    the exception is kept as the cause.
    """
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*args)
    except Exception as exc:
        modules = dict(gm.named_modules())
        raise run_failure(op, what, exc, node=prop.failed, modules=modules, probed=probed) from exc


class NormTracer(torch.fx.Tracer):
    """fx's tracer, with every norm layer (any library) and activation module kept as one ``call_module``
    node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, ProxyNormAct) or is_activation_module(m) or describe_norm(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The fx graph of ``model`` (norm layers and activations as leaves); raises what fx raises."""
    return NormTracer().trace(model)


def trace_or_reason(model: nn.Module) -> tuple[torch.fx.Graph | None, str]:
    """``(graph, "")``, or ``(None, why)`` when torch.fx cannot trace the model."""
    try:
        return trace(model), ""
    except Exception as exc:  # fx raises many kinds of exception on data-dependent control flow
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def call_counts(graph: torch.fx.Graph) -> Counter[str]:
    """How many times each module path is called in the graph."""
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_module")


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> [every path it is reachable by]`` (a module shared by two parents has two)."""
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return paths


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (``"layer1.0.bn1"``) inside ``model``."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


# Shape-only ops a (N, C) value may pass through on its way between a Linear and a 2d norm (CNN-4's
# head views (N, C) as (N, C, 1, 1)), or between a norm and the layer after it.
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze}
_VIEW_METHODS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "__getitem__"}


def is_singleton_view(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A view that only adds or removes trailing size-1 dims of an ``(N, C, 1, ...)`` value (shapes from
    ShapeProp)."""
    is_view = (
        (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
        or (node.op == "call_method" and node.target in _VIEW_METHODS)
        or (node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Flatten))
    )
    if not is_view:
        return False
    src = node.args[0] if node.args else None
    if not isinstance(src, torch.fx.Node):
        return False
    before, after = _shape(src), _shape(node)
    if before is None or after is None or len(before) < 2 or len(after) < 2:
        return False
    return before[:2] == after[:2] and all(s == 1 for s in before[2:]) and all(s == 1 for s in after[2:])


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def node_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The output shape ShapeProp recorded for a node, or None."""
    return _shape(node)


# --- the input ranks a value can have --------------------------------------------------------------

Ranks = frozenset[int] | None  # the ranks a value can have; None: any (nothing in the graph fixes it)

_POOLS = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_SAME_RANK_METHODS = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "nanmean", "nansum"}
_BROADCASTS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}


def _arg(node: torch.fx.Node, i: int, key: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _flattened(start: Any, end: Any) -> Ranks:
    """``flatten(start, -1)`` gives ``start + 1`` dims, whatever the input rank."""
    if isinstance(start, int) and not isinstance(start, bool) and start >= 0 and end == -1:
        return frozenset({start + 1})
    return None


def _reduced(ranks: Ranks, dims: Any, keepdim: Any) -> Ranks:
    if ranks is None or keepdim not in (True, False):
        return None
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    out = {r if keepdim else r - len({d % r for d in dims}) for r in ranks if all(-r <= d < r for d in dims)}
    return frozenset(out)


def _module_ranks(m: nn.Module | None, r: Ranks) -> Ranks:
    def within(*allowed: int) -> Ranks:
        return frozenset(allowed) if r is None else r & frozenset(allowed)

    if isinstance(m, nn.modules.conv._ConvNd):
        nd = len(m.kernel_size)
        return within(nd + 1, nd + 2)  # (C, *spatial) or (N, C, *spatial); the output has the same rank
    if isinstance(m, _POOLS):
        nd = _rank_suffix(type(m).__name__)
        return within(nd + 1, nd + 2) if nd else None
    if isinstance(m, nn.Flatten):
        return _flattened(m.start_dim, m.end_dim)
    if isinstance(m, (nn.Linear, nn.Identity, nn.modules.dropout._DropoutNd)) or is_activation_module(m):
        return r
    info = describe_norm(m) if m is not None else None
    if isinstance(info, NormInfo):
        if info.kind in BN_KINDS and info.rank is not None:
            return within(*{1: (2, 3), 2: (4,), 3: (5,)}[info.rank])
        return r  # (a norm keeps its input's shape)
    return None


def _rank_suffix(name: str) -> int | None:
    for nd in (1, 2, 3):
        if name.endswith(f"{nd}d"):
            return nd
    return None


def possible_ranks(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> dict[torch.fx.Node, Ranks]:
    """For each node, the ranks its value can have for *any* input the model accepts (None: any rank).

    Only what the graph proves: a Conv2d's output is 3-D or 4-D (unbatched or batched), a
    BatchNorm2d's 4-D, ``x.mean(dim=(2, 3))`` of a 4-D value 2-D, ``Flatten()`` / ``torch.flatten(x, 1)``
    2-D, ``x.view(n, -1)`` 2-D; a Linear, an activation, dropout and the norms keep their input's rank;
    the model's inputs and every other operation give None. :func:`normkit.fold_bn` folds a BN into a
    Linear without an example input only where this proves the Linear's output 2-D ``(N, C)``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(36, 5))
        >>> ranks = possible_ranks(trace(net), dict(net.named_modules()))
        >>> [(n.name, sorted(r) if r is not None else "any") for n, r in ranks.items() if n.op != "output"]
        [('input_1', 'any'), ('_0', [3, 4]), ('_1', [2]), ('_2', [2])]
    """
    ranks: dict[torch.fx.Node, Ranks] = {}

    def of(a: Any) -> Ranks:
        return ranks.get(a) if isinstance(a, torch.fx.Node) else None

    for node in graph.nodes:
        r0 = of(node.args[0]) if node.args else None
        out: Ranks = None
        if node.op == "call_module":
            out = _module_ranks(modules.get(str(node.target)), r0)
        elif node.op == "call_function":
            if node.target in ACT_FUNCTIONS:
                out = r0
            elif node.target is torch.flatten:
                out = _flattened(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
            elif node.target is torch.reshape:
                shape = _arg(node, 1, "shape", None)
                out = frozenset({len(shape)}) if isinstance(shape, (tuple, list)) else None
            elif node.target in (torch.mean, torch.sum, torch.amax, torch.amin):
                out = _reduced(r0, _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
            elif node.target in _BROADCASTS:
                tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
                sets = [r for r in map(of, tensors) if r is not None]
                if tensors and len(sets) == len(tensors):
                    out = frozenset(max(c) for c in itertools.product(*sets))  # (broadcasting)
        elif node.op == "call_method":
            name = str(node.target)
            if name in ACT_METHODS or name in _SAME_RANK_METHODS:
                out = r0
            elif name == "flatten":
                out = _flattened(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
            elif name in ("view", "reshape"):
                sizes = node.args[1:]
                if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                    out = frozenset({len(sizes[0])})
                elif sizes and not (len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node)):
                    out = frozenset({len(sizes)})  # (one Node alone may be a whole shape)
            elif name in _REDUCTIONS:
                out = _reduced(r0, _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
        ranks[node] = out
    return ranks


def probe_input(model: nn.Module, op: str, graph: torch.fx.Graph | None = None) -> Tensor:
    """A small deterministic input batch shaped for the model's first layer (conv, linear or norm).

    The first call_module node of ``graph`` decides (else the first module in ``named_modules``
    order); raises :class:`NormError` when that layer says nothing about the input shape.
    """
    modules = dict(model.named_modules())
    first: nn.Module | None = None
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module":
                first = modules.get(str(node.target))
                break
    if first is None:
        first = next((m for m in model.modules() if not list(m.children())), None)
    shape: tuple[int, ...] | None = None
    sizes = {1: 64, 2: 32, 3: 12}
    if isinstance(first, nn.modules.conv._ConvNd):
        nd = len(first.kernel_size)
        size = sizes[nd] if not isinstance(first, nn.modules.conv._ConvTransposeNd) else 8
        shape = (2, first.in_channels) + (size,) * nd
    elif isinstance(first, nn.Linear):
        shape = (2, first.in_features)
    else:
        info = describe_norm(first) if first is not None else None
        if info is not None and not isinstance(info, str):
            nd = info.rank or 2
            shape = (2, info.num_channels) + (sizes[nd] // 2,) * nd
    if shape is None:
        raise NormError(
            f"{op}: cannot make a probe input from the model's first layer "
            f"({type(first).__name__ if first is not None else 'none'}); pass example_input"
        )
    ref = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between the tensors of two outputs of the same structure."""
    from torch.utils._pytree import tree_leaves

    la, lb = tree_leaves(a), tree_leaves(b)
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, Tensor) and isinstance(y, Tensor) and x.numel():
            d = (x.detach().to(torch.float64) - y.detach().to(torch.float64)).abs().max().item()
            worst = float("nan") if math.isnan(d) or math.isnan(worst) else max(worst, d)
    return worst
