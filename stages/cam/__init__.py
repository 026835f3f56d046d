"""The cam step."""
