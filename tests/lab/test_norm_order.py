"""``post:`` specs: the norm after the activation (``conv -> act -> norm``), in the models, the checks, the
criteria, the plots and a tiny ``compare`` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit
from normkit.lab.experiments._common import ConfigError
from normkit.lab.experiments.compare import CompareConfig, e1_criteria, e3_criteria
from normkit.lab.experiments.power import PowerConfig
from normkit.lab.models import (
    CNN4,
    MLP3,
    MODEL_NAMES,
    ActNorm,
    PreActResNet,
    RandNet,
    VGGish,
    build_model,
    check_norm_spec,
)
from tests.lab.test_experiments import TINY, _compare


def _leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


def test_post_bn_orders_each_block_conv_act_norm() -> None:
    kinds = [type(m) for m in _leaves(CNN4("post:bn").features)]
    conv, relu, bn = nn.Conv2d, nn.ReLU, normkit.nn.BatchNorm2d
    assert kinds == [conv, relu, bn, conv, relu, bn, nn.MaxPool2d, conv, relu, bn, conv, relu, bn]
    # the conv before the activation keeps its bias; with the norm right after it (plain bn) it has none
    assert all(c.bias is not None for c in CNN4("post:bn").modules() if isinstance(c, nn.Conv2d))
    assert all(c.bias is None for c in CNN4("bn").modules() if isinstance(c, nn.Conv2d))
    assert not any(isinstance(m, normkit.nn.BatchNormAct2d) for m in CNN4("post:bn").modules())


def test_post_spec_in_the_head_and_the_other_models() -> None:
    head = build_model("cnn4-head", "post:gn:8").head
    assert isinstance(head, nn.Module)
    lin, relu, gn = _leaves(head)
    assert isinstance(lin, nn.Linear) and lin.bias is not None
    assert isinstance(relu, nn.ReLU) and isinstance(gn, normkit.nn.GroupNorm) and gn.num_groups == 8
    # instance norm: no norm on the head's 1x1 map, as without post:
    head = build_model("cnn4-head", "post:in").head
    assert isinstance(head, nn.Module)
    assert not any(isinstance(m, normkit.nn.InstanceNorm2d) for m in head.modules())
    res = PreActResNet("post:bn")
    blocks = [m for m in res.modules() if isinstance(m, ActNorm)]
    assert len(blocks) == 5 and all(isinstance(b[0], nn.ReLU) for b in blocks)
    assert all(c.bias is not None for c in [res.stem, res.blocks[0].conv1, res.blocks[0].conv2])
    vgg = VGGish("post:ln", width=4)
    assert sum(isinstance(m, ActNorm) for m in vgg.modules()) == 6
    mlp = MLP3("post:bn")
    assert mlp.norm == "post:bn1d" and all(lin.bias is not None for lin in mlp.linears)
    acts = [na for na in mlp.norm_acts if isinstance(na, ActNorm)]
    assert len(acts) == 3
    assert all(isinstance(na[0], nn.Sigmoid) and isinstance(na[1], nn.BatchNorm1d) for na in acts)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("norm", ["post:bn", "post:gn:8", "post:ln", "post:in"])
def test_every_model_runs_with_a_post_spec(model: str, norm: str) -> None:
    torch.manual_seed(0)
    out = build_model(model, norm)(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.sum().backward()


def _twin() -> nn.Sequential:
    """CNN-4 with ``post:bn`` written out in plain torch."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout)]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def test_post_bn_equals_a_plain_torch_twin_in_train_and_eval() -> None:
    torch.manual_seed(0)
    model, twin = CNN4("post:bn"), _twin()
    with torch.no_grad():  # BN's affine away from (1, 0), so that a misplaced one shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ours, theirs = model.state_dict(), twin.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    twin.load_state_dict(dict(zip(theirs, ours.values())))
    x = torch.randn(6, 1, 8, 8)
    for _ in range(2):  # train mode: batch statistics, and the running ones updated alike
        torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()
    twin.eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)


def test_mlp3_post_spec_returns_the_sigmoid_input() -> None:
    torch.manual_seed(0)
    mlp = MLP3("post:bn")
    x = torch.randn(5, 64)
    _, pre = mlp(x, return_hidden=True)
    h = x
    for lin, na in zip(mlp.linears, mlp.norm_acts):
        assert isinstance(na, ActNorm)
        z = lin(h)
        h = na[1](torch.sigmoid(z))
    torch.testing.assert_close(pre, z)


def test_spec_parsing_and_refusals() -> None:
    assert check_norm_spec(" POST:GN:8 ") == "post:gn:8"
    with pytest.raises(ValueError, match=r"'post:none': there is no norm to put after the activation"):
        check_norm_spec("post:none")
    with pytest.raises(ValueError, match=r"'post:ln\+pn': 'ln\+pn' contains its own activation"):
        check_norm_spec("post:ln+pn")
    with pytest.raises(ValueError, match=r"'post:gn:4\+pn'"):
        CNN4("post:gn:4+pn")
    with pytest.raises(ValueError, match=r"'post:post:bn': 'post:' given twice"):
        check_norm_spec("post:post:bn")
    with pytest.raises(ValueError, match=r"'post:batchnorm': .*unknown norm 'batchnorm'"):
        check_norm_spec("post:batchnorm")
    with pytest.raises(ValueError, match=r"RandNet: 'post:bn' puts the norm after the activation"):
        RandNet("post:bn", depth=1, width=8)


