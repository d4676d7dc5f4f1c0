"""Benchmark workloads: what to send (a prompt of a known length) and how much output to force.

Prompt kinds, chosen so the token count is exact wherever the API allows it:
- completions endpoint, no tokenizer: the prompt is a list of random token ids (the completions API accepts
  token lists), so the server sees exactly ``prompt_len`` tokens. Ids are drawn from ``[10, vocab_size)``;
  ids below 10 are skipped because bos/eos/pad/unk usually sit there. Without ``--vocab-size`` the range is
  ``[10, 500)``, valid for any real vocabulary and for tiny test models.
- any endpoint with a tokenizer (``--tokenizer DIR`` holding ``tokenizer.json``): text made of whole-word
  tokens, re-encoded and adjusted until it encodes (without special tokens) to exactly ``prompt_len`` ids.
- chat endpoint without a tokenizer: text of ``prompt_len`` common English words, each a single token in the
  usual BPE and SentencePiece vocabularies; the length is then an estimate, and the server's reported
  ``usage.prompt_tokens`` is what the metrics count.
Output length is forced by the client (``max_tokens`` = ``min_tokens`` = ``expected_output_len`` and
``ignore_eos``), so datasets only state it.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from hetserve.core.errors import ValidationError

DatasetName = Literal["random", "azure-conv", "azure-code", "sharegpt"]
DATASET_NAMES: tuple[str, ...] = ("random", "azure-conv", "azure-code", "sharegpt")

MIN_SAFE_TOKEN_ID = 10
DEFAULT_VOCAB_SIZE = 500
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# ShareGPT turns shorter than this carry too little signal (vLLM drops them for the same reason)
SHAREGPT_MIN_TOKENS = 4

_COMMON_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an had they you were their one all we can her has there been if more when will would who so no time "
    "people year way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name"
).split()


@dataclass(frozen=True)
class SampleRequest:
    """One request to send. ``prompt_len`` is the prompt's token count (exact unless stated otherwise);
    ``arrival_offset_s`` is the trace's own send time relative to the first request, or None."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int
    arrival_offset_s: float | None = None


@dataclass(frozen=True)
class TraceRow:
    timestamp_s: float
    context_tokens: int
    generated_tokens: int


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    def word_token_ids(self) -> list[int]: ...


