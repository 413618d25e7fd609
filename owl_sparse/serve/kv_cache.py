"""Static KV cache, attention masks and the (CUDA-graph captured) decode step for `serve`.

The cache is transformers' `StaticCache` (transformers 5.x: its layers keep the write
position in an on-device ``cumulative_length`` tensor, so a decode step contains no host
synchronisation and can be captured in a CUDA graph).  We never let transformers build
the attention mask: we pass our own additive 4-D mask ``[B, 1, q, max_len]`` (0 = attend,
``finfo.min`` = masked), which transformers returns as-is.  That keeps the mask at a fixed
address for graph replay, supports left padding, and does not depend on the mask helpers
that change between transformers releases.

Layout of one batch: prompts are left-padded to ``P`` tokens; cache slot ``j < P`` holds
prompt position ``j``; decode step ``t`` (0-based) writes slot ``P + t``.  Row ``b`` with
``n_b`` real prompt tokens has position ids ``0 .. n_b - 1`` on its real tokens, so a
padded row computes exactly what it would compute alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import logging
import threading
import types
import typing
import weakref

import torch

from .. import settings
from ..errors import InputError
from ..models.structure import cache_kwarg
from ..ops import cpu as cpu_ops
from .fusion import GroupSharedInput

log = logging.getLogger(__name__)

# Only these cache layers keep one slot per position, which the masks here assume.
_SUPPORTED_LAYERS = ("StaticLayer", "StaticSlidingWindowLayer")


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def kv_geometry(model) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder-only model, from its config."""
    cfg = text_config(model)
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(layers), int(kv_heads), int(head_dim)


def kv_cache_bytes(model, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of a static KV cache: 2 (K and V) x layers x batch x kv_heads x max_len x
    head_dim x element size."""
    layers, kv_heads, head_dim = kv_geometry(model)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * batch * kv_heads * max_len * head_dim * elem


def prefill_bytes(model, batch: int, prompt_len: int, max_len: int, dtype: torch.dtype) -> int:
    """A rough upper estimate of the transient memory of the prefill forward pass.

    Counts the hidden states and MLP intermediates of one block (a few live at once), the
    attention scores of one layer (the eager/math path materialises B x heads x P x L
    float32 scores), the 4-D mask and the last-token logits.
    """
    cfg = text_config(model)
    elem = torch.empty((), dtype=dtype).element_size()
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    tokens = batch * prompt_len
    acts = tokens * (6 * hidden + 3 * inter) * elem
    scores = batch * cfg.num_attention_heads * prompt_len * max_len * 4
    mask = batch * prompt_len * max_len * elem
    logits = batch * cfg.vocab_size * 4
    return acts + scores + mask + logits


def check_memory(model, batch: int, prompt_len: int, max_len: int, dtype, device) -> dict:
    """Raise InputError before any work when the KV cache and the prefill do not fit.

    Only CUDA devices are checked (against ``torch.cuda.mem_get_info``, keeping 10% in
    reserve); returns the estimate in bytes either way.
    """
    kv = kv_cache_bytes(model, batch, max_len, dtype)
    act = prefill_bytes(model, batch, prompt_len, max_len, dtype)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if kv + act > 0.9 * free:
            gib = 1 << 30
            raise InputError(
                f"batch {batch} x {max_len} tokens does not fit on {device}: the KV cache "
                f"needs {kv / gib:.2f} GiB and the prefill about {act / gib:.2f} GiB, but "
                f"only {free / gib:.2f} GiB are free; lower the batch size, the prompt "
                "length or max_new_tokens"
            )
    return {"kv_cache_bytes": kv, "prefill_bytes_estimate": act}


def new_static_cache(model, max_len: int):
    """A transformers `StaticCache` of ``max_len`` slots for ``model``.

    Raises:
        InputError: the model's cache has layers this module cannot mask (linear attention,
            or a sliding window shorter than ``max_len``).
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if not kinds <= set(_SUPPORTED_LAYERS):
        raise InputError(f"serve supports full-attention caches only; this model has {kinds}")
    window = getattr(text_config(model), "sliding_window", None)
    if "StaticSlidingWindowLayer" in kinds and window is not None and window < max_len:
        raise InputError(
            f"the model attends within a sliding window of {window} tokens, shorter than "
            f"prompt + new tokens = {max_len}; serve needs every position in the cache"
        )
    return cache


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one length.

    Returns:
        ``(ids, lengths)``: int64 ``[B, P]`` with P = the longest list, and int64 ``[B]``.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.as_tensor(s, dtype=torch.int64)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.int64)