def test_config_checks_name_the_spec_and_the_model() -> None:
    cfg = CompareConfig(norms=["bn", "post:bn", "POST:BN"], models=["cnn4"], **TINY).validate()
    assert cfg.norms == ["bn", "post:bn"]
    with pytest.raises(ConfigError, match=r"--norms: norm spec 'post:none'"):
        CompareConfig(norms=["post:none"], **TINY).validate()
    with pytest.raises(ConfigError, match=r"--norms: norm spec 'post:ln\+pn'"):
        CompareConfig(norms=["post:ln+pn"], **TINY).validate()
    with pytest.raises(ConfigError, match=r"--norms 'post:gn:3' does not fit cnn4"):
        CompareConfig(norms=["post:gn:3"], models=["cnn4"], **TINY).validate()
    with pytest.raises(ConfigError, match=r"batch size 1 cannot train BN"):
        CompareConfig(norms=["post:bn"], batch_sizes=[1], **TINY).validate()
    with pytest.raises(ConfigError, match=r"--norms 'post:bn' does not fit RandNet"):
        PowerConfig(norms=["bn", "post:bn"], **TINY).validate()


def _rows(cells: list[tuple[str, int, float]]) -> list[dict]:
    return [
        {"model": "m", "norm": n, "batch_size": b, "test_err_mean": e, "test_err_std": 0.5, "seeds": 3}
        for n, b, e in cells
    ]


def test_criteria_keep_post_specs_out_of_bn_gn_and_in() -> None:
    rows = _rows(
        [
            ("post:bn", 32, 1.0),
            ("post:bn", 2, 1.0),
            ("bn", 32, 1.0),
            ("bn", 2, 9.0),
            ("post:gn:8", 32, 1.0),
            ("post:gn:8", 2, 1.2),
            ("gn:8", 32, 1.5),
            ("gn:8", 2, 1.5),
        ]
    )
    crit = e1_criteria(rows, "m")
    first = next(c for c in crit if c["name"] == "E1 (i)")
    assert first["ok"] and "9.00 vs 1.00" in first["detail"]  # bn's, not post:bn's
    ii = [c["text"] for c in crit if c["name"] == "E1 (ii)"]
    assert any(t.startswith("post:gn:8 ") for t in ii) and not any("post:bn" in t for t in ii)
    third = next(c for c in crit if c["name"] == "E1 (iii)")
    assert third["text"].startswith("gn:8 − BN")
    rows = _rows(
        [("bn", 32, 1.0), ("gn:8", 32, 2.0), ("in", 32, 5.0), ("post:in", 32, 1.0), ("post:bn", 32, 9)]
    )
    (e3,) = e3_criteria(rows, "m")
    assert e3["ok"] and e3["detail"] == "5.00 vs worst 5.00"  # IN vs the worst before the activation


def test_post_styles_share_the_colour_and_differ_in_dash() -> None:
    from normkit.lab.plots import _styles, norm_family

    assert norm_family("post:bn") == "post:bn" and norm_family("post:gn:8") == "post:gn"
    st = _styles(["bn", "post:bn", "gn:8", "post:gn:8", "ws", "post:ws"])
    assert st["bn"]["color"] == st["post:bn"]["color"] and st["bn"]["linestyle"] != st["post:bn"]["linestyle"]
    assert st["gn:8"]["marker"] == st["post:gn:8"]["marker"] and st["post:gn:8"]["fillstyle"] == "top"
    assert st["ws"]["color"] != st["post:ws"]["color"]  # unknown families: a spare style each


def test_compare_figure_with_one_batch_size_draws_post_specs() -> None:
    from normkit.lab.plots import compare_figure

    rows = _rows([("bn", 32, 1.0), ("post:bn", 32, 1.5), ("ln+pn", 32, 1.2)])
    fig = compare_figure(rows)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["bn", "post:bn", "ln+pn"]


def test_compare_runs_bn_and_post_bn(tmp_path: Path) -> None:
    path = _compare(tmp_path, models=["cnn4"], norms=["bn", "post:bn"], epochs=1)
    results = json.loads((path / "results.json").read_text())
    cells = {(r["norm"], r["batch_size"]) for r in results["aggregate"]}
    assert cells == {(n, b) for n in ("bn", "post:bn") for b in (8, 4)}
    assert all("test_err_batch_stats_mean" in r for r in results["aggregate"])  # post:bn is BN too
    summary = (path / "summary.md").read_text()
    for row in ("| bn |", "| bn (batch stats) |", "| post:bn |", "| post:bn (batch stats) |"):
        assert row in summary, row
    e1 = [c for c in results["criteria"]["cnn4"] if c["name"] == "E1 (i)"]
    assert len(e1) == 1 and "post" not in e1[0]["text"]
    assert not any(c["name"] == "E1 (ii)" for c in results["criteria"]["cnn4"])  # both batch-dependent
    assert (path / "error_vs_batch.png").is_file() and (path / "curves.png").is_file()
