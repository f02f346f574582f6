"""Model cards for saved tokenizer folders: Hub metadata with the measured metrics, and a README body."""

from .card import build_model_card, write_model_card

__all__ = ["build_model_card", "write_model_card"]
