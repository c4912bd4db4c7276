"""Does SimPO training learn? SmolLM2-135M-Instruct on the project's generated preference set (correct vs wrong
answers to arithmetic and unit-conversion questions): held-out reward accuracy along the run.

    python bench/learning_curve.py [--steps 40] [--eval-every 10] [--batch-size 8] [--eval-pairs 128] [--lr 2e-5]

Trains with the worker's own Trainer (the production step) from the pretrained model; at step 0 and every
`eval-every` steps, evaluates the SimPO metrics on held-out pairs whose questions never occur in training (the
worker's own held-out evaluation, Trainer.evaluate).
Reward accuracy is the fraction of held-out pairs where beta * avg log p(correct answer) exceeds that of the wrong
one. Prints the curve as a table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from simpo_worker.contract.config import parse_worker_config
from simpo_worker.data.make_preference_data import main as make_preference_data
from simpo_worker.data.preference_data import PreferenceData
from simpo_worker.data.tokenizer import load_tokenizer
from simpo_worker.train.trainer import Trainer
from simpo_worker.weights.pretrained import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--eval-pairs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="simpo-learning-curve-"))
    make_preference_data([str(workdir), "--train", "2048", "--eval", str(args.eval_pairs), "--seed", str(args.seed)])
    config = parse_worker_config({
        "model": {"source": "smollm2"},
        "data": {"train_files": [str(workdir / "train.jsonl")], "max_seq_len": 64},
        "trainer": {"num_train_steps": args.steps, "batch_size": args.batch_size, "seed": args.seed},
        # The published Llama-3-Instruct SimPO recipe (beta 2.5, gamma/beta 0.55) with a small-model learning rate.
        "optimizer": {"learning_rate": args.lr, "warmup_steps": max(1, args.steps // 10)},
        "simpo": {"beta": 2.5, "gamma_beta_ratio": 0.55},
        "output_dir": str(workdir / "run"),
    })
    tokenizer = load_tokenizer("smollm2")
    trainer = Trainer(config, load_pretrained("smollm2"), tokenizer)
    # Not data.eval_files: the worker evaluates those at its inference pauses, this script at its own steps.
    held_out = PreferenceData(config.data, tokenizer, [str(workdir / "eval.jsonl")], args.batch_size, args.seed)

    print(f"SmolLM2-135M-Instruct, SimPO beta 2.5, gamma/beta 0.55, lr {args.lr}, {args.batch_size} pairs/step; "
          f"held-out: {args.eval_pairs} pairs")
    print(f"{'step':>5} {'train loss':>11} {'held-out loss':>14} {'reward acc':>11} {'margin':>8} "
          f"{'logp chosen':>12} {'logp rejected':>14}")
    recent: list[float] = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            m = trainer.evaluate(held_out)
            train_loss = f"{np.mean(recent):11.4f}" if recent else f"{'-':>11}"
            print(f"{step:5d} {train_loss} {m['loss']:14.4f} {m['rewards/accuracies']:11.3f} "
                  f"{m['rewards/margins']:8.3f} {m['logps/chosen']:12.4f} {m['logps/rejected']:14.4f}", flush=True)
            recent = []
        if step < args.steps:
            recent.append(trainer.train_step()["loss"])


if __name__ == "__main__":
    main()
