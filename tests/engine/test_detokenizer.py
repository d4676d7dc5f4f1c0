"""Incremental detokenizer tests: against a full decode of the same tokens, and stop strings against a
brute-force search of the full text."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hetserve.engine.detokenizer import IncrementalDetokenizer
from hetserve.engine.tokenizer import Tokenizer

TEXT = (
    "Hello world! Café crème brûlée, naïve façade. 中文测试，你好世界。日本語のテキスト。\n"
    "Emoji 😀 🎉 👍🏽 🚀 ✨ ❤️ symbols ±∞≠√ €£¥. The quick brown fox jumps over the lazy dog.\n"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>"]
REPLACEMENT = "\ufffd"


def _save(tmp: Path, name: str, backend: HFTokenizer) -> Tokenizer:
    model_dir = tmp / name
    model_dir.mkdir()
    backend.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer.from_dir(model_dir)


def _byte_level(tmp: Path) -> Tokenizer:
    # GPT-2 / Qwen / Llama-3 style: every byte is a token, merges may end inside a character
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT * 20], trainer)
    return _save(tmp, "byte_level", backend)


def _byte_fallback(tmp: Path) -> Tokenizer:
    # Llama-2 / Mistral style: metaspace words, rare characters as <0xNN> byte tokens, first space stripped
    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, limit_alphabet=30)
    trained.train_from_iterator([TEXT * 20], trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return _save(tmp, "byte_fallback", backend)


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    tmp = tmp_path_factory.mktemp(request.param)
    return _byte_level(tmp) if request.param == "byte_level" else _byte_fallback(tmp)


def _byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """``text`` as one token per byte (both tokenizers have a token for every byte)."""
    byte_fallback = tok.token_to_id("<0x41>") is not None
    names = [f"<0x{b:02X}>" if byte_fallback else _GPT2_BYTES[b] for b in text.encode("utf-8")]
    ids = [tok.token_to_id(name) for name in names]
    assert None not in ids
    return [i for i in ids if i is not None]


def _gpt2_byte_table() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_GPT2_BYTES = _gpt2_byte_table()


def _drive(detok: IncrementalDetokenizer, output: Sequence[int], rng: random.Random) -> tuple[list[str], str, str]:
    """Feed ``output`` in random chunks; return the output_text after each update, the concatenated
    deltas and the final text."""
    texts, deltas = [], []
    i = 0
    while i < len(output):
        n = rng.randint(1, 3)
        stop = detok.update(output[i : i + n])
        i += n
        texts.append(detok.output_text)
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            break
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return texts, "".join(deltas), detok.get_next_output_text(finished=True, delta=False)


def _expected_text(tok: Tokenizer, prompt: list[int], output: list[int], skip: bool) -> str:
    full = tok.decode(prompt + output, skip_special_tokens=skip)
    head = tok.decode(prompt, skip_special_tokens=skip)
    assert full.startswith(head)
    return full[len(head) :]


def _random_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Arbitrary ids: special tokens, characters split over byte tokens, for byte-level also invalid utf-8.

    A byte-fallback decoder turns a whole run of byte tokens into U+FFFDs once the run is invalid utf-8,
    including valid bytes already streamed, which no streaming decoder can take back; real models emit
    valid runs, so for that tokenizer byte tokens come only as whole characters here."""
    byte_fallback = tok.token_to_id("<0x41>") is not None
    byte_ids = {tok.token_to_id(f"<0x{b:02X}>") for b in range(256)} if byte_fallback else set()
    ids: list[int] = []
    while len(ids) < rng.randint(1, 40):
        if rng.random() < 0.2:
            ids += _byte_token_ids(tok, rng.choice("é中😀👍🏽€a"))
        else:
            token = rng.randrange(tok.vocab_size)
            if token not in byte_ids:
                ids.append(token)
    return ids


def test_incremental_equals_full_decode_for_random_tokens(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    prompts = [[], tokenizer.encode("Hello"), tokenizer.encode("中文 😀"), tokenizer.encode("<s>Hi</s><|im_end|>")]
    for case in range(150):
        prompt = rng.choice(prompts)
        if case % 2:
            output = _random_ids(tokenizer, rng)
        else:
            words = rng.choices(TEXT.split(" "), k=rng.randint(1, 12))
            output = tokenizer.encode(" ".join(words), add_special_tokens=False)
        skip = rng.random() < 0.5
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip, stop=[])
        texts, streamed, final = _drive(detok, output, rng)
        expected = _expected_text(tokenizer, prompt, output, skip)
        assert final == expected
        assert streamed == expected
        assert detok.output_text == expected
        for text in texts:
            assert expected.startswith(text)
            if REPLACEMENT not in expected:
                assert REPLACEMENT not in text


