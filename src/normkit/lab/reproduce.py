"""``normkit reproduce``: run the lab's protocol (docs/EXPERIMENTS.md, E1..E5) and write docs/RESULTS.md from
it.

RESULTS.md is this command's output, not a hand-kept file: every table, verdict and figure in it
comes from the runs this command just made with the current code, and its header names the
machine (CPU model, cores, load at the start, threads, BLAS, versions, git revision and whether
the tree was dirty), so two copies made on two machines can be told apart and compared. Text
after the line :data:`KEEP_MARKER` in an existing RESULTS.md is carried over unchanged (notes on
runs outside the protocol, each with its own commit and date).

Seeds: E1 is decided at B=2, where BN's error over seeds has spread from ±0.4 to ±7.7 pt between
two CPUs of the same kind. Each verdict is printed with its margin (the distance to its threshold)
and the standard error of that margin over the seeds, and called *holding* only when the margin is
more than 2 standard errors from 0. With ``n`` seeds per cell the standard error of a difference of
two cells is ``sigma * sqrt(2 / n)``; the default ``n = 5`` puts 2 SE at 9.7 pt for the worst
spread seen (7.7 pt), well under E1 (i)'s and (iii)'s margins at B=2 (about 25 pt), so the B=2
spread cannot decide them; verdicts with margins of a few tenths of a point (a test image is 0.28
pt) are reported as not decided rather than forced either way.

Example (the plan, without running it):
    >>> [step.key for step in plan(ReproduceConfig(seeds=5))]
    ['e1-head', 'e1-nohead', 'e3', 'e4', 'e2', 'e5']
    >>> plan(ReproduceConfig(seeds=3))[0].command
    'normkit compare --seeds 0,1,2'
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .data import load_dataset
from .experiments import CONFIGS, RUNNERS
from .experiments._common import ConfigError, LabConfig, markdown_table, opt
from .records import check_writable
from .report import environment_line

__all__ = ["KEEP_MARKER", "ReproduceConfig", "Step", "plan", "run_reproduce", "seed_noise_note"]

#: Text after this line in an existing RESULTS.md is kept as it is.
KEEP_MARKER = "<!-- Hand-written notes below this line are kept by `normkit reproduce`. -->"

_TITLES = {
    "e1-head": "E1: does BN break at small batches? CNN-4 with a Linear→norm→ReLU head (the default)",
    "e1-nohead": "E1 without the head (the protocol's CNN-4 as written)",
    "e3": "E3: does Proxy Norm close the gap to BN? (B=32, 15 epochs)",
    "e4": "E4: the power decomposition",
    "e2": "E2: higher learning rates with BN; MLP-3 sigmoid percentiles",
    "e5": "E5: Santurkar et al.'s loss-landscape measures",
}

_SHORT = {
    "e1-head": "E1 (head, the default)",
    "e1-nohead": "E1 (no head)",
    "e3": "E3",
    "e4": "E4",
    "e2": "E2",
    "e5": "E5",
}


@dataclass
class ReproduceConfig(LabConfig):
    """Configuration of ``normkit reproduce``.

    Attributes:
        seeds: seeds per compare cell (E1, E3); see the module docstring for why 5.
        results: the Markdown file to write (its ``figures/`` folder gets the plots).
        quick: a smoke run (a handful of samples and steps per experiment) that checks the pipeline,
            not the claims; its RESULTS.md says so in its first line.
        data, limit_train, limit_test, device, threads, out, quiet: as in :class:`LabConfig`, passed to every
        step.
    """

    seeds: int = opt(5, "seeds per compare cell (E1, E3)", min=2, max=50)
    results: str = opt(
        "docs/RESULTS.md", "the Markdown file to write; the plots go to figures/ next to it", metavar="PATH"
    )
    quick: bool = opt(False, "a smoke run of the pipeline (tiny data and steps), not a measurement")

    def _check(self) -> None:
        results = Path(self.results)
        if results.suffix.lower() != ".md":
            raise ConfigError(f"--results must name a Markdown file (.md), got {self.results!r}")
        check_writable(results.parent if str(results.parent) else Path("."), "--results", "its folder")


@dataclass(frozen=True)
class Step:
    """One experiment run of the plan: ``key`` (e.g. ``"e1-head"``), the subcommand, its config, the command
    shown."""

    key: str
    experiment: str
    config: Any
    command: str


def _argv(cfg: Any) -> list[str]:
    """The options that differ from the config's defaults, as a command line would give them."""
    default = type(cfg)()
    out: list[str] = []
    for f in fields(cfg):
        v, d = getattr(cfg, f.name), getattr(default, f.name)
        if v == d or f.name in ("out", "quiet", "threads", "device") or not f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(v, list):
            out += [flag, ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)]
        else:
            out += [flag, f"{v:g}" if isinstance(v, float) else str(v)]
    return out


