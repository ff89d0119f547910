"""Evaluation: segmentation metrics (Dice, HD95), clinical indices and slice-position analysis."""
