"""benchmarks/_profile.py: the trace summary that says where a profiled step's time went."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _profile import family, format_summary, summarize_trace  # noqa: E402


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def test_busy_idle_families_and_gaps_per_step():
    trace = {"traceEvents": [
        # step 1: a GEMM, an overlapping Triton kernel, a 300 us gap, the optimizer
        _kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 1000),
        _kernel("_rms_norm_fwd_kernel", 900, 200),
        _kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 1400, 500),
        # step 2: flash attention, 40 us gap (under the 50 us line), a copy
        _kernel("flash_fwd_kernel", 2000, 1000),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 3040, "dur": 60},
        # host events are not GPU time
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},
    ]}
    summary = summarize_trace(trace, steps=2)
    assert summary["gpu_events"] == 5
    assert summary["gpu_window_ms_per_step"] == pytest.approx(3.1 / 2)
    # busy: [0, 1100] + [1400, 1900] + [2000, 3000] + [3040, 3100] = 2.66 ms
    assert summary["gpu_busy_ms_per_step"] == pytest.approx(2.66 / 2)
    assert summary["gpu_idle_ms_per_step"] == pytest.approx(0.44 / 2)
    assert summary["idle_gaps_over_50us_per_step"] == pytest.approx((0.3 + 0.1) / 2)
    assert summary["largest_gaps"][0] == {"ms": 0.3, "after": "_rms_norm_fwd_kernel"}
    assert summary["ms_per_step_by_family"] == {
        "matmul": 0.5, "attention": 0.5, "optimizer": 0.25, "tunegraph/liger triton": 0.1,
        "copy/cast": 0.03}
    assert summary["top_kernels"][0]["name"] == "sm90_xmma_gemm_bf16bf16_bf16f32"
    # one step ends at the optimizer; the trailing kernels after it start a piece that has none
    assert summary["per_step"] == [{"wall_ms": 1.9, "busy_ms": 1.6, "largest_gap_ms": 0.3,
                                    "gap_after": "_rms_norm_fwd_kernel", "kernels": 3}]
    text = format_summary("s1 tunegraph", summary)
    assert "1.33 busy" in text and "0.3 ms after _rms_norm_fwd_kernel" in text


def test_a_trace_without_gpu_events_says_so():
    summary = summarize_trace({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm",
                                                "ts": 0, "dur": 5}]}, steps=2)
    assert summary["gpu_events"] == 0
    assert "no GPU events" in format_summary("cpu", summary)


@pytest.mark.parametrize(("name", "expected"), [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<4, ...>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, ...>", "reduction"),
    ("_rope_fwd_kernel", "tunegraph/liger triton"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("void cub::DeviceScanKernel<...>", "other"),
])
def test_kernel_families(name, expected):
    assert family(name) == expected
