"""Per-role choice of cuBLAS or the skinny GEMM (``engine/model/linears.py``): the roles cover every linear
the fused path runs, the dispatch sends only small row counts to the skinny kernel, and on a GPU the tuned
(or forced) choice gives the same greedy tokens as transformers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hetserve.engine.model import linears as linears_mod
from hetserve.engine.model.linears import ROLES, Linears, role_weights
from hetserve.engine.model.loader import load_model
from hetserve.kernels.skinny_gemm import SKINNY_MAX_ROWS, SkinnyConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_roles_are_the_weights_the_fused_forward_multiplies(tiny_model_factory: Any) -> None:
    model, cfg = load_model(tiny_model_factory("qwen2"), "cpu", torch.float32)
    model.fuse_projections()
    seen: list[tuple[str, int]] = []
    model.linears = _Recorder(seen)
    for layer in model.stage_layers:
        layer.self_attn.linears = layer.mlp.linears = model.linears
    layer = model.stage_layers[0]
    layer.self_attn.qkv_fused(torch.randn(3, cfg.hidden_size))
    layer.self_attn.out_proj(torch.randn(3, cfg.num_attention_heads * cfg.head_dim))
    layer.mlp.forward_fused(torch.randn(3, cfg.hidden_size))
    model.compute_logits(torch.randn(3, cfg.hidden_size))
    called = {role: ptr for role, ptr in seen}
    weights = role_weights(model)
    assert set(weights) == set(ROLES) == set(called)
    assert all(len(weights[r]) == cfg.num_hidden_layers for r in ROLES if r != "lm_head")
    first = {r: ws[0][0].data_ptr() for r, ws in weights.items()}
    assert called == first, "a role's tuned weight is not the one the forward multiplies"
    assert weights["qkv"][0][1] is not None, "qwen2's qkv bias must go with its weight"


class _Recorder(Linears):
    def __init__(self, seen: list[tuple[str, int]]) -> None:
        super().__init__()
        self.seen = seen

    def __call__(self, role: str, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append((role, weight.data_ptr()))
        return F.linear(x, weight, bias)



def test_dispatch_sends_only_small_batches_to_the_skinny_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake(x: torch.Tensor, w: torch.Tensor, b: Any, cfg: Any, impl: str) -> torch.Tensor:
        calls.append(x.shape[0])
        return F.linear(x, w, b)

    monkeypatch.setattr(linears_mod, "skinny_linear", fake)
    lin = Linears({"o_proj": SkinnyConfig()}, on_cpu=True)
    w = torch.randn(8, 4)
    for rows in (1, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1):
        lin("o_proj", torch.randn(rows, 4), w)
    lin("down", torch.randn(1, 4), w)  # no config for this role: cuBLAS
    Linears({"o_proj": SkinnyConfig()})("o_proj", torch.randn(1, 4), w)  # a CPU tensor without on_cpu
    assert calls == [1, SKINNY_MAX_ROWS]


@needs_cuda
@pytest.mark.gpu
def test_tuning_keeps_only_roles_that_beat_cublas(tiny_model_factory: Any) -> None:
    model, _ = load_model(tiny_model_factory("llama", hidden_size=512, intermediate_size=1536), "cuda",
                          torch.bfloat16)
    model.fuse_projections()
    report = linears_mod.tune_skinny(model, torch.device("cuda"))
    assert set(report) == set(ROLES)
    for role, rec in report.items():
        if rec["chosen"] is not None:
            best = min(v for k, v in rec["ms"].items() if k != "cublas")
            assert best < linears_mod.MARGIN * rec["ms"]["cublas"], role
    assert set(model.linears.configs) == {r for r, rec in report.items() if rec["chosen"] is not None}


@needs_cuda
@pytest.mark.gpu
def test_engine_with_every_role_on_the_skinny_kernel_equals_hf(tiny_model_factory: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from hetserve import LLM, SamplingParams
    from hetserve.engine import runner as runner_mod
    from tests.engine.test_engine_vs_hf import _prompts, hf_greedy

    def force_all(model: Any, device: Any) -> dict[str, Any]:
        model.linears.configs = dict.fromkeys(ROLES, SkinnyConfig(block_n=16, block_k=64))
        return {}

    monkeypatch.setattr(runner_mod, "tune_skinny", force_all)
    path = tiny_model_factory("qwen2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    prompts = _prompts(hf.config.vocab_size, seed=3)
    refs = [hf_greedy(hf, p, 16)[0] for p in prompts]
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=128, num_blocks=256, cuda_graph_max_batch=8)
    assert set(llm.engine.executor.model.linears.configs) == set(ROLES)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
