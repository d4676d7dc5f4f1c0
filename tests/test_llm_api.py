"""The offline API: bad input gets clear errors naming the field; seeds, n > 1, stop strings and chat."""

from __future__ import annotations

import json
import shutil

import pytest

from hetserve import LLM, SamplingParams
from hetserve.core.errors import ModelLoadError, ValidationError


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), device="cpu", max_model_len=128, num_blocks=200, block_size=8)


def test_prompt_longer_than_max_model_len_names_both_numbers(llm):
    with pytest.raises(ValidationError) as e:
        llm.generate([[5] * 130], SamplingParams(max_tokens=1))
    assert e.value.field == "prompt" and "130" in str(e.value) and "128" in str(e.value)
    with pytest.raises(ValidationError) as e:
        llm.generate([[5] * 100], SamplingParams(max_tokens=40))
    assert e.value.field == "max_tokens" and "128" in str(e.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(llm, prompt):
    with pytest.raises(ValidationError) as e:
        llm.generate([prompt])
    assert e.value.field == "prompt"


def test_bad_token_ids_and_types(llm):
    with pytest.raises(ValidationError, match="prompt"):
        llm.generate([[1, 2, 10**6]])
    with pytest.raises(ValidationError, match="prompt"):
        llm.generate([3.5])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()])


@pytest.mark.parametrize("kw, field", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                       ({"top_p": 1.01}, "top_p"), ({"max_tokens": 0}, "max_tokens")])
def test_bad_sampling_params(kw, field):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kw)
    assert e.value.field == field


def test_model_directory_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        LLM(str(bad), device="cpu")
    assert "architectures" in str(e.value) and "FalconForCausalLM" in str(e.value)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, corrupt)
    for f in corrupt.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(corrupt), device="cpu")
    no_tok = tmp_path / "notok"
    shutil.copytree(tiny_llama_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        LLM(str(no_tok), device="cpu")


def test_seeded_sampling_reproducible_regardless_of_batch(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(["The robot said"], sp)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True)
    batch = llm.generate(["zzz", "The robot said", "Once upon"], [others, sp, others])
    assert batch[1].outputs[0].token_ids == alone
    # chunked prefill and a tiny pool (preemption) do not change a seeded request either
    small = LLM(str(llm.config.model), device="cpu", max_model_len=64, num_blocks=12, block_size=8,
                max_num_batched_tokens=5)
    crowd = ["The robot said"] + [f"filler {i} text" for i in range(5)]
    out = small.generate(crowd, [sp] + [others] * 5)
    assert out[0].outputs[0].token_ids == alone
    assert small.engine.scheduler.num_preemptions > 0
    different = llm.generate(["The robot said"], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16,
                                                              seed=99, ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone


def test_n_greater_than_one(llm):
    out = llm.generate(["Hello"], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate(["Hello"], SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_stop_strings_and_token_ids(llm):
    base = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    text = base.text
    stop = text[5:8]
    assert stop and stop in text
    cut = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    o = cut[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[: text.index(stop)]
    tid = base.token_ids[4]
    o2 = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tid]))[0].outputs[0]
    assert o2.token_ids == base.token_ids[: base.token_ids.index(tid) + 1] and o2.stop_reason == tid
    o3 = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tid],
                                              min_tokens=10))[0].outputs[0]
    assert len(o3.token_ids) >= 10 and tid not in o3.token_ids[:9]


def test_text_equals_full_decode(llm):
    outs = llm.generate(["Le café 中文 🙂", "def f(x):"], SamplingParams(temperature=0, max_tokens=30,
                                                                       ignore_eos=True))
    for o in outs:
        c = o.outputs[0]
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_chat_uses_template(llm):
    msgs = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    prompt = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert "Hi there" in prompt
    assert out.prompt_token_ids == llm.tokenizer.encode(prompt, add_special_tokens=False)
    with pytest.raises(ValidationError) as e:
        llm.chat([{"role": "wizard", "content": "x"}])
    assert "role" in str(e.value)
