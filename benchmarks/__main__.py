"""``python -m benchmarks``: time fastkd against its baselines and write the results (``--help``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.cases import CASES
from benchmarks.report import tables, write
from benchmarks.runner import CPU_SHAPES, GPU_SHAPES, QUICK_SHAPES, run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shape(text: str) -> tuple[int, int]:
    rows, width = text.lower().split("x")
    return int(rows), int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes, short timings, no torch.compile on CPU")
    parser.add_argument("--device", help="a torch device (default: cuda when available, else cpu)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="default: bfloat16 and float32 on CUDA, float32 on the CPU")  # fmt: skip
    parser.add_argument("--shapes", nargs="+", type=_shape, help="ROWSxWIDTH ... (default: by device)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per shape")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES if cuda else CPU_SHAPES)
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    rounds = 1 if args.quick else args.rounds
    results = run(args.cases, shapes, dtypes, device, rounds, args.quick)
    paths = write(results, args.out)
    print(tables(results))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))


if __name__ == "__main__":
    main()
