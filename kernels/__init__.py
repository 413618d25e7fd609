"""Triton kernels for the packed sparse formats (shipped as ``owl_sparse.kernels``).

- :mod:`.bitmap_gemv`: bitmap decode kernel for 1-32 tokens (split-K, fp32 accumulation);
- :mod:`.bitmap_mm`: bitmap kernel for larger token counts (decode a tile, then ``tl.dot``);
- :mod:`.sparse24_gemv`: 2:4 decode kernel.

Each launcher has the dispatch-backend signature ``fn(x2d, packed, bias) -> y2d`` and is
registered in :mod:`owl_sparse.dispatch`.  Importing this package does not import Triton;
:func:`compile_check` compiles every kernel for a CUDA target without a GPU.
"""

from __future__ import annotations

# Shared-memory limit of one thread block on sm_80 / sm_90 (bytes).
_SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_GENERIC_INTS = ("T", "tiles_per_split", "chunks_per_split")


def _cfg_str(c) -> str:
    kw = ",".join(f"{k}={v}" for k, v in c.kwargs.items())
    return f"{kw},warps={c.num_warps},stages={c.num_stages}"


def _bitmap_sig(d: str, out: str, ints: tuple[str, ...]) -> dict[str, str]:
    """Argument types of the bitmap kernels: six pointers, then the int arguments."""
    sig = dict(
        x_ptr=f"*{d}",
        bitmap_ptr="*i32",
        values_ptr=f"*{d}",
        offsets_ptr="*i32",
        bias_ptr=f"*{d}",
        out_ptr=f"*{out}",
    )
    sig.update({n: "i32" for n in ints})
    return sig


_BITMAP_INTS = ("T", "N", "K", "Np", "n_words", "n_col_tiles")


def _variants(full: bool):
    """(name, jit fn, signature, constexprs, num_warps, num_stages) for every kernel variant."""
    import torch

    from .bitmap_gemv import _bitmap_gemv_kernel, gemv_configs
    from .bitmap_mm import _bitmap_mm_kernel, mm_configs
    from .sparse24_gemv import _sparse24_gemv_kernel, sparse24_configs

    tt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    for dtype, d in tt.items():
        configs = []
        for tokens in (1, 32) if not full else (1, 2, 4, 16, 32):
            cands = gemv_configs(4096, 4096, tokens, 132, dtype)
            configs += [(tokens, c) for c in (cands if full else cands[:1])]
        for tokens, c in configs:
            kw = c.kwargs
            for partial in (False, True):
                out = "fp32" if partial else d
                sig = _bitmap_sig(d, out, (*_BITMAP_INTS, "tiles_per_split"))
                const = dict(
                    HAS_BIAS=True,
                    PARTIAL=partial,
                    BLOCK_N=kw["BLOCK_N"],
                    BLOCK_T=kw["BLOCK_T"],
                    USE_DOT=kw["USE_DOT"],
                    DOT_FP32=dtype == torch.float32,
                    HW_POPC=True,
                )
                yield (
                    f"bitmap_gemv[{d},T={tokens},{_cfg_str(c)},partial={partial}]",
                    _bitmap_gemv_kernel,
                    sig,
                    const,
                    c.num_warps,
                    c.num_stages,
                )
        for c in mm_configs(4096, 4096, 4096, dtype)[: None if full else 1]:
            sig = _bitmap_sig(d, d, _BITMAP_INTS)
            const = dict(HAS_BIAS=True, DOT_FP32=dtype == torch.float32, HW_POPC=True, **c.kwargs)
            yield (
                f"bitmap_mm[{d},{_cfg_str(c)}]",
                _bitmap_mm_kernel,
                sig,
                const,
                c.num_warps,
                c.num_stages,
            )
        for tokens in (1, 16) if not full else (1, 2, 16):
            cands = sparse24_configs(4096, 4096, tokens, 132, dtype)
            for c in cands if full else cands[:1]:
                kw = dict(c.kwargs)
                kw.pop("SPLIT_K")
                for partial in (False, True):
                    sig = dict(
                        x_ptr=f"*{d}",
                        values_ptr=f"*{d}",
                        meta_ptr="*u8",
                        bias_ptr=f"*{d}",
                        out_ptr="*fp32" if partial else f"*{d}",
                    )
                    sig.update({n: "i32" for n in ("T", "N", "K", "meta_cols", "chunks_per_split")})
                    const = dict(
                        HAS_BIAS=True, PARTIAL=partial, DOT_FP32=dtype == torch.float32, **kw
                    )
                    yield (
                        f"sparse24_gemv[{d},T={tokens},{_cfg_str(c)},partial={partial}]",
                        _sparse24_gemv_kernel,
                        sig,
                        const,
                        c.num_warps,
                        c.num_stages,
                    )


def compile_check(arch: int = 90, full: bool = False) -> list[str]:
    """Compile every kernel variant for ``sm_<arch>`` to a cubin, without a GPU.

    Catches kernels that only work in the interpreter (layout, type or resource errors).
    ``full`` compiles every candidate config (slow); otherwise the default config of each
    kernel, dtype and token class, with and without split-K.  Returns the variant names;
    raises RuntimeError naming the first variant that fails or needs too much shared memory.
    Must run without ``TRITON_INTERPRET=1`` (the kernels are then interpreter objects).
    """
    from owl_sparse import settings

    if settings.get().triton_interpret:
        raise RuntimeError(
            "compile_check needs TRITON_INTERPRET unset (run it in a separate process)"
        )
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done = []
    for name, fn, sig, const, warps, stages in _variants(full):
        sig = {**sig, **{k: "constexpr" for k in const}}
        # Pointers are 16-byte aligned as the JIT specialises them for torch tensors; shape
        # arguments are either multiples of 16 (LLM shapes) or generic (odd test shapes,
        # compiled for fp16 only).  The token count and split sizes stay generic.
        for aligned in (True, False) if "fp16" in name else (True,):
            attrs = {
                (i,): [["tt.divisibility", 16]]
                for i, (k, v) in enumerate(sig.items())
                if v.startswith("*") or (aligned and v == "i32" and k not in _GENERIC_INTS)
            }
            src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
            label = f"{name}{'' if aligned else '[generic ints]'}"
            try:
                opts = {"num_warps": warps, "num_stages": stages}
                compiled = triton.compile(src, target=target, options=opts)
            except Exception as exc:
                raise RuntimeError(f"compile_check: {label} failed for sm_{arch}: {exc}") from exc
            shared = compiled.metadata.shared
            if shared > _SMEM_LIMIT.get(arch, 101376):
                raise RuntimeError(
                    f"compile_check: {label} needs {shared} bytes of shared memory on sm_{arch}"
                )
            done.append(label)
    return done
