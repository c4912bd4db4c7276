"""`simpo-interleave demo`: the reference workflow on one machine, on the real model.

SmolLM2-135M-Instruct, the project's generated preference data, 4 local hosts: train 2 steps, score the 128
held-out pairs (SimPO loss, reward accuracy) and sample their 128 prompts with max_new_tokens=2048 (EOS honoured)
on every host at once, train 5 more steps. It writes a
SimpoInterleaveJob YAML (the file you would `kubectl apply`, with local paths), runs it with the local runner,
and prints where the outputs are and a summary. `--small` is the same flow on a tiny random-init model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml

from simpo_interleave.local_runner import run_job_file
from simpo_worker.data.make_preference_data import generate, write_jsonl
from simpo_worker.store import outputs, storage

REFERENCE_STEPS, REFERENCE_EVAL_STEP, REFERENCE_PROMPTS, REFERENCE_MAX_NEW_TOKENS = 7, 2, 128, 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="out/demo", help="where everything goes (default: %(default)s)")
    parser.add_argument("--hosts", type=int, default=4, help="local host processes (default: %(default)s)")
    parser.add_argument("--small", action="store_true",
                        help="a tiny random-init model, 8 prompts x 16 new tokens (for tests and a quick look)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output_dir).resolve()
    job_file = write_demo_job(out, small=args.small, hosts=args.hosts)
    print(f"job: {job_file}", flush=True)
    code = run_job_file(str(job_file), hosts=args.hosts)
    if code == 0:
        print(summary(str(out / "run")))
    return code


def write_demo_job(out: Path, small: bool, hosts: int) -> Path:
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = generate(train=512, held_out=REFERENCE_PROMPTS, seed=0)
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "eval.jsonl", held_out)
    prompts = [{"messages": row["chosen"][:-1]} for row in held_out]  # system + user turns
    write_jsonl(data_dir / "prompts.jsonl", prompts[:8] if small else prompts)
    job = demo_job(data_dir, out / "run", small=small, hosts=hosts)
    job_file = out / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return job_file


def demo_job(data_dir: Path, output_dir: Path, small: bool, hosts: int) -> dict[str, Any]:
    model: dict[str, Any] = {"source": "smollm2"}
    if small:
        model = {"architecture": {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
                                  "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 512}}
    config = {
        "model": model,
        "tokenizer": "smollm2",
        "data": {"train_files": [str(data_dir / "train.jsonl")], "eval_files": [str(data_dir / "eval.jsonl")],
                 "max_seq_len": 128},
        "optimizer": {"learning_rate": 5e-6, "warmup_steps": 1},
        "simpo": {"beta": 2.5, "gamma_beta_ratio": 0.55},
        # Params and optimizer state sharded over the hosts (FSDP) and two microbatches: 4 hosts of SmolLM2
        # training fit in this machine's 24 GiB. Inference still gets a full replica per host.
        "trainer": {"num_train_steps": REFERENCE_STEPS, "batch_size": 8, "microbatches": 2,
                    "mesh": {"data": 1, "fsdp": -1}, "seed": 0},
        "inference": {
            "eval_at_steps": [REFERENCE_EVAL_STEP],
            "mode": "host_data_parallel",
            "prompts_file": str(data_dir / "prompts.jsonl"),
            "max_new_tokens": 16 if small else REFERENCE_MAX_NEW_TOKENS,
            # The tiny model's context is 512: prompt + new tokens must fit it.
            "max_prompt_len": 256 if small else 512,
            "batch_size": 32,
            "temperature": 0.7,
            "top_p": 0.9,
        },
        # On CPU one host may decode 2048 tokens for a long time while the others wait at the barrier.
        "distributed": {"barrier_timeout_s": 4 * 3600},
        "output_dir": str(output_dir),
    }
    return {
        "apiVersion": "simpo.dev/v1alpha1",
        "kind": "SimpoInterleaveJob",
        "metadata": {"name": "demo-small" if small else "demo", "namespace": "default"},
        "spec": {"image": "simpo-interleave-worker:local", "hosts": hosts, "config": config},
    }


def summary(output_dir: str) -> str:
    """What a person wants to see after the run: losses, the held-out metrics and samples of each pause, where the
    files are."""
    records = outputs.read_metrics(output_dir)
    train = [r for r in records if r.get("event") == "train"]
    lines = [f"outputs: {output_dir}", "", "step  loss     reward-acc  margin   step-s  compilations"]
    for r in train:
        lines.append(f"{r['step']:>4}  {r['loss']:.4f}   {r['rewards/accuracies']:.2f}        "
                     f"{r['rewards/margins']:+.3f}  {r['step_time']:6.2f}  {r['train_step_compilations']}")
    evaluations = {r["step"]: r for r in records if r.get("event") == "eval"}
    for event in (r for r in records if r.get("event") == "inference"):
        step = event["step"]
        manifest = outputs.read_manifest(output_dir, step)
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["phase_seconds"].items())
        lines.append("")
        if step in evaluations:
            e = evaluations[step]
            lines.append(f"held-out pairs at step {step}: {e['pairs']} pairs, loss {e['loss']:.4f}, reward-acc "
                         f"{e['rewards/accuracies']:.3f}, margin {e['rewards/margins']:+.3f} ({e['seconds']:.1f}s)")
        lines += [f"inference after step {step}: {manifest['prompts']} prompts on {manifest['hosts']} hosts",
                  f"  finished: {manifest['finish_reasons']['stop']} stopped (EOS), "
                  f"{manifest['finish_reasons']['length']} hit max_new_tokens",
                  f"  tokens: {manifest['completion_tokens']}, {manifest['tokens_per_second']:.1f} tokens/s",
                  f"  phases: {phases}",
                  f"  files: {outputs.inference_dir(output_dir, step)}/"]
        first = storage.read_jsonl(outputs.host_shard_path(output_dir, step, 0, manifest["hosts"]))[0]
        lines.append(f"  e.g. prompt {first['global_prompt_index']}: {json.dumps(first['completion'][:160])}")
    return os.linesep.join(lines)
