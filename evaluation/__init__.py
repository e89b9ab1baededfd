"""Scoring and the classic baselines: the metrics and reports (metrics.py), grid choice on the validation
users (tuning.py) and the no-network baselines, whose fits also give the bias head its start
(baselines.py)."""
