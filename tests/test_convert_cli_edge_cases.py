"""normkit.convert.from_keras_bn and command-line paths the rest of the suite leaves out.

Found by measuring coverage. Oracles: Keras's documented inference formula written out here,
``normkit.kernels.status()`` for what ``normkit kernels status`` prints, and the documented
error types and messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import normkit
from normkit import NormError
from normkit.cli import main
from normkit.convert import from_keras_bn


class _KerasLike:
    """The slice of a Keras layer that from_keras_bn reads (get_weights / get_config), plus attributes."""

    def __init__(self, weights: list[Any], config: dict[str, Any], **attrs: Any) -> None:
        self._w, self._c = weights, config
        for k, v in attrs.items():
            setattr(self, k, v)

    def get_weights(self) -> list[np.ndarray]:
        return [np.array(w) for w in self._w]

    def get_config(self) -> dict[str, Any]:
        return dict(self._c)


_W4 = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
_STATS = {"moving_mean": torch.zeros(3), "moving_variance": torch.ones(3)}


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (
            lambda: from_keras_bn(_KerasLike(_W4, {}, adjustment=lambda *a: a)),
            "the layer has an adjustment callable",
        ),
        (
            lambda: from_keras_bn(_KerasLike(_W4[:3], {})),
            "expected weights ['gamma', 'beta', 'moving_mean', 'moving_variance'] from the layer, "
            "got 3 arrays",
        ),
        (
            lambda: from_keras_bn(_STATS, variance="x"),
            "variance must be None, 'biased' or 'unbiased', got 'x'",
        ),
        (
            lambda: from_keras_bn({**_STATS, "gamma": torch.ones(4)}),
            "gamma has 4 values but moving_mean has 3",
        ),
    ],
    ids=["adjustment", "weight-count", "variance", "gamma-size"],
)
def test_from_keras_bn_argument_errors(call: Callable[[], Any], words: str) -> None:
    with pytest.raises(NormError) as e:
        call()
    assert words in str(e.value)


def test_from_keras_bn_frozen_layer_without_scale() -> None:
    beta, mean, var = np.array([0.5, 0.0, -0.5]), np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 0.5])
    layer = _KerasLike(
        [beta, mean, var], {"scale": False, "center": True, "trainable": False, "epsilon": 1e-3}
    )
    bn = from_keras_bn(layer).double()
    assert type(bn).__name__ == "FrozenBatchNorm2d" and bn.weight is None
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    view = (1, 3, 1, 1)
    t = {
        k: torch.tensor(v, dtype=torch.float64).view(view) for k, v in (("b", beta), ("m", mean), ("v", var))
    }
    want = (x - t["m"]) / torch.sqrt(t["v"] + 1e-3) + t["b"]  # Keras's inference, scale=False
    torch.testing.assert_close(bn.train()(x), want, rtol=1e-12, atol=1e-12)  # frozen: the same in training


# --- command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bench", "--layouts", ","], "expected a comma-separated list"),
        (["bench", "--layouts", "nchw,xx"], "bad list 'nchw,xx': expected one of nchw, cl, got 'xx'"),
    ],
    ids=["empty-list", "bad-choice"],
)
def test_cli_list_arguments_are_checked(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_cli_kernels_status_and_build(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernels", "status"]) == 0
    assert capsys.readouterr().out.strip() == normkit.kernels.status().strip()
    assert main(["kernels", "build"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"normkit kernels: fused CPU kernels ready in {normkit.kernels.build_dir()}"
