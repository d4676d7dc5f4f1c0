"""Sampler tests: every mask and penalty against a brute-force python loop, sampling against softmax."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.sampling import (
    Sampler,
    SamplingState,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    make_generator,
)

NEG_INF = float("-inf")


def _random_logits(rng: random.Random, num_rows: int, vocab_size: int) -> torch.Tensor:
    rows = []
    for _ in range(num_rows):
        scale = rng.choice([0.1, 1.0, 3.0, 10.0])
        row = [rng.gauss(0.0, scale) for _ in range(vocab_size)]
        # some entries already masked by an earlier processor
        for _ in range(rng.randrange(0, max(vocab_size // 4, 1))):
            row[rng.randrange(vocab_size)] = NEG_INF
        if all(x == NEG_INF for x in row):
            row[0] = 0.0
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def _softmax(row: list[float]) -> list[float]:
    finite = [x for x in row if x != NEG_INF]
    top = max(finite)
    exps = [math.exp(x - top) if x != NEG_INF else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _state(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
           eos: frozenset[int] = frozenset()) -> SamplingState:
    return SamplingState.create(params, prompt or [], eos, "cpu", output_token_ids=output)


def test_top_k_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(300):
        num_rows, vocab_size = rng.randint(1, 5), rng.randint(1, 40)
        logits = _random_logits(rng, num_rows, vocab_size)
        ks = [rng.choice([0, rng.randint(1, vocab_size + 2)]) for _ in range(num_rows)]
        got = apply_top_k(logits, torch.tensor(ks))
        for i, k in enumerate(ks):
            row = logits[i].tolist()
            expected = list(row)
            if 0 < k < vocab_size:
                kth = sorted(row, reverse=True)[k - 1]
                expected = [x if x >= kth else NEG_INF for x in row]
            assert got[i].tolist() == expected


def test_top_p_matches_brute_force() -> None:
    rng = random.Random(1)
    checked = 0
    for _ in range(400):
        num_rows, vocab_size = rng.randint(1, 5), rng.randint(1, 40)
        logits = _random_logits(rng, num_rows, vocab_size)
        ps = [rng.choice([1.0, rng.uniform(0.05, 1.0)]) for _ in range(num_rows)]
        got = apply_top_p(logits, torch.tensor(ps))
        for i, p in enumerate(ps):
            row = logits[i].tolist()
            probs = _softmax(row)
            order = sorted(range(vocab_size), key=lambda j: -probs[j])
            # smallest set of most likely tokens whose mass reaches p
            keep: set[int] = set()
            mass = 0.0
            borderline = False
            for j in order:
                if mass >= p:
                    break
                keep.add(j)
                mass += probs[j]
                borderline |= abs(mass - p) < 1e-5
            if p >= 1.0:
                keep = set(range(vocab_size))
            elif borderline:
                continue
            checked += 1
            expected = [x if j in keep else NEG_INF for j, x in enumerate(row)]
            assert got[i].tolist() == expected, (p, probs)
    assert checked > 500


def test_min_p_matches_brute_force() -> None:
    rng = random.Random(2)
    checked = 0
    for _ in range(300):
        num_rows, vocab_size = rng.randint(1, 5), rng.randint(1, 40)
        logits = _random_logits(rng, num_rows, vocab_size)
        ps = [rng.choice([0.0, rng.uniform(0.0, 1.0)]) for _ in range(num_rows)]
        got = apply_min_p(logits, torch.tensor(ps))
        for i, p in enumerate(ps):
            row = logits[i].tolist()
            probs = _softmax(row)
            threshold = p * max(probs)
            if any(abs(q - threshold) < 1e-6 for q in probs) and p > 0:
                continue
            checked += 1
            expected = [x if probs[j] >= threshold else NEG_INF for j, x in enumerate(row)]
            assert got[i].tolist() == expected
    assert checked > 500


def test_penalties_match_brute_force() -> None:
    rng = random.Random(3)
    for _ in range(100):
        num_rows, vocab_size = rng.randint(1, 4), rng.randint(2, 30)
        logits = _random_logits(rng, num_rows, vocab_size)
        prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(0, 10))] for _ in range(num_rows)]
        outputs = [[rng.randrange(vocab_size) for _ in range(rng.randint(0, 10))] for _ in range(num_rows)]
        rep = [rng.choice([1.0, rng.uniform(0.5, 2.0)]) for _ in range(num_rows)]
        pres = [rng.choice([0.0, rng.uniform(-2.0, 2.0)]) for _ in range(num_rows)]
        freq = [rng.choice([0.0, rng.uniform(-2.0, 2.0)]) for _ in range(num_rows)]
        prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool)
        counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32)
        for i in range(num_rows):
            for t in prompts[i]:
                prompt_mask[i, t] = True
            for t in outputs[i]:
                counts[i, t] += 1
        got = apply_penalties(logits, prompt_mask, counts, torch.tensor(rep), torch.tensor(pres), torch.tensor(freq))
        for i in range(num_rows):
            for t in range(vocab_size):
                x = logits[i, t].item()
                if t in prompts[i] or t in outputs[i]:
                    x = x / rep[i] if x > 0 else x * rep[i]
                n = outputs[i].count(t)
                x -= freq[i] * n + pres[i] * (1 if n > 0 else 0)
                if x == NEG_INF:
                    assert got[i, t].item() == NEG_INF
                else:
                    assert got[i, t].item() == pytest.approx(x, rel=1e-5, abs=1e-5)


def test_greedy_is_argmax_of_penalised_logits() -> None:
    rng = random.Random(4)
    vocab_size = 50
    sampler = Sampler(vocab_size, "cpu")
    for _ in range(30):
        logits = _random_logits(rng, 6, vocab_size)
        states = []
        for _ in range(6):
            params = SamplingParams(temperature=0.0, repetition_penalty=rng.choice([1.0, 1.7]),
                                    frequency_penalty=rng.choice([0.0, 1.5]))
            prompt = [rng.randrange(vocab_size) for _ in range(5)]
            output = [rng.randrange(vocab_size) for _ in range(5)]
            states.append(_state(params, prompt, output))
        got = sampler(logits, states).token_ids
        for i, state in enumerate(states):
            row = logits[i].tolist()
            p = state.params
            for t in range(vocab_size):
                if t in state.prompt_token_ids or t in state.output_token_ids:
                    row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
                row[t] -= p.frequency_penalty * state.output_token_ids.count(t)
            assert got[i] == max(range(vocab_size), key=lambda t: row[t])


def test_penalty_counts_follow_the_growing_output() -> None:
    # the sampler keeps device-side counts across steps; they must track appended (and reset) outputs
    vocab_size = 6
    sampler = Sampler(vocab_size, "cpu")
    state = _state(SamplingParams(temperature=0.0, frequency_penalty=2.0), prompt=[0])
    logits = torch.tensor([[5.0, 4.9, 4.8, 4.7, 4.6, 4.5]])
    seen = []
    for _ in range(6):
        token = sampler(logits, [state]).token_ids[0]
        seen.append(token)
        state.output_token_ids.append(token)
    assert seen == [0, 1, 2, 3, 4, 5]  # each pick pays 2.0 the next time, so the argmax walks the vocab
    state.output_token_ids.clear()  # a rebuilt request starts counting afresh
    assert sampler(logits, [state]).token_ids == [0]


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_seeded_sampling_is_reproducible_and_batch_independent(device: str) -> None:
    vocab_size = 64 if device == "cpu" else 151936
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)

    def logits_for(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        return (torch.randn(vocab_size, generator=g) * 3).to(device)

    def run(position: int, num_others: int, others_seeded: bool) -> list[int]:
        sampler = Sampler(vocab_size, device)
        target = SamplingState.create(params, [], frozenset(), device)
        others = [
            SamplingState.create(SamplingParams(temperature=1.0, seed=(7 + j) if others_seeded else None, top_p=0.9),
                                 [], frozenset(), device)
            for j in range(num_others)
        ]
        tokens = []
        for step in range(25):
            batch = list(others)
            batch.insert(position, target)
            rows = [torch.randn(vocab_size, device=device) for _ in batch]
            rows[position] = logits_for(step)
            out = sampler(torch.stack(rows), batch).token_ids
            tokens.append(out[position])
            for state, token in zip(batch, out):
                state.output_token_ids.append(token)
        return tokens

    alone = run(0, 0, False)
    assert run(0, 0, False) == alone
    assert run(2, 5, True) == alone
    assert run(5, 5, False) == alone
    assert run(1, 3, True) == alone
    other_seed = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=99)
    sampler = Sampler(vocab_size, device)
    state = SamplingState.create(other_seed, [], frozenset(), device)
    differs = [sampler(logits_for(s).unsqueeze(0), [state]).token_ids[0] for s in range(25)]
    assert differs != alone


def _expected_distribution(logits: list[float], temperature: float, top_k: int, top_p: float,
                           min_p: float) -> list[float]:
    scaled = [x / temperature for x in logits]
    probs = _softmax(scaled)
    order = sorted(range(len(logits)), key=lambda j: -probs[j])
    keep = set(order[:top_k]) if top_k else set(order)
    mass, nucleus = 0.0, set()
    renorm = sum(probs[j] for j in keep)
    for j in order:
        if j not in keep or mass >= top_p:
            continue
        nucleus.add(j)
        mass += probs[j] / renorm
    keep = nucleus
    top = max(probs[j] for j in keep)
    keep = {j for j in keep if probs[j] >= min_p * top}
    total = sum(probs[j] for j in keep)
    return [probs[j] / total if j in keep else 0.0 for j in range(len(logits))]


def _chi_square(counts: list[int], expected: list[float]) -> float:
    n = sum(counts)
    stat = 0.0
    for c, p in zip(counts, expected):
        if p == 0.0:
            assert c == 0
            continue
        stat += (c - n * p) ** 2 / (n * p)
    return stat


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 6, 0.9, 0.05)],
)
def test_sampling_follows_the_masked_softmax(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    base = [2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0]
    vocab_size, num_draws = len(base), 20000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sampler = Sampler(vocab_size, "cpu", generator=make_generator(0, "cpu"))
    states = [_state(params) for _ in range(num_draws)]
    tokens = sampler(torch.tensor([base] * num_draws), states).token_ids
    counts = [tokens.count(t) for t in range(vocab_size)]
    expected = _expected_distribution(base, temperature, top_k, top_p, min_p)
    support = sum(1 for p in expected if p > 0)
    # chi-square with support-1 degrees of freedom (<= 9); 40 is far beyond its 1e-5 quantile
    assert _chi_square(counts, expected) < 40, (counts, expected, support)


def test_seeded_row_draws_follow_the_softmax() -> None:
    # the per-row seeded noise path, one draw per step, must be a fair sample too
    base = [1.0, 0.5, 0.0, -0.5, -1.0]
    sampler = Sampler(len(base), "cpu")
    state = _state(SamplingParams(temperature=1.0, seed=5))
    logits = torch.tensor([base])
    tokens = [sampler(logits, [state]).token_ids[0] for _ in range(3000)]
    counts = [tokens.count(t) for t in range(len(base))]
    assert _chi_square(counts, _softmax(base)) < 30, counts


def test_logprobs_are_raw_log_softmax() -> None:
    rng = random.Random(6)
    vocab_size = 40
    sampler = Sampler(vocab_size, "cpu")
    logits = torch.randn(5, vocab_size, generator=torch.Generator().manual_seed(6)) * 4
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.8, logprobs=0, repetition_penalty=1.5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0, logprobs=3, top_k=4, presence_penalty=1.0),
        SamplingParams(temperature=1.0, logprobs=100),
    ]
    states = [_state(p, prompt=[rng.randrange(vocab_size) for _ in range(4)], output=[1, 2]) for p in params]
    out = sampler(logits, states)
    assert out.logprobs[2] is None
    for i, p in enumerate(params):
        if p.logprobs is None:
            continue
        lp = out.logprobs[i]
        assert lp is not None
        row = [float(x) for x in logits[i].double()]
        top = max(row)
        log_z = top + math.log(sum(math.exp(x - top) for x in row))
        reference = [x - log_z for x in row]
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(reference[token], abs=1e-4)
        assert lp.rank == 1 + sum(1 for x in reference if x > reference[token])
        n = min(p.logprobs, vocab_size)
        best = sorted(range(vocab_size), key=lambda t: -reference[t])[:n]
        assert lp.top_token_ids == best
        assert lp.top_logprobs == pytest.approx([reference[t] for t in best], abs=1e-4)


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    vocab_size = 10
    eos, stop_id = 3, 7
    sampler = Sampler(vocab_size, "cpu")
    logits = torch.zeros(1, vocab_size)
    logits[0, eos] = 10.0
    logits[0, stop_id] = 9.0
    logits[0, 5] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id])
    state = _state(params, eos=frozenset({eos}))
    picks = []
    for _ in range(4):
        token = sampler(logits, [state]).token_ids[0]
        picks.append(token)
        state.output_token_ids.append(token)
    assert picks == [5, 5, 5, eos]
    # random rows are blocked too
    random_state = _state(SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[stop_id]),
                          eos=frozenset({eos}))
    tokens = sampler(logits.repeat(500, 1), [random_state] * 500).token_ids
    assert eos not in tokens and stop_id not in tokens
    # ignore_eos: eos is an ordinary token, only stop ids are held back
    ignoring = _state(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id], ignore_eos=True),
                      eos=frozenset({eos}))
    assert sampler(logits, [ignoring]).token_ids == [eos]


def test_mixed_batch_greedy_rows_and_top_k_one() -> None:
    vocab_size = 30
    sampler = Sampler(vocab_size, "cpu")
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(8))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, seed=3, top_k=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=5.0, top_p=0.01),
        SamplingParams(temperature=0.5, min_p=1.0),
    ]
    out = sampler(logits, [_state(p) for p in params]).token_ids
    assert out == logits.argmax(dim=1).tolist()
