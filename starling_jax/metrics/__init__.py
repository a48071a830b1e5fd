"""Evaluation metrics: reward-model ranking accuracy (ranking.py) and statistics (stats.py)."""
