"""Manifest CSVs: the one format every data source in fedus is turned into.

Columns follow the public corpus (`image_path, mask_path, label, patient_id,
center, device, organ, task`); paths are relative to the manifest's folder.
Near-duplicate pairs (`near_duplicates.csv`, beside the manifest or in a
dataset sub-folder, paths relative to that file) feed the leakage-safe split.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedus.config import ConfigError

MANIFEST_COLUMNS = ("image_path", "mask_path", "label", "patient_id", "center", "device", "organ", "task")
NEAR_DUPLICATES = "near_duplicates.csv"


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest; image/mask paths become absolute strings."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"manifest not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable CSV ({err.__class__.__name__})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{path}: manifest lacks columns {', '.join(missing)}")
    root = path.parent
    df["image_path"] = [str((root / p).resolve()) for p in df["image_path"]]
    df["mask_path"] = [str((root / p).resolve()) if p else "" for p in df["mask_path"]]
    return df.reset_index(drop=True)


def read_near_duplicates(manifest_path: str | Path) -> list[tuple[str, str]]:
    """All near-duplicate pairs that apply to a manifest, as absolute image paths."""
    root = Path(manifest_path).expanduser().resolve().parent
    files = [root / NEAR_DUPLICATES, *sorted(root.glob(f"*/{NEAR_DUPLICATES}"))]
    pairs: list[tuple[str, str]] = []
    for file in files:
        if not file.is_file():
            continue
        dup = pd.read_csv(file, dtype=str, keep_default_na=False)
        base = file.parent
        pairs += [
            (str((base / a).resolve()), str((base / b).resolve()))
            for a, b in zip(dup["image_a"], dup["image_b"])
        ]
    return pairs
