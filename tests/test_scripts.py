"""The benchmark and GPU-box scripts are not imported by other tests: at least they must parse."""

from __future__ import annotations

import py_compile
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmark_scripts_compile(path):
    py_compile.compile(str(path), doraise=True)


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_quality_pipeline_runs_in_two_calls(tiny_base, task_dir, tmp_path):
    """benchmarks/quality.py on a tiny model: the adapters in one call, gates + evaluation in the
    next (adapters kept, times merged), then the tables and the composite routing picture."""
    import json
    import sys

    out = tmp_path / "q"
    args = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "run", "--out", str(out), "--base", str(tiny_base),
            "--data-dir", str(task_dir), "--tasks", "count,reverse,upper", "--adapter-steps", "2", "--mixed-steps", "3",
            "--steps", "3", "--batch-size", "4", "--rows-per-task", "8", "--max-length", "64", "--limit", "2",
            "--composite", "own", "--composite-samples", "2"]
    subprocess.run([*args, "--stop-after", "adapters"], check=True, capture_output=True)
    first = json.loads((out / "times.json").read_text())
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["count", "mixed", "reverse", "upper"]
    assert not (out / "meteora").exists()
    stamp = (out / "adapters" / "count" / "adapter_model.safetensors").stat().st_mtime_ns
    subprocess.run(args, check=True, capture_output=True)
    assert (out / "adapters" / "count" / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # kept
    times = json.loads((out / "times.json").read_text())
    assert {k: times[k] for k in first} == first  # the adapters' times of the first call stay
    assert list(times) == [
        "per-task adapters", "mixed-task LoRA", "gates (+ gate accuracy)", "evaluation", "routing picture"]
    table = (out / "quality.md").read_text()
    for text in ("| count |", "composite-3 (the harness", "composite-3 (free)", "| mixed |", "gate accuracy"):
        assert text in table, text
    assert (out / "eval" / "routing.png").is_file()
