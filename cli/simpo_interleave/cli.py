"""`simpo-interleave <command>`: one console script; each command's module is imported only when used,
so the worker image never imports the operator's dependencies and vice versa.

A command module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from simpo_worker.contract.errors import NonRetryableError

COMMANDS = {
    "demo": ("simpo_interleave.demo", "run the reference workflow locally on SmolLM2 (train 2, infer, train 5)"),
    "local": ("simpo_interleave.local_runner", "run a SimpoInterleaveJob YAML as N local host processes"),
    "worker": ("simpo_worker.main", "run one host's worker (what each pod runs)"),
    "render": ("simpo_operator.render", "print the ConfigMap and JobSet the operator creates for a job YAML"),
    "plan": ("simpo_interleave.plan", "compile a job for its TPU slice without one: does it fit, how fast will it run"),
    "operator": ("simpo_operator.main", "run the kopf operator"),
    "crd": ("simpo_operator.crd", "print the generated CustomResourceDefinition YAML"),
}


def usage() -> str:
    lines = ["usage: simpo-interleave <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"simpo-interleave: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"simpo-interleave {argv[0]}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except NonRetryableError as error:
        print(f"simpo-interleave {argv[0]}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
