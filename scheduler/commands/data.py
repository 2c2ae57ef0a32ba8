"""Commands that write inputs: ``make-sample-data`` and ``make-tiny-checkpoint``."""

from __future__ import annotations

from pathlib import Path

import click

from scheduler.context import AppContext
from scheduler.tables import shown


def _check_output_folder(directory: Path, what: str) -> None:
    """DIRECTORY and the folders above it must be folders or not exist yet (one line, exit 1, not a traceback)."""
    for folder in (directory, *directory.parents):
        try:
            is_file = folder.exists() and not folder.is_dir()
        except OSError as exc:  # e.g. a parent folder that cannot be searched
            raise click.ClickException(_write_failure(directory, what, exc)) from exc
        if is_file:
            inside = "" if folder == directory else f" (it would hold {directory})"
            raise click.ClickException(
                f"{folder} is a file, not a folder{inside}; pass a folder (new or existing) to write {what} to"
            )


def _write_failure(directory: Path, what: str, exc: OSError) -> str:
    """One line for a folder that cannot be written (a parent that is a file, no permission, a full disk)."""
    where = f" ({exc.filename})" if exc.filename else ""
    return (f"cannot write {what} to {directory}: {exc.strerror or exc}{where}; "
            "choose a folder you can write to")


@click.command("make-sample-data")
@click.argument("directory", type=click.Path(path_type=Path))
# The generator's own bounds (scheduler/sample_data.py): 32-2048 px, at least one good image and one per defect type.
@click.option("--size", default=256, show_default=True, type=click.IntRange(32, 2048), help="Image side in px.")
@click.option("--per-class", default=12, show_default=True, type=click.IntRange(4, 10000),
              help="Test images per category (one good and one per defect type at least).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed: the same seed writes the same images.")
@click.option("--overwrite", is_flag=True,
              help="Write into category folders DIRECTORY already holds (files of the same name are replaced, "
              "others are kept: an empty folder gives a clean dataset).")
@click.pass_obj
def make_sample_data_command(app: AppContext, directory: Path, size: int, per_class: int, seed: int,
                             overwrite: bool) -> None:
    """Write a small MVTec-format dataset (textures and objects with exact defect masks) to DIRECTORY."""
    from scheduler.sample_data import DEFAULT_CATEGORIES, SampleDataError, make_sample_data

    _check_output_folder(directory, "the sample dataset")
    existing = [name for name in DEFAULT_CATEGORIES if (directory / name).exists()]
    if existing and not overwrite:
        raise click.ClickException(
            f"{directory} already holds {', '.join(existing)}; choose an empty folder or pass --overwrite "
            "to write over them"
        )
    try:
        summary = make_sample_data(directory, size=size, per_class=per_class, seed=seed, overwrite=overwrite)
    except SampleDataError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(_write_failure(directory, "the sample dataset", exc)) from exc
    app.console.print(f"sample dataset written to [bold]{shown(directory)}[/]: {shown(summary)}")


@click.command("make-tiny-checkpoint")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed of the weights.")
@click.option("--kind", type=click.Choice(["read", "lisa", "lisa-13b", "pixellm", "pixellm-13b"]), default="read",
              show_default=True,
              help="read: READ's released layout (LLaVA-1.5 projector, 336 px CLIP, 576 image tokens); lisa: "
              "LISA-7B-v1's (one Linear projector, 224 px CLIP, 256 image tokens, <im_patch> <im_start> <im_end> "
              "[SEG] tokens); lisa-13b: LISA-13B-llama2-v1's (as lisa, on LLaMA-2, [SEG] <im_start> <im_end> "
              "tokens, three shards); pixellm / pixellm-13b: PixelLM-7B's / -13B's hf_model (two projectors, 336 px CLIP "
              "resized to 448, [SEG0]-[SEG5], multi-scale mask decoder, no SAM image encoder).")
@click.pass_obj
def make_tiny_checkpoint_command(app: AppContext, directory: Path, seed: int, kind: str) -> None:
    """Write a random-weight READ, LISA or PixelLM checkpoint in its released layout, plus a tiny CLIP folder of the
    matching geometry, to DIRECTORY.

    The released layout file for file: config.json, weight shards + index, and the tokenizer as the released
    folders ship it (a small SentencePiece tokenizer.model trained here with LLaMA's settings,
    tokenizer_config.json, special_tokens_map.json, added_tokens.json; no tokenizer.json)."""
    _check_output_folder(directory, "the checkpoint")
    try:
        if kind.startswith("pixellm"):
            from workers.pixellm.tiny import make_tiny_pixellm

            checkpoint, clip = make_tiny_pixellm(directory, seed=seed, layout="13b" if kind.endswith("13b") else "7b")
            family, kind = "PixelLM", "pixellm"
        else:
            from workers.read.tiny import make_tiny_checkpoint

            checkpoint, clip = make_tiny_checkpoint(directory, seed=seed, kind=kind)
            family, kind = ("LISA", "lisa") if kind.startswith("lisa") else ("READ", kind)
    except OSError as exc:
        raise click.ClickException(_write_failure(directory, "the checkpoint", exc)) from exc
    app.console.print(f"tiny {family} checkpoint: [bold]{shown(checkpoint)}[/]\n"
                      f"tiny CLIP folder:     [bold]{shown(clip)}[/]")
    app.console.print(f"use: readar run --detector {kind} --checkpoint {shown(checkpoint)} --clip {shown(clip)} "
                      "--mvtec-root DIR")


COMMANDS = (make_sample_data_command, make_tiny_checkpoint_command)
