"""The segmentation step."""