def plan(cfg: ReproduceConfig) -> list[Step]:
    """The runs RESULTS.md is made of, with this config's seeds and common settings."""
    seeds = list(range(cfg.seeds))
    common = {f.name: getattr(cfg, f.name) for f in fields(LabConfig)}
    quick_compare = (
        {"limit_train": 64, "limit_test": 32, "epochs": 1, "max_steps": 2, "jobs": 1} if cfg.quick else {}
    )
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("e1-head", "compare", {"seeds": seeds, **quick_compare}),
        ("e1-nohead", "compare", {"models": ["cnn4"], "seeds": seeds, **quick_compare}),
        (
            "e3",
            "compare",
            {
                "models": ["cnn4"],
                "norms": ["bn", "gn:8", "ln", "in", "ln+pn", "gn:4+pn"],
                "batch_sizes": [32],
                "epochs": 15,
                "seeds": seeds,
                **quick_compare,
            },
        ),
        (
            "e4",
            "power",
            {
                "trained": True,
                **(
                    {
                        "limit_train": 64,
                        "limit_test": 32,
                        "depth": 3,
                        "width": 8,
                        "samples": 16,
                        "epochs": 1,
                        "max_steps": 2,
                    }
                    if cfg.quick
                    else {}
                ),
            },
        ),
        (
            "e2",
            "lr-sweep",
            {
                **(
                    {
                        "limit_train": 64,
                        "limit_test": 32,
                        "lrs": [0.01, 0.1],
                        "epochs": 1,
                        "max_steps": 2,
                        "batch_size": 8,
                        "mlp_steps": 4,
                        "percentile_every": 2,
                        "mlp_batch_size": 8,
                    }
                    if cfg.quick
                    else {}
                )
            },
        ),
        (
            "e5",
            "landscape",
            {
                **(
                    {
                        "limit_train": 64,
                        "limit_test": 32,
                        "steps": 2,
                        "every": 1,
                        "etas": 2,
                        "width": 4,
                        "batch_size": 8,
                    }
                    if cfg.quick
                    else {}
                )
            },
        ),
    ]
    steps = []
    for key, experiment, kw in specs:
        cls = CONFIGS[experiment][0]
        own = {
            k: v for k, v in common.items() if not (k == "data" and v == LabConfig.data)
        }  # power keeps digits16
        if cfg.quick:  # the quick sizes, unless the user gave their own limits
            kw = {k: v for k, v in kw.items() if k not in ("limit_train", "limit_test") or own.get(k) is None}
        config = cls(**{**own, **kw})
        command = " ".join(["normkit", experiment, *_argv(config)])
        steps.append(Step(key, experiment, config, command))
    return steps


def _verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    crit = results.get("criteria") or []
    if isinstance(crit, dict):  # compare: per model
        return [c for cs in crit.values() for c in cs]
    return list(crit)


def _verdict_cell(crits: list[dict[str, Any]]) -> str:
    if not crits:
        return "(no criteria)"
    met = sum(c.get("ok") is True for c in crits)
    missed = [c for c in crits if c.get("ok") is False]
    na = sum(c.get("ok") is None for c in crits)
    undecided = [c for c in crits if c.get("holds") is False]
    parts = [f"{met} of {len(crits)} met"]
    if missed:
        parts.append("not met: " + "; ".join(f"{c.get('name', '')} {c['text']}".strip() for c in missed))
    if na:
        parts.append(f"{na} not measurable")
    if undecided:
        parts.append(f"{len(undecided)} within the seeds' noise")
    return ", ".join(parts)