def prefill_inputs(lengths: torch.Tensor, width: int, max_len: int, dtype, device):
    """Position ids ``[B, P]`` and the additive mask ``[B, 1, P, max_len]`` for a prefill.

    Query ``i`` of row ``b`` may attend to slot ``j`` when ``j <= i`` and slot ``j`` holds
    a real token.  A padding query attends to itself only, so no softmax row is empty
    (its output is never used).
    """
    b = lengths.shape[0]
    first = (width - lengths.to(device)).view(b, 1)  # slot of each row's first real token
    slots = torch.arange(width, device=device).view(1, width)
    positions = (slots - first).clamp(min=0)
    q = torch.arange(width, device=device).view(1, width, 1)
    k = torch.arange(max_len, device=device).view(1, 1, max_len)
    allowed = ((k <= q) & (k >= first.view(b, 1, 1))) | (k == q)
    mask = torch.zeros((b, 1, width, max_len), dtype=dtype, device=device)
    mask.masked_fill_(~allowed.view(b, 1, width, max_len), torch.finfo(dtype).min)
    return positions, mask


def cache_length(prompt_len: int, new_tokens: int) -> int:
    """Slots of the static cache: prompt + new tokens, rounded up to a multiple of 16 so
    the mask rows stay aligned for the fused attention kernels (extra slots stay masked)."""
    return -(-(prompt_len + new_tokens) // 16) * 16


def check_attention(model) -> None:
    """The 4-D additive mask works with transformers' "sdpa" and "eager" attention only."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise InputError(
            f"serve needs attn_implementation 'sdpa' or 'eager', the model uses {impl!r}; "
            "load it with attn_implementation='sdpa'"
        )


@contextlib.contextmanager
def decode_attention(model, device):
    """For the decode steps of a CPU model: transformers' "eager" attention (a matmul, a
    softmax, a matmul, which torch.compile fuses) in place of SDPA, whose CPU kernel costs
    ~60 us a layer at one query (SmolLM2-135M, 2 threads: 1.9 ms of an 11 ms step; ~12%
    more tok/s with eager).  Prefill keeps the model's own.  Restored on exit, also after an
    error; a no-op off the CPU, for a model already on "eager", or with
    ``OWL_SPARSE_CPU_DECODE_EAGER_ATTENTION=0``."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = (
        torch.device(device).type == "cpu"
        and before == "sdpa"
        and settings.get().cpu_decode_eager_attention
    )
    if not switch:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _decode_forward(model, tokens, positions, mask, cache, kwargs):
    """The one-token forward pass; module level, so that `torch.compile` traces it once per
    model and input shapes (not once per `DecodeStep`).  ``kwargs`` names the cache's
    argument (``cache_name``) and carries any other forward arguments."""
    kwargs = dict(kwargs)
    out = model(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=mask,
        use_cache=True,
        **{kwargs.pop("cache_name"): cache},
        **kwargs,
    )
    return out.logits[:, -1, :]


_compile_failed: str | None = None  # why compiling failed once (then never again)
# One compiled step per model and per state of that model (its modules' types and training
# flags, hooks, parameter and buffer shapes, dtypes, devices, strides, its config; see
# `model_state`): each gets its own copy of _decode_forward's code object, so torch.compile
# keeps its graphs apart and a step never pays guard checks against another model's graphs
# (nor runs into dynamo's recompile limit, after which it would fall back to eager without a
# word).  Because the state is checked here, once per generate call, the compiled step skips
# dynamo's guards on the model's modules, which it would otherwise evaluate on every token
# (~1-2 ms a step on SmolLM2-135M packed on the dev CPU, 630 tensors; guards on the step's
# own inputs and the KV cache stay).
_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_copies = itertools.count()
# Graphs one compiled step may hold: one per (batch, cache length) served.
RECOMPILE_LIMIT = 64


