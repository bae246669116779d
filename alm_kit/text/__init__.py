"""Text formats shared by data preparation, training and inference (thinking blocks, response templates)."""
