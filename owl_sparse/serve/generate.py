"""Generation in the same process as pruning: static KV cache, CUDA-graph decode loop.

`generate(model, tokenizer, prompts, ...)` serves a dense model and a model whose linear
layers were swapped by `owl_sparse.sparsify_` through the very same loop, so their
tokens/s compare fairly.  On CUDA the one-token decode step is captured in a CUDA graph
(launch overhead would otherwise hide the kernels at batch 1); on the CPU it is compiled
with ``torch.compile`` (Python and module overhead would otherwise dominate a small model).

Token accounting: the prefill pass yields the first new token; each later token costs one
decode step.  ``decode_tokens_per_s`` = batch x timed decode steps / their time, where the
first decode step (warm-up) and, on CUDA, the capture step are left out of the timing
(they are still in ``step_s``).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import settings
from ..args import as_int
from ..errors import InputError
from ..models.structure import cache_kwarg, max_context
from ..nn.native import native_linears
from .kv_cache import (
    DecodeStep,
    cache_length,
    check_attention,
    check_memory,
    decode_attention,
    left_pad,
    new_static_cache,
    prefill_inputs,
    text_config,
)
from .sampling import check_ids, check_penalty, check_sampling, penalize, sample_next, seen_tokens

# On CUDA the host checks for "every row finished" only every this many steps, so it
# does not wait for the device after each token (the surplus tokens are dropped).
_EOS_CHECK_EVERY = 8


@dataclass
class GenerateResult:
    """What `generate` produced and how fast.

    Attributes:
        texts: decoded new text per prompt (None from `generate_ids`).
        token_ids: new token ids per prompt, ending with the EOS token when one was made.
        prompt_lengths: prompt tokens per prompt.
        prefill_s: wall time of the prefill passes (summed over batches).
        decode_s: time of the timed decode steps (see module doc).
        decode_tokens_per_s: batch x timed steps / decode_s (0.0 when nothing was timed).
        step_s: time of every decode step, in order.
        timed_steps: how many of ``step_s`` the throughput counts.
        batch_size: sequences per forward pass.
        cuda_graph: whether the decode steps replayed a CUDA graph.
        graph_error: why capture failed, when it did.
        compiled: whether decode steps ran through torch.compile.
        compile_error: why compiling the step failed, when it did.
        memory: the KV cache and prefill estimates in bytes.
    """

    texts: list[str] | None
    token_ids: list[list[int]]
    prompt_lengths: list[int]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    timed_steps: int = 0
    batch_size: int = 0
    cuda_graph: bool = False
    graph_error: str | None = None
    compiled: bool = False
    compile_error: str | None = None
    memory: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    if eos_token_id is None:
        for src in (tokenizer, getattr(model, "generation_config", None), model.config):
            eos_token_id = getattr(src, "eos_token_id", None)
            if eos_token_id is not None:
                break
    if eos_token_id is None:
        return []
    listed = eos_token_id if isinstance(eos_token_id, list | tuple) else [eos_token_id]
    return [as_int("eos_token_id", e) for e in listed]


def generate(
    model,
    tokenizer,
    prompts: list[str] | str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    repetition_penalty: float = 1.0,
    cuda_graphs: bool | None = None,
    compile_step: bool | None = None,
    native_dense: bool | None = None,
) -> GenerateResult:
    """Generate text for prompts with a static KV cache (batched, left-padded).

    Args:
        model: a transformers causal LM, dense or sparsified, in eval mode on its device.
        tokenizer: its tokenizer (``encode`` / ``decode``); None is an error.
        prompts: one prompt or a list; each must tokenize to at least one token.
        max_new_tokens: tokens to generate per prompt (fewer when EOS comes first).
        temperature: 0 = greedy; > 0 samples (with ``top_k`` / ``top_p``, seeded by ``seed``).
        batch_size: prompts per forward pass (default: all at once).
        stop_at_eos: stop a row at its first EOS token (the tokenizer's, else the model's).
        eos_token_id: override the EOS token(s).
        repetition_penalty: transformers' repetition penalty (1.0 = off): before each
            pick, the logit of every token already in the row (prompt or generated) is
            divided by it where positive and multiplied where negative
            (`owl_sparse.serve.sampling.penalize`); greedy picks then match transformers'
            ``generate(do_sample=False, repetition_penalty=...)``.
        cuda_graphs: replay the decode step from a CUDA graph (default: True on CUDA).
        compile_step: where no CUDA graph is used (the CPU), run the decode step through
            ``torch.compile`` (default: ``OWL_SPARSE_COMPILE_DECODE``, on). The first
            step of a new (model, batch, cache length) pays the compilation; it is left
            out of the decode timing like every first step.  Falls back to eager, with one
            logged warning, where compiling fails.
        native_dense: on the CPU, run the model's dense ``nn.Linear`` layers (all of a dense
            model's, a packed model's LM head) through owl-sparse's dense kernel for the
            duration of the call (:func:`owl_sparse.nn.native.native_linears`; default:
            ``OWL_SPARSE_CPU_DENSE_KERNEL``, on).

    Returns:
        `GenerateResult` with texts, token ids and timings.

    Raises:
        InputError: no tokenizer, empty prompts, a prompt plus ``max_new_tokens`` beyond
            the model's context, a batch whose KV cache does not fit in free GPU memory,
            bad sampling settings — all before any model work.
    """
    if tokenizer is None:
        raise InputError(
            "generate needs a tokenizer: this model has none (pass token ids "
            "to generate_ids instead)"
        )
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be a non-empty list of strings")
    seqs = [list(tokenizer.encode(p)) for p in prompts]
    result = generate_ids(
        model,
        seqs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        stop_at_eos=stop_at_eos,
        eos_token_id=_eos_ids(model, tokenizer, eos_token_id),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        repetition_penalty=repetition_penalty,
        cuda_graphs=cuda_graphs,
        compile_step=compile_step,
        native_dense=native_dense,
    )
    result.texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in result.token_ids]
    return result


def generate_ids(
    model,
    seqs: list[list[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    repetition_penalty: float = 1.0,
    cuda_graphs: bool | None = None,
    compile_step: bool | None = None,
    native_dense: bool | None = None,
) -> GenerateResult:
    """`generate` on token id lists (no tokenizer needed): same arguments and checks.

    ``seqs`` is a list of non-empty lists of integer token ids in ``[0, vocab_size)`` (Python
    or numpy ints, or 1-D integer tensors; floats are refused, never truncated).  The
    counts (``max_new_tokens``, ``top_k``, ``batch_size``, ``seed``) take any integer but a
    bool, ``temperature`` / ``top_p`` any finite real number.  ``pad_token_id``
    (default: the model's, else 0) only fills left padding, which is always masked.
    """
    max_new_tokens, temperature, top_k, top_p, batch_size, seed = check_sampling(
        max_new_tokens, temperature, top_k, top_p, batch_size, seed
    )
    repetition_penalty = check_penalty(repetition_penalty)
    vocab = text_config(model).vocab_size
    seqs = check_ids(seqs, vocab)
    longest = max(len(s) for s in seqs)
    limit = max_context(model)
    if limit is not None and longest + max_new_tokens > limit:
        raise InputError(
            f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} "
            f"that is {longest + max_new_tokens}, beyond the model's context of {limit}"
        )
    emb = model.get_input_embeddings().weight
    device, dtype = emb.device, emb.dtype
    batch_size = batch_size or len(seqs)
    check_attention(model)
    memory = check_memory(
        model,
        min(batch_size, len(seqs)),
        longest,
        cache_length(longest, max_new_tokens),
        dtype,
        device,
    )
    eos = _eos_ids(model, None, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
    else:
        pad_token_id = as_int("pad_token_id", pad_token_id)
    if pad_token_id is None or not 0 <= pad_token_id < vocab:
        pad_token_id = 0  # any valid id: padding is masked, but it is still embedded
    use_graph = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
    if compile_step is None:
        compile_step = settings.get().compile_decode
    compile_step = bool(compile_step) and not (use_graph and device.type == "cuda")
    if native_dense is None:
        native_dense = settings.get().cpu_dense_kernel
    generator = torch.Generator(device=device).manual_seed(seed)

    out = GenerateResult(
        texts=None,
        token_ids=[],
        prompt_lengths=[len(s) for s in seqs],
        batch_size=batch_size,
        memory=memory,
        cuda_graph=use_graph,
    )
    timed_tokens = 0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        with native_linears(model, enabled=bool(native_dense) and device.type == "cpu"):
            part = _generate_batch(
                model,
                chunk,
                max_new_tokens,
                device,
                dtype,
                pad_token_id,
                eos if stop_at_eos else [],
                use_graph,
                compile_step,
                lambda x: sample_next(x, temperature, top_k, top_p, generator),
                repetition_penalty,
            )
        out.token_ids += part["token_ids"]
        out.prefill_s += part["prefill_s"]
        out.step_s += part["step_s"]
        timed = part["step_s"][part["warmup_steps"] :]
        out.decode_s += sum(timed)
        out.timed_steps += len(timed)
        timed_tokens += len(chunk) * len(timed)
        out.cuda_graph = out.cuda_graph and part["cuda_graph"]
        out.graph_error = out.graph_error or part["graph_error"]
        out.compiled = out.compiled or part["compiled"]
        out.compile_error = out.compile_error or part["compile_error"]
    out.decode_tokens_per_s = timed_tokens / out.decode_s if out.decode_s > 0 else 0.0
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()  # no_grad would still run every custom op's autograd wrapper
def _generate_batch(
    model,
    seqs,
    max_new_tokens,
    device,
    dtype,
    pad_id,
    eos,
    use_graph,
    compile_step,
    pick,
    penalty=1.0,
) -> dict:
    """One left-padded batch: prefill, then decode step by step (see module doc)."""
    ids, lengths = left_pad(seqs, pad_id)
    b, width = ids.shape
    max_len = cache_length(width, max_new_tokens)
    cache = new_static_cache(model, max_len)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    kwargs = {"logits_to_keep": 1} if keep else {}
    positions, mask = prefill_inputs(lengths, width, max_len, dtype, device)

    _sync(device)
    t0 = time.perf_counter()
    logits = model(
        input_ids=ids.to(device),
        position_ids=positions,
        attention_mask=mask,
        use_cache=True,
        **{cache_kwarg(model): cache},
        **kwargs,
    ).logits[:, -1, :]
    if penalty != 1.0:  # every pick sees the logits penalized for the row's tokens so far
        seen = seen_tokens(ids.to(device), lengths, logits.shape[-1])
        choose = pick

        def pick(x):
            token = choose(penalize(x, seen, penalty))
            seen[torch.arange(token.shape[0], device=token.device), token] = True
            return token

    token = pick(logits)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    del mask, logits

    with decode_attention(model, device):
        step = DecodeStep(
            model, cache, lengths, width, max_len, dtype, device, use_graph, keep, compile_step
        )
        out = torch.full((b, max_new_tokens), pad_id, dtype=torch.int64, device=device)
        eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        cuda = device.type == "cuda"
        marks = [_mark(cuda)]
        for t in range(max_new_tokens):
            out[:, t] = token
            if eos:
                finished |= torch.isin(token, eos_t)
                if (not cuda or t % _EOS_CHECK_EVERY == 0) and bool(finished.all()):
                    break
            if t == max_new_tokens - 1:
                break
            token = pick(step(token, t))
            marks.append(_mark(cuda))
    _sync(device)
    step_s = [_elapsed(a, z) for a, z in zip(marks[:-1], marks[1:])]
    rows = out.cpu().tolist()
    token_ids = []
    for row in rows:
        cut = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        token_ids.append(row[:cut])
    warmup = 2 if step.uses_graph else 1
    return {
        "token_ids": token_ids,
        "prefill_s": prefill_s,
        "step_s": step_s,
        "warmup_steps": warmup if len(step_s) > warmup else 0,
        "cuda_graph": step.uses_graph,
        "graph_error": step.graph_error,
        "compiled": step.compiled,
        "compile_error": step.compile_error,
    }


def _mark(cuda: bool):
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(a, z) -> float:
    return a.elapsed_time(z) / 1e3 if isinstance(a, torch.cuda.Event) else z - a
