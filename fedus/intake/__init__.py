"""Site data intake: a hospital's DICOM/PNG/JPEG archive -> a local manifest, and a shareable data card.

Names are loaded on first use (PEP 562): a ClientApp process that only checks a data card
(client/replies.py) must not pay for pydicom and the decoders on every Flower message."""

from importlib import import_module

_WHERE = {"data_card": "card", "render_markdown": "card", "write_card": "card", "FrameSampling": "readers",
          "ScanResult": "scanner", "scan": "scanner"}
__all__ = ["FrameSampling", "ScanResult", "data_card", "render_markdown", "scan", "write_card"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fedus.intake' has no attribute '{name}'")
    return getattr(import_module(f"fedus.intake.{_WHERE[name]}"), name)
