"""The cost of pausing training for inference, on the real model.

    python bench/pause_overhead.py [--prompts 32] [--max-new-tokens 128] [--steps 7] [--eval-step 2]

Three fresh processes (each pays its own compilation, as a real run would), same model, data, prompts:
  A  train 2 -> infer -> train 5   (the interleaved run, checkpoint before the pause included)
  A0 the same without the checkpoint before the pause (checkpoint.at_eval: false)
  B  train 7, no inference
  C  inference alone (the same pause, on the initial params)
overhead = A - B - C: what interleaving costs beyond its two parts. It splits into A - A0, the pause's checkpoint
(B and C write none at step 2; its asynchronous write shares the CPUs with the inference), and A0 - B - C, the
pause itself (switching programs, moving params, the barriers). Also reported: train-step compilations in A
(target 1: resuming after the pause reuses the compiled step, 0 recompilations) and engine compilations.
Generation uses ignore_eos so every scenario decodes the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SCENARIOS = ("interleaved", "interleaved_no_checkpoint", "train_only", "infer_only")


def config_for(scenario: str, args: argparse.Namespace, workdir: Path) -> dict:
    config = {
        "model": {"source": "smollm2"},
        "tokenizer": "smollm2",
        "data": {"train_files": [str(workdir / "train.jsonl")], "max_seq_len": 128},
        "optimizer": {"learning_rate": 5e-6, "warmup_steps": 1},
        "trainer": {"num_train_steps": args.steps, "batch_size": args.batch_size, "seed": 0},
        "inference": {"eval_at_steps": [] if scenario == "train_only" else [args.eval_step],
                      "prompts_file": str(workdir / "prompts.jsonl"), "max_new_tokens": args.max_new_tokens,
                      "batch_size": args.prompts, "ignore_eos": True},
        "output_dir": str(workdir / scenario),
    }
    if scenario == "interleaved_no_checkpoint":
        config["trainer"]["checkpoint"] = {"at_eval": False}
    return config


def run_scenario(scenario: str, config_file: str) -> dict:
    """In this (fresh) process: build the run, time the part the scenario measures."""
    from simpo_worker.interleave import build_run
    from simpo_worker.main import load_worker_config

    config = load_worker_config(config_file)
    run = build_run(config)
    started = time.perf_counter()
    if scenario == "infer_only":
        run.pause_for_inference(0)
    else:
        run.run()
    wall = time.perf_counter() - started
    return {"scenario": scenario, "wall_s": wall, "train_step_compilations": run.trainer.train_step_compilations,
            "engine_compilations": run.engine.compilations, "steps": run.trainer.step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--eval-step", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        print("RESULT " + json.dumps(run_scenario(args.scenario, args.config)), flush=True)
        return 0

    from simpo_worker.data.make_preference_data import generate, write_jsonl

    with tempfile.TemporaryDirectory(prefix="pause-bench-") as tmp:
        workdir = Path(tmp)
        train, held_out = generate(train=256, held_out=args.prompts, seed=0)
        write_jsonl(workdir / "train.jsonl", train)
        write_jsonl(workdir / "prompts.jsonl", [{"messages": row["chosen"][:-1]} for row in held_out])
        results = {}
        for scenario in SCENARIOS:
            config_file = workdir / f"{scenario}.yaml"
            config_file.write_text(yaml.safe_dump(config_for(scenario, args, workdir)))
            output = subprocess.run([sys.executable, __file__, "--scenario", scenario, "--config", str(config_file)],
                                    check=True, capture_output=True, text=True, env={**os.environ,
                                                                                      "JAX_PLATFORMS": "cpu"})
            line = next(l for l in output.stdout.splitlines() if l.startswith("RESULT "))
            results[scenario] = json.loads(line[len("RESULT "):])
    a, a0, b, c = (results[s]["wall_s"] for s in SCENARIOS)
    print(f"SmolLM2-135M, {args.steps} steps x {args.batch_size} pairs; pause at step {args.eval_step}: "
          f"{args.prompts} prompts x {args.max_new_tokens} new tokens (ignore_eos), 1 host")
    print(f"{'scenario':<34}{'wall s':>9}{'train compiles':>16}{'engine compiles':>17}")
    names = {"interleaved": "A train 2 -> infer -> train 5", "interleaved_no_checkpoint": "A0 A without its checkpoint",
             "train_only": "B train 7", "infer_only": "C inference alone"}
    for scenario in SCENARIOS:
        r = results[scenario]
        print(f"{names[scenario]:<34}{r['wall_s']:>9.1f}{r['train_step_compilations']:>16}"
              f"{r['engine_compilations']:>17}")
    for label, extra in (("overhead A - B - C", a - b - c), ("  the checkpoint: A - A0", a - a0),
                         ("  the pause: A0 - B - C", a0 - b - c)):
        print(f"{label:<34}{extra:>9.1f}   ({100 * extra / (b + c):+.1f}% of B + C)")
    print(f"train-step recompilations after resuming: {results['interleaved']['train_step_compilations'] - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
