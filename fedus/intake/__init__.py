"""Site data intake: a hospital's DICOM/PNG/JPEG archive -> a local manifest, and a shareable data card."""

from fedus.intake.card import data_card, render_markdown, write_card
from fedus.intake.readers import FrameSampling
from fedus.intake.scan import ScanResult, scan

__all__ = ["FrameSampling", "ScanResult", "data_card", "render_markdown", "scan", "write_card"]
