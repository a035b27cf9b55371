"""Command line of the offline tools: `python -m models <command> ...`.

    python -m models build-default --out var/models/default [--seed 0]
        [--head-init-std 0.001] [--force]
    python -m models train --run-dir runs/fold1 --csv-dir CSV --images DATA --fold 1 [...]
    python -m models export runs/fold1/best.keras --out var/models/fold1
    python -m models evaluate var/models/fold1 --out reports/fold1
        [--csv-dir CSV --images DATA --fold 1] [--patients RAW] [--covid-ct-md DIR]
    python -m models import-weights FPN-fold1.hdf5 --out var/models/paper-fold1
    python -m models verify-import FPN-fold1.hdf5 var/models/paper-fold1 [--dicom-dir DIR]
    python -m models explain --model var/models/fold1 --study study.zip --out explained/

`python -m models COMMAND --help` documents each command's options.

Each command is a pair of functions: one adds its subparser, one runs it and returns the
exit status. Add a command by appending its `_add_*` function to COMMANDS.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from models import checkpoint, evaluate, explain_offline, import_weights, train, verify_import

# Not __name__: run with -m, that is "__main__".
logger = logging.getLogger("models.cli")


# --- build-default ---------------------------------------------------------------------------


def _add_build_default(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "build-default",
        help="export the UNTRAINED network as the default SavedModel (plumbing only)",
        description="Build the network with random weights and export it with a model "
        "card that says it is untrained. Skips when OUT already holds a valid export.",
    )
    p.add_argument("--out", type=Path, default=Path("var/models/default"), help="directory")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument(
        "--head-init-std",
        type=float,
        default=0.001,
        help="std of the head dense kernels' normal init (paper: 0.001)",
    )
    p.add_argument("--version", default=None, help="model card version")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT exists")
    p.set_defaults(run=_run_build_default)


def _run_build_default(args: argparse.Namespace) -> int:
    from app.contract import read_card

    out: Path = args.out
    overwrite = args.force
    if out.exists() and not args.force:
        try:
            card = read_card(out)
        except (OSError, ValueError) as e:
            logger.error("%s exists but holds no valid model card (%s); use --force", out, e)
            return 1
        if not (card.untrained and card.preprocessing is None):
            print(f"{out} already holds model {card.version} ({card.weights_source}); skipped")
            return 0
        # An untrained default from before the network took its input unscaled (its card
        # states no preprocessing; its graph divides each slice by its maximum): replace it.
        logger.warning("%s holds an untrained model of the earlier network; rebuilding", out)
        overwrite = True
    from models.export import build_default, directory_size

    path = build_default(
        out,
        seed=args.seed,
        head_init_std=args.head_init_std,
        version=args.version,
        overwrite=overwrite,
    )
    card = read_card(path)
    print(
        f"built UNTRAINED model {card.version} at {path}: {card.parameters:,} parameters, "
        f"{directory_size(path) / 1e6:.1f} MB"
    )
    return 0


# --- the command line ---------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    _add_build_default,
    train.add_train_command,
    checkpoint.add_command,
    evaluate.add_command,
    import_weights.add_command,
    verify_import.add_command,
    explain_offline.add_command,
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