def test_split_characters_are_held_back(tokenizer: Tokenizer) -> None:
    text = "a😀中é👍🏽b"
    ids = _byte_token_ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"), stop=[])
    seen = []
    for token in ids:
        detok.update([token])
        seen.append(detok.output_text)
        assert REPLACEMENT not in detok.output_text
        assert text.startswith(detok.output_text)
    assert detok.output_text == text
    # the text grew only at character boundaries: once per character
    assert len(set(seen)) == len(text)


def test_truncated_character_is_released_when_finished(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok", add_special_tokens=False) + _byte_token_ids(tokenizer, "😀")[:-2]
    detok = IncrementalDetokenizer(tokenizer, [], stop=[])
    detok.update(ids)
    # (a byte-fallback decoder may hold "k" back too when it is a byte token of the same run)
    assert detok.output_text in ("o", "ok")
    final = detok.get_next_output_text(finished=True, delta=False)
    assert final == tokenizer.decode(ids) and final.startswith("o") and final.endswith(REPLACEMENT)


def test_window_stays_short(tokenizer: Tokenizer) -> None:
    lengths: list[int] = []
    original = tokenizer.decode

    def recording_decode(ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        lengths.append(len(ids))
        return original(ids, skip_special_tokens)

    prompt = tokenizer.encode(TEXT * 3)
    output = tokenizer.encode(TEXT * 5, add_special_tokens=False)
    tokenizer.decode = recording_decode  # type: ignore[method-assign]
    try:
        detok = IncrementalDetokenizer(tokenizer, prompt, stop=["never"])
        for token in output:
            detok.update([token])
    finally:
        del tokenizer.decode
    assert detok.output_text == _expected_text(tokenizer, prompt, output, True)
    assert max(lengths) <= 16
    assert len(lengths) <= 1.5 * len(output)


def _brute_force_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    # the stop a character-by-character reader meets first: earliest end, then earliest start
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return (text[: i + len(s)] if include else text[:i]), s


def test_stop_strings_match_brute_force(tokenizer: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(200):
        words = rng.choices(TEXT.split(" "), k=rng.randint(2, 15))
        output = tokenizer.encode(" ".join(words), add_special_tokens=False)
        full = tokenizer.decode(output)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8 and len(full) > 1:
                start = rng.randrange(len(full) - 1)
                stops.append(full[start : start + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(["zzz", "中文测", "quick brown", "!"]))
        include = rng.random() < 0.5
        prompt = tokenizer.encode(rng.choice(["", "quick brown fox", "中文"]))
        detok = IncrementalDetokenizer(tokenizer, prompt, stop=stops, include_stop_str_in_output=include)
        texts, streamed, final = _drive(detok, output, rng)
        expected, expected_stop = _brute_force_stop(_expected_text(tokenizer, prompt, output, True), stops, include)
        assert (final, detok.stop_reason) == (expected, expected_stop), (stops, full)
        assert streamed == expected
        for text in texts:
            if not include:
                # nothing past the stop is ever shown, even transiently
                assert expected.startswith(text) or text.startswith(expected)


def test_stop_spanning_tokens_and_streaming_hold_back(tokenizer: Tokenizer) -> None:
    ids = _byte_token_ids(tokenizer, "abc STOP def")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP", "xyz"])
    deltas, matched = [], None
    for k, token in enumerate(ids):
        matched = detok.update([token])
        deltas.append(detok.get_next_output_text(finished=matched is not None, delta=True))
        if matched:
            break
        # at most len("STOP") - 1 trailing characters are withheld while they could start a stop
        assert len("".join(deltas)) >= len(detok.output_text) - 3
    assert matched == "STOP" and k == len("abc STOP") - 1
    assert "".join(deltas) == detok.output_text == "abc "
    assert all("S" not in d for d in deltas)
    # include_stop_str_in_output: nothing withheld, the stop string ends the text
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP"], include_stop_str_in_output=True)
    streamed = []
    for token in ids:
        matched = detok.update([token])
        streamed.append(detok.get_next_output_text(finished=matched is not None, delta=True))
        if matched:
            break
    assert "".join(streamed) == "abc STOP"


def test_earliest_stop_wins_and_prompt_is_ignored(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The quick brown fox jumps", add_special_tokens=False)
    # in one update: "brown" ends before "fox jumps" and "jumps"
    prompt = tokenizer.encode("fox")
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=["jumps", "fox jumps", "brown"])
    assert detok.update(ids) == "brown"
    assert detok.output_text == _expected_text(tokenizer, prompt, ids, True).split("brown")[0]
    assert detok.output_text.strip() == "The quick"
    # the prompt contains a stop string, the output does not
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("quick"), stop=["quick"])
    assert detok.update(tokenizer.encode(" fox", add_special_tokens=False)) is None
    # multi-byte stop string arriving one byte at a time
    detok = IncrementalDetokenizer(tokenizer, [], stop=["中文"], include_stop_str_in_output=True)
    results = [detok.update([t]) for t in _byte_token_ids(tokenizer, "好中文测")]
    assert "中文" in results and detok.output_text == "好中文"
