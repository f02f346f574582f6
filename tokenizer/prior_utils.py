"""Helpers between a tokenizer's codes and an autoregressive prior (any `transformers` causal LM).

The prior's vocabulary is the codebook plus a few special ids:

    0 … V−1                 the codes
    V                       BOS, starts every sequence
    V + 1 … V + C           optional class-label tokens (class c is V + 1 + c), placed after BOS

A training sequence is [BOS, (class), z_1 … z_L]; generation starts from [BOS, (class)] and produces L more ids,
restricted to codes by `CodeOnlyLogitsProcessor`.
"""

from __future__ import annotations

import torch


def prior_vocab_size(codebook_size: int, num_classes: int = 0) -> int:
    """Vocabulary of the prior: V codes, BOS, and one token per class."""
    return codebook_size + 1 + num_classes


def codes_to_prior_input_ids(codes: torch.Tensor, codebook_size: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """codes (B, L) → prior input ids (B, 1 + [1] + L): BOS, the class token when `labels` (B,) is given, the codes."""
    codes = torch.as_tensor(codes).long()
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (B, L), got {tuple(codes.shape)}.")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size - 1}], got [{codes.min().item()}, {codes.max().item()}].")
    prefix = [torch.full((codes.shape[0], 1), codebook_size, dtype=torch.long)]
    if labels is not None:
        labels = torch.as_tensor(labels).long().view(-1, 1)
        if labels.shape[0] != codes.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} rows but codes has {codes.shape[0]}.")
        prefix.append(codebook_size + 1 + labels)
    return torch.cat([*prefix, codes], dim=1)


def generation_prefix(batch_size: int, codebook_size: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The ids generation starts from: (B, 1) BOS, or (B, 2) BOS + class token."""
    return codes_to_prior_input_ids(torch.zeros(batch_size, 0, dtype=torch.long), codebook_size, labels)


def prior_output_to_codes(sequences: torch.Tensor, num_tokens: int, codebook_size: int) -> torch.Tensor:
    """`generate()` output (B, prefix + L) → codes (B, L): the last L ids, checked to be codes."""
    sequences = torch.as_tensor(sequences)
    if sequences.ndim != 2 or sequences.shape[1] < num_tokens:
        raise ValueError(f"Expected generated sequences (B, >= {num_tokens}), got {tuple(sequences.shape)}.")
    codes = sequences[:, -num_tokens:].long()
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(
            f"The prior generated ids outside the codebook [0, {codebook_size - 1}] (got up to {codes.max().item()}); "
            "generate with CodeOnlyLogitsProcessor."
        )
    return codes


class CodeOnlyLogitsProcessor:
    """A `transformers` logits processor that allows only code ids (0 … V−1) to be generated."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.codebook_size:] = float("-inf")
        return scores
