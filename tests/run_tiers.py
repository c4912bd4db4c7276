"""`make test`: every phase of the test command, timed, each held to its budget.

Runs with the system's python3 (standard library only: the venv does not exist yet on a fresh machine). Phases in
order: install (the venv), the control plane's Go programs, the import layers (import-linter), then the test
tiers, one pytest session each, stage by stage: a stage's tiers run at once (a tier that mostly waits on its
control plane beside one that computes). Prints each phase's wall time against its budget, the machine's load,
the slowest tests of the whole run (from each tier's JUnit XML) and one closing count line. Exits non-zero when a
phase fails, a test fails or skips, or a tier's wall time passes its budget by more than `OVER_BUDGET` (CI's
90-minute limit is a hard one: a tier that creeps up is named here before the whole run falls over it). Stages,
tiers and budgets live in pyproject.toml, `[tool.simpo-interleave.ci]`.

    python3 tests/run_tiers.py [--tier NAME ...] [pytest args...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from session_cache import COMPILATION_CACHE_ENV  # beside this file: tests/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
OVER_BUDGET = 1.5  # a phase fails the run past 1.5x its budget
SLOWEST = 30


@dataclass
class Phase:
    name: str
    budget_s: float | None  # None: reported, not held to a budget (a fresh machine's install and Go builds)
    seconds: float = 0.0
    code: int | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def over_budget(self) -> bool:
        return self.budget_s is not None and self.seconds > OVER_BUDGET * self.budget_s


def load_ci() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["simpo-interleave"]["ci"]


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def run_phase(phase: Phase, argv: list[str]) -> None:
    print(f"\n=== {phase.name}: {' '.join(argv)}  (load {load_average()})", flush=True)
    start = time.monotonic()
    phase.code = subprocess.run(argv, cwd=REPO).returncode
    phase.seconds = time.monotonic() - start


def run_stage(tiers: list[tuple[Phase, list[str], Path]], env: dict[str, str]) -> None:
    """The stage's tiers at once, each its own pytest session; a tier's output is printed whole when it ends."""
    running = []
    for phase, argv, log in tiers:
        print(f"\n=== {phase.name} started: {' '.join(argv)}  (load {load_average()})", flush=True)
        handle = log.open("w")
        running.append((phase, handle, log, time.monotonic(),
                        subprocess.Popen(argv, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)))
    while running:
        for item in list(running):
            phase, handle, log, start, process = item
            if process.poll() is None:
                continue
            phase.seconds, phase.code = time.monotonic() - start, process.returncode
            handle.close()
            print(f"\n=== {phase.name} ended in {phase.seconds:.0f} s, exit {phase.code} (load {load_average()})")
            print(log.read_text(), end="", flush=True)
            running.remove(item)
        time.sleep(1)


def junit_cases(path: Path) -> list[tuple[float, str, str]]:
    """(seconds, outcome, test id) of each test case; pytest's junit `time` is setup + call + teardown."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        cases.append((float(case.get("time", 0)), outcome, name))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", action="append", help="run only these tiers (default: every stage's)")
    args, pytest_args = parser.parse_known_args(argv)
    ci = load_ci()
    tiers, stages = ci["tiers"], ci["stages"]
    unknown = set(args.tier or []) - set(tiers)
    if unknown:
        parser.error(f"unknown tier(s) {sorted(unknown)}; tiers: {list(tiers)}")
    if args.tier:
        stages = [[name for name in stage if name in args.tier] for stage in stages]

    phases: list[Phase] = []
    setup = [("install", ["make", "install"]), ("control-plane", ["make", "control-plane"]),
             ("import-layers", ["make", "lint-imports"])]
    for name, command in setup:
        phase = Phase(name, None)
        phases.append(phase)
        run_phase(phase, command)
        if phase.code != 0:
            return report(phases, [], f"{name} failed (exit {phase.code})")

    reports = Path(tempfile.mkdtemp(prefix="simpo-tiers-"))
    # One persistent compilation cache for every process of the run: pytest's and its xdist workers' own
    # programs and every single-process worker it starts (tests/conftest.py, tests/session_cache.py).
    env = {**os.environ, COMPILATION_CACHE_ENV: str(reports / "jax-compilation-cache")}
    junits = []
    for stage in filter(None, stages):
        runs = []
        for name in stage:
            tier = tiers[name]
            phase = Phase(f"tier {name}", tier["budget_s"])
            phases.append(phase)
            junit = reports / f"{name}.xml"
            junits.append((phase, junit))
            workers = (["-n", str(tier["workers"]), "--dist", tier.get("dist", "load")]
                       if tier.get("workers", 1) > 1 else [])
            runs.append((phase, [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                                 f"--junitxml={junit}", "-o", "junit_duration_report=total", *tier["paths"],
                                 *pytest_args], reports / f"{name}.log"))
        run_stage(runs, env)
    if os.path.isdir(env[COMPILATION_CACHE_ENV]):
        shutil.rmtree(env[COMPILATION_CACHE_ENV])
    cases: list[tuple[float, str, str]] = []
    for phase, junit in junits:
        if not junit.exists():
            phase.code = phase.code or 1  # no report: never counted as a pass
            continue
        tier_cases = junit_cases(junit)
        cases += tier_cases
        for _, outcome, _ in tier_cases:
            phase.counts[outcome] = phase.counts.get(outcome, 0) + 1
    return report(phases, cases)


def report(phases: list[Phase], cases: list[tuple[float, str, str]], failure: str | None = None) -> int:
    print(f"\n=== {SLOWEST} slowest tests of the run (setup + call + teardown)")
    for seconds, outcome, name in sorted(cases, reverse=True)[:SLOWEST]:
        print(f"{seconds:8.1f}s  {outcome:7s}  {name}")
    print(f"\n=== phases (load now {load_average()}, {os.cpu_count()} CPUs)")
    print(f"{'phase':20s} {'wall s':>8s} {'budget s':>9s} {'limit s':>8s}  result")
    problems = [failure] if failure else []
    for phase in phases:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(phase.counts.items()))
        result = "ok" if phase.code == 0 else f"exit {phase.code}"
        if phase.over_budget:
            result += " OVER BUDGET"
            problems.append(f"{phase.name} took {phase.seconds:.0f} s, more than {OVER_BUDGET}x its budget of "
                            f"{phase.budget_s:.0f} s (pyproject.toml [tool.simpo-interleave.ci])")
        elif phase.code not in (0, None):
            problems.append(f"{phase.name} failed (exit {phase.code})")
        budget, limit = (("-", "-") if phase.budget_s is None
                         else (f"{phase.budget_s:.0f}", f"{OVER_BUDGET * phase.budget_s:.0f}"))
        print(f"{phase.name:20s} {phase.seconds:8.0f} {budget:>9s} {limit:>8s}  "
              f"{result}{'  (' + counts + ')' if counts else ''}")
    print(f"{'total':20s} {sum(p.seconds for p in phases):8.0f}")
    passed = sum(1 for _, outcome, _ in cases if outcome == "passed")
    failed = sum(1 for _, outcome, _ in cases if outcome == "failed")
    skipped = [name for _, outcome, name in cases if outcome == "skipped"]
    if skipped:
        problems.append(f"{len(skipped)} test(s) skipped, and no test may skip here: {', '.join(skipped[:10])}")
    for problem in dict.fromkeys(problems):
        print(f"FAILED: {problem}", file=sys.stderr)
    print(f"tests: {passed} passed, {failed} failed" + (f", {len(skipped)} skipped" if skipped else ""))
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
