"""``lightning-interp publish | pull | card | convert | zoo``: the zoo's command-line tools.

Each command is a function taking its argv (without the command name) and returning an
exit code; :mod:`lightning_interp.cli` dispatches to them. Library errors become one line
on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from lightning_interp._commands import run_command

Command = Callable[[list[str]], int]


def _command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Command]:
    """Wrap ``run(args)`` with argument parsing and typed-error reporting."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Command:
        @functools.wraps(run)
        def command(argv: list[str]) -> int:
            return run_command(name, PARSERS[name](), run, argv)

        return command

    return decorate


def _card_data(args: argparse.Namespace) -> dict[str, str]:
    return {"license": args.license} if args.license else {}


def _add_evaluation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--evaluation",
        help="a `lightning-interp evaluate --out` JSON to show in the card (and publish as "
        "evaluation.json); an evaluation.json beside the dictionary is used without this",
    )


def _evaluation_kwargs(args: argparse.Namespace, head: bool) -> dict[str, str]:
    from lightning_interp.errors import ConfigError

    if args.evaluation and head:
        raise ConfigError("--evaluation is for dictionaries; a concept head's card has no evals")
    return {"evaluation": args.evaluation} if args.evaluation else {}


# ---------------------------------------------------------------------------- parsers
def _publish_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp publish",
        description="Publish a training run (or dictionary folder) to the Hugging Face Hub as "
        "one commit: a folder per site, config.json + model.safetensors each, and a card.",
    )
    parser.add_argument(
        "dir", help="run folder (<run>/dictionary or <run>/<name>/dictionary) or a head folder"
    )
    parser.add_argument("--repo-id", required=True, help="target repo, org/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to commit to (created if missing)")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--license", help="license id for the card, e.g. apache-2.0")
    parser.add_argument("--message", help="commit message")
    _add_evaluation(parser)
    return parser


def _pull_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp pull",
        description="Download one dictionary (Hub repo, zoo: id or folder) and save it as a "
        "native folder.",
    )
    parser.add_argument("source", help="org/name, zoo:<release>/<id>, or a local folder")
    parser.add_argument("dir", nargs="?", help="output folder (default: ./<name>[/<site>])")
    parser.add_argument("--site", help="which dictionary of a multi-site source")
    parser.add_argument("--subfolder", help="exact folder inside the repo")
    parser.add_argument("--revision", help="branch, tag or commit sha")
    parser.add_argument("--format", default="auto", help="source format (default: detect)")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    return parser


def _card_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp card",
        description="Render the model card publishing DIR would write (stdout, or --output).",
    )
    parser.add_argument("dir", help="run, dictionary or concept-head folder")
    parser.add_argument("--repo-id", default="<org>/<repo>", help="repo the card is for")
    parser.add_argument("--license", help="license id for the card")
    parser.add_argument("--output", "-o", help="write the card to this file")
    _add_evaluation(parser)
    return parser


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp convert",
        description="Convert a dictionary folder between formats (never unpickles).",
    )
    parser.add_argument("src", help="source dictionary folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--from", dest="from_format", default="auto", help="default: detect")
    parser.add_argument("--to", dest="to_format", default="native", help="default: native")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dictionary already in DST"
    )
    return parser


def _zoo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-interp zoo", description="Browse the catalogue of public releases."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser(
        "list",
        help="one line per release (filters combine)",
        description="One line per release: its number of matching dictionaries, format, "
        "backbone, architecture and title. Filters combine; patterns may be globs.",
    )
    listing.add_argument(
        "--backbone", help="Hub id or model name, e.g. gpt2, google/gemma-2-2b, 'gemma-2-*'"
    )
    listing.add_argument(
        "--site",
        help="site read (or, for a transcoder, written): layers.8.resid_post, a kind such as "
        "resid_post or attn_z, or a glob; lists only the matching dictionaries' count",
    )
    listing.add_argument("--architecture", help="standard, topk, jumprelu, gated, ...")
    listing.add_argument("--kind", choices=("sae", "transcoder", "skip_transcoder"))
    listing.add_argument(
        "--format", help="a format name, or 'loadable' for releases lightning-interp can read"
    )
    show = sub.add_parser("show", help="a release's dictionaries and published metrics")
    show.add_argument("id", help="release id (or zoo:<release>)")
    return parser


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "publish": _publish_parser,
    "pull": _pull_parser,
    "card": _card_parser,
    "convert": _convert_parser,
    "zoo": _zoo_parser,
}


# ---------------------------------------------------------------------------- commands
@_command("publish")
def publish(args: argparse.Namespace) -> int:
    """``lightning-interp publish DIR --repo-id ORG/NAME`` (a run, dictionary or head folder)."""
    from lightning_interp.concepts.base import is_head_folder
    from lightning_interp.zoo.heads import publish_head_folder
    from lightning_interp.zoo.publish import publish_run

    # Heads and native dictionaries share file names: the config's format tells them apart.
    head = is_head_folder(args.dir)
    publish_folder = publish_head_folder if head else publish_run
    result = publish_folder(
        args.dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        card_data=_card_data(args),
        commit_message=args.message,
        **_evaluation_kwargs(args, head),
    )
    print(f"published {args.dir} to {result.repo_id} @ {result.commit}")
    print(result.url)
    return 0


