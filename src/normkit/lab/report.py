"""Gather run folders into one Markdown report and one static HTML page (plots embedded).

``normkit report`` reads each run's ``config.json``, ``env.json``, ``summary.md`` and PNGs and
writes ``report.md`` (images linked relative to it) and ``report.html`` (self-contained: the
PNGs are inlined as data URIs, the Markdown rendered with markdown-it, which comes with rich).

Example:
    >>> import tempfile, json, pathlib
    >>> with tempfile.TemporaryDirectory() as root:
    ...     run = pathlib.Path(root, "compare-20260101-000000"); run.mkdir()
    ...     _ = (run / "config.json").write_text(json.dumps({"experiment": "compare"}))
    ...     _ = (run / "summary.md").write_text("# compare\\n\\n| a |\\n|---|\\n| 1 |\\n")
    ...     md, html = write_report([], runs_root=root)
    ...     "<table>" in html.read_text(), md.name
    (True, 'report.md')
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .records import check_writable, read_manifest

__all__ = ["environment_line", "find_runs", "render_html", "write_report"]

_IMG = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _read_json(path: Path) -> dict[str, Any]:
    """A run file's JSON object; ``{}`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_runs(root: str | Path, latest_only: bool = True) -> list[Path]:
    """Run folders under ``root`` (those with a ``config.json``), oldest first.

    With ``latest_only``, the newest *finished* run per experiment: a run that was interrupted,
    failed or is still running (``manifest.json``) never replaces a finished one. Without it, every
    run, whatever its status (the report marks the unfinished ones).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"runs root {str(root)!r} is not a folder (run an experiment first, or pass --runs-root)"
        )
    runs = sorted(
        (p for p in root.iterdir() if (p / "config.json").is_file()),
        key=lambda p: ((p / "config.json").stat().st_mtime, p.name),
    )
    if not latest_only:
        return runs
    latest: dict[str, Path] = {}
    for p in runs:
        if read_manifest(p).get("status") != "finished":
            continue
        latest[_read_json(p / "config.json").get("experiment", p.name.split("-")[0])] = p
    return sorted(latest.values(), key=lambda p: ((p / "config.json").stat().st_mtime, p.name))


def _shift_headings(md: str, by: int = 1) -> str:
    return re.sub(r"^(#{1,5}) ", lambda m: "#" * (len(m.group(1)) + by) + " ", md, flags=re.M)


def _status_text(run: Path) -> str:
    """``"interrupted, 4 of 6 trainings finished"``: a run's status and, when recorded, its progress."""
    manifest = read_manifest(run)
    done = f", {manifest['done']} of {manifest['total']} trainings finished" if "total" in manifest else ""
    return f"{manifest.get('status', '?')}{done}"


def run_command(argv: list[str]) -> str:
    """The command that started a run, from its recorded ``sys.argv``: ``normkit ...`` for the CLI, the
    script for a run started from Python.

    Example:
        >>> run_command(["/venv/bin/normkit", "compare", "--seeds", "0"]), run_command(["exp.py", "2"])
        ('normkit compare --seeds 0', 'python exp.py 2')
        >>> run_command([""]), run_command([])
        ('(from Python, interactively)', '(not recorded)')
    """
    if not argv:
        return "(not recorded)"
    first = argv[0].replace("\\", "/")
    if first.rsplit("/", 1)[-1] == "normkit" or first.endswith(("normkit/__main__.py", "normkit/cli.py")):
        return " ".join(["normkit", *argv[1:]])
    if first in ("", "-c"):
        return "(from Python, interactively)"
    return " ".join(["python", *argv])


def _section(run: Path, out_dir: Path) -> str:
    cfg = _read_json(run / "config.json")
    env = _read_json(run / "env.json")
    timing = _read_json(run / "timing.json")
    manifest = read_manifest(run)
    status = manifest.get("status", "?")
    if status == "finished" and (run / "summary.md").is_file():
        summary = (run / "summary.md").read_text()
    else:
        done = (
            f": {manifest['done']} of {manifest['total']} trainings finished" if "total" in manifest else ""
        )
        error = f" ({manifest['error']})" if manifest.get("error") else ""
        summary = (
            f"**Run {status}**{done}{error}; its finished work is in `metrics.jsonl`, there is no summary.\n"
        )
    rel = Path(os.path.relpath(run, out_dir))

    def relink(m: re.Match[str]) -> str:
        target = m.group(2)
        if "://" in target or target.startswith("/"):
            return m.group(0)
        return f"![{m.group(1)}]({(rel / target).as_posix()})"

    command = run_command(env.get("argv") or [])
    facts = [f"run folder `{run.name}`", f"status {status}", f"command `{command}`"]
    if env:
        facts.append(environment_line(env))
    if timing.get("wall_s") is not None:
        facts.append(f"{timing['wall_s']:.0f} s wall")
    title = f"## {cfg.get('experiment', run.name)}: {run.name}" + (
        "" if status == "finished" else f" ({status})"
    )
    return "\n".join([title, "", "; ".join(facts) + ".", "", _IMG.sub(relink, _shift_headings(summary, 2))])


