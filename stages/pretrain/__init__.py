"""The pretrain step."""
