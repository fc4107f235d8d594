"""The command-line options every example shares: where to run (--device, --backend) and the seed.

Argument parsing only; each example adds its own options and does its own work.
"""

import argparse


def example_parser(doc: str, seed_help: str = "initial weights") -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc`` (the example's docstring, shown in full after the options)."""
    summary, _, details = doc.partition("\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu",
                        help='"cpu" (default), "cuda", "cuda:N", or the backend\'s own device name (e.g. device1)')
    parser.add_argument("--backend", default=None,
                        help="numpy, cupy, torch or array_api_strict (default: chosen from --device)")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    return parser
