"""The seed_net step."""
