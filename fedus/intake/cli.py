"""`fedus data scan` and `fedus data card`: site data intake from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

data_app = typer.Typer(no_args_is_help=True, help="Site data intake: archive -> manifest, and the shareable data card.")
console = Console(stderr=True)


@data_app.command("scan")
def scan_cmd(
    site_dir: Path = typer.Argument(..., help="folder tree of DICOM, PNG and JPEG files"),
    out: Path = typer.Option(..., "--out", help="manifest CSV to write; frames, log and cache go beside it"),
    workers: Optional[int] = typer.Option(None, min=1, help="decoding processes (default: CPU count, at most 8)"),
    every: Optional[int] = typer.Option(None, help="cine: keep every K-th frame"),
    frames: Optional[int] = typer.Option(None, help="cine: keep N evenly spaced frames (default 8)"),
    center: Optional[str] = typer.Option(None, help="value of the manifest's center column (default: folder name)"),
    label_from_folder: bool = typer.Option(False, help="label = first sub-folder name (class folders)"),
) -> None:
    """Scan a site's archive into a manifest; bad files are skipped and listed in intake-log.csv."""
    from fedus.intake.readers import FrameSampling
    from fedus.intake.scanner import scan

    result = scan(site_dir, out, sampling=FrameSampling.parse(every, frames), workers=workers, center=center,
                  label_from_folder=label_from_folder)
    console.print(result.summary(), highlight=False, soft_wrap=True)
    console.print(f"manifest: {result.manifest}\nskipped files: {result.log}", highlight=False, soft_wrap=True)


@data_app.command("card")
def card_cmd(
    manifest: Path = typer.Argument(..., help="manifest CSV written by `fedus data scan`"),
    out: Optional[Path] = typer.Option(None, help="card JSON path (default: data-card.json beside the manifest)"),
    k: int = typer.Option(5, help="small-cell threshold: counts under k are shown as <k"),
) -> None:
    """Aggregate, small-cell-suppressed data card: the only intake output that may leave the site."""
    from fedus.intake.card import render_markdown, write_card

    json_path, md_path = write_card(manifest, out, k)
    typer.echo(render_markdown(json.loads(json_path.read_text())))
    console.print(f"card: {json_path} and {md_path}", highlight=False, soft_wrap=True)
