from __future__ import annotations

import json

import pytest

from hetserve.core.config import CacheConfig, EngineConfig, SchedulerConfig
from hetserve.core.errors import ModelLoadError, ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.sampling_params import SamplingParams, SamplingType


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": -1}, "logprobs"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 2.5}, "max_tokens"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field
    assert field in str(e.value)


def test_sampling_params_defaults():
    assert SamplingParams(temperature=0).sampling_type == SamplingType.GREEDY
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(top_k=-1).top_k == 0
    kids = [SamplingParams(n=3, seed=10).clone_for_child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12] and all(k.n == 1 for k in kids)


def test_engine_config_from_kwargs_routes_and_rejects():
    c = EngineConfig.from_kwargs("m", block_size=32, max_num_seqs=4, device="cpu")
    assert c.cache.block_size == 32 and c.scheduler.max_num_seqs == 4 and c.device.device == "cpu"
    with pytest.raises(ValidationError) as e:
        EngineConfig.from_kwargs("m", blok_size=32)
    assert e.value.field == "blok_size"
    with pytest.raises(ValidationError):
        CacheConfig(block_size=0)
    with pytest.raises(ValidationError):
        SchedulerConfig(max_num_seqs=0)


LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def test_both_rope_spellings_parse_the_same():
    old = dict(LLAMA31, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    new = dict(LLAMA31, rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0))
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling == b.rope_scaling and a.rope_scaling["rope_type"] == "llama3"
    assert a.head_dim == 128
    # Llama-3-8B: 128 KiB of KV per token in bf16 (GPU.md)
    assert a.kv_bytes_per_token("bfloat16") == 128 * 1024
    # 8.03 B parameters
    assert abs(a.num_params() - 8.03e9) / 8.03e9 < 0.01
    legacy = dict(LLAMA31, rope_scaling={"type": "linear", "factor": 2.0})
    assert ModelConfig.from_dict(legacy).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_model_config_errors_name_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match="architectures"):
        ModelConfig.from_dict(dict(LLAMA31, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelConfig.from_dict({k: v for k, v in LLAMA31.items() if k != "hidden_size"})
    with pytest.raises(ModelLoadError, match="rope_type"):
        ModelConfig.from_dict(dict(LLAMA31, rope_scaling={"rope_type": "longrope"}))
    with pytest.raises(ModelLoadError, match="num_key_value_heads"):
        ModelConfig.from_dict(dict(LLAMA31, num_key_value_heads=5))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        ModelConfig.from_path(tmp_path)
    with pytest.raises(ModelLoadError, match="config.json"):
        ModelConfig.from_path(tmp_path / "missing")
    q = ModelConfig.from_dict(dict(LLAMA31, architectures=["Qwen2ForCausalLM"]))
    assert q.qkv_bias and not q.o_bias and not q.qk_norm
    q3 = ModelConfig.from_dict(dict(LLAMA31, architectures=["Qwen3ForCausalLM"], head_dim=64))
    assert q3.qk_norm and q3.head_dim == 64
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA31, architectures=["MistralForCausalLM"],
                                                          sliding_window=4096)))
    assert ModelConfig.from_path(tmp_path).sliding_window == 4096
