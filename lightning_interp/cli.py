"""The ``lightning-interp`` command: LightningCLI over DictionaryModule and a data module.

``lightning-interp fit --config recipes/quickstart.yaml`` trains; ``validate``, ``test`` and
``--print_config`` work as in any LightningCLI. Configs are parsed in omegaconf mode, so
``${model.dictionary.init_args.config.d_in}``-style interpolation resolves.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_interp.modules import DictionaryModule


class InterpCLI(LightningCLI):
    """LightningCLI with the library's defaults (omegaconf parsing, overwriting config saves)."""


def build_cli(args: list[str] | None = None) -> InterpCLI:
    """Parse ``args`` (default: ``sys.argv``) and run the subcommand; returns the CLI object.

    Args:
        args: Command-line arguments; tests pass a list.
    """
    return InterpCLI(
        DictionaryModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main() -> None:
    """Entry point of the ``lightning-interp`` console script (exit status 0 on success)."""
    build_cli()


if __name__ == "__main__":
    main()
