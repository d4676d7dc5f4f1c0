"""Dataset readers on the committed Azure trace excerpts (tests/data, CC-BY 4.0, see its README)."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path

import pytest

from hetserve.bench.datasets import DatasetConfig, HFTokenizer, load_requests, read_azure_trace
from hetserve.core.errors import ValidationError

DATA = Path(__file__).resolve().parents[1] / "data"
EXCERPTS = {"azure-conv": DATA / "azure_conv_excerpt.csv", "azure-code": DATA / "azure_code_excerpt.csv"}


def _csv_rows(path: Path) -> list[tuple[float, int, int]]:
    """Independent reader: split lines by hand; timestamps parsed with strptime (7 digits cut to 6)."""
    lines = path.read_text().splitlines()
    assert lines[0].strip() == "TIMESTAMP,ContextTokens,GeneratedTokens"
    out = []
    for line in lines[1:]:
        ts, ctx, gen = line.strip().split(",")
        out.append((datetime.strptime(ts[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp(), int(ctx), int(gen)))
    return out


@pytest.mark.parametrize("name", sorted(EXCERPTS))
def test_azure_token_id_prompts_have_the_trace_lengths(name: str) -> None:
    rows = _csv_rows(EXCERPTS[name])
    assert len(rows) == 300
    reqs = load_requests(DatasetConfig(name=name, path=str(EXCERPTS[name]), num_prompts=300), as_text=False)
    assert len(reqs) == 300
    for req, (ts, ctx, gen) in zip(reqs, rows):
        assert isinstance(req.prompt, list) and len(req.prompt) == req.prompt_len == ctx
        assert all(10 <= t < 500 for t in req.prompt)
        assert req.expected_output_len == gen
        assert req.arrival_offset_s == pytest.approx(ts - rows[0][0], abs=1e-5)


def test_trace_reader_matches_csv_and_caps_clip() -> None:
    path = EXCERPTS["azure-code"]
    rows = _csv_rows(path)
    parsed = read_azure_trace(path)
    assert [(r.context_tokens, r.generated_tokens) for r in parsed] == [(c, g) for _, c, g in rows]
    cfg = DatasetConfig(
        name="azure-code", path=str(path), num_prompts=50, max_input_len=1000, max_output_len=12, vocab_size=32000
    )
    reqs = load_requests(cfg, as_text=False)
    assert len(reqs) == 50
    for req, (_, ctx, gen) in zip(reqs, rows):
        assert len(req.prompt) == req.prompt_len == min(ctx, 1000)
        assert req.expected_output_len == min(gen, 12)
        assert all(10 <= t < 32000 for t in req.prompt)
    assert max(t for r in reqs for t in r.prompt) >= 500  # the larger vocabulary is used


def test_random_lengths_are_in_range_and_seeded() -> None:
    cfg = DatasetConfig(num_prompts=400, random_input_len=100, random_output_len=40, random_range_ratio=0.25, seed=11)
    reqs = load_requests(cfg, as_text=False)
    ins = [r.prompt_len for r in reqs]
    outs = [r.expected_output_len for r in reqs]
    assert min(ins) >= 75 and max(ins) <= 125 and min(outs) >= 30 and max(outs) <= 50
    assert abs(sum(ins) / len(ins) - 100) < 3 and len(set(ins)) > 30
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    assert load_requests(cfg, as_text=False) == reqs
    other = load_requests(DatasetConfig(**{**cfg.__dict__, "seed": 12}), as_text=False)
    assert [r.prompt_len for r in other] != ins
    fixed = load_requests(DatasetConfig(num_prompts=5, random_input_len=7, random_output_len=3), as_text=False)
    assert [(r.prompt_len, r.expected_output_len) for r in fixed] == [(7, 3)] * 5


def test_chat_text_without_tokenizer_has_one_word_per_token() -> None:
    reqs = load_requests(DatasetConfig(num_prompts=5, random_input_len=33, random_output_len=4), as_text=True)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == r.prompt_len == 33 for r in reqs)


def _train_tokenizer(tmp: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "serve",
        "token",
        "model",
        "cache",
        "block",
        "queue",
        "the",
        "of",
        "request",
        "latency",
        "decode",
        "prefill",
        "kernel",
        "device",
        "stream",
        "batch",
        "router",
    ]
    corpus = [" ".join(rng.choice(words) + rng.choice(["", "s", "ed", "ing"]) for _ in range(30)) for _ in range(300)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    (tmp / "tok").mkdir()
    tok.save(str(tmp / "tok" / "tokenizer.json"))
    return tmp / "tok"


def test_tokenizer_text_prompts_have_exact_token_counts(tmp_path: Path) -> None:
    tok_dir = _train_tokenizer(tmp_path)
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rows = _csv_rows(EXCERPTS["azure-conv"])[:20]
    for as_text in (False, True):  # a tokenizer makes text prompts for either endpoint
        cfg = DatasetConfig(
            name="azure-conv",
            path=str(EXCERPTS["azure-conv"]),
            num_prompts=20,
            max_input_len=600,
            tokenizer_path=str(tok_dir),
        )
        reqs = load_requests(cfg, as_text=as_text)
        for req, (_, ctx, _) in zip(reqs, rows):
            assert isinstance(req.prompt, str)
            assert len(reference.encode(req.prompt, add_special_tokens=False).ids) == req.prompt_len == min(ctx, 600)
    assert HFTokenizer(tok_dir).vocab_size == reference.get_vocab_size(with_added_tokens=False)


def test_sharegpt_reader(tmp_path: Path) -> None:
    convs = [
        {"id": "a", "conversations": [{"from": "human", "value": "x" * 40}, {"from": "gpt", "value": "y" * 80}]},
        {"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "y" * 80}]},
        {"id": "one-turn", "conversations": [{"from": "human", "value": "x" * 40}]},
        {"id": "long", "conversations": [{"from": "human", "value": "z" * 4000}, {"from": "gpt", "value": "w" * 40}]},
        {"id": "b", "conversations": [{"from": "human", "value": "q" * 100}, {"from": "gpt", "value": "r" * 20}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    reqs = load_requests(
        DatasetConfig(name="sharegpt", path=str(path), num_prompts=10, max_input_len=500), as_text=False
    )
    # 4 characters per token without a tokenizer; "short" and "one-turn" dropped, "long" over the cap
    assert sorted((r.prompt, r.prompt_len, r.expected_output_len) for r in reqs) == [
        ("q" * 100, 25, 5),
        ("x" * 40, 10, 20),
    ]
    jsonl = tmp_path / "sg.jsonl"
    jsonl.write_text("\n".join(json.dumps(c) for c in convs))
    assert len(load_requests(DatasetConfig(name="sharegpt", path=str(jsonl), num_prompts=1), as_text=True)) == 1


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("a,b,c\n1,2,3\n", "--dataset-path"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,12,x\n", "--dataset-path"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "--dataset-path"),
    ],
)
def test_bad_trace_files_name_the_flag(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValidationError) as exc:
        load_requests(DatasetConfig(name="azure-conv", path=str(path)), as_text=False)
    assert exc.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "nope"}, "--dataset"),
        ({"name": "azure-code"}, "--dataset-path"),
        ({"num_prompts": 0}, "--num-prompts"),
        ({"random_range_ratio": 1.0}, "--random-range-ratio"),
        ({"vocab_size": 10}, "--vocab-size"),
        ({"max_input_len": 0}, "--max-input-len"),
    ],
)
def test_bad_configs_name_the_flag(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        DatasetConfig(**kwargs)  # type: ignore[arg-type]
    assert exc.value.field == field
