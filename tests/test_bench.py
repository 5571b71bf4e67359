"""Smoke test of bench/bench_maps.py: its quick setting runs every map against torch.softmax (and the
entmax package) and writes the table files with finite, positive ratios."""
import csv
import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_maps.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_maps", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_maps_quick_writes_ratios(tmp_path, capsys):
    rows = load_bench().main(["--quick", "--out_dir", str(tmp_path)])
    assert {"sparsemax", "entmax15", "k_subsets k=3", "sequential_k_subsets k=3"} <= {r["map"] for r in rows}
    assert all(r["ours_vs_softmax"] > 0 and math.isfinite(r["ours_vs_softmax"]) for r in rows)
    with open(tmp_path / "bench_maps.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    table = (tmp_path / "bench_maps.md").read_text()
    assert "numba CPU kernels" in table and "| sparsemax |" in table
    assert f"wrote {tmp_path}" in capsys.readouterr().out


def test_bench_engine_smoke_writes_ratios(tmp_path):
    """bench_engine's smallest setting runs and records positive ratios (no timing is asserted)."""
    spec = importlib.util.spec_from_file_location("bench_engine", BENCH.with_name("bench_engine.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--bag_sizes", "3", "--steps", "1", "--kmil_bags", "16", "--threads", "1",
                          "--out_dir", str(tmp_path)])
    assert [r["bag_size"] for r in result["mnist_step"]] == [3]
    assert all(r["speedup_bf16"] > 0 and r["bf16_vs_floor"] > 0 for r in result["mnist_step"])
    assert {r["precision"] for r in result["kmil"]} == {"fp32", "bf16"}
    assert "K-MIL epoch" in (tmp_path / "bench_engine.md").read_text() and len(result["real_world"]) == 2
