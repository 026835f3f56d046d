"""The report step."""
