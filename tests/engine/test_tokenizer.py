"""Tokenizer tests: encode, decode and chat templates against transformers' AutoTokenizer on the same dir."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from hetserve.core.errors import ModelLoadError, ValidationError
from hetserve.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = (
    "Hello world! The quick brown fox jumps over the lazy dog. Café crème brûlée, naïve façade résumé.\n"
    "中文测试，你好世界。日本語のテキストです。한국어 문장도 있어요.\n"
    "Emoji: 😀 🎉 👍🏽 🚀 ✨ ❤️ and symbols ±∞≠√ €£¥.\n"
    "def main():\n    return {'key': [1, 2, 3]}  # code\n"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(first=true) %}"
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.first %}"
    "{{ raise_exception('Conversation must not start with the assistant') }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}|{{ message.thinking }}"
    "</think>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message.tool_calls is defined %}{% for call in message.tool_calls %}"
    "<tool_call>{{ call | tojson }}</tool_call>{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}"
    "<|im_end|>\n"
    "{% set ns.first = false %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
TOOL_TEMPLATE = (
    "{% for message in messages %}[{{ message.role | upper }}] {{ message.content }}\n"
    "{% endfor %}{% if tools %}TOOLS={{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)


def train_backend(post_processor: Any = None) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS * 10], trainer)
    if post_processor is not None:
        tok.post_processor = post_processor
    return tok


def make_dir(
    root: Path,
    name: str,
    config: dict[str, Any],
    post_processor: Any = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    model_dir = root / name
    model_dir.mkdir()
    train_backend(post_processor).save(str(model_dir / "tokenizer.json"))
    full = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", **config}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(full))
    if generation_config is not None:
        (model_dir / "generation_config.json").write_text(json.dumps(generation_config))
    return model_dir


def bos_processor() -> Any:
    # Llama-3 style: tokenizer.json itself prepends bos
    return processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])


def hf(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    pieces = CORPUS.split(" ") + ["<|im_start|>", "<|im_end|>", "</s>", "\n\n", "  ", "\t", "é", "😀", "中", "x"]
    texts = ["", " ", "Hello", "<s>hi</s>"]
    for _ in range(count):
        texts.append(rng.choice(["", " "]).join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return texts


@pytest.mark.parametrize(
    "config,post_processor",
    [({}, None), ({"add_bos_token": True}, None), ({}, "bos"), ({"add_bos_token": False}, "bos")],
    ids=["plain", "add_bos_in_config", "bos_in_post_processor", "bos_off_in_config"],
)
def test_encode_and_decode_match_transformers(tmp_path: Path, config: dict[str, Any], post_processor: Any) -> None:
    model_dir = make_dir(tmp_path, "tok", config, bos_processor() if post_processor == "bos" else None)
    ours, theirs = Tokenizer.from_dir(model_dir), hf(model_dir)
    for text in random_texts(0, 60):
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == theirs.encode(text, add_special_tokens=add_special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    ids = list(range(ours.vocab_size))
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.vocab_size == len(theirs)
    assert set(theirs.all_special_ids) <= set(ours.all_special_ids)
    assert set(ours.all_special_ids) == {theirs.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def test_missing_special_token_is_added_like_transformers(tmp_path: Path) -> None:
    eos = {"__type": "AddedToken", "content": "<|end|>", "special": True, "normalized": False}
    model_dir = make_dir(tmp_path, "tok", {"pad_token": "<|pad_new|>", "eos_token": eos})
    ours, theirs = Tokenizer.from_dir(model_dir), hf(model_dir)
    text = "a<|pad_new|>b<|end|>"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.vocab_size == len(theirs)
    assert ours.eos_token_ids == frozenset({theirs.eos_token_id})


def test_legacy_special_tokens_map(tmp_path: Path) -> None:
    model_dir = make_dir(tmp_path, "tok", {"eos_token": None})
    (model_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    ours, theirs = Tokenizer.from_dir(model_dir), hf(model_dir)
    assert theirs.eos_token == "<|im_end|>"
    assert ours.eos_token_ids == frozenset({theirs.eos_token_id})


def test_eos_ids_merge_generation_config(tmp_path: Path) -> None:
    model_dir = make_dir(tmp_path, "tok", {}, generation_config={"eos_token_id": [3, 1, 4]})
    tok = Tokenizer.from_dir(model_dir)
    eos = hf(model_dir).convert_tokens_to_ids("</s>")
    assert tok.eos_token_ids == frozenset({eos, 3, 4})
    single = make_dir(tmp_path, "single", {}, generation_config={"eos_token_id": 2})
    assert Tokenizer.from_dir(single).eos_token_ids == frozenset({eos, 2})


CONVERSATIONS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello 😀"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "中文?"},
                  {"role": "assistant", "content": "是的。"}, {"role": "user", "content": "Café"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one "},
                                               {"type": "text", "text": "part two"}]}]},
    {"messages": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function",
                                   "function": {"name": "get", "arguments": "{\"c\": \"Zürich\"}"}}]},
                  {"role": "tool", "content": "20°C"}],
     "tools": [{"type": "function", "function": {"name": "get", "description": "météo <b>",
                                                 "parameters": {"type": "object"}}}]},
    {"messages": [{"role": "user", "content": "think?"}], "enable_thinking": False},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "sum"},
                  {"role": "user", "content": "ok"}, {"role": "assistant", "content": "x", "thinking": "t2"}]},
]


def _render_both(ours: Tokenizer, theirs: Any, case: dict[str, Any], add_generation_prompt: bool,
                 chat_template: str | None = None) -> tuple[str, str]:
    kwargs = {k: v for k, v in case.items() if k != "messages"}
    mine = ours.apply_chat_template(case["messages"], add_generation_prompt=add_generation_prompt,
                                    chat_template=chat_template, **kwargs)
    reference = theirs.apply_chat_template(case["messages"], tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template, **kwargs)
    return mine, reference


@pytest.mark.parametrize("spelling", ["config_string", "config_list", "jinja_file", "saved_by_transformers"])
def test_chat_template_matches_transformers(tmp_path: Path, spelling: str) -> None:
    if spelling == "config_string":
        model_dir = make_dir(tmp_path, "tok", {"chat_template": CHATML_TEMPLATE})
    elif spelling == "config_list":
        model_dir = make_dir(tmp_path, "tok", {"chat_template": [{"name": "default", "template": CHATML_TEMPLATE},
                                                                 {"name": "tool_use", "template": TOOL_TEMPLATE}]})
    elif spelling == "jinja_file":
        # the file wins over the config entry, as in transformers
        model_dir = make_dir(tmp_path, "tok", {"chat_template": "IGNORED"})
        (model_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE)
        extra = model_dir / "additional_chat_templates"
        extra.mkdir()
        (extra / "tool_use.jinja").write_text(TOOL_TEMPLATE)
    else:
        source = make_dir(tmp_path, "src", {"chat_template": [{"name": "default", "template": CHATML_TEMPLATE},
                                                              {"name": "tool_use", "template": TOOL_TEMPLATE}]})
        model_dir = tmp_path / "saved"
        hf(source).save_pretrained(str(model_dir))
        assert (model_dir / "chat_template.jinja").is_file()
    ours, theirs = Tokenizer.from_dir(model_dir), hf(model_dir)
    for case in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            mine, reference = _render_both(ours, theirs, case, add_generation_prompt)
            assert mine == reference
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<s>")
    if spelling != "config_string":
        mine, reference = _render_both(ours, theirs, CONVERSATIONS[1], True, chat_template="tool_use")
        assert mine == reference and "[SYSTEM]" in mine
    # an explicit template source overrides the model's
    mine, reference = _render_both(ours, theirs, CONVERSATIONS[0], True, chat_template="{{ messages[0].content }}!")
    assert mine == reference == "Hello 😀!"


@pytest.mark.parametrize("content", ["The answer is", "  trailing space  ", [{"type": "text", "text": "part"}]])
def test_continue_final_message_matches_transformers(tmp_path: Path, content: Any) -> None:
    model_dir = make_dir(tmp_path, "tok", {"chat_template": CHATML_TEMPLATE})
    ours, theirs = Tokenizer.from_dir(model_dir), hf(model_dir)
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}]
    mine = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    reference = theirs.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert mine == reference
    assert not mine.endswith("<|im_end|>\n")
    with pytest.raises(ValidationError) as err:
        ours.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)
    assert err.value.field == "continue_final_message"


def test_chat_template_helpers_and_errors(tmp_path: Path) -> None:
    model_dir = make_dir(tmp_path, "tok", {"chat_template": CHATML_TEMPLATE})
    tok = Tokenizer.from_dir(model_dir)
    year = tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ strftime_now('%Y') }}")
    assert year.isdigit() and len(year) == 4
    loop = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                   chat_template=loop) == "a"
    with pytest.raises(ValidationError) as err:
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])
    assert err.value.field == "messages" and "must not start" in err.value.message
    with pytest.raises(ValidationError) as err:
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.append(1) }}")
    assert err.value.field == "chat_template" and "unsafe" in err.value.message
    with pytest.raises(ValidationError) as err:
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    assert err.value.field == "chat_template"


@pytest.mark.parametrize(
    "messages,field",
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
        ([{"content": "a"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "wizard", "content": "c"}],
         "messages[2].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "assistant", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": ["text"]}], "messages[0].content[0]"),
    ],
)
def test_invalid_messages_name_the_field(tmp_path: Path, messages: Any, field: str) -> None:
    tok = Tokenizer.from_dir(make_dir(tmp_path, "tok", {"chat_template": CHATML_TEMPLATE}))
    with pytest.raises(ValidationError) as err:
        tok.apply_chat_template(messages)
    assert err.value.field == field


def test_missing_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(make_dir(tmp_path, "tok", {}))
    with pytest.raises(ValidationError) as err:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert err.value.field == "chat_template"
    named = Tokenizer.from_dir(make_dir(tmp_path, "named", {"chat_template": [{"name": "a", "template": "x"}]}))
    with pytest.raises(ValidationError) as err:
        named.apply_chat_template([{"role": "user", "content": "hi"}])
    assert err.value.field == "chat_template" and "'a'" in err.value.message
    assert named.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="a") == "x"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_dir(empty)
    assert err.value.field == "tokenizer.json"
    corrupt = make_dir(tmp_path, "corrupt", {})
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_dir(corrupt)
    assert err.value.field == "tokenizer.json"
    bad_config = make_dir(tmp_path, "bad_config", {})
    (bad_config / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_dir(bad_config)
    assert err.value.field == "tokenizer_config.json"
    bad_template = make_dir(tmp_path, "bad_template", {"chat_template": 5})
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_dir(bad_template)
    assert "chat_template" in err.value.field
