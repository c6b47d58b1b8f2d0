"""The ``lightning-interp`` command: LightningCLI over DictionaryModule and a data module.

``lightning-interp fit --config recipes/quickstart.yaml`` trains; ``validate``, ``test`` and
``--print_config`` work as in any LightningCLI. Configs are parsed in omegaconf mode, so
``${model.init_args.dictionary.init_args.config.d_latent}``-style interpolation resolves.
The model and the data are chosen by ``class_path`` (subclass mode): a
:class:`~lightning_interp.modules.DictionaryModule`, a
:class:`~lightning_interp.modules.MultiDictionaryModule`, or any LightningModule.

A dictionary's ``d_in`` (and a transcoder's ``d_out``) may be left out of a config: the
module fills them at setup from the data module's site widths
(:class:`~lightning_interp.data.source.ActivationSource`), with its provenance. This is not
done with ``link_arguments``: a link's target can no longer be set on the command line
(``--...config.d_in=16``) nor restored from a checkpoint's hyper-parameters, the widths are
known only once the data module has loaded its backbone, and a multi-dictionary run needs
one width per dictionary.

Commands that are not training runs (zoo publishing, conversion, ...) are plain functions
registered in :data:`EXTRA_COMMANDS`; :func:`main` dispatches to them before LightningCLI
parses anything, so each keeps its own small argparse parser and imports lazily.

Run defaults (each applies only where the config leaves the choice open): a
:class:`~lightning.pytorch.loggers.CSVLogger` under ``default_root_dir``; checkpoints in
``<default_root_dir>/checkpoints`` with a ``last.ckpt`` so ``--ckpt_path last`` resumes;
plain progress lines instead of a redrawn bar when stdout is not a terminal; no
third-party tips or deprecation warnings. A :class:`~lightning_interp.errors.LightningInterpError`
from any subcommand is printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from lightning_interp._commands import PROG, error_line
from lightning_interp.callbacks.progress import LogProgress
from lightning_interp.errors import (
    CheckpointError,
    ConfigError,
    LightningInterpDeprecationWarning,
    LightningInterpError,
)

# Lightning's own subcommands (LightningCLI.subcommands()).
TRAINING_COMMANDS: tuple[str, ...] = tuple(LightningCLI.subcommands())

# name -> "module:function"; the function takes the remaining argv and returns an exit code.
EXTRA_COMMANDS: dict[str, str] = {
    "publish": "lightning_interp.zoo.commands:publish",
    "pull": "lightning_interp.zoo.commands:pull",
    "card": "lightning_interp.zoo.commands:card",
    "convert": "lightning_interp.zoo.commands:convert",
    "zoo": "lightning_interp.zoo.commands:zoo",
    "features": "lightning_interp.features.commands:features",
    "evaluate": "lightning_interp.evals.commands:evaluate",
    "dashboard": "lightning_interp.features.dashboard:command",
    "neuronpedia": "lightning_interp.features.neuronpedia:command",
    "explain": "lightning_interp.autointerp.commands:explain",
    "attribute": "lightning_interp.circuits.commands:attribute",
    "intervene": "lightning_interp.circuits.intervene_command:intervene",
}

# Warnings about choices made on purpose, which say nothing about the run: the activation
# streams define __len__ and capture in the main process, a recipe that asks for the CPU
# means it, and the sparse decoder kernels use torch's (tested) beta CSR tensors.
_NOISE = (
    r".*IterableDataset.*has `__len__` defined",
    r".*does not have many workers",
    r".*GPU available but not used",
    r".*Sparse CSR tensor support is in beta",
)


def version() -> str:
    """The installed version of lightning-interp."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("lightning-interp")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from lightning_interp import __version__

        return __version__


