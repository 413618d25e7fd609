"""owl-sparse demo: bad options reported before the model is loaded."""

from __future__ import annotations

import pytest
from factories import one_line_error

from owl_sparse.cli.main import main


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--sparsity", "1.5"], ["sparsity"]),
        (["--pattern", "1:4"], ["contradicts"]),
        (["--format", "2:4"], ["--format 2:4", "--pattern"]),
        (["--out", "{file}"], ["{file}", "exists"]),
    ],
)
def test_cli_demo_checks_before_loading(extra, fragments, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    extra = [a.format(file=tmp_path / "afile") for a in extra]
    assert main(["demo", "--model", "stories260k", "--quiet", *extra]) == 2
    one_line_error(capsys, *[f.format(file=tmp_path / "afile") for f in fragments])


def test_demo_dtype_is_bf16_where_the_cpu_multiplies_it_natively():
    import torch

    from owl_sparse.cli.demo import pick_dtype
    from owl_sparse.ops import cpu

    cpu_device = torch.device("cpu")
    assert pick_dtype("float32", cpu_device)[0] == torch.float32
    assert pick_dtype(None, torch.device("meta"))[0] is None  # not a CPU: as stored
    if not cpu.available():
        assert pick_dtype(None, cpu_device)[0] is None
        return
    for isa in cpu.supported_isas():
        with cpu.use_isa(isa):
            dtype, why = pick_dtype(None, cpu_device)
        assert dtype == (torch.bfloat16 if isa == "avx512_bf16" else None), isa
        assert ("AVX512_BF16" in why) == (dtype is not None)


def test_demo_decode_rounds_rotate_and_pair(monkeypatch):
    from owl_sparse.cli import demo

    order = []

    class Fake:
        def __init__(self, rate):
            self.rate = rate

    def fake_generate(model, tokenizer, prompt, max_new_tokens, repetition_penalty, native_dense):
        assert repetition_penalty == 1.3
        order.append(model.rate)
        return type("G", (), {"decode_tokens_per_s": model.rate * (1 + len(order) / 100)})()

    monkeypatch.setattr(demo, "generate", fake_generate)
    got = demo.decode_rounds({"a": (Fake(1.0), None), "b": (Fake(2.0), None)}, None, 4, 3, 1.3)
    assert order == [1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0]  # warm-ups, then rotated rounds
    assert len(got["a"]) == len(got["b"]) == 3
    assert 1.9 < demo.paired_ratio(got["b"], got["a"]) < 2.1


def test_demo_calibrates_offline_on_prose_it_does_not_evaluate_on(monkeypatch):
    """Without shared data the demo evaluates on the start of Python's documentation prose
    and calibrates on the rest (never on the evaluation windows); an explicit text or "self"
    wins."""
    import dataclasses

    from factories import _word_tokenizer

    from owl_sparse.cli import demo

    # ids 30..99, each once ("w2" is the tokenizer's EOS and would split "w20".."w29")
    words = " ".join(f"w{i}" for i in range(30, 100))
    monkeypatch.setattr(demo, "load_text", lambda spec: words if spec == "pydoc" else "")
    offline = dataclasses.replace(demo.settings.get(), data_dir=None)
    monkeypatch.setattr(demo.settings, "get", lambda: offline)
    tok = _word_tokenizer()
    args = demo.DemoConfig(calib_samples=16, calib_seqlen=8)
    used = 30  # the evaluation read ids 30..59
    ids, where = demo.pick_calibration(None, tok, args, "pydoc", used)
    assert ids.shape == (16, 8) and "after the 30 tokens evaluated on" in where
    assert ids.min() >= 60 and ids.max() <= 99
    whole, where = demo.pick_calibration(None, tok, args, "wikitext2", used)
    assert "evaluated on" not in where and whole.shape == (16, 8) and whole.min() < 60
    sampled = []
    monkeypatch.setattr(demo, "sample_from_model", lambda *a: sampled.append(a) or ids)
    self_args = demo.DemoConfig(calib_samples=16, calib_seqlen=8, calib_text="self")
    assert demo.pick_calibration("m", tok, self_args, "pydoc", used)[1].endswith("from the model")
    assert sampled


def test_demo_serves_torch_f_linear_only_when_asked(monkeypatch):
    """The torch F.linear row costs one more compiled decode step (about a minute cold, the
    demo's time budget is 5 minutes with the install): it is opt-in."""
    from owl_sparse.cli import main as cli

    seen = []
    monkeypatch.setattr("owl_sparse.cli.demo.run_demo", lambda config: seen.append(config) or {})
    parser = cli.build_parser()
    for argv, want in ((["demo"], False), (["demo", "--torch-baseline"], True)):
        cli.cmd_demo(parser.parse_args(argv))
        assert seen[-1].torch_baseline is want
