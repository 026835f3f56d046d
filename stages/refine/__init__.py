"""The refine step."""
