"""The offline API, vLLM-style: LLM(model).generate(prompts, sampling_params) -> RequestOutputs."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tqdm import tqdm

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from engine.sampling_params import SamplingParams

_PROGRESS_MIN_PROMPTS = 16


class LLM:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", **engine_args):
        self.engine = LLMEngine(EngineArgs(model=model, device=device, dtype=dtype, **engine_args))
        self.tokenizer = self.engine.tokenizer  # None when the checkpoint has no tokenizer.json
        self._ids = itertools.count()

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """Submits every prompt at once (the scheduler batches them) and returns results in input order.
        lora_request: one adapter for every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        loras = [lora_request] * len(prompts) if lora_request is None or isinstance(lora_request, LoRARequest) \
            else list(lora_request)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(loras)} LoRA requests")
        # Every prompt is checked before any is queued, so a refused one leaves nothing behind.
        prompt_ids = [self.engine.prepare(prompt, p, f"prompts[{i}]")
                      for i, (prompt, p) in enumerate(zip(prompts, params))]
        lora_ids = [self.engine.add_lora(lora) if lora is not None else None for lora in loras]
        results: dict[str, RequestOutput] = {}
        for prompt, ids, p, lora_id in zip(prompts, prompt_ids, params, lora_ids):
            request_id = str(next(self._ids))
            self.engine.enqueue(request_id, ids, p, lora_id)
            results[request_id] = RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids,
                                                 [CompletionOutput(i, logprobs=[] if p.logprobs is not None else None)
                                                  for i in range(p.n)])
        bar = tqdm(total=len(prompts), desc="generating", disable=not use_tqdm or len(prompts) < _PROGRESS_MIN_PROMPTS)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                completion = results[out.request_id].outputs[out.index]
                if out.prompt_logprobs is not None:
                    results[out.request_id].prompt_logprobs = self._with_token_texts(out.prompt_logprobs)
                completion.text += out.new_text
                completion.token_ids += out.new_token_ids
                if out.new_logprobs is not None:
                    completion.logprobs += out.new_logprobs
                results[out.request_id].num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
                if out.request_finished:
                    results[out.request_id].finished = True
                    bar.update()
        bar.close()
        return list(results.values())

    def _with_token_texts(self, prompt_logprobs: PromptLogprobs) -> PromptLogprobs:
        """Fills each Logprob's decoded_token (each token alone, special tokens shown), as vLLM does."""
        if self.tokenizer is not None:
            for entry in prompt_logprobs:
                for token, logprob in (entry or {}).items():
                    logprob.decoded_token = self.tokenizer.decode([token], skip_special_tokens=False)
        return prompt_logprobs

    def reset_prefix_cache(self) -> bool:
        """Drops every cached prefix not in use (vLLM's name); True if nothing cached is left."""
        return self.engine.reset_prefix_cache()
