"""Evaluation: defended generation, judges, metrics, transfer, ECSO and the baseline defenses."""