def typed_error(err: BaseException) -> LightningInterpError | None:
    """``err`` if it is a library error, else the library error it was raised from.

    jsonargparse re-raises an error from a class's ``__init__`` as a ``ValueError`` listing
    every union member it tried (``raise ... from err``); the typed error is its cause.
    Only explicit causes are followed, so a bug raised while handling one is not masked.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, LightningInterpError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


class _DropTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... try installing litlogger")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡" not in record.getMessage()


def quiet_third_party_output() -> None:
    """No tips, no deprecation warnings and no redrawn download bars in the CLI's output.

    Third-party deprecations are for the library's developers (the test suite shows them); a
    user's log should show the run, and this library's own deprecations (a renamed class in
    a recipe, a setting that no longer does anything), which the user can act on. Warnings
    asked for with ``-W`` or ``PYTHONWARNINGS`` are left alone.
    """
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        # Inserted last, so matched first.
        warnings.filterwarnings("default", category=LightningInterpDeprecationWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    if not sys.stderr.isatty():
        # Hub and transformers redraw their bars with \r: one endless line in a log file.
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()
        _quiet_gguf_loading()


def _quiet_gguf_loading() -> None:
    """Silence the GGUF de-quantisation bar, which ignores ``disable_progress_bar``.

    transformers' GGUF loader (``modeling_gguf_pytorch_utils``, 5.x) calls a raw
    ``tqdm.auto.tqdm``: 272 redrawn frames on one line of the quickstart's log. It is given
    tqdm's own off switch; nothing else changes.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loading
    except ImportError:  # another transformers layout: nothing to silence
        return
    bar = getattr(gguf_loading, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_loading.tqdm = functools.partial(bar, disable=True)


def _accepts(class_path: str, argument: str) -> bool:
    """Whether the class at ``class_path`` takes ``argument`` in its constructor."""
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return argument in inspect.signature(cls.__init__).parameters


class InterpCLI(LightningCLI):
    """LightningCLI with the library's run defaults (see the module docstring).

    A top-level ``--optimizer`` (``--lr_scheduler``) is moved into the module's own
    ``optimizer`` (``lr_scheduler``) argument when it has one. LightningCLI would otherwise
    replace the module's ``configure_optimizers`` wholesale, silently dropping its warm-up
    and decay schedule and its per-dictionary parameter groups.
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then check a ``--ckpt_path`` file before LightningCLI reads it.

        Right after parsing, LightningCLI ``torch.load``s the file for its hyper-parameters,
        before any module code runs: a missing, empty or truncated file would end in a raw
        ``FileNotFoundError``, ``EOFError`` or zip-archive traceback.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        special = path in ("last", "best", "hpc") or str(path).startswith("registry")
        if path and not special and "://" not in str(path):
            if not Path(path).is_file():
                raise CheckpointError(
                    f"--ckpt_path {path}: no such file; pass a .ckpt file a ModelCheckpoint "
                    f"wrote (e.g. <default_root_dir>/checkpoints/last.ckpt) or 'last'"
                )
            from lightning_interp.modules.checkpoints import check_checkpoint_file

            check_checkpoint_file(path)

    def before_instantiate_classes(self) -> None:
        """Let dictionaries wait for their widths; route the optimizer into the module.

        A dictionary whose config leaves ``d_in`` open is handed to the module unbuilt; the
        module builds it at setup from its data module's site widths.
        """
        from lightning_interp.modules.dictionary_spec import defer_unsized_dictionaries

        defer_unsized_dictionaries(self.parser)
        config = self.config.get(str(self.subcommand), self.config)
        model = config.get("model")
        class_path = model.get("class_path") if model is not None else None
        if not class_path:
            return
        for key in ("optimizer", "lr_scheduler"):
            given = config.get(key)
            if given is None:
                continue
            name = class_path.rsplit(".", 1)[1]
            if not _accepts(class_path, key):
                if _accepts(class_path, "optimizer"):
                    raise ConfigError(
                        f"--{key} is not used by {name}, which has no {key} argument: remove "
                        f"--{key} (see model.init_args of {name} for its own options)"
                    )
                continue  # a plain LightningModule: LightningCLI's automatic handling
            model.init_args[key] = given
            config[key] = None
            print(
                f"{PROG}: --{key} {given.class_path} is used as model.init_args.{key}"
                f" (the module keeps its own schedule and parameter groups)",
                file=sys.stderr,
            )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with the run defaults added where the config left them open."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        root = str(config.get("default_root_dir") or os.getcwd())
        if config.get("logger") in (None, True):
            # Lightning's own default would be TensorBoard when it happens to be installed
            # (else CSV, with a warning): CSV is always there and readable by anything.
            kwargs["logger"] = CSVLogger(save_dir=root)
        callbacks = list(config.get("callbacks") or [])
        checkpointing = config.get("enable_checkpointing") is not False
        checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
        if checkpointing and not checkpoints:
            # As Lightning's default checkpoint, plus last.ckpt so `--ckpt_path last` works.
            callbacks.append(ModelCheckpoint(save_last=True))
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                # Lightning would put them under the logger's version_N folder, a new one
                # each run, where `--ckpt_path last` of the next run never looks.
                local = "://" not in root
                folder = os.path.join(os.path.realpath(root) if local else root, "checkpoints")
                callback.dirpath = folder
        bar_wanted = config.get("enable_progress_bar") is not False
        has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
        if bar_wanted and not has_bar and not sys.stdout.isatty():
            callbacks.append(LogProgress())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        """Refuse ``--ckpt_path last`` when the run keeps no checkpoint to resume from."""
        subcommand = self.config_init.get(str(self.subcommand))
        if subcommand is None or subcommand.get("ckpt_path") != "last":
            return
        callbacks = self.trainer.callbacks
        if not any(isinstance(c, ModelCheckpoint | OnExceptionCheckpoint) for c in callbacks):
            raise CheckpointError(
                "--ckpt_path last: this run saves no checkpoints (enable_checkpointing is "
                "false); pass a checkpoint file, or enable checkpointing and train first"
            )


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
        # prog: the usage line names the command, not the interpreter's argv[0].
        parser_kwargs={"parser_mode": "omegaconf", "prog": PROG},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def run_extra_command(name: str, args: list[str]) -> int:
    """Run the registered non-training command ``name`` with ``args``; returns its exit code."""
    module_name, function_name = EXTRA_COMMANDS[name].split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(args) or 0)


def _usage() -> str:
    return f"usage: {PROG} {{{','.join((*TRAINING_COMMANDS, *EXTRA_COMMANDS))}}} ..."


def _unknown_command(name: str | None) -> int:
    """Print what a mistyped (or missing) command could have been, and every command.

    Returns:
        The exit code, 2 (a usage error, as argparse's).
    """
    if name is None:
        problem = "a command is required"
    else:
        close = difflib.get_close_matches(name, (*TRAINING_COMMANDS, *EXTRA_COMMANDS), n=1)
        problem = f"unknown command {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    print(_usage(), file=sys.stderr)
    print(
        f"{PROG}: error: {problem}; training: {', '.join(TRAINING_COMMANDS)}; "
        f"other: {', '.join(EXTRA_COMMANDS)}",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-interp`` console script (exit status 0 on success).

    Library errors (:class:`~lightning_interp.errors.LightningInterpError`) end the command
    with one line on stderr and exit status 2; configuration errors print the usage and
    exit with 2 (jsonargparse); anything else is a bug and keeps its traceback.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    first = args[0] if args else None
    if first in ("--version", "-V"):
        print(f"{PROG} {version()}")
        sys.exit(0)
    if first in EXTRA_COMMANDS:
        quiet_third_party_output()  # `features`, `explain`... load models too
        sys.exit(run_extra_command(first, args[1:]))
    if first is None or (not first.startswith("-") and first not in TRAINING_COMMANDS):
        sys.exit(_unknown_command(first))
    if first in ("-h", "--help"):
        print(f"{PROG}: training subcommands below; other commands: {', '.join(EXTRA_COMMANDS)}\n")
    quiet_third_party_output()
    try:
        # LightningCLI reads sys.argv itself when given None (and warns when given both).
        build_cli(argv)
    except Exception as err:
        typed = typed_error(err)
        if typed is None:
            raise
        command = first if first in TRAINING_COMMANDS else None
        print(error_line(command, typed), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
