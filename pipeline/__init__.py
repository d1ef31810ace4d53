"""Stage 1: raw ImageNet folders -> WebDataset shard set (contract 1), and the one image
preprocessing definition shared with serving (contract 3)."""
