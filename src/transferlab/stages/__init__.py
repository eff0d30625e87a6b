"""Stages: source training (or loading), target fine-tuning, evaluation."""
