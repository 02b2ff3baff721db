"""Ablation studies: study files expanded into runs, run in parallel, and reported with intervals."""
