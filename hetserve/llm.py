"""The offline Python API: ``from hetserve import LLM, SamplingParams``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hetserve.core.config import EngineConfig
from hetserve.core.errors import ValidationError
from hetserve.core.outputs import RequestOutput
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.llm_engine import LLMEngine, PromptType


class LLM:
    """An engine for offline batches.

    ``LLM(model=DIR, max_num_seqs=..., block_size=..., num_blocks=..., max_num_batched_tokens=..., ...)`` takes
    the fields of ``CacheConfig``, ``SchedulerConfig`` and ``DeviceConfig`` as keywords. ``model=None`` uses the
    embedded tiny model (made on first use). ``LLM(model, cluster="cpu-pair", strategy=...)`` (dp, pp, pd, cronus,
    hetis) serves through worker processes (``hetserve.runtime.cluster_engine``); call ``shutdown()`` after.
    """

    def __init__(self, model: str | None = None, cluster: Any = None, strategy: str | None = None,
                 **kwargs: Any) -> None:
        if model is None:
            from hetserve.tiny.make_tiny import default_model_dir

            model = str(default_model_dir())
        self.engine: Any
        if cluster is not None:
            # one worker process per device; kwargs go to hetserve.runtime.deploy.from_cluster
            from hetserve.runtime.deploy import from_cluster

            strategy = strategy or "dp"
            self.config = EngineConfig.from_kwargs(str(model))
            self.engine = from_cluster(str(model), cluster, strategy, **kwargs)
            return
        self.config = EngineConfig.from_kwargs(str(model), **kwargs)
        self.engine = LLMEngine(self.config)

    def shutdown(self) -> None:
        """Stop worker processes (cluster engines); a no-op for a single device."""
        stop = getattr(self.engine, "shutdown", None)
        if callable(stop):
            stop()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string or a list of token ids); results in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValidationError(
                    "sampling_params", f"{len(params)} sampling params for {len(prompts)} prompts"
                )
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(None, p, sp))
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        template = chat_template or self.config.chat_template
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, chat_template=template)
            for c in conversations
        ]
        # the template already carries the BOS token where the model wants one
        token_prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[i] for i in ids]
