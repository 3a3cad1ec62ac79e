"""The ``fastkd`` command: ``fastkd demo`` (or ``python -m fastkd demo``); ``--help`` lists the options.

Parsing the command line imports nothing beyond fastkd itself (and torch): ``fastkd --help`` and
``fastkd --version`` work without the ``demo`` extra, and ``fastkd demo`` without it says what to
install.
"""

from __future__ import annotations

import argparse

import fastkd


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    from fastkd.demo import missing_requirements
    from fastkd.demo.data import DATASETS
    from fastkd.demo.experiment import Config  # no third-party import: those wait for the run

    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd: fused kernels for knowledge distillation")
    parser.add_argument("--version", action="version", version=f"fastkd {fastkd.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="distill a real model end to end: teacher, calibration, five students, fidelity, report",
        description="Train an over-confident teacher, calibrate it, distill students five ways and write a report. "
        "Needs scikit-learn, matplotlib and tqdm (the `demo` extra).",
    )
    default = Config()
    demo.add_argument("--dataset", choices=DATASETS, default=default.dataset,
                      help="digits (bundled with scikit-learn) or a torchvision data set already on disk")  # fmt: skip
    demo.add_argument("--data-root", help="the folder holding --dataset cifar10 / fashion-mnist (never downloaded)")
    demo.add_argument("--seeds", type=_positive, default=default.seeds, help="student seeds (mean ± std)")
    demo.add_argument("--epochs", type=_positive, default=default.epochs, help="epochs of each student")
    demo.add_argument("--teacher-epochs", type=_positive, default=default.teacher_epochs, help="epochs of the teachers")
    demo.add_argument("--labeled", type=_positive, help="labeled train rows for the students (digits: 200)")
    demo.add_argument("--out", default="runs/demo", help="the report's folder (default: runs/demo)")
    demo.add_argument("--device", help="a torch device (default: cuda when available, else cpu)")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke test of a few seconds (2 seeds, 1 epoch each, one CPU thread): "
                      "checks that the pipeline runs; its numbers are not results")  # fmt: skip
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    missing = missing_requirements(args.dataset)
    if missing:
        parser.exit(
            2,
            f"fastkd demo: error: the demo needs {', '.join(missing)}, not installed here. Install the "
            f"`demo` extra: pip install {' '.join(missing)} (or, from a clone of fastkd: pip install '.[demo]')\n",
        )

    import torch

    from fastkd.demo import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = Config(dataset=args.dataset, data_root=args.data_root, labeled=args.labeled, seeds=args.seeds,
                    epochs=args.epochs, teacher_epochs=args.teacher_epochs, device=device, quiet=args.quiet)  # fmt: skip
    try:
        run(config, out=args.out, quick=args.quick)
    except (FileNotFoundError, ImportError, ValueError) as error:
        parser.exit(2, f"fastkd demo: error: {error}\n")


if __name__ == "__main__":
    main()
