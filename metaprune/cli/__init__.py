"""The ``metaprune`` command line: a thin argparse front end over the library.

Each sub-module registers its commands (``register(subparsers)``) and imports the library only
when a command runs. Every :class:`~metaprune.errors.MetapruneError` is printed as one
``error: ...`` line with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from metaprune import __version__
from metaprune.cli import demo_cmd, export_cmd, graph_cmds, metanet_cmds, prune_cmds, spa_cmds, train_cmds
from metaprune.cli.common import MODEL_COMMANDS, add_arch, apply_config, arch_context, setup_runtime
from metaprune.errors import MetapruneError

RESUMABLE = ("zoo", "meta-train")  # long runs whose finished parts stay on failure
COMMAND_MODULES = (train_cmds, graph_cmds, prune_cmds, metanet_cmds, spa_cmds, export_cmd, demo_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="metaprune",
        description="Compress trained CNNs and ViTs: convert to graphs, edit with a metanetwork, "
        "prune structurally, adapt per task with Structured Pruning Adapters.",
    )
    parser.add_argument("--version", action="version", version=f"metaprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        mod.register(sub)
    for name in MODEL_COMMANDS:
        if name in sub.choices:
            add_arch(sub.choices[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metaprune`` command."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        if getattr(args, "command", None) is None:
            parser.print_help()
            return 2
        args = apply_config(parser, args, argv)
        setup_runtime(args)
        from metaprune.io import output_transaction

        with arch_context(args):  # --arch / --trust-code (commands that load a model file)
            if args.command in RESUMABLE:  # finished members / epochs are kept for the rerun
                return int(args.func(args) or 0)
            with output_transaction():  # a failed command removes the outputs it created
                return int(args.func(args) or 0)
    except MetapruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system failure outside the writers (full disk, permissions, I/O error)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}; free some space, fix the permissions or choose another path",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, nothing half-written was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
