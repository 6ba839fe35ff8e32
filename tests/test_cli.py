"""`python -m lstm_fused check|bench|demo`: exit codes, output, files written (tiny grids)."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from lstm_fused import benchmarking, cli, parity
from lstm_fused.functional import backend_unavailable_reason

needs_fused = pytest.mark.skipif(backend_unavailable_reason("fused") is not None,
                                 reason=str(backend_unavailable_reason("fused")))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")


@needs_fused
def test_check_passes_on_tiny_grid(capsys):
    assert cli.main(["check", "--grid", "tiny", "--dtype", "float64", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "4/4 cases passed" in out
    assert "bfloat16" in out and "FAIL" not in out


@needs_fused
def test_check_exits_1_when_a_case_fails(monkeypatch, capsys):
    monkeypatch.setitem(parity.TOLERANCES, torch.float32, 0.0)
    assert cli.main(["check", "--grid", "tiny", "--dtype", "float32"]) == 1
    assert "2 FAILED" in capsys.readouterr().out


@needs_fused
def test_check_reports_a_raising_case_as_failed(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(parity, "_run", broken)
    result = parity.run_case(parity.ParityCase(), torch.float64)
    assert not result.passed
    assert "kernel exploded" in result.error


@no_gpu
@pytest.mark.parametrize("command", ["check", "bench"])
def test_cuda_without_gpu_is_a_clear_usage_error(command, capsys):
    assert cli.main([command, "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@needs_fused
def test_bench_quick_writes_table_json_plot_and_page(tmp_path, capsys):
    out_dir, page = tmp_path / "results", tmp_path / "results.md"
    page.write_text("# Results\n\nintro\n")
    argv = ["bench", "--quick", "--grid", "tiny", "--repeats", "2", "--warmup", "0",
            "--out", str(out_dir), "--page", str(page)]
    assert cli.main(argv) == 0
    assert "Geometric-mean speedup" in capsys.readouterr().out

    data = json.loads((out_dir / "results.json").read_text())
    assert len(data["rows"]) == len(benchmarking.TINY_GRID) * len(benchmarking.MODES)
    assert data["machine"]["torch"] == torch.__version__
    assert data["machine"]["cpu"] and data["machine"]["torch_threads"] >= 1
    for row in data["rows"]:
        for impl in benchmarking.IMPLS:
            assert len(row[impl]["times_ms"]) == 2 and row[impl]["median_ms"] > 0
        assert set(row["peak_bytes"]) == set(benchmarking.IMPLS)
    assert "| T6-B3-H8-float32 |" in (out_dir / "results.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out_dir / "speedup.png").stat().st_size > 0

    text = page.read_text()
    assert text.startswith("# Results\n\nintro\n")
    assert text.count("<!-- results:cpu:begin -->") == 1


def test_results_page_section_is_replaced_not_appended(tmp_path):
    page = tmp_path / "page.md"
    benchmarking.update_results_page(str(page), "cpu", "first", "run1")
    benchmarking.update_results_page(str(page), "cuda", "gpu table", "run2")
    benchmarking.update_results_page(str(page), "cpu", "second", str(tmp_path / "run3"),
                                     plot=str(tmp_path / "run3" / "speedup.png"))
    text = page.read_text()
    assert "first" not in text and "second" in text and "gpu table" in text
    assert text.index("second") < text.index("gpu table")
    assert "](run3/speedup.png)" in text  # relative to the page


def test_peak_memory_counts_what_the_call_allocates():
    holder = []
    peak = benchmarking.peak_memory_bytes(lambda: holder.append(torch.empty(2**20)), "cpu")
    assert peak is None or peak >= 4 * 2**20


def test_demo_gets_the_remaining_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("lstm_fused.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lstm_fused.demo", fake)
    assert cli.main(["demo", "--quick", "--help"]) == 0
    assert seen == [["--quick", "--help"]]


def test_missing_demo_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lstm_fused.demo", None)  # import fails as if absent
    assert cli.main(["demo"]) == 2
    assert "demo.py is missing" in capsys.readouterr().err


@needs_fused
def test_python_dash_m_entry_point():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "lstm_fused", "check", "--grid", "tiny", "--dtype", "float64"],
        capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2/2 cases passed" in proc.stdout


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"], ["bench", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    assert "usage: python -m lstm_fused" in capsys.readouterr().out


@needs_fused
def test_bench_variants_writes_the_table(tmp_path, capsys):
    """`bench --variants`: one row per cell variant, the three implementations timed."""
    out_dir = tmp_path / "variants"
    argv = ["bench", "--variants", "--grid", "tiny", "--repeats", "2", "--warmup", "0",
            "--out", str(out_dir)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads((out_dir / "results.json").read_text())
    assert [r["variant"] for r in data["rows"]] == list(benchmarking.VARIANTS)
    for row in data["rows"]:
        for impl in benchmarking.VARIANT_IMPLS:
            assert len(row[impl]["times_ms"]) == 2 and row[impl]["median_ms"] > 0
        assert row["vs_plain"] > 0 and row["reference_speedup"] > 0
        assert f"| {row['variant']} | T6-B3-H8" in out


@needs_fused
@pytest.mark.parametrize("mode", benchmarking.MODES)
def test_bench_autocast_case_runs_both_modules_under_autocast(mode, monkeypatch):
    case = benchmarking.BenchCase(T=4, B=2, H=8, autocast="bfloat16")
    assert case.name == "T4-B2-H8-float32-autocast-bfloat16"
    assert case.gemm_dtype == "bfloat16"
    modules = benchmarking.build_modules(case, "cpu")
    monkeypatch.setattr(benchmarking, "build_modules", lambda *args, **kwargs: modules)
    output_dtypes = {}
    for impl, module in modules.items():
        assert module.weight_ih_l0.dtype == torch.float32
        module.register_forward_hook(
            lambda mod, args, out, impl=impl: output_dtypes.__setitem__(impl, out[0].dtype))
    for run in benchmarking.make_workloads(case, mode).values():
        run()
    assert output_dtypes == {impl: torch.bfloat16 for impl in benchmarking.IMPLS}


def test_bench_float32_geomean_leaves_out_autocast_rows():
    def row(speedup, autocast):
        case = benchmarking.BenchCase(T=4, B=2, H=8, autocast=autocast)
        return {"mode": "forward+backward", "speedup": speedup, "config": dataclasses.asdict(case)}

    rows = [row(2.0, None), row(8.0, None), row(0.1, "bfloat16")]
    assert benchmarking.geomean_speedup(rows) == pytest.approx(4.0)
