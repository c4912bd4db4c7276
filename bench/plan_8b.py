"""`simpo-interleave plan` on the full Llama-3-8B reference job: the example manifest
(manifests/examples/llama3-8b-m11-v5p-32.yaml) with its model source pointed at a directory holding only Llama-3-8B's
config.json (bench/llama3-8b-config.json: 32 layers; no weights), compiled for each slice asked for.

    python bench/plan_8b.py [--slices v5p-32 v6e-16 v5litepod-16 2xv5p-16] [--json-dir DIR] [--set KEY=VALUE ...]

Each slice is planned in its own process (its printed table and compile time follow). Exits with the first slice's
plan exit code: 0 it fits, 10 it does not. `--set trainer.remat=none trainer.attention=dense
trainer.loss_chunk_tokens=0` plans the train step as it was first measured (no memory savings): it does not fit.
A full 8B plan compiles for a long time on a small machine: the decode programs unroll their 32 layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "manifests" / "examples" / "llama3-8b-m11-v5p-32.yaml"
CONFIG = REPO / "bench" / "llama3-8b-config.json"


def job_for(slice_name: str, model_dir: Path, settings: list[str] = ()) -> dict:
    """The example job on `slice_name` ("v6e-16", or "2xv5p-16" for two slices: data over the slices, FSDP within
    each), its model the local config, with `settings` ("trainer.remat=none") applied to spec.config."""
    job = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    for setting in settings:
        key, _, value = setting.partition("=")
        *parents, last = key.split(".")
        node = job["spec"]["config"]
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = yaml.safe_load(value)
    count, _, accelerator = slice_name.partition("x")
    if not count.isdigit():
        count, accelerator = "1", slice_name
    job["spec"]["tpu"] = {"type": accelerator, "slices": int(count)}
    if int(count) > 1:  # the slices split `data` (over DCN); FSDP stays within each slice
        job["spec"]["config"]["trainer"]["mesh"] = {"data": int(count), "fsdp": -1}
    job["spec"]["config"]["model"]["source"] = str(model_dir)
    job["metadata"]["name"] = f"m11-llama3-8b-{slice_name}"
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", nargs="+", default=["v5p-32"])
    parser.add_argument("--json-dir", type=Path, default=None, help="also write each plan's --json object here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override spec.config settings, e.g. trainer.remat=none trainer.attention=dense "
                             "trainer.loss_chunk_tokens=0 (the train step as first measured: no memory savings)")
    args = parser.parse_args(argv)
    codes = []
    with tempfile.TemporaryDirectory(prefix="llama3-8b-") as folder:
        model_dir = Path(folder) / "Meta-Llama-3-8B-Instruct"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(CONFIG.read_text())
        for slice_name in args.slices:
            path = Path(folder) / f"{slice_name}.yaml"
            path.write_text(yaml.safe_dump(job_for(slice_name, model_dir, args.set), sort_keys=False))
            print(f"==== {slice_name} ====", flush=True)
            started = time.perf_counter()
            command = [sys.executable, "-m", "simpo_interleave.cli", "plan", str(path), "--json"]
            result = subprocess.run(command, capture_output=True, text=True)
            codes.append(result.returncode)
            if result.returncode not in (0, 10):
                # libtpu's start-up warnings first, then the error: show where the traceback begins.
                start = result.stderr.find("Traceback")
                print(result.stderr[max(start, 0):][:6000], file=sys.stderr)
                continue
            plan = json.loads(result.stdout)
            if args.json_dir:
                args.json_dir.mkdir(parents=True, exist_ok=True)
                (args.json_dir / f"{slice_name}.json").write_text(json.dumps(plan, indent=2))
            from simpo_interleave.plan import does_not_fit_message, render
            print(render(plan))
            if result.returncode:
                print(does_not_fit_message(plan))
            print(f"plan exit {result.returncode}; {time.perf_counter() - started:.0f} s wall for this slice", flush=True)
    return codes[0] if codes else 2


if __name__ == "__main__":
    sys.exit(main())
