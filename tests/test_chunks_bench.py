"""loadtests/chunks_bench.py runs as documented, with tiny parameters (speed is never
asserted: the figures are docs/performance.md's, from a run of the benchmark itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._services import require_redis

ROOT = Path(__file__).resolve().parents[1]


def test_the_chunks_bench_runs_on_both_stores_and_prints_every_figure() -> None:
    redis = require_redis()
    out = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "chunks_bench.py"), "--stores",
         "memory,redis", "--redis-url", redis, "--chunks", "20", "--paced", "10",
         "--rate", "500", "--ops", "4", "--rounds", "2", "--idle", "0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    names = [(f["figure"], f.get("store")) for f in figures]
    assert names == [("server.idle", "memory"), ("chunks.burst", "memory"),
                     ("chunks.paced", "memory"), ("server.idle", "redis"),
                     ("chunks.burst", "redis"), ("chunks.paced", "redis"),
                     ("roundtrip.a2a", None), ("roundtrip.grpc", None),
                     ("roundtrip.ratio_a2a_over_grpc", None)]
    streamed = [f["chunks"] for f in figures if f["figure"].startswith("chunks.")]
    assert streamed == [20, 10, 20, 10]  # every chunk arrived
    assert figures[6]["ops"] == figures[7]["ops"] == 4
    assert "| ratio A2A / gRPC |" in out.stdout


def test_the_chunks_bench_refuses_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "chunks_bench.py"), "--chunks", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "--chunks" in out.stderr
