"""The peer, in its own process so the suite can time-box it: transformers' own continuous batching
(``generate_batch``, transformers >= 5) on a model of the same config with random weights, greedy, a fixed
number of new tokens per request (eos disabled so every request produces them all).

``python benchmarks/peer_worker.py IN.json OUT.json``; IN holds ``{"config": <HF config dict>, "prompts":
[[ids]], "max_new_tokens": N, "device": "cuda", "dtype": "bfloat16", "cb": {...ContinuousBatchingConfig}}``.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from typing import Any


def main(inp: str, outp: str) -> int:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with open(inp) as f:
        spec = json.load(f)
    res: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__}
    device = torch.device(spec.get("device", "cuda"))
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    dtype = dtypes[spec.get("dtype", "bfloat16")]
    raw = dict(spec["config"])
    model_type = raw.pop("model_type", "llama")
    for k in ("architectures", "torch_dtype", "dtype", "transformers_version"):
        raw.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **raw)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    res["build_s"] = time.perf_counter() - t0
    res["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    prompts: list[list[int]] = spec["prompts"]
    new = int(spec["max_new_tokens"])
    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kw: dict[str, Any] = {}
    try:
        from transformers import ContinuousBatchingConfig

        allowed = set(inspect.signature(ContinuousBatchingConfig).parameters)
        want = {k: v for k, v in (spec.get("cb") or {}).items() if k in allowed}
        if device.type != "cuda":
            want.pop("use_cuda_graph", None)
        kw["continuous_batching_config"] = ContinuousBatchingConfig(**want)
        res["cb_config"] = want
    except Exception as e:  # noqa: BLE001 - older transformers: defaults
        res["cb_config_error"] = repr(e)
    params = set(inspect.signature(model.generate_batch).parameters)
    kw = {k: v for k, v in kw.items() if k in params}
    # a short call first: kernel compilation and graph capture stay out of the timed call where they can
    t0 = time.perf_counter()
    model.generate_batch(inputs=[p[:32] for p in prompts[:2]], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0), **kw)
    res["warmup_call_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in out.values())
    prompt_tokens = sum(len(p) for p in prompts)
    res.update(
        num_requests=len(prompts), max_new_tokens=new, prompt_tokens=prompt_tokens, generated_tokens=generated,
        wall_s=wall, output_tok_s=generated / wall, total_tok_s=(generated + prompt_tokens) / wall,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        note="wall time of one generate_batch call after a short warm-up call; includes its own setup",
    )
    with open(outp, "w") as f:
        json.dump(res, f, indent=1)
    print(f"peer: {len(prompts)} requests, {generated} tokens in {wall:.1f} s -> {generated / wall:.0f} out tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
