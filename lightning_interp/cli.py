"""The ``lightning-interp`` command: LightningCLI over DictionaryModule and a data module.

``lightning-interp fit --config recipes/quickstart.yaml`` trains; ``validate``, ``test`` and
``--print_config`` work as in any LightningCLI. Configs are parsed in omegaconf mode, so
``${model.init_args.dictionary.init_args.config.d_in}``-style interpolation resolves. The
model and the data are chosen by ``class_path`` (subclass mode): a
:class:`~lightning_interp.modules.DictionaryModule`, a
:class:`~lightning_interp.modules.MultiDictionaryModule`, or any LightningModule.

Commands that are not training runs (zoo publishing, conversion, ...) are plain functions
registered in :data:`EXTRA_COMMANDS`; :func:`main` dispatches to them before LightningCLI
parses anything, so each keeps its own small argparse parser and imports lazily.
"""

from __future__ import annotations

import importlib
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

# name -> "module:function"; the function takes the remaining argv and returns an exit code.
EXTRA_COMMANDS: dict[str, str] = {
    "publish": "lightning_interp.zoo.commands:publish",
    "pull": "lightning_interp.zoo.commands:pull",
    "card": "lightning_interp.zoo.commands:card",
    "convert": "lightning_interp.zoo.commands:convert",
    "zoo": "lightning_interp.zoo.commands:zoo",
}


class InterpCLI(LightningCLI):
    """LightningCLI with the library's defaults (omegaconf parsing, overwriting config saves)."""


def build_cli(args: list[str] | None = None) -> InterpCLI:
    """Parse ``args`` (default: ``sys.argv``) and run the subcommand; returns the CLI object.

    Args:
        args: Command-line arguments; tests pass a list.
    """
    return InterpCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def run_extra_command(name: str, args: list[str]) -> int:
    """Run the registered non-training command ``name`` with ``args``; returns its exit code."""
    module_name, function_name = EXTRA_COMMANDS[name].split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(args) or 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-interp`` console script (exit status 0 on success).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in EXTRA_COMMANDS:
        sys.exit(run_extra_command(args[0], args[1:]))
    if args and args[0] in ("-h", "--help"):
        extra = ", ".join(sorted(EXTRA_COMMANDS)) or "none"
        print(f"lightning-interp: training subcommands below; other commands: {extra}\n")
    # LightningCLI reads sys.argv itself when given None (and warns when given both).
    build_cli(argv)


if __name__ == "__main__":
    main()
