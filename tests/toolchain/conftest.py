"""Fixtures shared by the torch.func tests (``test_func_rules``, ``test_func_ops``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def gn_pn_calls(monkeypatch):
    """Records which implementation ran: the fused Function's kernels, or the unfused composite's parts
    (normkit's norm Function, the ATen step, the composite statistics)."""
    from normkit.functional import proxy_norm as pn_module
    from normkit.kernels import _func
    from normkit.ops import library, proxy

    seen: dict[str, int] = {"fused forward": 0, "fused backward": 0, "unfused": 0}

    def count(key, fn):
        def wrapped(*a, **k):
            seen[key] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(_func, "_gn_act_forward", count("fused forward", _func._gn_act_forward))
    monkeypatch.setattr(_func, "_gn_act_backward", count("fused backward", _func._gn_act_backward))
    monkeypatch.setattr(library, "norm", count("unfused", library.norm))
    monkeypatch.setattr(proxy, "forward_aten", count("unfused", proxy.forward_aten))
    monkeypatch.setattr(
        pn_module, "_proxy_stats_composite", count("unfused", pn_module._proxy_stats_composite)
    )
    return seen