#: Reference values (this module's docstring: full runs on two CPUs of the same kind), not measurements of
#: any one run: BN's widest spread over seeds at B=2 (pt), and E1 (i)'s / (iii)'s margins at B=2 (pt).
REFERENCE_SIGMA, REFERENCE_MARGIN = 7.7, 25.0


def seed_noise_note(seeds: int, e1_results: list[dict[str, Any]]) -> str:
    """RESULTS.md's sentence on whether the seeds' spread can decide E1 (i) / (iii), from the E1 runs'
    ``results.json`` (the widest std over seeds at the smallest batch size, the smallest margin of those
    criteria); the reference values are named as such, never as measured here.

    Example:
        >>> rows = [{"model": "m", "norm": "bn", "batch_size": 2, "test_err_std": 3.0, "diverged": 0},
        ...         {"model": "m", "norm": "bn", "batch_size": 32, "test_err_std": 0.5, "diverged": 0}]
        >>> crit = {"m": [{"name": "E1 (i)", "margin": 20.0}, {"name": "E1 (ii)", "margin": 0.1}]}
        >>> note = seed_noise_note(2, [{"aggregate": rows, "criteria": crit}])
        >>> "in this run the widest spread at B=2 was sigma = 3.0 pt (m bn): 2 SE is 6.0 pt" in note
        True
        >>> "smallest margin of E1 (i) and (iii) here, 20.0 pt: this spread cannot decide them" in note
        True
    """
    import math

    lead = "With n seeds the SE of a difference of two cells is sigma·sqrt(2/n)"
    reference = (
        f"(reference values from full runs, not measured here: sigma up to {REFERENCE_SIGMA:g} pt at B=2 "
        f"between two CPUs of the same kind, E1 margins at B=2 about {REFERENCE_MARGIN:g} pt; "
        "normkit.lab.reproduce)"
    )
    rows = [r for res in e1_results for r in res.get("aggregate") or []]
    if not rows:
        return f"{lead} {reference}."
    lo = min(r["batch_size"] for r in rows)
    spread = [
        (float(r["test_err_std"]), f"{r['model']} {r['norm']}")
        for r in rows
        if r["batch_size"] == lo
        and not r.get("diverged")
        and isinstance(r.get("test_err_std"), (int, float))
        and math.isfinite(r["test_err_std"])
    ]
    margins = [
        abs(c["margin"])
        for res in e1_results
        for cs in (res.get("criteria") or {}).values()
        for c in cs
        if c.get("name") in ("E1 (i)", "E1 (iii)") and isinstance(c.get("margin"), (int, float))
    ]
    if not spread:
        return f"{lead}; no spread over seeds was measured at B={lo} in this run {reference}."
    sigma, where = max(spread)
    two_se = 2 * sigma * math.sqrt(2 / seeds)
    text = (
        f"{lead}: with n = {seeds}, in this run the widest spread at B={lo} was sigma = {sigma:.1f} pt "
        f"({where}): 2 SE is {two_se:.1f} pt"
    )
    if margins:
        m = min(margins)
        text += f", against the smallest margin of E1 (i) and (iii) here, {m:.1f} pt: this spread " + (
            "cannot decide them" if two_se < m else "can decide them (see their notes)"
        )
    return f"{text} {reference}."


def _figure_name(key: str, png: str) -> str:
    """``figures/`` name of a run's plot: ``e1_head_error_vs_batch.png``, ``e4_power_post_norm.png``, ..."""
    return f"{key.replace('-', '_')}_{png}"


