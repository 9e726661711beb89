"""Per-site evaluation: agreement with the teacher and frozen-feature probes."""