def environment_line(env: dict[str, Any]) -> str:
    """``env.json`` in one line: machine, load, parallelism, versions, BLAS, git state (what explains a
    difference).

    Example:
        >>> line = environment_line({"cpu_model": "AMD EPYC", "cpu_count": 2, "load_avg": [1.0, 0.5, 0.2],
        ...     "threads": 1, "torch": "2.13.0", "numpy": "2.4.6", "normkit": "0.1", "blas": "mkl",
        ...     "device": "cpu", "git": "0123456789abcdef", "git_dirty": True})
        >>> line.split("; ")  # doctest: +NORMALIZE_WHITESPACE
        ['CPU AMD EPYC, 2 cores, load 1.00 at the start', '1 thread(s)', 'device cpu',
         'torch 2.13.0, numpy 2.4.6, normkit 0.1, BLAS mkl', 'git 0123456789ab (dirty)']
    """
    load = env.get("load_avg")
    parts = [
        f"CPU {env.get('cpu_model', '(not recorded)')}, {env.get('cpu_count', '?')} cores"
        + (f", load {load[0]:.2f} at the start" if load else "")
    ]
    parts.append(env.get("parallelism") or f"{env.get('threads')} thread(s)")
    parts.append(f"device {env.get('device')}")
    parts.append(
        f"torch {env.get('torch')}, numpy {env.get('numpy', '?')}, normkit {env.get('normkit', '?')}, "
        f"BLAS {env.get('blas', '?')}"
    )
    git = env.get("git")
    dirty = env.get("git_dirty")
    if git and "+dirty" in str(git):  # records from before git_dirty
        git, dirty = str(git).replace("+dirty", ""), True
    parts.append(f"git {str(git)[:12]}" + (" (dirty)" if dirty else ""))
    return "; ".join(parts)


def render_html(markdown: str, base: Path, title: str = "normkit report") -> str:
    """Markdown to a self-contained HTML page; local images (relative to ``base``) inlined as PNG data
    URIs."""

    def inline(m: re.Match[str]) -> str:
        target = base / m.group(2)
        if target.is_file():
            data = base64.b64encode(target.read_bytes()).decode("ascii")
            return f"![{m.group(1)}](data:image/png;base64,{data})"
        return m.group(0)

    text = _IMG.sub(inline, markdown)
    try:
        from markdown_it import MarkdownIt

        body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    except ImportError:  # pragma: no cover - markdown-it-py comes with rich
        body = f"<pre>{html_lib.escape(text)}</pre>"
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 "
        "1em;line-height:1.45}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px "
        "8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:0 "
        "3px}"
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html_lib.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def write_report(
    runs: Sequence[str | Path] = (),
    runs_root: str | Path = "runs",
    out: str | Path | None = None,
    latest_only: bool = True,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for ``runs`` (default: found under ``runs_root``); return their
    paths.

    Raises:
        ValueError: no runs found, or a given folder is not a run folder.
    """
    folders = list({Path(r).resolve(): Path(r) for r in runs}.values())  # a folder given twice: once
    for f in folders:
        if not (f / "config.json").is_file():
            raise ValueError(f"{str(f)!r} is not a run folder (no config.json)")
    if not folders:
        folders = find_runs(runs_root, latest_only)
    if not folders:
        unfinished = [
            p for p in find_runs(runs_root, latest_only=False) if read_manifest(p).get("status") != "finished"
        ]
        if unfinished:
            last = unfinished[-1]
            raise ValueError(
                f"no finished runs under {str(runs_root)!r}; {len(unfinished)} unfinished run(s) "
                f"skipped ({', '.join(f'{p.name}: {_status_text(p)}' for p in unfinished)}); report one by "
                f"passing its folder (normkit report {str(last)!r}), or all of them with --all"
            )
        raise ValueError(f"no runs under {str(runs_root)!r}; run an experiment first (e.g. normkit compare)")
    out_dir = Path(out) if out is not None else (Path(runs_root) if not runs else folders[0].parent)
    check_writable(out_dir, "--out", "the report's folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"--out {str(out_dir)!r}: cannot create the report folder: {e.strerror or e}"
        ) from None
    header = [
        "# normkit lab report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(folders)} run(s). Each section is one "
        "run: its command, "
        "environment, summary table with the pass criteria of docs/EXPERIMENTS.md (E1..E5), and plots.",
        "",
        *[
            f"- {_read_json(f / 'config.json').get('experiment', '?')}: `{f.name}`"
            + ("" if read_manifest(f).get("status") == "finished" else f" ({_status_text(f)})")
            for f in folders
        ],
        "",
    ]
    md = "\n".join(header) + "\n" + "\n\n".join(_section(f, out_dir) for f in folders) + "\n"
    md_path = out_dir / "report.md"
    md_path.write_text(md)
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(md, out_dir))
    return md_path, html_path
