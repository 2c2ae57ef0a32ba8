"""Commands that write inputs: ``make-sample-data`` and ``make-tiny-checkpoint``."""

from __future__ import annotations

from pathlib import Path

import click

from scheduler.context import AppContext
from scheduler.tables import shown


@click.command("make-sample-data")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--size", default=256, show_default=True, type=click.IntRange(32, 4096), help="Image side in px.")
@click.option("--per-class", default=12, show_default=True, type=click.IntRange(3, 10000),
              help="Test images per category.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed: the same seed writes the same images.")
@click.pass_obj
def make_sample_data_command(app: AppContext, directory: Path, size: int, per_class: int, seed: int) -> None:
    """Write a small MVTec-format dataset (textures and objects with exact defect masks) to DIRECTORY."""
    from scheduler.sample_data import make_sample_data

    summary = make_sample_data(directory, size=size, per_class=per_class, seed=seed)
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
    if kind.startswith("pixellm"):
        from workers.pixellm.tiny import make_tiny_pixellm

        checkpoint, clip = make_tiny_pixellm(directory, seed=seed, layout="13b" if kind.endswith("13b") else "7b")
        family, kind = "PixelLM", "pixellm"
    else:
        from workers.read.tiny import make_tiny_checkpoint

        checkpoint, clip = make_tiny_checkpoint(directory, seed=seed, kind=kind)
        family, kind = ("LISA", "lisa") if kind.startswith("lisa") else ("READ", kind)
    app.console.print(f"tiny {family} checkpoint: [bold]{shown(checkpoint)}[/]\n"
                      f"tiny CLIP folder:     [bold]{shown(clip)}[/]")
    app.console.print(f"use: readar run --detector {kind} --checkpoint {shown(checkpoint)} --clip {shown(clip)} "
                      "--mvtec-root DIR")


COMMANDS = (make_sample_data_command, make_tiny_checkpoint_command)
