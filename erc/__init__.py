"""erc: multimodal emotion recognition in conversation, from the public files to an MLflow leaderboard."""

__version__ = "0.1.0"