class HFTokenizer:
    """A ``tokenizers`` tokenizer read from ``DIR/tokenizer.json`` (no transformers, no torch)."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise ValidationError("--tokenizer", f"no tokenizer.json at {p}")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValidationError("--tokenizer", "needs the 'tokenizers' package (pip install tokenizers)") from None
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises bare Exceptions on bad files
            raise ValidationError("--tokenizer", f"cannot read {file}: {e}") from None
        self._special_ids = {int(i) for i in self._tok.get_added_tokens_decoder()}

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=False))

    def word_token_ids(self) -> list[int]:
        """Ids of plain-word tokens (optional leading space or SentencePiece marker, 2-10 ASCII letters):
        random sequences of them decode to text that re-encodes to the same count in BPE vocabularies."""
        word = re.compile(r"^(Ġ|▁| )?[A-Za-z]{2,10}$")
        vocab = self._tok.get_vocab(with_added_tokens=False)
        words = {t: i for t, i in vocab.items() if word.match(t) and i not in self._special_ids}
        spaced = sorted(i for t, i in words.items() if t[0] in "Ġ▁ ")
        # word-initial pieces keep their boundaries when concatenated; fall back to all words if too few
        return spaced if len(spaced) >= 50 else sorted(words.values())


class PromptBuilder:
    """Makes prompts of a given token count: token ids, or text (see the module docstring)."""

    def __init__(
        self,
        *,
        as_text: bool,
        rng: random.Random,
        tokenizer: TokenizerLike | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.as_text = as_text or tokenizer is not None
        self.tokenizer = tokenizer
        self._rng = rng
        hi = vocab_size if vocab_size is not None else (tokenizer.vocab_size if tokenizer else DEFAULT_VOCAB_SIZE)
        self._id_range = (MIN_SAFE_TOKEN_ID, max(MIN_SAFE_TOKEN_ID + 1, hi))
        self._word_ids: list[int] = []
        if tokenizer is not None:
            self._word_ids = tokenizer.word_token_ids() or list(range(*self._id_range))

    @property
    def exact(self) -> bool:
        """Whether ``build`` returns exact token counts."""
        return not self.as_text or self.tokenizer is not None

    def build(self, num_tokens: int) -> tuple[str | list[int], int]:
        """Returns (prompt, its token count)."""
        num_tokens = max(1, num_tokens)
        if not self.as_text:
            lo, hi = self._id_range
            return [self._rng.randrange(lo, hi) for _ in range(num_tokens)], num_tokens
        if self.tokenizer is None:
            return " ".join(self._rng.choice(_COMMON_WORDS) for _ in range(num_tokens)), num_tokens
        return self._exact_text(self.tokenizer, num_tokens)

    def _exact_text(self, tok: TokenizerLike, num_tokens: int) -> tuple[str, int]:
        ids = [self._rng.choice(self._word_ids) for _ in range(num_tokens)]
        text = tok.decode(ids)
        for _ in range(16):
            got = tok.encode(text)
            if len(got) == num_tokens:
                return text, num_tokens
            # merges at word boundaries change the count: trim or top up and re-check
            ids = (
                got[:num_tokens]
                if len(got) > num_tokens
                else got + [self._rng.choice(self._word_ids) for _ in range(num_tokens - len(got))]
            )
            text = tok.decode(ids)
        return text, len(tok.encode(text))


@dataclass(frozen=True)
class DatasetConfig:
    """Which workload and how much of it; fields are named after the CLI flags that set them."""

    name: str = "random"
    path: str | None = None
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    max_input_len: int | None = None
    max_output_len: int | None = None
    seed: int = 0
    vocab_size: int | None = None
    tokenizer_path: str | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValidationError("--dataset", f"unknown dataset {self.name!r}; choose from {', '.join(DATASET_NAMES)}")
        if self.name != "random" and not self.path:
            raise ValidationError("--dataset-path", f"--dataset {self.name} needs --dataset-path FILE")
        if self.path and self.name != "random" and not Path(self.path).is_file():
            raise ValidationError("--dataset-path", f"no such file: {self.path}")
        for flag, value in (
            ("--num-prompts", self.num_prompts),
            ("--random-input-len", self.random_input_len),
            ("--random-output-len", self.random_output_len),
            ("--max-input-len", self.max_input_len),
            ("--max-output-len", self.max_output_len),
        ):
            if value is not None and value < 1:
                raise ValidationError(flag, f"must be >= 1, got {value}")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValidationError("--random-range-ratio", f"must be in [0, 1), got {self.random_range_ratio}")
        if self.vocab_size is not None and self.vocab_size <= MIN_SAFE_TOKEN_ID:
            raise ValidationError("--vocab-size", f"must be > {MIN_SAFE_TOKEN_ID}, got {self.vocab_size}")


def _parse_timestamp_s(text: str) -> float:
    """Seconds since the epoch (naive times are read as local; only differences are used)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    # Azure writes 7 fractional digits, which datetime before Python 3.11 rejects: add the fraction by hand
    whole, dot, frac = text.partition(".")
    if dot and frac.isdigit():
        return datetime.fromisoformat(whole).timestamp() + float("0." + frac)
    return datetime.fromisoformat(text).timestamp()


def read_azure_trace(path: str | Path) -> list[TraceRow]:
    """Rows of an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``), in file order."""
    rows: list[TraceRow] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValidationError("--dataset-path", f"{path}: missing column(s) {missing}; need {AZURE_COLUMNS}")
            for line_no, rec in enumerate(reader, start=2):
                try:
                    rows.append(
                        TraceRow(
                            timestamp_s=_parse_timestamp_s(rec["TIMESTAMP"]),
                            context_tokens=int(rec["ContextTokens"]),
                            generated_tokens=int(rec["GeneratedTokens"]),
                        )
                    )
                except (TypeError, ValueError) as e:
                    raise ValidationError("--dataset-path", f"{path}:{line_no}: bad row {rec}: {e}") from None
    except OSError as e:
        raise ValidationError("--dataset-path", f"cannot read {path}: {e}") from None
    if not rows:
        raise ValidationError("--dataset-path", f"{path}: no rows")
    return rows


