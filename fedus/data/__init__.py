"""Site data: manifests, leakage-safe splits, datasets, augmentation, synthetic centres."""

from fedus.data.manifest import MANIFEST_COLUMNS, read_manifest, read_near_duplicates
from fedus.data.sites import SiteData, list_sites, load_site, resolve_manifest
from fedus.data.splits import grouped_split, leakage_groups

__all__ = [
    "MANIFEST_COLUMNS", "SiteData", "grouped_split", "leakage_groups", "list_sites",
    "load_site", "read_manifest", "read_near_duplicates", "resolve_manifest",
]
