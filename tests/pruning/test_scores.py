"""Scorers: Wanda and SparseGPT on small layers and on a real layer of stories260K."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from owl_sparse.pruning import PruneError, Target
from owl_sparse.pruning.masks import pruned_per_row, select_mask
from owl_sparse.pruning.scores import magnitude_scores, sparsegpt, wanda_scores


def _layer_problem(rows=24, cols=300, tokens=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix  # correlated features
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _error(w, w_pruned, x):
    return torch.linalg.matrix_norm(x @ w.t() - x @ w_pruned.t()).item()


@pytest.mark.parametrize("target", [Target(0.5), Target(0.7), Target.of(0, (2, 4))])
def test_sparsegpt_masks_are_exact_and_beat_wanda(target):
    w, x = _layer_problem()
    new, keep = sparsegpt(w, x.t() @ x, target)
    assert new.dtype == torch.float32 and keep.dtype == torch.bool and keep.shape == w.shape
    assert (new[~keep] == 0).all()
    if target.nm is None:
        assert (keep.logical_not().sum(dim=1) == pruned_per_row(target.sparsity, 300)).all()
    else:
        assert (keep.reshape(24, 75, 4).sum(dim=2) == 2).all()
    wanda_keep = select_mask(wanda_scores(w, (x * x).sum(0)), target)
    assert _error(w, new, x) < _error(w, w * wanda_keep, x)


def _naive_sparsegpt(w, h, sparsity, blocksize):
    """Column by column with eager (not lazy) updates of the whole matrix, in float64."""
    w, cols = w.double().clone(), w.shape[1]
    h = h.double() + 0.01 * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    total = pruned_per_row(sparsity, cols)
    quota = lambda i: min(int(sparsity * i + 0.5 + 1e-9), total)  # noqa: E731
    for j in range(cols):
        if j % blocksize == 0:
            end = min(j + blocksize, cols)
            sal = w[:, j:end] ** 2 / u.diagonal()[j:end] ** 2
            k = quota(end) - quota(j)
            order = torch.sort(sal, dim=1, stable=True).indices[:, :k]
            keep[:, j:end].scatter_(1, order + 0, False)
        err = w[:, j] * (~keep[:, j]) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])
    return w * keep, keep


@pytest.mark.parametrize("cols, blocksize", [(300, 128), (40, 16), (64, 128)])
def test_sparsegpt_lazy_blocks_match_the_naive_algorithm(cols, blocksize):
    w, x = _layer_problem(rows=10, cols=cols, tokens=600, seed=cols)
    h = x.t() @ x
    new, keep = sparsegpt(w, h, Target(0.6), blocksize=blocksize)
    ref, ref_keep = _naive_sparsegpt(w, h, 0.6, blocksize)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref, rtol=1e-3, atol=1e-3)


def test_sparsegpt_with_white_inputs_is_magnitude_pruning():
    # H = c*I: no correlations to compensate, saliency w^2 / const -> magnitude, one block
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    new, keep = sparsegpt(w, 3.0 * torch.eye(64), Target(0.6))
    expected = select_mask(magnitude_scores(w), Target(0.6))
    assert torch.equal(keep, expected)
    torch.testing.assert_close(new, w * expected)


def test_sparsegpt_dead_inputs_are_zeroed():
    w, x = _layer_problem(rows=6, cols=40, tokens=300)
    x[:, [3, 17]] = 0.0
    new, keep = sparsegpt(w, x.t() @ x, Target(0.3))
    assert (new[:, [3, 17]] == 0).all()
    assert torch.isfinite(new).all()


def test_sparsegpt_retries_with_more_damping():
    # eigenvalues 2.02 and -0.02: 1% damping fails, 10% succeeds
    h = torch.tensor([[1.0, 1.02], [1.02, 1.0]])
    new, keep = sparsegpt(torch.tensor([[1.0, 2.0]]), h, Target(0.5))
    assert keep.tolist() == [[False, True]] and new[0, 0] == 0


def test_sparsegpt_gives_up_with_a_clear_error():
    with pytest.raises(PruneError, match="not positive definite.*retries"):
        sparsegpt(torch.ones(2, 4), -torch.eye(4), Target(0.5), name="layer.x")


def test_wanda_scores_shape_check():
    with pytest.raises(ValueError, match=r"colsq must have shape \[4\]"):
        wanda_scores(torch.ones(2, 4), torch.ones(3))


@pytest.fixture(scope="module")
def stories_layer(shared_data):
    if importlib.util.find_spec("owl_sparse.models.llama2c") is None:
        pytest.skip("owl_sparse.llama2c is not there yet")
    path = shared_data / "stories260K" / "stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    from owl_sparse.data import calibration_batches, tokenize
    from owl_sparse.models import find_decoder_blocks, load_model

    model, tok = load_model(path)
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:60000]
    ids = calibration_batches(tokenize(tok, text), 16, 128, seed=0)
    block = find_decoder_blocks(model).blocks[2]
    seen = {}
    hooks = [
        block.mlp.down_proj.register_forward_pre_hook(
            lambda m, a: seen.setdefault("down", []).append(a[0])
        ),
        block.self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: seen.setdefault("q", []).append(a[0])
        ),
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {
        "down": (
            block.mlp.down_proj.weight.detach().clone(),
            torch.cat(seen["down"]).flatten(0, 1),
        ),
        "q": (block.self_attn.q_proj.weight.detach().clone(), torch.cat(seen["q"]).flatten(0, 1)),
    }


@pytest.mark.parametrize("layer", ["down", "q"])
@pytest.mark.parametrize("target", [Target(0.5), Target(0.7), Target.of(0, (2, 4))])
def test_sparsegpt_reconstructs_a_real_layer_better_than_wanda(stories_layer, layer, target):
    w, x = stories_layer[layer]
    x = x.double()
    new, keep = sparsegpt(w, (x.t() @ x).float(), target)
    wanda_keep = select_mask(wanda_scores(w, (x * x).sum(0)), target)
    assert keep.sum() == wanda_keep.sum()  # equal sparsity
    sgpt_err = _error(w.double(), new.double(), x)
    wanda_err = _error(w.double(), (w * wanda_keep).double(), x)
    assert sgpt_err < wanda_err, (sgpt_err, wanda_err)
