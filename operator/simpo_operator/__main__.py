"""`python -m simpo_operator`: the operator image's entry point. That image installs the controller and the
worker-config schema only (no local runner, demo or `simpo-interleave` command line)."""

import argparse
import sys

from simpo_operator import main

parser = argparse.ArgumentParser(prog="python -m simpo_operator", description="run the kopf operator")
main.add_arguments(parser)
sys.exit(main.run(parser.parse_args()))
