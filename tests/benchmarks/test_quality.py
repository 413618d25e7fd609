"""benchmarks/quality.py: the verdict rule, the report, and a reduced real run."""

from __future__ import annotations

import json
import sys

from factories import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import quality  # noqa: E402


def test_verdict_needs_two_standard_errors():
    assert quality.verdict([10.0, 10.1, 9.9], [12.0, 12.1, 11.9]) == "helps"
    assert quality.verdict([12.0, 12.1, 11.9], [10.0, 10.1, 9.9]) == "hurts"
    # means 1 apart, standard error sqrt(2 * 1^2 / 3) = 0.82: not beyond 2 of them
    assert quality.verdict([10.0, 11.0, 12.0], [11.0, 12.0, 13.0]) == "within noise"
    assert quality.verdict([10.0], [12.0, 12.1]) == "one seed"


def _run(name, seed, ppl, achieved, target=0.5):
    return {
        f"{name}@{seed}": {
            "perplexity": ppl,
            "kl": 0.1 * ppl,
            "top1": 0.5,
            "achieved_sparsity": achieved,
            "target_sparsity": target,
            "total_s": 1.0,
        }
    }


def test_render_spreads_budgets_and_verdicts():
    results = {"dense": {"perplexity": 5.0, "kl": 0.0, "top1": 1.0, "total_s": 1.0}}
    for seed, (u, o) in enumerate([(10.0, 8.0), (10.2, 8.1), (9.8, 7.9)]):
        results |= _run("wanda-uniform-0.5", seed, u, 0.5)
        results |= _run("wanda-owl-0.5", seed, o, 0.5003 if seed else 0.5021)
    text = quality.render({"results": results, "protocol": {"model": "m"}})
    assert "| wanda | uniform | 10.00 ± 0.20 |" in text
    assert "| wanda | owl | 8.00 ± 0.10 |" in text
    assert "50.09% ✗" in text and "off budget: ['wanda-owl-0.5']" in text
    assert "- wanda at 0.5: owl helps (8.00 ± 0.10 vs 10.00 ± 0.20 uniform)" in text


def test_reduced_run_on_stories260k(shared_data, tmp_path, monkeypatch):
    """The suite's reduced mode: two seeds, Wanda, uniform against tuned, 50%."""
    monkeypatch.setenv("OWL_SPARSE_DATA", str(shared_data))
    monkeypatch.setenv("OWL_SPARSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    args = ["--model", "stories260k", "--out", str(out), "--methods", "wanda"]
    args += ["--allocations", "uniform,tuned", "--levels", "0.5", "--seeds", "0,1"]
    args += ["--samples", "8", "--seqlen", "64", "--eval-windows", "4", "--quiet"]
    done = quality.main(args)
    res = done["results"]
    assert set(res) == {"dense"} | {
        f"wanda-{a}-0.5@{s}" for a in ("uniform", "tuned") for s in (0, 1)
    }
    for key, row in res.items():
        if key == "dense":
            continue
        assert 0 < row["kl"] and 0 <= row["top1"] <= 1 and row["perplexity"] > 1
        assert abs(row["achieved_sparsity"] - 0.5) <= quality.BUDGET_TOLERANCE
    assert res["wanda-uniform-0.5@0"]["perplexity"] != res["wanda-uniform-0.5@1"]["perplexity"]
    assert "chosen" in res["wanda-tuned-0.5@0"]["allocation_search"]
    assert json.loads(out.with_suffix(".json").read_text()) == done
    text = out.with_suffix(".md").read_text()
    assert "## tuned against uniform" in text and "± " in text
    # resumable: a second call runs nothing new
    again = quality.main(args)
    assert again["results"] == res