def model_state(model) -> str:
    """A digest of everything of ``model`` a compiled decode step depends on besides its
    tensors' values: every module's type, ``training`` flag and hooks, every parameter's and
    buffer's name, shape, stride, dtype and device, and the config.  Two calls give the same
    digest when none of these changed in between (values may change: the step reads them anew
    on every call).  Not covered: torch's global module hooks and attributes of a module
    other than these, which decode code does not change in practice."""
    h = hashlib.sha1()
    for name, m in model.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks)
        kind = f"{type(m).__module__}.{type(m).__qualname__}"
        h.update(f"{name}|{kind}|{m.training}|{[list(d) for d in hooks]}".encode())
        for tag, tensors in (("p", m._parameters), ("b", m._buffers)):
            for key, t in tensors.items():
                desc = None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)
                h.update(f"{tag}{key}{desc}".encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _skip_module_guards(entries):
    """torch.compile guard filter: drop the guards whose source lies in an nn.Module (the
    model: `model_state` stands in for them), keep the rest."""
    return [not _in_module(e.orig_guard.source) for e in entries]


def _in_module(source) -> bool:
    test = getattr(source, "is_unspecialized_nn_module", None)
    return bool(test and test())


# torch.compile options of the decode step.  size_asserts off: inductor's Python wrapper
# would otherwise check the size and stride of every graph input and custom-op output on
# every step (~4 calls per packed layer, ~840 a step on SmolLM2-135M packed: 1.5-2 ms of a
# 9 ms step on the dev CPU); the model's tensors are checked once per generate call instead
# (`model_state`: shapes, strides, dtypes, devices), the step's own inputs and the KV cache by
# dynamo's guards, and the custom ops' outputs have the shapes and strides of their fake
# implementations (tests/ops/test_library.py holds every CPU backend to them; tests/serve
# compare compiled and eager steps token for token).  cpp_wrapper: inductor writes the step's
# wrapper (buffer allocation, kernel calls, custom-op calls through the dispatcher) in C++
# instead of Python: on the dev CPU, SmolLM2-135M packed at 70% bf16 decoded 3-6% faster in
# interleaved A/B rounds (median per-round ratios 1.026-1.064).  cpp_wrapper_build_separate:
# the wrapper (~84k lines for 30 blocks) is compiled at -O1 apart from the kernels (-O3);
# compiled whole at -O3 the first (cold-cache) compile took 165 s instead of 38 s with the
# Python wrapper, built apart 65 s, at the same decode speed (A/B 1.048); -O0 cost 9%.
# realize_cpu_opcount_threshold 8 (inductor's default: 50): a pointwise result of more than
# 8 operations is computed once into a buffer instead of inside each consumer's loop.  Here
# that is the rotary embedding of the query, which inductor otherwise recomputed (cos, sin
# and all) for every cache position of the attention's q.k reduction; 4 measured the same.
# SmolLM2-135M packed 70% bf16: +3.6% decode tok/s (12 interleaved rounds, cache of 96).
COMPILE_OPTIONS = {
    "guard_filter_fn": _skip_module_guards,
    "size_asserts": False,
    "cpp_wrapper": True,
    "cpp_wrapper_build_separate": True,
    "realize_cpu_opcount_threshold": 8,
}


def _later_steps():
    """The context of a compiled decode step after a `DecodeStep`'s first (in practice its
    second: the steps after it call the graph directly, see `DecodeStep._note`) when the
    first ran a single graph: dynamo runs only the guards that differ between the step
    function's graphs (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``; torch >=
    2.6), a no-op where torch lacks it."""
    if _SKIP_GUARD_EVAL:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    return contextlib.nullcontext()


def _has_skip_guard_eval() -> bool:
    stance = getattr(torch.compiler, "set_stance", None)
    return stance is not None and "skip_guard_eval_unsafe" in inspect.signature(stance).parameters


_SKIP_GUARD_EVAL = _has_skip_guard_eval()


def compile_options(device: torch.device | None = None) -> dict:
    """A fresh copy of `COMPILE_OPTIONS` for one `torch.compile` call (torch.compile pops
    ``guard_filter_fn`` out of the dict it is given, so a shared dict would compile every
    step after the first with all of the model's guards), plus, for a CPU model with the
    C++ wrapper on, the CPU ops' C shims (`owl_sparse.ops.cpu.c_shims`), and for a CPU model
    whose kernels loaded the pass that groups the packed layers reading the same activations
    (`owl_sparse.serve.fusion`: SmolLM2-135M packed 70% bf16, 120 kernel calls a step instead
    of 210; ``OWL_SPARSE_CPU_GROUP_LAYERS=0`` leaves them apart)."""
    options = dict(COMPILE_OPTIONS)
    if device is not None and device.type == "cpu" and options.get("cpp_wrapper"):
        shims = cpu_ops.c_shims()
        if shims:
            options["aot_inductor.custom_ops_to_c_shims"] = shims
    grouped = settings.get().cpu_group_layers
    if grouped and device is not None and device.type == "cpu" and cpu_ops.available():
        options["post_grad_custom_pre_pass"] = GroupSharedInput()
    return options


class _GraphCall(typing.NamedTuple):
    """One call of a compiled graph: the callable, its flat inputs and what it returned."""

    graph: typing.Callable
    inputs: tuple
    outputs: typing.Sequence


class _Recording(threading.local):
    calls: list[_GraphCall] | None = None  # a list while a DecodeStep records its graphs


_recording = _Recording()


def _recording_inductor(gm, example_inputs, options: dict | None = None):
    """The decode step's torch.compile backend: inductor (`torch._inductor.compile` with
    ``options``), its graph wrapped so that each call is noted in ``_recording.calls``
    while a `DecodeStep` records (its first two compiled steps)."""
    compiled = torch._inductor.compile(gm, example_inputs, options=options)

    def run(*args):
        outputs = compiled(*args)
        calls = _recording.calls
        if calls is not None:
            calls.append(_GraphCall(compiled, args, outputs))
        return outputs

    return run


def _compiled(model):
    state = model_state(model)
    steps = _compiled_steps.setdefault(model, {})
    if state not in steps:
        code = _decode_forward.__code__
        code = code.replace(co_name=f"{code.co_name}_{next(_copies)}")
        fn = types.FunctionType(code, _decode_forward.__globals__, code.co_name)
        # dynamic=False: one graph per (batch, cache length); the step's inputs keep their
        # shapes from step to step, so no step recompiles.
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else None  # no tensors: no shims
        steps[state] = torch.compile(
            fn, dynamic=False, backend=_recording_inductor, options=compile_options(device)
        )
    return steps[state]


class DecodeStep:
    """One-token decode step over a static cache: replayed from a CUDA graph, compiled
    with `torch.compile` (``compile_step``, meant for the CPU), or eager.

    Static buffers (fixed addresses, so a captured graph can be replayed): the input token
    ``[B, 1]``, the position ids ``[B, 1]`` and the mask ``[B, 1, 1, max_len]``.  Step
    ``t`` opens mask column ``P + t`` and runs the model, which writes that cache slot.

    With ``cuda_graph=True`` the first step runs eagerly on a side stream (it loads
    kernels, fills autotuning caches and allocates cuBLAS workspaces), and the second step
    captures the forward pass into a `torch.cuda.CUDAGraph`, then every step replays it.
    When capture fails the step stays eager and ``graph_error`` says why.

    With ``compile_step=True`` (and no graph) the forward pass runs through
    ``torch.compile`` (inductor): the first step pays the compilation (cached for the
    process per model, model state (`model_state`) and shapes, and on disk by inductor), later
    steps run without Python module overhead, through inductor's C++ wrapper; the second
    with only the guards that tell the step's graphs apart (see `COMPILE_OPTIONS`,
    `_later_steps`), the third and later ones, when the first two ran the same single graph
    on the same tensors, by calling that graph directly (``direct``, see `_note`).
    When compiling fails before any of the step's graphs ran, the step runs eagerly,
    ``compile_error`` says why and one warning is logged; later steps in the process do not
    try again.  When it fails after some ran (a graph break, then a failing compile), the
    cache no longer matches the tokens and a RuntimeError says so.
    """

    def __init__(
        self,
        model,
        cache,
        lengths: torch.Tensor,
        width: int,
        max_len: int,
        dtype,
        device,
        cuda_graph: bool,
        keep_logits: bool,
        compile_step: bool = False,
    ):
        self.model, self.cache, self.width = model, cache, width
        self.device = torch.device(device)
        b = lengths.shape[0]
        self.tokens = torch.zeros((b, 1), dtype=torch.int64, device=self.device)
        self.base_pos = lengths.view(b, 1).to(self.device)
        self.positions = self.base_pos.clone()
        first = (width - lengths).view(b, 1, 1, 1)
        k = torch.arange(max_len).view(1, 1, 1, max_len)
        real = (k >= first) & (k < width)
        mask = torch.zeros((b, 1, 1, max_len), dtype=dtype)
        self.mask = mask.masked_fill_(~real, torch.finfo(dtype).min).to(self.device)
        self.kwargs = {"cache_name": cache_kwarg(model)}
        if keep_logits:
            self.kwargs["logits_to_keep"] = 1
        self.want_graph = cuda_graph and self.device.type == "cuda"
        self.graph = None
        self.graph_error: str | None = None
        self.static_logits = None
        self.steps = 0
        self.want_compile = compile_step and not self.want_graph and _compile_failed is None
        self.compile_error: str | None = _compile_failed if compile_step else None
        self.compiled = False  # True once a compiled step ran
        self.step_fn = _compiled(model) if self.want_compile else None
        # After two compiled steps that ran the same single graph on the same inputs and
        # returned one of its outputs: (graph call, index of the logits among its outputs),
        # and later steps call that graph directly.
        self.direct: tuple[_GraphCall, int] | None = None
        self._probe: tuple[_GraphCall, int] | None = None
        self._recorded = 0
        self.single_graph = False  # the first compiled step ran exactly one graph

    def _forward(self) -> torch.Tensor:
        return _decode_forward(
            self.model, self.tokens, self.positions, self.mask, self.cache, self.kwargs
        )

    def _compiled_forward(self) -> torch.Tensor:
        global _compile_failed
        if self.direct is not None:
            call, index = self.direct
            return call.graph(*call.inputs)[index]
        args = (self.model, self.tokens, self.positions, self.mask, self.cache, self.kwargs)
        _recording.calls = calls = []
        try:
            if self.compiled:
                # Later steps pass the very tensors of the first, with the same shapes, under
                # the same global state: the first step's guards (all of them, evaluated or
                # compiled anew) chose the graph, so a later step whose first ran one graph
                # (no graph break, whose resume code may need its own guards) evaluates only
                # the guards that tell the step function's graphs apart (~5% more tok/s
                # packed 70% bf16 on the dev CPU, interleaved A/B), and none skips patching
                # dynamo's config (0.1-0.2 ms).
                with _later_steps() if self.single_graph else contextlib.nullcontext():
                    logits = self.step_fn(*args)
            else:
                limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                with torch._dynamo.config.patch(recompile_limit=limit):
                    logits = self.step_fn(*args)
        except Exception as e:
            self.want_compile = False
            self.compile_error = _compile_failed = f"{type(e).__name__}: {e}".split("\n")[0]
            if calls:  # some of the step's graphs ran: their cache writes cannot be undone
                raise RuntimeError(
                    f"the compiled decode step failed after {len(calls)} of its graphs ran "
                    f"({self.compile_error}); the KV cache no longer matches the tokens, so "
                    "this generate call stops: run it again with compile_step=False"
                ) from e
            # Nothing ran: the step is run eagerly, and so are all later ones.
            log.warning(
                "torch.compile of the decode step failed, decoding eagerly: %s", self.compile_error
            )
            return self._forward()
        finally:
            _recording.calls = None
        if not self.compiled:
            self.compiled = True
            self.single_graph = len(calls) == 1
        if self._recorded < 2:
            self._recorded += 1
            self._note(calls, logits)
        return logits

    def _note(self, calls: list[_GraphCall], logits: torch.Tensor) -> None:
        """After each of the first two compiled steps: when both ran one and the same graph
        on the very same input tensors and returned one of its outputs (always the same),
        later steps call that graph directly (``direct``), without dynamo's frame: its guard
        checks and the bytecode that gathers the ~800 parameters and buffers of the model
        into the graph's inputs (SmolLM2-135M packed 70% bf16 on the dev CPU: 4.80 instead
        of 5.28 ms a step, +10%, interleaved A/B).  Safe for the reasons `_later_steps` is,
        and checked: a step that ran anything else (two graphs, a graph break) keeps
        dynamo."""
        found = None
        if len(calls) == 1:
            index = [i for i, o in enumerate(calls[0].outputs) if o is logits]
            if len(index) == 1:
                found = (calls[0], index[0])
        if found is None:
            self._recorded = 2  # stop probing
            self._probe = None
            return
        if self._probe is None:
            self._probe = found
            return
        (first, i), (second, j) = self._probe, found
        same = (
            first.graph is second.graph
            and i == j
            and len(first.inputs) == len(second.inputs)
            and all(a is b for a, b in zip(first.inputs, second.inputs))
        )
        self._probe = None
        if same:
            self.direct = (second._replace(outputs=()), j)

    @property
    def uses_graph(self) -> bool:
        return self.graph is not None

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Run decode step ``t`` for ``tokens`` ([B] int64 on the device); returns the
        next-token logits ``[B, V]`` (a static buffer when replaying a graph: copy it or
        use it before the next call)."""
        self.tokens.copy_(tokens.view(-1, 1))
        torch.add(self.base_pos, t, out=self.positions)
        self.mask[..., self.width + t] = 0
        self.steps += 1
        if self.graph is not None:
            self.graph.replay()
            return self.static_logits
        if self.want_compile:
            return self._compiled_forward()
        if not self.want_graph:
            return self._forward()
        if self.steps == 1:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = self._forward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return logits
        return self._capture_and_replay()

    def _capture_and_replay(self) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_logits = self._forward()
        except Exception as e:  # keep serving eagerly, but say so in the result
            self.want_graph = False
            self.graph_error = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", self.graph_error)
            return self._forward()
        # Capture records kernels without running them: the cache positions did not move.
        self.graph = graph
        graph.replay()
        return self.static_logits
