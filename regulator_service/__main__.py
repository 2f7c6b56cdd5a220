"""``python -m regulator_service [serve flags]``: the server alone, without the client commands."""

import argparse
import sys

from . import serve

parser = argparse.ArgumentParser(prog="python -m regulator_service")
serve.add_arguments(parser)
sys.exit(serve.run(parser.parse_args()))
