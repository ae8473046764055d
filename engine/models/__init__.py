"""Model registry: config.json's architectures[0] -> model class."""

from torch import nn

from engine.models.falcon_h1 import FalconH1ForCausalLM
from engine.models.falcon_mamba import FalconMambaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "FalconH1ForCausalLM": FalconH1ForCausalLM,
    "FalconMambaForCausalLM": FalconMambaForCausalLM,
    "MambaForCausalLM": FalconMambaForCausalLM,
}