def _default_pull_dir(args: argparse.Namespace) -> Path:
    """``./<repo name>[/<site>]``, or ``./<release>/<id>`` for a catalogue id.

    Each level comes from an argument, so each is checked to be one plain folder name: a
    ``--site ..`` or a repo named ``..`` cannot make the default point elsewhere.
    """
    from lightning_interp._io import check_folder_name

    if args.source.startswith("zoo:"):
        release, _, name = args.source.removeprefix("zoo:").partition("/")
        folder = check_folder_name(release, "release")
    else:
        repo_name = args.source.removeprefix("hf://").rstrip("/").rsplit("/", 1)[-1]
        folder = check_folder_name(repo_name, "repo name")
        name = ""
    name = args.site or args.subfolder or name
    if not name:
        return Path(folder)
    return Path(folder, check_folder_name(name.strip("/").replace("/", "_"), "site"))


@_command("pull")
def pull(args: argparse.Namespace) -> int:
    """``lightning-interp pull SOURCE [DIR] [--site SITE]``."""
    from lightning_interp.zoo.formats import write_folder
    from lightning_interp.zoo.load import load_dictionary

    target = Path(args.dir) if args.dir else _default_pull_dir(args)  # checked before download
    dictionary = load_dictionary(
        args.source,
        site=args.site,
        subfolder=args.subfolder,
        revision=args.revision,
        format=args.format,
        token=args.token,
    )
    folder = write_folder(dictionary, target)
    revision = dictionary.config.provenance.revision
    print(
        f"saved {dictionary.architecture} (d_in={dictionary.d_in}, d_latent={dictionary.d_latent})"
    )
    print(f"{folder}" + (f"  (revision {revision})" if revision else ""))
    return 0


@_command("card")
def card(args: argparse.Namespace) -> int:
    """``lightning-interp card DIR [--repo-id ORG/NAME] [--evaluation FILE] [--output FILE]``."""
    from lightning_interp._io import atomic_write
    from lightning_interp.concepts.base import is_head_folder
    from lightning_interp.zoo.heads import render_head_card
    from lightning_interp.zoo.publish import render_card

    head = is_head_folder(args.dir)
    render = render_head_card if head else render_card
    kwargs = {"card_data": _card_data(args), **_evaluation_kwargs(args, head)}
    text = render(args.dir, repo_id=args.repo_id, **kwargs)
    if args.output:
        output = Path(args.output)
        atomic_write(output, lambda p: p.write_text(text, encoding="utf-8"))
        print(f"wrote {output}")
    else:
        sys.stdout.write(text)
    return 0


@_command("convert")
def convert(args: argparse.Namespace) -> int:
    """``lightning-interp convert SRC DST --from FORMAT --to FORMAT [--overwrite]``."""
    from lightning_interp.zoo.formats import convert as convert_folder

    folder = convert_folder(
        args.src,
        args.dst,
        from_format=args.from_format,
        to_format=args.to_format,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.to_format} dictionary to {folder}")
    return 0


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _zoo_list(args: argparse.Namespace) -> int:
    from lightning_interp.zoo.catalogue import filter_catalogue

    filters = ("backbone", "site", "architecture", "kind", "format")
    matches = filter_catalogue(**{name: getattr(args, name) for name in filters})
    print(
        f"{'release':<46} {'dicts':>5}  {'format':<12} {'backbone':<30} {'architecture':<21} title"
    )
    for match in matches:
        entry = match.entry
        fmt = entry.format if entry.loadable else f"{entry.format}*"
        arch = (entry.architecture or "–") + ("" if entry.kind == "sae" else f" {entry.kind}")
        print(
            f"{entry.release:<46} {len(match.sites):>5}  {fmt:<12} {entry.backbone:<30} "
            f"{arch:<21} {entry.title}"
        )
    sites = sum(len(m.sites) for m in matches)
    print(f"{len(matches)} releases, {sites} dictionaries (* format not loadable yet)")
    return 0


@_command("zoo")
def zoo(args: argparse.Namespace) -> int:
    """``lightning-interp zoo list [--backbone B --site S --architecture A ...]``, ``zoo show``."""
    from lightning_interp.zoo.catalogue import FOREIGN_FORMATS, get_release

    if args.action == "list":
        return _zoo_list(args)
    entry = get_release(args.id.removeprefix("zoo:").split("/")[0])
    print(f"{entry.release}: {entry.title}")
    print(f"  repo {entry.repo}@{entry.revision}  format {entry.format}  backbone {entry.backbone}")
    if not entry.loadable:
        print(f"  not loadable yet: {FOREIGN_FORMATS[entry.format]}")
    details = [f"architecture {entry.architecture}"] if entry.architecture else []
    details += [f"kind {entry.kind}"] + ([f"license {entry.license}"] if entry.license else [])
    print("  " + "  ".join(details))
    for label, url in entry.links.items():
        print(f"  {label}: {url}")
    for source in entry.sources:
        print(f"  source: {source}")
    print(f"\n  {'id':<36} {'site':<24} {'width':>8} {'L0':>7} {'FVU':>7}  neuronpedia / path")
    for site in entry.sites:
        where = site.site or "–"
        if site.site_out:
            where += f" -> {site.site_out}"
        star = " *" if site.canonical else ""
        print(
            f"  {site.id + star:<36} {where:<24} {_number(site.width):>8} {_number(site.l0):>7} "
            f"{_number(site.fvu):>7}  {site.neuronpedia or '–'}  {site.path}"
        )
    if any(site.canonical for site in entry.sites):
        print("\n  * canonical: a bare site name resolves to it")
    if entry.loadable:
        print(f"\nload one with: load_dictionary('zoo:{entry.release}/{entry.sites[0].id}')")
    return 0
