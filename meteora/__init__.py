"""meteora: many LoRA adapters in one LLM as a mixture of LoRA experts (MeteoRA, arXiv 2405.13053).

    import meteora
    base, tok = meteora.load_base_model()                      # SmolLM2-135M by default
    model = meteora.from_adapters(base, {"math": "path/to/lora", "code": "org/lora"}, top_k=2)
    model.set_routing(top_k=1, temperature=2.0)
    model.save_pretrained("ckpt"); model = meteora.load("ckpt")
"""

from . import ops, reference
from .adapters import AdapterError, LoraAdapter, load_adapter
from .base import cache_dir, default_model_dir, load_base_model
from .layer import MeteoRALinear, Routing
from .loss import gate_accuracy, gate_loss, meteora_loss
from .model import CheckpointError, MeteoRAModel, PromptVote, RoutingTrace, from_adapters, load, new_experts

__all__ = [
    "AdapterError", "CheckpointError", "LoraAdapter", "MeteoRALinear", "MeteoRAModel", "PromptVote", "Routing",
    "RoutingTrace", "cache_dir", "default_model_dir", "from_adapters", "gate_accuracy", "gate_loss",
    "load", "load_adapter", "load_base_model", "meteora_loss", "new_experts", "ops", "reference",
]
__version__ = "0.1.0"
