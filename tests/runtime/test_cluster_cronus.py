"""Cronus in the real runtime (cpu-pair: the head on the half-speed worker, the main on the full-speed one).

The head instance prefills the first ``k`` prompt tokens, its KV moves (converted: block 16 -> 32, NHD -> HND on
the wire) to the main instance, which prefills the rest in chunks beside its decodes and does all decoding.
Every split gives the same greedy tokens as the single-process engine, and no instance leaks a block.
"""

from __future__ import annotations

import pytest

from hetserve.core.sampling_params import SamplingParams
from hetserve.llm import LLM
from tests.runtime.helpers import assert_no_leaks

MAX_LEN = 256
# lengths 20..75: k = 16 is a block boundary and 23 is mid-block for every prompt; chunks of 24 on the main
PROMPTS = [[1 + (i * 11 + j * 3) % 500 for j in range(20 + i * 11)] for i in range(6)]
SP = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
INSTANCES = [
    {"name": "head0", "role": "head", "devices": ["host:1"]},
    {"name": "main0", "role": "main", "devices": ["host:0"], "max_num_batched_tokens": 24},
]


def _run(model: str, policy: dict, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(model, cluster="cpu-pair", strategy="cronus", instances=INSTANCES, max_model_len=MAX_LEN,
              num_kv_blocks=128, deployment_params={"split_policy": policy}, **kw)
    try:
        outs = llm.generate(PROMPTS, SP)
    except BaseException:
        llm.shutdown()
        raise
    return [o.outputs[0].token_ids for o in outs], llm



@pytest.mark.parametrize("k", [0, 1, 16, 23, 10_000], ids=["k0", "k1", "block-boundary", "mid-block", "whole"])
def test_fixed_split_same_tokens(model: str, reference: list[list[int]], k: int) -> None:
    tokens, llm = _run(model, {"kind": "fixed", "k": k},
                       block_sizes={"main0": 32}, kv_layouts={"main0": "HND"})
    try:
        assert tokens == reference
        chosen = llm.engine.deployment.k_chosen
        assert [kk for kk, _ in chosen] == [min(k, len(p)) for p in PROMPTS]
        # k = 0 never touches the head; otherwise every request's head KV crossed over exactly once
        expected = 0 if k == 0 else len(PROMPTS)
        assert llm.engine.num_transfers_ok == expected and llm.engine.num_transfers_failed == 0
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()


def test_adaptive_split_same_tokens(model: str, reference: list[list[int]]) -> None:
    tokens, llm = _run(model, {"kind": "adaptive", "tbt_slo_ms": 50, "granularity": 8})
    try:
        assert tokens == reference
        chosen = llm.engine.deployment.k_chosen
        assert len(chosen) == len(PROMPTS) and all(0 <= k <= L for k, L in chosen)
        assert llm.engine.num_transfers_ok == sum(1 for k, _ in chosen if k > 0)
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()
