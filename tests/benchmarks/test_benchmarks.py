"""The benchmarks in their reduced CPU mode, so they cannot rot; the suite's helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_e2e, bench_kernels, common, e2e_models, suite_report  # noqa: E402
from owl_sparse import settings  # noqa: E402
from owl_sparse.ops import dispatch  # noqa: E402
from owl_sparse.ops import table as table_mod  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kernel_doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    doc = bench_kernels.main(
        [
            "--grid",
            "cpu",
            "--target-s",
            "0.005",
            "--device",
            "cpu",
            "--json-out",
            str(out / "kernels.json"),
            "--table-out",
            str(out / "table.json"),
        ]
    )
    return doc, out


@pytest.fixture(scope="module")
def e2e_doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    doc = bench_e2e.main(
        [
            "--models",
            "tiny",
            "--batches",
            "1,2",
            "--new-tokens",
            "4",
            "--prefill",
            "32",
            "--prompt-len",
            "8",
            "--prefill-reps",
            "2",
            "--device",
            "cpu",
            "--json-out",
            str(out / "e2e.json"),
        ]
    )
    return doc, out


def test_kernel_bench_measures_and_checks_every_contender(kernel_doc):
    doc, _ = kernel_doc
    rows = doc["rows"]
    timed = [r for r in rows if "time_us" in r]
    points = {(r["layer"], r["pattern"], r["tokens"]) for r in rows}
    assert len(points) == 2 * 2 * 2  # shapes x patterns x token counts of the cpu grid
    for point in points:
        names = {r["contender"] for r in timed if (r["layer"], r["pattern"], r["tokens"]) == point}
        assert "cublas" in names and len(names) >= 2, names  # the baseline and >= 1 kernel
    for r in timed:
        assert r["ok"], f"{r['contender']} wrong on {r['N']}x{r['K']}: rel err {r['rel_err']}"
        assert r["time_us"] > 0 and r["gbps"] > 0
        assert r["ceiling"] == 1.0 if r["contender"] == "cublas" else r["ceiling"] > 1.5
        base = next(
            b
            for b in timed
            if b["contender"] == "cublas"
            and b["N"] == r["N"]
            and b["pattern"] == r["pattern"]
            and b["tokens"] == r["tokens"]
        )
        assert r["speedup"] == pytest.approx(base["time_us"] / r["time_us"])
    assert "### Kernels" in bench_kernels.to_markdown(doc)


def test_kernel_bench_table_loads_into_dispatch(kernel_doc, monkeypatch):
    doc, out = kernel_doc
    table = json.loads((out / "table.json").read_text())
    assert table["gpu"] == doc["env"]["device"] and table["entries"] == doc["dispatch"]
    monkeypatch.setenv("OWL_SPARSE_DISPATCH_TABLES", str(out / "table.json"))
    settings.reload()
    dispatch.reload_tables()
    try:
        loaded = table_mod.entries_by_key()
        for e in table["entries"]:
            key = (table["gpu"], e["fmt"], e["dtype"], e["N"], e["K"], e["tokens"])
            assert any(row[1] == e["backend"] for row in loaded[key])
    finally:
        monkeypatch.delenv("OWL_SPARSE_DISPATCH_TABLES")
        dispatch.reload_tables()


def _row(contender, time_us, ok=True, tokens=1):
    return dict(
        model="m",
        layer="l",
        N=16,
        K=128,
        dtype="float16",
        pattern="70%",
        fmt="bitmap",
        tokens=tokens,
        contender=contender,
        time_us=time_us,
        ok=ok,
    )


def test_dispatch_entries_never_pick_slow_or_wrong_kernels():
    rows = [
        _row("cublas", 10.0),
        _row("triton_gemv", 9.9),
        _row("triton_mm", 5.0, ok=False),
        _row("cublas", 10.0, tokens=3),
        _row("triton_gemv", 4.0, tokens=3),
    ]
    entries = bench_kernels.dispatch_entries(rows)
    assert [(e["tokens"], e["backend"]) for e in entries] == [(1, "dense"), (4, "triton_gemv")]
    assert "2.50x cuBLAS" in entries[1]["why"] and entries[1]["sparsity"] == 0.7


def test_byte_ceiling_matches_the_reference_table():
    for sparsity, ceiling in ((0.5, 1.78), (0.6, 2.16), (0.7, 2.76), (0.8, 3.81)):
        got = common.byte_ceiling(2.0, common.bitmap_bytes_per_weight(sparsity))
        assert got == pytest.approx(ceiling, abs=0.005)
    assert common.byte_ceiling(2.0, 1.125) == pytest.approx(1.78, abs=0.005)


def test_time_calls_on_cpu_is_a_median():
    timing = common.time_calls([lambda: time.sleep(0.003)], "cpu", target_s=0.03, min_reps=5)
    assert timing.method == "cpu-wall" and timing.reps >= 5
    assert 0.003 <= timing.seconds < 0.05


def test_e2e_dense_vs_sparse(e2e_doc, capsys):
    doc, _ = e2e_doc
    by_variant = {r["variant"]: r for r in doc["results"]}
    assert set(by_variant) == {"dense", "bitmap-70", "2:4"}
    assert by_variant["dense"]["weight_ratio"] == 1.0
    assert by_variant["bitmap-70"]["linear_ratio"] < 0.5  # fp32: 1/32 + 0.3 plus tile padding
    assert 0.5 < by_variant["2:4"]["linear_ratio"] < 0.6  # fp32: half the values + metadata
    for r in doc["results"]:
        assert set(r["decode"]) == {"1", "2"} and r["prefill_s"] > 0
        assert all(v["tokens_per_s"] > 0 and v["cuda_graph"] is False for v in r["decode"].values())
    headers, rows = bench_e2e.table_rows(doc)
    assert len(rows) == 3 and "tok/s b2" in headers


def test_ramp_profile_is_owl_shaped():
    profile = e2e_models.ramp_profile(32)
    assert sum(profile) / 32 == pytest.approx(0.7)
    assert profile[0] == pytest.approx(0.62) and profile[-1] == pytest.approx(0.78)


def test_suite_report_writes_json_markdown_and_plots(kernel_doc, e2e_doc, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    common.write_json(parts / "kernels.json", kernel_doc[0])
    common.write_json(parts / "e2e.json", e2e_doc[0])
    (parts / "steps.txt").write_text("build 0 12\nkernels 0 30\n")
    (parts / "gpu_tests.log").write_text("....\n== 3 passed, 2 skipped in 4.0s ==\n")
    out = suite_report.build(parts, tmp_path / "results")
    files = [Path(f) for f in out["files"]]
    assert {f.suffix for f in files} == {".json", ".md", ".png"}
    for png in (f for f in files if f.suffix == ".png"):
        assert png.read_bytes()[:8] == PNG
    md = next(f for f in files if f.suffix == ".md").read_text()
    assert "3 passed, 2 skipped" in md and "not measured (no GPU)" in md
    assert "End to end" in md and "Kernels" in md and kernel_doc[0]["env"]["commit"] in md
    doc = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    assert doc["steps"] == [["build", "0", "12"], ["kernels", "0", "30"]]


def test_cli_bench_dispatches_to_the_benchmarks(capsys):
    from owl_sparse.cli.main import main

    code = main(
        [
            "bench",
            "kernels",
            "--grid",
            "cpu",
            "--only",
            "cublas",
            "--table-out",
            "none",
            "--device",
            "cpu",
            "--target-s",
            "0.001",
        ]
    )
    assert code == 0 and "48x256" in capsys.readouterr().out


def test_suite_scripts_parse_and_name_existing_modules():
    for script in ("gpu_suite.sh", "prepare_gpu_data.sh"):
        subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], check=True)
    text = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    for module in ("bench_kernels", "bench_e2e", "suite_report"):
        assert f"benchmarks.{module}" in text and (REPO / "benchmarks" / f"{module}.py").is_file()


@pytest.mark.slow
def test_pytest_benchmark_file_runs():
    env = {**os.environ, "OWL_SPARSE_BENCH_SIZE": "256"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-disable",
            str(REPO / "benchmarks" / "test_cpu_bench.py"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_e2e_real_owl_wanda_on_stories260k(shared_data, tmp_path):
    doc = bench_e2e.main(
        [
            "--models",
            "stories260k",
            "--variants",
            "dense,bitmap-70",
            "--batches",
            "1",
            "--new-tokens",
            "4",
            "--prefill",
            "64",
            "--calib-samples",
            "4",
            "--calib-seqlen",
            "64",
            "--device",
            "cpu",
            "--save-owl-profile",
            str(tmp_path / "owl.json"),
        ]
    )
    sparse = doc["results"][1]
    assert sparse["masks"].startswith("real owl + wanda")
    profile = json.loads((tmp_path / "owl.json").read_text())["block_sparsities"]
    assert len(profile) == 5 and sum(profile) / 5 == pytest.approx(0.7, abs=0.01)
    assert max(profile) - min(profile) == pytest.approx(0.16, abs=0.01)  # OWL spread 2*lambda


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_kernel_point_on_gpu_uses_graph_timing():
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = bench_kernels.measure_point(
        "llama2-7b",
        "q/k/v/o",
        4096,
        4096,
        torch.float16,
        "70%",
        torch.device("cuda"),
        (1, 16),
        None,
        gen,
        common.Deadline(None),
        0.05,
    )
    timed = [r for r in rows if "time_us" in r]
    assert {r["contender"] for r in timed} >= {"cublas", "triton_gemv"}
    assert all(r["ok"] and r["method"] == "cuda-graph" for r in timed)
    assert all(r["rotation"] >= 2 for r in timed)  # 32 MB weights: L2 would hold one


@pytest.mark.gpu
def test_e2e_tiny_on_gpu_uses_cuda_graphs():
    doc = bench_e2e.main(
        [
            "--models",
            "tiny",
            "--batches",
            "1,4",
            "--new-tokens",
            "8",
            "--prefill",
            "64",
            "--device",
            "cuda",
            "--dtype",
            "float16",
        ]
    )
    for r in doc["results"]:
        assert all(v["cuda_graph"] for v in r["decode"].values()), r["decode"]
        assert r["peak_bytes"] > 0


def test_cpu_kernel_bench_tiny_grid(tmp_path):
    """The CPU kernel benchmark's reduced grid: every contender correct, ratios from the
    times of the same run, a loadable dispatch table, the report and plot written."""
    from benchmarks import bench_cpu
    from owl_sparse.ops import cpu

    if not cpu.available():
        pytest.skip("compiled CPU kernels unavailable")
    out = tmp_path / "cpu"
    doc = bench_cpu.main(
        ["--grid", "tiny", "--target-s", "0.02", "--out", str(out), "--table-out", "none"]
    )
    rows = doc["rows"]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert {r["contender"] for r in rows} == set(bench_cpu.CONTENDERS)
    assert doc["read_bandwidth_gbps"] > 0 and doc["llc_bytes"] > 0
    for r in rows:
        base = next(
            b
            for b in rows
            if b["contender"] == "torch_dense"
            and (b["layer"], b["dtype"], b["pattern"], b["tokens"])
            == (r["layer"], r["dtype"], r["pattern"], r["tokens"])
        )
        assert r["speedup"] == pytest.approx(base["time_us"] / r["time_us"])
    assert {e["backend"] for e in doc["dispatch"]} <= {"cpu_sparse", "dense"}
    saved = dispatch.save_table(tmp_path / "t.json", cpu.device_key(), doc["dispatch"])
    assert json.loads(saved.read_text())["entries"]
    md = out.with_suffix(".md").read_text()
    assert md.count("|") > 10
    assert (
        f"- command: `python -m benchmarks.bench_cpu --grid tiny --target-s 0.02 --out {out}" in md
    )
    assert json.loads(out.with_suffix(".json").read_text())["command"] == doc["command"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_memory_bench_reports_every_stage_per_variant(shared_data, tmp_path):
    from benchmarks import memory

    out = tmp_path / "mem"
    doc = memory.main(
        [
            "--model",
            "stories260k",
            "--samples",
            "4",
            "--seqlen",
            "64",
            "--new-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    stages = {v: [s["stage"] for s in r["stages"]] for v, r in doc["results"].items()}
    assert stages == {
        "dense": ["start", "loaded", "served"],
        "packed": ["start", "loaded", "pruned", "packed", "served"],
    }
    for r in doc["results"].values():
        peaks = [s["peak_mib"] for s in r["stages"]]
        assert peaks == sorted(peaks)  # a lifetime peak never falls
        assert all(s["peak_mib"] >= s["rss_mib"] - 1 for s in r["stages"])
    assert json.loads(out.with_suffix(".json").read_text())["command"].startswith("python -m")
    assert "lifetime peak MiB" in out.with_suffix(".md").read_text()


def test_cpu_dense_layers_reduced(monkeypatch, tmp_path):
    from benchmarks import cpu_dense_layers

    monkeypatch.setattr(cpu_dense_layers, "SHAPES", {"odd 40x200": (40, 200), "b 17x64": (17, 64)})
    monkeypatch.setattr(cpu_dense_layers, "llc_bytes", lambda: 64 * 2**10)
    from owl_sparse.ops import cpu, dispatch

    table = tmp_path / "t.json"
    packed_entry = dict(fmt="bitmap", dtype="bfloat16", N=64, K=64, tokens=1, sparsity=0.7)
    dispatch.save_table(table, cpu.device_key(), [dict(packed_entry, backend="dense")])
    args = ["--tokens", "1,3", "--target-s", "0.003", "--out", str(tmp_path / "d")]
    doc = cpu_dense_layers.main([*args, "--table-out", str(table)])
    assert len(doc["rows"]) == 2 * 2 * 2
    for r in doc["rows"]:
        assert r["rel_err"] < 2e-2, r  # both contenders against fp32
        assert r["time_us"] > 0 and r["copies"] >= 2
    assert (tmp_path / "d.md").read_text().count("x |") >= 1 and (tmp_path / "d.json").is_file()
    saved = json.loads(table.read_text())["entries"]
    dense = [e for e in saved if e["fmt"] == "dense"]
    assert {(e["N"], e["K"], e["tokens"]) for e in dense} == {
        (n, k, t) for n, k in ((40, 200), (17, 64)) for t in (1, 4)
    }
    assert all(e["backend"] in ("torch", "cpu_kernel") for e in dense)
    assert [e for e in saved if e["fmt"] == "bitmap"] == [dict(packed_entry, backend="dense")]


def test_decode_rounds_interleaves_and_pairs_the_ratios(tmp_path):
    from benchmarks import decode_rounds

    calls = []
    speeds = {"a": iter([10.0, 30.0, 40.0]), "b": iter([10.0, 10.0, 40.0])}

    def contender(name):
        def run():
            calls.append(name)
            return next(speeds[name]) if len(calls) > 2 else 1.0  # the warm-ups: 1.0

        return run

    per_round = decode_rounds.interleaved_rounds({"a": contender("a"), "b": contender("b")}, 3)
    # one warm-up each, then every round both contenders, the order rotated per round
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert per_round == {"a": [10.0, 30.0, 40.0], "b": [10.0, 10.0, 40.0]}
    s = decode_rounds.summarize(per_round)
    assert s["contenders"]["a"]["median"] == 30.0 and s["contenders"]["b"]["min"] == 10.0
    assert s["ratios"]["a/b"] == 1.0  # median of 1, 3, 1 (not 30 / 10 of the medians)
    assert s["ratios"]["b/a"] == 1.0


def test_decode_rounds_reduced(tmp_path):
    from benchmarks import decode_rounds

    md = tmp_path / "r.md"
    doc = decode_rounds.main(
        [
            "--model",
            "tiny",
            "--rounds",
            "2",
            "--new-tokens",
            "3",
            "--prompt-len",
            "5",
            "--variants",
            "dense,bitmap-70",
            "--md-out",
            str(md),
            "--json-out",
            str(tmp_path / "r.json"),
        ]
    )
    rows = doc["summary"]["contenders"]
    assert set(rows) == {"dense", "bitmap-70"}  # no llama.cpp for a random model
    assert all(len(r["rounds"]) == 2 and min(r["rounds"]) > 0 for r in rows.values())
    assert "x dense (median of rounds)" in md.read_text()
    assert json.loads((tmp_path / "r.json").read_text())["env"]["commit"]
    with pytest.raises(Exception, match="variants"):
        decode_rounds.main(["--model", "tiny", "--variants", "sparse"])
