"""Encode speed of the worker's tokenizer (HF `tokenizers`) against the hand-written byte-level BPE it replaced,
read from git at --old-rev and imported under another name. Both are loaded from SmolLM2's GGUF (one GGUFReader,
so metadata parsing is not counted) and encode the same texts one call per text, as the worker does.

    python bench/bench_tokenizer.py [--old-rev b0c4593] [--pairs 2048] [--golden-repeats 200] [--passes 3]

(needs `regex`, which the old implementation imports: `make install-peers`)

Corpora: `preference` is the project's generated preference data as PreferenceData encodes it (per answer: the
chat-rendered prompt and the answer's text); `goldens` is the tokenizer goldens' texts (tests/goldens/
tokenizer_smollm2.json: multilingual, emoji, code, whitespace runs) repeated; `repo` is this repository's own
tracked .py and .md files, one text each (mostly distinct words: the case a cache helps least).

Pass 1 is timed with a cold cache (the old implementation caches each pre-tokenized piece's BPE, and so does
`tokenizers`' BPE); "warm" is the best of the later passes. Both by CPU time (this process's, all threads) and
wall-clock: on a shared machine wall-clock mostly measures the neighbours, so speed-ups are by CPU time. A third
row is `tokenizers`' own batch call (encode_batch_fast: no offsets, threads), which the worker does not use; it
shares the BPE cache of the row above, so its pass 1 is not cold. All must give the same ids, or the script fails.
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

from simpo_worker.data.make_preference_data import generate
from simpo_worker.data.tokenizer import Tokenizer
from simpo_worker.weights.smollm2 import smollm2_gguf_path

REPO = Path(__file__).resolve().parents[1]


# The old tokenizer's imports, moved since to the worker's packages by role.
MOVED_IMPORTS = {"simpo_worker.chat_template": "simpo_worker.data.chat_template",
                 "simpo_worker.config": "simpo_worker.contract.config",
                 "simpo_worker.errors": "simpo_worker.contract.errors",
                 "simpo_worker.smollm2": "simpo_worker.weights.smollm2"}


def import_old(rev: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:worker/simpo_worker/tokenizer.py"],
                            check=True, capture_output=True, text=True).stdout
    for old, new in MOVED_IMPORTS.items():
        source = source.replace(f"from {old} import", f"from {new} import")
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


def repo_texts() -> list[str]:
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.py", "*.md"], check=True, capture_output=True,
                           text=True).stdout.split()
    return [(REPO / name).read_text(encoding="utf-8") for name in names if (REPO / name).is_file()]


def timed_passes(encode_all, texts: list[str], passes: int) -> tuple[list[tuple[float, float]], list[list[int]]]:
    """((wall s, CPU s) per pass, the ids)."""
    seconds, ids = [], None
    for _ in range(passes):
        wall, cpu = time.perf_counter(), time.process_time()
        ids = encode_all(texts)
        seconds.append((time.perf_counter() - wall, time.process_time() - cpu))
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
    classes = {f"hand-written ({args.old_rev})": import_old(args.old_rev).Tokenizer, "tokenizers": Tokenizer}
    for name, cls in classes.items():
        start = time.perf_counter()
        implementations[name] = cls.from_gguf(reader)
        print(f"{name}: built from the GGUF metadata in {time.perf_counter() - start:.2f} s", file=sys.stderr)

    backend = implementations["tokenizers"].backend
    encoders = {name: lambda texts, tok=tok: [tok.encode(text) for text in texts]
                for name, tok in implementations.items()}
    encoders["tokenizers encode_batch_fast"] = lambda texts: [
        encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    corpora = {"preference": preference_texts(implementations["tokenizers"], args.pairs),
               "goldens": golden_texts(args.golden_repeats), "repo": repo_texts()}
    print("| corpus | texts | tokens | implementation | cold CPU s | warm CPU s | warm wall s | warm tokens/CPU s "
          "| speed-up warm (cold) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for corpus, texts in corpora.items():
        results = {name: timed_passes(encode_all, texts, args.passes) for name, encode_all in encoders.items()}
        (old_seconds, old_ids), *others = results.values()
        if any(ids != old_ids for _, ids in others):
            raise SystemExit(f"{corpus}: the implementations give different ids")
        tokens = sum(map(len, old_ids))
        old_cpu = min(cpu for _, cpu in old_seconds[1:] or old_seconds)
        for name, (seconds, _) in results.items():
            warm = seconds[1:] or seconds
            wall, cpu = min(w for w, _ in warm), min(c for _, c in warm)
            cold = seconds[0][1]
            speedup = "" if seconds is old_seconds else f"{old_cpu / cpu:.2f}x ({old_seconds[0][1] / cold:.2f}x)"
            print(f"| {corpus} | {len(texts)} | {tokens} | {name} | {cold:.3f} | {cpu:.3f} | {wall:.3f} | "
                  f"{tokens / cpu:,.0f} | {speedup} |")


if __name__ == "__main__":
    main()
