"""Per-site evaluation: agreement with the teacher, cheap per-round probes (`site_eval`), and the full
protocol for teacher / student / random init (`protocol`: label fractions, kNN, stage decoder; `run_eval`)."""