_IMG = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def _section(step: Step, run: Path, figures: Path, rel: str, wall: float) -> str:
    summary = (run / "summary.md").read_text()
    summary = re.sub(r"^(#{1,4}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", summary, flags=re.M)

    def relink(m: re.Match[str]) -> str:
        src = run / m.group(2)
        if not src.is_file():
            return m.group(0)
        name = _figure_name(step.key, m.group(2))
        shutil.copyfile(src, figures / name)
        return f"![{m.group(1)}]({rel}/{name})"

    summary = _IMG.sub(relink, summary)
    return "\n".join(
        [
            f"## {_TITLES[step.key]}",
            "",
            "```bash",
            step.command,
            "```",
            "",
            f"Run folder `{run.name}`, {wall / 60:.1f} min.",
            "",
            summary.rstrip(),
            "",
        ]
    )


def run_reproduce(cfg: ReproduceConfig) -> Path:
    """Run :func:`plan`'s experiments one after the other and write ``cfg.results`` (and its figures); return
    its path.

    Every step's settings are checked before the first one starts. A step that fails stops the
    command (its run folder says why); nothing is written to ``cfg.results`` then.
    """
    cfg.validate()
    steps = plan(cfg)
    for (
        step
    ) in steps:  # all checks first, data ones included: a bad setting must not surface after an hour of runs
        c = step.config.validate()
        c.check_data(load_dataset(c.data, limit_train=c.limit_train, limit_test=c.limit_test))
    results = Path(cfg.results)
    figures = results.parent / "figures"
    t_all = time.perf_counter()
    done: list[tuple[Step, Path, float]] = []
    for step in steps:
        if not cfg.quiet:
            print(f"reproduce: {step.key}: {step.command}", flush=True)
        t0 = time.perf_counter()
        out = RUNNERS[step.experiment](step.config)
        path = out.path if hasattr(out, "summary") else out[0]
        done.append((step, Path(path), time.perf_counter() - t0))
    total = time.perf_counter() - t_all
    figures.mkdir(parents=True, exist_ok=True)
    env = json.loads((done[0][1] / "env.json").read_text())
    rows = []
    for step, run, wall in done:
        res = json.loads((run / "results.json").read_text())
        rows.append(
            [_SHORT[step.key], _verdict_cell(_verdicts(res)), f"`{step.command}`", f"{wall / 60:.1f} min"]
        )
    kept = ""
    if results.is_file():
        old = results.read_text()
        if KEEP_MARKER in old:
            kept = old.split(KEEP_MARKER, 1)[1].strip("\n")
    rel = Path("figures").as_posix()
    head = [
        "# What the lab measured here",
        "",
        *(
            [
                "**Quick smoke run (`--quick`): a handful of samples and steps, the numbers below mean "
                "nothing.**",
                "",
            ]
            if cfg.quick
            else []
        ),
        f"Generated by `normkit reproduce --seeds {cfg.seeds}{' --quick' if cfg.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}, in {total / 60:.0f} min; do not edit the part above the notes marker "
        "by "
        "hand: change the code and run the command again.",
        "",
        f"Machine: {environment_line(env)}. Each run's `env.json` has the rest (cores usable, Python, "
        "platform).",
        "",
        f"Seeds: {cfg.seeds} per cell of E1 and E3. Each verdict is read with its margin (distance to its "
        "threshold, > 0 on the passing side) and the standard error of that margin over the seeds; it "
        "*holds* when the margin is more than 2 SE from 0, else it is *within the seeds' noise* and not "
        "decided either way. "
        + seed_noise_note(
            cfg.seeds,
            [
                json.loads((run / "results.json").read_text())
                for step, run, _ in done
                if step.key.startswith("e1")
            ],
        )
        + " Protocol and pass criteria: docs/EXPERIMENTS.md.",
        "",
        markdown_table(["experiment", "verdicts", "command", "wall time"], rows),
        "",
        "`normkit report --runs-root " + str(cfg.out) + " --all` gathers the runs into one `report.md` and a "
        "self-contained `report.html`.",
        "",
    ]
    body = [_section(step, run, figures, rel, wall) for step, run, wall in done]
    text = (
        "\n".join(head) + "\n" + "\n".join(body) + "\n" + KEEP_MARKER + "\n" + (f"\n{kept}\n" if kept else "")
    )
    results.write_text(text)
    return results
