"""The ``fastkd`` command: ``python -m fastkd demo`` (or ``fastkd demo``)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd: fused kernels for knowledge distillation")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show the tempered softmax, the first op of fastkd, at work")
    parser.parse_args(argv)
    from fastkd.demo import run

    run()


if __name__ == "__main__":
    main()
