"""What every benchmark shares: one timing rule, the result files, the README block from the committed result.

    from bench.common import fastest_seconds, write_result, report_block
"""
from __future__ import annotations

import json
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


def report_block(name: str, markdown: Callable[[dict], str]) -> None:
    """``--report``: rewrite the README block ``name`` from the committed result (no timing is run)."""
    if not training.write_readme_block(name, committed_report(name, markdown)):
        raise SystemExit(f"README.md has no <!-- BEGIN {name} --> block")
    print(f"wrote the README block {name}")
