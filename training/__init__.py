"""The run skeleton both trainers share (trainers.py), checkpoints (checkpointing.py), what the scripts
share about a run: names, files, shape options, random streams, the TensorBoard writer (runs.py), and what
the reports say about the learned loss (analysis.py)."""
