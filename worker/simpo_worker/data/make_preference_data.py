"""The project's own preference data: checkable questions (arithmetic, unit conversion) with a correct answer
(chosen) and a plausible wrong one (rejected), phrased as chat, in UltraFeedback-binarized JSONL.

    python -m simpo_worker.data.make_preference_data OUT_DIR [--train 2048] [--eval 256] [--seed 0]

writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl. No question appears in both splits. Chosen and rejected use
the same wording and differ only in the number, so a model can only tell them apart by getting the answer right.
Each row also carries `task` and `answer` so anyone can check the labels.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SYSTEM = "You are a precise assistant. Answer in one short sentence."

# (larger unit, smaller unit, how many smaller units make one larger)
CONVERSIONS = [
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("days", "hours", 24), ("feet", "inches", 12), ("weeks", "days", 7), ("yards", "feet", 3),
]


def addition(rng: random.Random) -> tuple[str, str, str, int]:
    """(question, right answer text, wrong answer text, right value)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return _equation(a, "+", b, a + b, a + b + rng.choice([-10, 10, -1, 1, -2, 2]))


def subtraction(rng: random.Random) -> tuple[str, str, str, int]:
    a, b = sorted([rng.randint(10, 99), rng.randint(10, 99)], reverse=True)
    return _equation(a, "-", b, a - b, a - b + rng.choice([-10, 10, -1, 1, -2, 2]))


def multiplication(rng: random.Random) -> tuple[str, str, str, int]:
    a, b = rng.randint(2, 60), rng.randint(2, 12)
    return _equation(a, "×", b, a * b, a * b + rng.choice([-a, a, -b, b, -1, 1]))


def conversion(rng: random.Random) -> tuple[str, str, str, int]:
    big, small, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 120)
    wrong = n * rng.choice(sorted({f for _, _, f in CONVERSIONS} - {factor}))
    return (f"How many {small} are in {n} {big}?", f"{n} {big} is {n * factor} {small}.",
            f"{n} {big} is {wrong} {small}.", n * factor)


def _equation(a: int, symbol: str, b: int, right: int, wrong: int) -> tuple[str, str, str, int]:
    return f"What is {a} {symbol} {b}?", f"{a} {symbol} {b} = {right}.", f"{a} {symbol} {b} = {wrong}.", right


TASKS = {"addition": addition, "subtraction": subtraction, "multiplication": multiplication,
         "conversion": conversion}


def make_row(question: str, chosen: str, rejected: str, answer: int, task: str) -> dict:
    context = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {
        "prompt": question,
        "chosen": context + [{"role": "assistant", "content": chosen}],
        "rejected": context + [{"role": "assistant", "content": rejected}],
        "task": task,
        "answer": answer,
    }


def generate(train: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Tasks in turn (so both splits hold the same mix), each question at most once; held-out rows come last."""
    rng = random.Random(seed)
    rows, seen = [], set()
    names = list(TASKS)
    for i in range(train + held_out):
        task = names[i % len(names)]
        for _ in range(10_000):
            question, chosen, rejected, answer = TASKS[task](rng)
            if question not in seen and chosen != rejected and rejected.split()[-1][0] != "-":
                break  # a new question whose wrong answer is not negative (too easy to spot)
        else:
            raise SystemExit(f"cannot make {train + held_out} distinct questions: the {task} questions ran out")
        seen.add(question)
        rows.append(make_row(question, chosen, rejected, answer, task))
    return rows[:train], rows[train:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simpo_worker.data.make_preference_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2048, help="training pairs")
    parser.add_argument("--eval", type=int, default=256, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = generate(args.train, args.eval, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", held_out)
    print(f"wrote {len(train)} training and {len(held_out)} held-out pairs to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
