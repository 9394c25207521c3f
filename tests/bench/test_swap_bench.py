"""The swap benchmark runs end to end (small N) and never drops an inference.

Timings are printed by the benchmark, never asserted here: these machines are
noisy. Dropped requests and failed swaps are correctness, so they are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.model_builder import build_dense_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("flags", "engine"), [((), "litert-c-api"), (("--no-c-api",), "litert")])
def test_swap_benchmark_reports_every_figure_and_drops_nothing(
    tmp_path: Path, flags: tuple[str, ...], engine: str
) -> None:
    """`bench/swap.py --json` with given files, on the C API and on the Python interpreter:
    all figures present, dropped == 0."""
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    shape = {"input_size": 64, "hidden": (256, 256), "output_size": 10, "batch": 4}
    a.write_bytes(build_dense_model(seed=1, **shape))
    b.write_bytes(build_dense_model(seed=2, **shape))
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "swap.py"), "--model-a", str(a), "--model-b", str(b),
         "--swaps", "6", "--seconds", "0.2", "--rounds", "2", "--json", *flags],
        capture_output=True, text=True, check=True, timeout=170,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for key in (
        "swaps", "inferences", "dropped", "max_gap_ms", "swap_ms_p50", "swap_ms_p99",
        "baseline_load_ms_p50", "swap_to_baseline_ratio", "infer_throughput_ratio",
        "infer_throughput_ratio_pooled", "baseline_load_mapped_ms_p50",
        "baseline_load_binding_ms_p50", "baseline_load_max_gap_ms", "bare_max_gap_ms",
        "swap_max_gap_ms_p50", "baseline_load_inline_max_gap_ms",
    ):  # fmt: skip
        assert key in result, key
    assert result["engine"] == engine
    assert result["swaps"] == 6 and result["outcomes"] == {"activated": 6}
    assert result["dropped"] == 0
    assert result["inferences"] > 0


def test_swap_benchmark_refuses_a_missing_file(tmp_path: Path) -> None:
    """Bad input: one clear line and a non-zero exit."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "swap.py"), "--model-a", str(tmp_path / "nope"),
         "--model-b", str(tmp_path / "nope2")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "cannot read" in out.stderr


@pytest.mark.timeout(180)
def test_swap_benchmark_runs_on_a_third_party_multi_output_model(
    tmp_path: Path, face_detector: bytes
) -> None:
    """MediaPipe's face detector (two outputs) given as A and B: B becomes the same model in
    another file, every swap activates, nothing is dropped."""
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    a.write_bytes(face_detector)
    b.write_bytes(face_detector)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "swap.py"), "--model-a", str(a), "--model-b", str(b),
         "--swaps", "4", "--seconds", "0.2", "--rounds", "2", "--json"],
        capture_output=True, text=True, check=True, timeout=170,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["signature"] == (
        "(float32[1, 128, 128, 3]) -> (float32[1, 896, 16],float32[1, 896, 1])"
    )
    assert result["model_b_padded"] is True
    assert result["outcomes"] == {"activated": 4} and result["dropped"] == 0


def test_swap_benchmark_refuses_a_pair_the_agent_would_refuse(tmp_path: Path) -> None:
    """A and B with other interfaces: one line naming the tensor, non-zero exit."""
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    a.write_bytes(build_dense_model(output_size=3))
    b.write_bytes(build_dense_model(output_size=2))
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "swap.py"), "--model-a", str(a), "--model-b", str(b)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert "output 0 ('output'): shape [1, 2] instead of [1, 3]" in out.stderr
