"""Membership inference on what the server sees: one update, every round, the final model."""
