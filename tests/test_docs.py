"""The README and the documentation say true things: their code runs, their links resolve, and the
measured "why normkit" rows hold on this machine (the script behind them is run here).

The site itself (Sphinx, warnings as errors, tutorials executed) is built by CI's docs step.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("[0-9][0-9]_*.py"))
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def _python_block_after(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no python block after {heading!r} in {path.name}"
    return match.group(1)


@pytest.mark.parametrize(
    "path, heading",
    [(README, "## A 30-second tour"), (DOCS / "index.md", "## Thirty seconds")],
    ids=["README", "docs-index"],
)
def test_the_tour_runs(path: Path, heading: str) -> None:
    code = _python_block_after(path, heading)
    namespace: dict[str, object] = {}
    exec(compile(code, f"{path.name}:{heading}", "exec"), namespace)


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_the_tutorials_readme_names_are_the_files() -> None:
    text = README.read_text()
    named = re.findall(r"docs/tutorials/(\d\d_\w+\.py)", text)
    for name in named:
        assert (DOCS / "tutorials" / name).exists(), name
    assert len(TUTORIALS) >= 3
    # and the other way: every tutorial is linked from the README
    assert sorted(named) == [p.name for p in TUTORIALS], (named, [p.name for p in TUTORIALS])


def _doc_example_namespace() -> dict[str, object]:
    """What the README's fragments take as given: a small conv net with BN, a batch, a loader."""
    import normkit

    torch.manual_seed(0)
    # fmt: off
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )
    # fmt: on
    batch = torch.randn(8, 3, 8, 8)
    loader = [(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    return {
        "torch": torch,
        "normkit": normkit,
        "model": model,
        "example_batch": batch,
        "batch": batch,
        "train_loader": loader,
    }


@pytest.mark.parametrize(
    "heading",
    ["### Proxy Normalization", "### Batch norm across processes", "### Model surgery and diagnostics"],
)
def test_the_readme_fragments_run(heading: str) -> None:
    code = _python_block_after(README, heading)
    # DistributedDataParallel needs a process group (tests/distributed/ runs it on real gloo groups);
    # the rest of the fragment runs as written, without one.
    code = code.replace("torch.nn.parallel.DistributedDataParallel(model)", "model")
    namespace = _doc_example_namespace()
    exec(compile(code, f"README.md:{heading}", "exec"), namespace)
    if "folded" in namespace and "max_diff" in namespace:
        assert namespace["max_diff"] < 1e-4  # type: ignore[operator]


def test_the_differences_example_prints_its_comment() -> None:
    """docs/differences.md's NaN example: its last line evaluates to what the comment under it shows."""
    code = _python_block_after(DOCS / "differences.md", "## Non-finite batches")
    lines = code.strip().splitlines()
    comment = lines.pop()
    assert comment.startswith("#"), comment
    expected = comment.lstrip("# ").split("  ")[0]
    namespace: dict[str, object] = {"torch": torch, "normkit": importlib.import_module("normkit")}
    exec(compile("\n".join(lines[:-1]), "differences.md", "exec"), namespace)
    got = eval(lines[-1], namespace)
    assert repr(got) == expected, (repr(got), expected)


def _documented_commands() -> list[tuple[str, str]]:
    """Every ``normkit ...`` command line the pages and tutorials show: fenced shell lines, inline code."""
    found: list[tuple[str, str]] = []
    for path in [*PAGES, *TUTORIALS]:
        text = path.read_text()
        lines: list[str] = []
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            lines += [ln.split(" #")[0].strip() for ln in block.splitlines()]
        lines += re.findall(r"``?(normkit [a-z][^`]*)``?", text)
        for line in lines:
            line = re.sub(r"^torchrun .*?-m normkit\.cli ", "normkit ", line)
            if line.startswith("normkit ") and "..." not in line and "--help" not in line:
                found.append((path.name, line))
    return sorted(set(found))


def test_documented_commands_parse() -> None:
    """Every subcommand and flag the docs show exists, with values the parser takes."""
    from normkit.cli import build_parser

    commands = _documented_commands()
    assert len(commands) > 20, commands
    for where, line in commands:
        argv = shlex.split(line)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:  # argparse's exit for an unknown flag or a bad value
            pytest.fail(f"{where}: `{line}` does not parse (exit {e.code})")


def _resolve(name: str) -> object:
    parts = name.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_the_api_names_the_docs_use_exist() -> None:
    """Every ``normkit.x.y`` a page or tutorial names is importable (or is one of its torch.library ops)."""
    missing = []
    for path in [*PAGES, *TUTORIALS, DOCS / "why_normkit.py"]:
        for name in sorted(set(re.findall(r"(?<![\w/:])normkit(?:\.[A-Za-z_]\w*)+", path.read_text()))):
            try:
                _resolve(name)
            except (ImportError, AttributeError):
                op = name.split(".", 1)[1]
                if "." in op or not hasattr(torch.ops.normkit, op):
                    missing.append(f"{path.name}: {name}")
    assert not missing, missing


def test_the_readme_speed_rows_are_performance_md_numbers() -> None:
    """The README's `normkit bench` rows quote docs/PERFORMANCE.md's section 1, not an older run."""
    perf = (DOCS / "PERFORMANCE.md").read_text()
    section1 = perf[perf.index("## 1.") : perf.index("## 2.")]
    cells = {c.strip() for row in section1.splitlines() if row.startswith("| ") for c in row.split("|")}
    rows = [ln for ln in README.read_text().splitlines() if ln.startswith("| ") and "`normkit bench`" in ln]
    assert len(rows) >= 3
    for row in rows:
        for ms in re.findall(r"([0-9.]+) ms", row):
            assert ms in cells, f"README row quotes {ms} ms, not in PERFORMANCE.md section 1: {row[:80]}"


def _load_why() -> ModuleType:
    spec = importlib.util.spec_from_file_location("why_normkit", DOCS / "why_normkit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_why_normkit_rows_hold_here() -> None:
    """The README's measured rows that compare with torch.nn, measured again (seeded, seconds)."""
    why = _load_why()
    torch_err, our_err = why.offset_precision()
    assert torch_err > 1e-2 and our_err < 1e-6, (torch_err, our_err)
    torch_nan, our_nan = why.nan_batch()
    assert torch_nan.startswith("NaN") and our_nan.startswith("finite, 1 update skipped")
    assert why.checkpoint_round_trip() < 1e-5
    # The README quotes one run's numbers (torch's error depends on its CPU kernels' vector width);
    # they must be of the measured orders of magnitude, and name this script as their command.
    readme = README.read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| GroupNorm(8) of `1e4"))
    quoted_torch, quoted_ours = (float(v) for v in row.split("|")[2:5:2])
    assert quoted_torch > 1e-2 and quoted_ours < 1e-6 and "`python docs/why_normkit.py`" in row
