"""The README's usage example runs as written, and its two set-up commands exist in the Makefile."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})


def test_readme_setup_commands_are_make_targets():
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    for target in ("run", "test"):
        assert f"make {target}" in text
        assert re.search(rf"^{target}:", makefile, re.M)


def test_readme_tables_are_regenerated_from_the_committed_results(load_bench):
    """Every README table marked <!-- BEGIN name --> is what its --report command builds from the
    committed results files (no number in them is typed by hand)."""
    import bit_pattern as bp
    import hopfield_deq as hd
    import hopfield_deq_stability as hs
    import mnist_mil_main as mm
    import real_world_mil as rw
    import training

    results = README.parent / "results"
    benches = ("bench_bag_layout", "bench_engine", "bench_lenet", "bench_maps", "bench_mil_epoch", "bench_deq", "bench_fixed_point_modes",
               "bench_real_world")
    expected = {**{name: load_bench(name).committed_report() for name in benches}, "kmil_table": mm.kmil_report(results),
                "mnist_mil_table": mm.bag_report(results),
                "real_world_table": rw.markdown_table(rw.load_results(results / "real_world_mil")),
                "real_world_engine_checks": rw.engine_checks_table(), "real_world_cost": rw.sweep_cost_table(),
                "real_world_selection": rw.selection_table(rw.load_results(results / "real_world_mil")),
                "real_world_refit": rw.refit_table(results / "real_world_mil"),
                "hopdeq_full": hd.full_report(), "hopdeq_solver": hd.solver_report(),
                "hopdeq_stability": hs.report(), "hopdeq_reduced": hd.reduced_report(),
                "bit_pattern_table": bp.readme_report()}
    for name, table in expected.items():
        block = training.readme_block(name, README)
        assert block is not None, name
        assert block.strip() == table.strip(), f"README block {name} is stale: run its --report command"