def _cap(value: int, cap: int | None) -> int:
    return max(1, value if cap is None else min(value, cap))


def azure_requests(rows: list[TraceRow], cfg: DatasetConfig, builder: PromptBuilder) -> list[SampleRequest]:
    """The first ``num_prompts`` rows, each a prompt of ContextTokens tokens forcing GeneratedTokens tokens;
    arrival offsets are the trace's timestamps relative to the first row."""
    chosen = rows[: cfg.num_prompts]
    t0 = chosen[0].timestamp_s
    out: list[SampleRequest] = []
    for row in chosen:
        prompt, prompt_len = builder.build(_cap(row.context_tokens, cfg.max_input_len))
        out.append(
            SampleRequest(
                prompt=prompt,
                prompt_len=prompt_len,
                expected_output_len=_cap(row.generated_tokens, cfg.max_output_len),
                arrival_offset_s=max(0.0, row.timestamp_s - t0),
            )
        )
    return out


def random_requests(cfg: DatasetConfig, builder: PromptBuilder, rng: random.Random) -> list[SampleRequest]:
    """Lengths uniform in ``[len * (1 - ratio), len * (1 + ratio)]`` (inclusive), as vLLM's random dataset."""
    r = cfg.random_range_ratio
    out: list[SampleRequest] = []
    for _ in range(cfg.num_prompts):
        in_len = rng.randint(max(1, int(cfg.random_input_len * (1 - r))), int(cfg.random_input_len * (1 + r)))
        out_len = rng.randint(max(1, int(cfg.random_output_len * (1 - r))), int(cfg.random_output_len * (1 + r)))
        prompt, prompt_len = builder.build(_cap(in_len, cfg.max_input_len))
        out.append(SampleRequest(prompt, prompt_len, _cap(out_len, cfg.max_output_len)))
    return out


def _estimate_tokens(text: str) -> int:
    # about 4 characters per token for English BPE; only used when no tokenizer is given
    return max(1, round(len(text) / 4))


def _read_sharegpt_entries(path: str) -> list[Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValidationError("--dataset-path", f"cannot read {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValidationError("--dataset-path", f"{path}: neither JSON nor JSON lines: {e}") from None
    if not isinstance(data, list):
        raise ValidationError("--dataset-path", f"{path}: expected a JSON list of conversations")
    return data


def sharegpt_requests(cfg: DatasetConfig, builder: PromptBuilder, rng: random.Random) -> list[SampleRequest]:
    """First human turn as the prompt, the reply's length as the forced output; entries shuffled by seed."""
    assert cfg.path is not None
    entries = _read_sharegpt_entries(cfg.path)
    rng.shuffle(entries)
    tok = builder.tokenizer
    count = (lambda s: len(tok.encode(s))) if tok is not None else _estimate_tokens
    out: list[SampleRequest] = []
    for entry in entries:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if not isinstance(prompt, str) or not isinstance(reply, str):
            continue
        prompt_len, output_len = count(prompt), count(reply)
        if prompt_len < SHAREGPT_MIN_TOKENS or output_len < SHAREGPT_MIN_TOKENS:
            continue
        if cfg.max_input_len is not None and prompt_len > cfg.max_input_len:
            continue
        out.append(SampleRequest(prompt, prompt_len, _cap(output_len, cfg.max_output_len)))
        if len(out) == cfg.num_prompts:
            break
    if not out:
        raise ValidationError("--dataset-path", f"{cfg.path}: no usable ShareGPT conversations")
    return out


def load_requests(cfg: DatasetConfig, *, as_text: bool) -> list[SampleRequest]:
    """The workload ``cfg`` describes; ``as_text`` when the endpoint takes only text (chat)."""
    rng = random.Random(cfg.seed)
    tokenizer = HFTokenizer(cfg.tokenizer_path) if cfg.tokenizer_path else None
    builder = PromptBuilder(as_text=as_text, rng=rng, tokenizer=tokenizer, vocab_size=cfg.vocab_size)
    if cfg.name == "random":
        return random_requests(cfg, builder, rng)
    if cfg.name in ("azure-conv", "azure-code"):
        assert cfg.path is not None
        return azure_requests(read_azure_trace(cfg.path), cfg, builder)
    return sharegpt_requests(cfg, builder, rng)
