"""Held-out evaluation: predictions -> official Super-NaturalInstructions scores and reports."""
