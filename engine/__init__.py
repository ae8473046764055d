"""falcon-serve's engine: models, caches, scheduling and sampling for hybrid SSM language models."""

from engine.config import EngineArgs
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput, StepOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "StepOutput"]
