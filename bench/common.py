"""What every benchmark shares: one timing rule, the result files, the README block from the committed result.

    from bench.common import fastest_seconds, provenance, write_result, report_block
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import training

REPO_DIR = Path(__file__).resolve().parents[1]
COMMITTED_DIR = REPO_DIR / "results" / "bench"


def fastest_seconds(fn: Callable[[], object], rounds: int, calls: int = 1, warmup: int = 1) -> float:
    """Seconds per call of the fastest of ``rounds`` timed rounds of ``calls`` calls each, after ``warmup``
    untimed calls (kernel compilation, allocator): min_r (t_r / calls). The minimum is the least disturbed
    round on a shared machine."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def provenance(start: float) -> dict:
    """Where and how long a result was measured, as trial files record it: the commit, the CPU (its model, its
    ``host_cpus`` cores and their 1-minute load average at the end, which counts other jobs sharing them) and the
    wall time since ``start`` (a ``time.perf_counter()``)."""
    return {"git_commit": training.git_commit(), "cpu": training.cpu_model(), "host_cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0], "wall_time_s": time.perf_counter() - start}


def target_cell(value: float, target: float | None, at_least: bool = True) -> str:
    """A table's target column: ">= 2x (met)", "<= 6x (not met)", or "-" without a target."""
    if target is None:
        return "-"
    met = value >= target if at_least else value <= target
    return f"{'>=' if at_least else '<='} {target:g}x ({'met' if met else 'not met'})"


def measured_at(result: dict) -> str:
    """The provenance line under a table: "Measured at commit ..." and, where recorded, the CPU, its load and the
    wall time ("" for a result that recorded no commit)."""
    if "git_commit" not in result:
        return ""
    where = (f" on {result['cpu']} ({result['host_cpus']} cores, 1-minute load average {result['load_average']:.1f} "
             "at the end)" if "cpu" in result else "")
    wall = f", {result['wall_time_s']:.0f} s wall" if "wall_time_s" in result else ""
    return f"Measured at commit {result['git_commit']}{where}{wall}."


def write_result(result: dict, out_dir: str | Path, name: str, markdown: Callable[[dict], str]) -> None:
    """``<out_dir>/<name>.json`` (the result) and ``<name>.md`` (its table), and say where they went."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwrote {training.repo_relative(out_dir / f'{name}.json')} and .md")


def committed_report(name: str, markdown: Callable[[dict], str], results_dir: Path = COMMITTED_DIR) -> str:
    """The README block ``name``: ``markdown`` of the committed full run ``results/bench/<name>.json``."""
    path = results_dir / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{training.repo_relative(path)} is missing: run python3 bench/{name}.py first")
    return markdown(json.loads(path.read_text()))


def write_block(name: str, content: str) -> None:
    """Rewrite the README block ``name`` with ``content`` (refused if the README has no such block)."""
    if not training.write_readme_block(name, content):
        raise SystemExit(f"README.md has no <!-- BEGIN {name} --> block")
    print(f"wrote the README block {name}")


def report_block(name: str, markdown: Callable[[dict], str]) -> None:
    """``--report``: rewrite the README block ``name`` from the committed result (no timing is run)."""
    write_block(name, committed_report(name, markdown))
