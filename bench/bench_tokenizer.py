"""Encode speed of the worker's tokenizer (HF `tokenizers`) against the hand-written byte-level BPE it replaced,
read from git at --old-rev and imported under another name. Both are loaded from SmolLM2's GGUF (one GGUFReader,
so metadata parsing is not counted) and encode the same texts one call per text, as the worker does.

    python bench/bench_tokenizer.py [--old-rev b0c4593] [--pairs 2048] [--golden-repeats 200] [--passes 3]

Corpora: `preference` is the project's generated preference data as PreferenceData encodes it (per answer: the
chat-rendered prompt and the answer's text); `goldens` is the tokenizer goldens' texts (tests/goldens/
tokenizer_smollm2.json: multilingual, emoji, code, whitespace runs) repeated. Pass 1 is timed with a cold cache
(the old implementation caches each pre-tokenized piece's BPE, and so does `tokenizers`' BPE); "warm" is the best
of the later passes. Both must give the same ids, or the script fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader

from simpo_worker.make_preference_data import generate
from simpo_worker.smollm2 import smollm2_gguf_path
from simpo_worker.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def import_old(rev: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:worker/simpo_worker/tokenizer.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="old-tokenizer-")) / "old_tokenizer.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preference_texts(tokenizer: Tokenizer, pairs: int) -> list[str]:
    rows, _ = generate(pairs, 0, seed=0)
    texts = []
    for row in rows:
        for conversation in (row["chosen"], row["rejected"]):
            prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True)
            full = tokenizer.apply_chat_template(conversation)
            texts += [prompt, full[len(prompt):]]
    return texts


def golden_texts(repeats: int) -> list[str]:
    golden = json.loads((REPO / "tests/goldens/tokenizer_smollm2.json").read_text(encoding="utf-8"))
    return [case["text"] for case in golden["texts"]] * repeats


def timed_passes(tokenizer, texts: list[str], passes: int) -> tuple[list[float], list[list[int]]]:
    seconds, ids = [], None
    for _ in range(passes):
        start = time.perf_counter()
        ids = [tokenizer.encode(text) for text in texts]
        seconds.append(time.perf_counter() - start)
    return seconds, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-rev", default="b0c4593", help="git revision holding the hand-written tokenizer")
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--golden-repeats", type=int, default=200)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()

    reader = GGUFReader(smollm2_gguf_path())
    implementations = {}
    for name, cls in ((f"hand-written ({args.old_rev})", import_old(args.old_rev).Tokenizer), ("tokenizers", Tokenizer)):
        start = time.perf_counter()
        implementations[name] = cls.from_gguf(reader)
        print(f"{name}: built from the GGUF metadata in {time.perf_counter() - start:.2f} s", file=sys.stderr)

    corpora = {"preference": preference_texts(implementations["tokenizers"], args.pairs),
               "goldens": golden_texts(args.golden_repeats)}
    print("| corpus | texts | tokens | implementation | cold pass s | warm pass s | warm tokens/s | speed-up |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for corpus, texts in corpora.items():
        results = {}
        for name, tokenizer in implementations.items():
            results[name] = timed_passes(tokenizer, texts, args.passes)
        (old_seconds, old_ids), (new_seconds, new_ids) = results.values()
        if old_ids != new_ids:
            raise SystemExit(f"{corpus}: the two implementations give different ids")
        tokens = sum(map(len, new_ids))
        for name, (seconds, _) in results.items():
            warm = min(seconds[1:]) if len(seconds) > 1 else seconds[0]
            speedup = "" if seconds is old_seconds else f"{min(old_seconds[1:] or old_seconds) / warm:.1f}x"
            print(f"| {corpus} | {len(texts)} | {tokens} | {name} | {seconds[0]:.3f} | {warm:.3f} | "
                  f"{tokens / warm:,.0f} | {speedup} |")


if __name__ == "__main__":
    main()
