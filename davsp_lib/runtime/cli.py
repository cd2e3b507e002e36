"""The ``davsp`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="davsp", description="DAVSP workbook")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the notebook pipeline (the main job)")
    run.add_argument("--preset", default="embedded", help="embedded (default), smoke or paper")
    run.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    run.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 01")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a parameter in every notebook that declares it (papermill-style; VALUE "
        "is read as int, float, true/false/none or a [list], else a string); repeatable",
    )
    run.add_argument(
        "--model",
        help="shorthand for -p model M -p model_a M (tiny, small, a LLaVA / Qwen2-VL id or folder)",
    )

    card = commands.add_parser(
        "recipe", help="print the recipe card: each reference-recipe item, ours, and why not"
    )
    card.add_argument("--preset", default="paper", help="paper (default), embedded or smoke")

    ask = commands.add_parser("ask", help="answer a query about an image")
    ask.add_argument("--image", required=True, help="image file")
    ask.add_argument("--query", required=True)
    ask.add_argument("--model", default="tiny", help="tiny, small, or a Hugging Face id / folder")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--safety-prompt", help="text safety prompt (prefix placement)")

    read = commands.add_parser("read", help="print what the model perceives in each image")
    read.add_argument("--image", nargs="+", required=True, help="image files")
    read.add_argument("--model", default="tiny", help="tiny, small, or a Hugging Face id / folder")
    read.add_argument("--max-new-tokens", type=int, default=96)

    data = commands.add_parser("data", help="benchmark data: download, verify, summary")
    data.add_argument("action", choices=["download", "verify", "summary"])
    data.add_argument("--root", help="data root (default: $DAVSP_DATA_ROOT or ../shared/data)")
    data.add_argument("--source", nargs="*", help="only these sources (download)")
    data.add_argument("--base-url", help="fetch from this mirror instead of the public URLs")

    notebooks = commands.add_parser(
        "notebooks", help="write notebooks/NN_name.ipynb from their jupytext sources NN_name.py"
    )
    notebooks.add_argument("action", choices=["sync"])
    notebooks.add_argument(
        "--check", action="store_true", help="only list stale .ipynb files (exit 1 if any)"
    )

    figures = commands.add_parser(
        "figures", help="copy the README's figures from a run folder into figures/ (+ manifest)"
    )
    figures.add_argument("--from", dest="run_dir", required=True, help="run folder, runs/<run>")
    figures.add_argument("--out", default="figures", help="where to write (default: figures)")
    figures.add_argument("--commit", help="commit the run was made at, when run.json has none")
    figures.add_argument("--note", help="one line for the manifest (e.g. a caveat)")
    figures.add_argument(
        "--allow-missing", action="store_true", help="skip figures the run lacks (listed)"
    )
    return parser


def _data(args: argparse.Namespace) -> int:
    if args.action == "summary":
        from davsp_lib.data.datasets import data_root, summarize

        print(summarize(data_root(args.root)))
        return 0
    from davsp_lib.data import download

    argv = [args.action]
    if args.root:
        argv += ["--root", args.root]
    if args.action == "download":
        if args.source:
            argv += ["--source", *args.source]
        if args.base_url:
            argv += ["--base-url", args.base_url]
    return download.main(argv)


def _figures(args: argparse.Namespace) -> int:
    from davsp_lib.runtime.readme_figures import collect

    manifest = collect(
        args.run_dir,
        args.out,
        commit=args.commit,
        note=args.note,
        allow_missing=args.allow_missing,
    )
    for figure in manifest["figures"]:
        print(f"{figure['source']} -> {args.out}/{figure['file']} ({figure['bytes']} bytes)")
    for source in manifest["skipped"]:
        print(f"skipped (not in the run): {source}")
    print(f"manifest: {args.out}/manifest.json, {args.out}/README.md")
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    from davsp_lib.runtime.notebook_sources import NOTEBOOK_DIR, sync

    stale = sync(check=args.check)
    verb = "out of sync" if args.check else "wrote"
    for path in stale:
        print(f"{verb} {path.relative_to(NOTEBOOK_DIR.parent)}")
    if not stale:
        print("notebooks in sync with their .py sources")
    return 1 if args.check and stale else 0


TRANSCRIBE_QUERY = "Transcribe all text in the image exactly. Reply with the text only."


def _load(model: str):
    from davsp_lib.models.adapters import load_adapter

    return load_adapter(model)


def _canvas(adapter, path: str):
    from davsp_lib.data.images import load_image, to_tensor

    return adapter.prepare_image(to_tensor(load_image(path)))


def _ask(args: argparse.Namespace) -> int:
    from davsp_lib.models.conversation import Conversation

    adapter = _load(args.model)
    conv = Conversation(args.query, safety_prompt=args.safety_prompt)
    canvas = _canvas(adapter, args.image)[None]
    print(adapter.generate(canvas, [conv], max_new_tokens=args.max_new_tokens)[0])
    return 0


def _read(args: argparse.Namespace) -> int:
    """One line per image, in order: ``PATH<TAB>text`` (newlines in the text become spaces)."""
    from davsp_lib.models.conversation import Conversation

    adapter = _load(args.model)
    for path in args.image:
        canvas = _canvas(adapter, path)[None]
        if adapter.perceives_text:  # the embedded model: its visual input, decoded
            text = adapter.perceive(canvas)[0]
        else:  # a real VLM: its answer when asked to transcribe
            conv = Conversation(TRANSCRIBE_QUERY)
            text = adapter.generate(canvas, [conv], max_new_tokens=args.max_new_tokens)[0]
        print(f"{path}\t{' '.join(text.split())}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from davsp_lib.runtime.errors import DataError, UnsupportedModelError

    args = build_parser().parse_args(argv)
    commands = {
        "run": _run,
        "data": _data,
        "ask": _ask,
        "read": _read,
        "recipe": _recipe,
        "notebooks": _notebooks,
        "figures": _figures,
    }
    try:
        return commands[args.command](args)
    except (DataError, UnsupportedModelError, FileNotFoundError, ValueError) as error:
        print(f"davsp {args.command}: error: {error}", file=sys.stderr)
        return 2


def parse_value(text: str) -> Any:
    """A ``-p`` value as papermill's CLI reads one, plus YAML lists and mappings."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    words = {"true": True, "false": False, "none": None, "null": None}
    if text.strip().lower() in words:
        return words[text.strip().lower()]
    if text.strip().startswith(("[", "{")):
        import yaml

        return yaml.safe_load(text)
    return text


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {name: parse_value(value) for name, value in args.parameter}
    if args.model:
        values.update(model=args.model, model_a=args.model)
    return values


def _recipe(args: argparse.Namespace) -> int:
    from davsp_lib.runtime.pipeline import PRESETS
    from davsp_lib.runtime.recipe import main as print_card

    if args.preset not in PRESETS:
        print(f"davsp recipe: error: unknown preset {args.preset!r}; choose from "
              f"{sorted(PRESETS)}", file=sys.stderr)  # fmt: skip
        return 2
    return print_card(args.preset)


def _run(args: argparse.Namespace) -> int:
    from davsp_lib.runtime.pipeline import main_run

    return main_run(args.out, args.preset, args.only, overrides(args))


if __name__ == "__main__":
    sys.exit(main())
