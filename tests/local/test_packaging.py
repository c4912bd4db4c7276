"""Each image ships its role only: the worker image's `simpo-interleave worker` runs without the operator package,
and the operator image's `python -m simpo_operator` runs without the command-line package (local runner, demo)."""

import subprocess
import sys

BLOCK = "import sys; sys.modules[{blocked!r}] = None; sys.argv = {argv!r}; "


def run_without(blocked: str, code: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked, argv=argv) + code],
                          capture_output=True, text=True, timeout=120)


def test_the_worker_command_needs_no_operator_package():
    result = run_without("simpo_operator", "from simpo_interleave.cli import main; sys.exit(main())",
                         ["simpo-interleave", "worker", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_the_operator_entry_point_needs_no_command_line_package():
    result = run_without("simpo_interleave", "import runpy; runpy.run_module('simpo_operator', run_name='__main__')",
                         ["simpo_operator", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--peering" in result.stdout
