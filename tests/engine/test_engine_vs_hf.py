"""Greedy generation through the whole engine (scheduler, paged KV, runner, sampler) equals a brute-force
greedy loop over HF transformers on the same weights, for every supported architecture, with batching,
chunked prefill, preemption and prefix-cache hits. Log-probabilities match HF's log-softmax."""

from __future__ import annotations

import random

import pytest
import torch

from hetserve import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

NUM_NEW = 32
ARCHS = [
    ("llama", {}),  # llama3 rope scaling, GQA 4/2, rope_parameters spelling
    ("qwen2", {"rope_style": "rope_scaling"}),  # qkv bias, tied embeddings, old spelling
    ("qwen3", {"num_kv_heads": 1, "head_dim": 32}),  # q/k norm, MQA, head_dim != hidden/heads
    ("mistral", {}),
]


def _prompts(vocab: int, seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 7, 8, 13, 21, 30, 45, 5]
    return [(prefix or []) + [rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy with the HF cache; returns tokens and the log-prob of each chosen token."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    past = out.past_key_values
    toks, lps = [], []
    logits = out.logits[0, -1].float()
    for _ in range(n):
        t = int(torch.argmax(logits))
        toks.append(t)
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
    return toks, lps


@pytest.fixture(scope="module", params=ARCHS, ids=[a for a, _ in ARCHS])
def arch_case(request, tiny_model_factory):
    arch, kw = request.param
    path = tiny_model_factory(arch, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    prompts = _prompts(hf.config.vocab_size, seed=len(arch))
    refs = [hf_greedy(hf, p, NUM_NEW) for p in prompts]
    return path, hf, prompts, refs


def _run(path, prompts, **engine_kw):
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=128, **engine_kw)
    sp = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=0)
    return llm, llm.generate(prompts, sp)


@pytest.mark.parametrize(
    "engine_kw",
    [
        {},
        {"max_num_batched_tokens": 7},  # prefill in chunks of 7
        {"num_blocks": 40, "block_size": 4, "max_num_batched_tokens": 64},  # 156 token slots: preemption
        {"async_scheduling": True, "num_blocks": 40, "block_size": 4, "max_num_batched_tokens": 64},  # forced on
    ],
    ids=["batched", "chunk7", "preempt", "async-preempt"],
)
def test_greedy_equals_hf(arch_case, engine_kw):
    path, _, prompts, refs = arch_case
    llm, outs = _run(path, prompts, **engine_kw)
    for out, (ref_toks, ref_lps) in zip(outs, refs):
        assert out.outputs[0].token_ids == ref_toks
        got_lps = [lp.logprob for lp in out.outputs[0].logprobs]
        assert max(abs(a - b) for a, b in zip(got_lps, ref_lps)) < 1e-4
    sched = llm.engine.scheduler
    if "num_blocks" in engine_kw:
        assert sched.num_preemptions > 0
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks


def test_prefix_cache_hits_stay_exact(arch_case):
    path, hf, _, _ = arch_case
    rng = random.Random(7)
    shared = [rng.randrange(4, hf.config.vocab_size) for _ in range(37)]
    prompts = _prompts(hf.config.vocab_size, seed=3, prefix=shared)
    refs = [hf_greedy(hf, p, NUM_NEW)[0] for p in prompts]
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=128, block_size=8)
    sp = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    first = llm.generate(prompts[:1], sp)  # warms the cache with the shared prefix
    rest = llm.generate(prompts[1:], sp)
    assert [o.outputs[0].token_ids for o in first + rest] == refs
    assert all(o.num_cached_tokens >= 32 for o in rest)  # 4 full blocks of the prefix were reused
