"""An HF LlamaForCausalLM config.json and the ArchitectureConfig it means, both ways (transformers 4 and 5
layouts in, the layout every transformers version reads out).
"""

from __future__ import annotations

from typing import Any

from simpo_worker.contract import schema
from simpo_worker.contract.config import ArchitectureConfig, RopeScaling
from simpo_worker.contract.errors import ConfigError, ModelError


def config_from_hf(data: Any, where: str) -> ArchitectureConfig:
    """Map an HF LlamaForCausalLM config.json (transformers 4 or 5 layout) to ArchitectureConfig."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a JSON object")
    model_type = data.get("model_type")
    if model_type != "llama":
        raise ModelError(f"{where}: unsupported architecture: model_type {model_type!r} "
                         f"(architectures {data.get('architectures')}); only Llama (model_type 'llama') is supported")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act {data['hidden_act']!r} is not supported (only 'silu')")
    for bias in ("attention_bias", "mlp_bias"):
        if data.get(bias):
            raise ModelError(f"{where}: {bias}: true is not supported (Llama has no biases)")

    def required(key: str) -> Any:
        if key not in data:
            raise ModelError(f"{where}: required key {key!r} is missing")
        return data[key]

    # transformers 5 writes rope_parameters (with rope_theta inside); older files have rope_theta + rope_scaling.
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "llama3":
        try:
            rope_scaling = RopeScaling(factor=float(rope["factor"]),
                                       low_freq_factor=float(rope["low_freq_factor"]),
                                       high_freq_factor=float(rope["high_freq_factor"]),
                                       original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        except KeyError as error:
            raise ModelError(f"{where}: llama3 rope scaling is missing {error}") from error
    else:
        raise ModelError(f"{where}: rope type {rope_type!r} is not supported (only default and llama3)")

    eos = data.get("eos_token_id")
    heads = required("num_attention_heads")
    # head_dim None means hidden_size // num_heads, as HF; keeps a save/load round trip equal.
    head_dim = data.get("head_dim")
    if head_dim == required("hidden_size") // heads:
        head_dim = None
    config = ArchitectureConfig(
        vocab_size=required("vocab_size"),
        hidden_size=required("hidden_size"),
        intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        max_position_embeddings=data.get("max_position_embeddings", 2048),
        bos_token_id=data.get("bos_token_id"),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
    )
    try:
        schema.validate(config, where)
    except ConfigError as error:
        raise ModelError(str(error)) from error
    return config


def config_to_hf(config: ArchitectureConfig) -> dict[str, Any]:
    """config.json in the layout every transformers version reads (rope_theta + rope_scaling)."""
    c = config
    data: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.resolved_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "torch_dtype": "float32",
    }
    if c.rope_scaling is not None:
        s = c.rope_scaling
        data["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                "high_freq_factor": s.high_freq_factor,
                                "original_max_position_embeddings": s.original_max_position_embeddings}
    if c.bos_token_id is not None:
        data["bos_token_id"] = c.bos_token_id
    if c.eos_token_ids:
        data["eos_token_id"] = c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids)
    return data

