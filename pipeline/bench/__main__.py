"""``python -m pipeline.bench run --quick``: the benchmark without the main ``inferlane`` CLI."""

from pipeline.bench.cli import bench_app

bench_app(prog_name="python -m pipeline.bench")
