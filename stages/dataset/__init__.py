"""The dataset step."""
