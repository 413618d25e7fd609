"""Saves killed at every step (a real process exit, no cleanup runs): the target is always
the complete old or the complete new checkpoint, and the next save cleans what was left."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from factories import digest, hidden, pruned_model

from owl_sparse.io import WEIGHTS, atomic, load_pretrained, save_pretrained

# (function patched in owl_sparse.io.atomic, kill before or after its call)
STEPS = [
    ("_plain_modes", "before"),
    ("fsync_tree", "before"),
    ("fsync_tree", "after"),
    ("exchange", "before"),
    ("exchange", "after"),
    ("fsync_dir", "after"),
    ("rmtree", "before"),
]
# Without the one-step swap (other systems): the old directory is renamed aside first.
FALLBACK_STEPS = [("replace", "before"), ("replace_1", "after"), ("replace_2", "after")]

CHILD = """
import os, shutil, sys
from owl_sparse.io import WEIGHTS, atomic, load_pretrained, save_pretrained
name, when, fallback, new, target = sys.argv[1:6]
model, _ = load_pretrained(new)
if fallback == "1":
    atomic.exchange = lambda a, b: False
calls = {"n": 0}
def wrap(real, nth=1):
    def step(*args, **kwargs):
        calls["n"] += 1
        if when == "before" and calls["n"] == nth:
            os._exit(137)
        out = real(*args, **kwargs)
        if when == "after" and calls["n"] == nth:
            os._exit(137)
        return out
    return step
if name == "rmtree":
    atomic.shutil.rmtree = wrap(shutil.rmtree)
elif name.startswith("replace"):
    nth = int(name.partition("_")[2] or 1)
    atomic.os.replace = wrap(os.replace, nth)
else:
    setattr(atomic, name, wrap(getattr(atomic, name)))
save_pretrained(model, target)
print("not killed")
"""


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    old, _ = pruned_model("llama", "bitmap")
    new, _ = pruned_model("llama", "2:4")
    save_pretrained(old, root / "old")
    save_pretrained(new, root / "new")
    return root / "old", root / "new"


def _which(target, versions) -> bool:
    """True when ``target`` holds one of the two versions whole: it loads (every check of
    the loader passes) and its weights file is the old or the new one, byte for byte."""
    load_pretrained(target)
    weights = digest(target)[WEIGHTS]
    return weights in (digest(versions[0])[WEIGHTS], digest(versions[1])[WEIGHTS])


def _killed_save(tmp_path, versions, name, when, fallback):
    old, new = versions
    target = tmp_path / "ck"
    save_pretrained(load_pretrained(old)[0], target)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), name, when, fallback, str(new), str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 137, (done.returncode, done.stdout, done.stderr[-2000:])
    return target


@pytest.mark.parametrize("name, when", STEPS)
def test_kill_at_any_step_leaves_old_or_new(tmp_path, versions, name, when):
    if atomic._RENAMEAT2 is None:
        pytest.skip("no renameat2 here: the two-rename path is tested below")
    target = _killed_save(tmp_path, versions, name, when, "0")
    assert _which(target, versions)
    load_pretrained(target)
    assert atomic.recover_interrupted(target) or True
    assert hidden(tmp_path) == []
    assert _which(target, versions)


@pytest.mark.parametrize("name, when", FALLBACK_STEPS)
def test_kill_without_exchange_is_recovered_by_the_next_save(tmp_path, versions, name, when):
    target = _killed_save(tmp_path, versions, name, when, "1")
    # Between the two renames the target may be missing for a moment; the next save to it
    # (here: its first step, recover_interrupted) puts the old checkpoint back.
    atomic.recover_interrupted(target)
    assert hidden(tmp_path) == []
    assert _which(target, versions)
    load_pretrained(target)


def test_stale_temporaries_of_a_live_process_are_left_alone(tmp_path):
    target = tmp_path / "ck"
    mine = tmp_path / f".ck.tmp-{__import__('os').getpid()}-abc"
    mine.mkdir()
    dead = tmp_path / ".ck.tmp-999999999-abc"
    dead.mkdir()
    other = tmp_path / ".other.tmp-999999999-abc"
    other.mkdir()
    assert atomic.recover_interrupted(target) == [dead]
    assert sorted(hidden(tmp_path)) == sorted([mine.name, other.name])


def test_exchange_swaps_two_directories(tmp_path):
    if atomic._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert atomic.exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_an_unwritable_destination_is_refused_before_any_work(tmp_path):
    """/proc refuses new files even to root: the check probes, it does not trust modes."""
    from owl_sparse.errors import InputError
    from owl_sparse.io.atomic import check_replaceable

    with pytest.raises(InputError, match="cannot write in /proc"):
        check_replaceable("/proc/owl-sparse-out", lambda p: True, "a checkpoint")
    check_replaceable(tmp_path / "new" / "ck", lambda p: True, "a checkpoint")
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind


def test_cli_prune_refuses_an_unwritable_out_before_loading(hf_dir, text_file, monkeypatch, capsys):
    import owl_sparse.models.load as load

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(load, "load_model", never)
    from owl_sparse.cli.main import main

    argv = ["prune", "--model", str(hf_dir), "--calib-text", str(text_file), "--out"]
    assert main(argv + ["/proc/owl-sparse-out"]) == 2
    assert "cannot write in /proc" in capsys.readouterr().err
