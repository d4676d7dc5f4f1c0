"""Piecewise CUDA graphs (mixed prefill + decode steps, pipeline stages): the model's dense pieces per token
bucket with eager attention between them. On CPU the pieces run eagerly (Triton interpreted) through the runner's
whole piecewise path (staging into the static buffers, padding to buckets, the cut at attention), and greedy
generation must equal HF transformers; on a GPU the captured graphs must give the eager engine's tokens."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from hetserve import LLM, SamplingParams
from hetserve.engine.piecewise_graphs import PiecewiseGraphRunner, piecewise_token_sizes
from hetserve.kernels import HAS_TRITON

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def test_piecewise_token_sizes() -> None:
    sizes = piecewise_token_sizes(1024)
    assert sizes[:5] == [16, 32, 48, 64, 96] and sizes[-1] == 1024
    assert sizes == sorted(set(sizes))
    assert piecewise_token_sizes(40) == [16, 32, 40]
    assert piecewise_token_sizes(2000)[-2:] == [1920, 2000]


class EagerPiecewise(PiecewiseGraphRunner):
    """The piecewise runner with every "replay" run eagerly: CPU coverage of everything but the capture."""

    def capture(self) -> None:
        self.graphs = {t: [] for t in self.sizes}  # type: ignore[misc]
        self.runs: list[tuple[int, int]] = []

    def run(self, t: int, n: int, meta: Any, intermediate: Any = None) -> list[torch.Tensor]:
        self.runs.append((t, n))
        return super().run(t, n, meta, intermediate)

    def _replay(self, i: int, t: int) -> None:
        with torch.inference_mode():
            out = self._piece(i, t)
        if out:
            self.outputs[t] = out


def _hf_refs(path: Any, prompts: list[list[int]], num_new: list[int]) -> list[list[int]]:
    from tests.engine.test_engine_vs_hf import hf_greedy

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    return [hf_greedy(hf, p, n)[0] for p, n in zip(prompts, num_new, strict=True)]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(("arch", "kwargs"), [("llama", {}), ("qwen3", {"head_dim": 32})], ids=["llama", "qwen3"])
def test_runner_piecewise_path_equals_hf_on_cpu(tiny_model_factory: Any, arch: str, kwargs: dict[str, Any]) -> None:
    """Chunked prefills beside decodes (every step mixed or a prefill, 5..24 tokens, padded to 16 or 32): the
    tokens equal HF's, and the piecewise path took every step (no decode-only graph is installed)."""
    path = tiny_model_factory(arch, **kwargs)
    rng = random.Random(7)
    vocab = 500
    prompts = [[rng.randrange(4, vocab) for _ in range(n)] for n in (11, 19, 4, 27)]
    num_new = [6, 4, 9, 3]
    refs = _hf_refs(path, prompts, num_new)
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64, attention_backend="triton",
              max_num_batched_tokens=24)
    runner = llm.engine.executor
    runner.model.fused_path = True
    pw = EagerPiecewise(runner.model, runner.kv_caches, runner.backend, runner.device, [16, 32], runner.dtype)
    pw.capture()
    runner.piecewise = pw
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in num_new]
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert pw.runs and all(n <= t for t, n in pw.runs)
    assert any(n < t for t, n in pw.runs), "no step was padded"
    assert {t for t, _ in pw.runs} == {16, 32}


# ---- CUDA ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_piecewise_graphs_on_gpu_equal_eager(tiny_model_factory: Any) -> None:
    """Captured piecewise graphs (mixed steps) and the decode graphs vs an engine without graphs: equal greedy
    tokens, and the piecewise graphs did replay."""
    from tests.engine.test_engine_vs_hf import _prompts

    path = tiny_model_factory("llama")
    prompts = _prompts(500, seed=3)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    common: dict[str, Any] = {"device": "cuda", "dtype": "float32", "max_model_len": 128, "num_blocks": 256,
                              "max_num_batched_tokens": 40}
    eager = LLM(str(path), enforce_eager=True, **common).generate(prompts, sp)
    llm = LLM(str(path), piecewise_graph_max_tokens=64, cuda_graph_max_batch=4, **common)
    runner = llm.engine.executor
    assert runner.piecewise is not None and runner.piecewise.graphs
    replays = {"n": 0}
    orig = runner.piecewise.run

    def counting(*a: Any, **k: Any) -> Any:
        replays["n"] += 1
        return orig(*a, **k)

    runner.piecewise.run = counting
    outs = llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
    assert replays["n"] > 0
