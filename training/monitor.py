"""Watching a DAPS run for the encoder's dead state.

A DAPS encoder can fall, in its first few dozen steps, into a state it cannot leave: q(z | x) puts all its mass on
one code sequence, the same for every image. Then all K samples of every image are that sequence, the weights are
uniform (ESS = K whatever η is), the η solve sits at its floor, and the encoder's loss −Σ w log q is ≈ 0 with zero
gradient; the decoder learns the mean image and the run ends at the mean-image PSNR. It was measured on MNIST with a
wider encoder (`hidden_size=128`) or decoder (`decoder_hidden_size=1024`) than the preset's, on every seed tried
(benchmarks/RESULTS.md, "Eighteenth and nineteenth sessions"); the preset's own run touches the state for 10–30
steps on some seeds and leaves it. `CollapseMonitor` turns the logged statistics into one clear warning instead of a silent wasted run.
"""

from __future__ import annotations

import math

__all__ = ["CollapseMonitor"]


class CollapseMonitor:
    """Flags a DAPS run whose samples have all been one code for at least `min_steps` steps.

    Fed the trainer's log rows in order (`update`); a row counts as collapsed when its mean ESS is within 1 % of K
    and the batch's samples used at most `max_codes` distinct codes. The state must hold on consecutive logged rows
    spanning `min_steps` steps (and on at least two rows), so the brief visits that healthy runs make are not
    flagged. Rows without `ess` or `code_usage` (the baselines') never count.

    Args:
        num_samples: K, the samples per image.
        codebook_size: V.
        min_steps: how long the state must last before it is reported.
        max_codes: at most this many distinct codes in the batch's samples count as collapsed.
    """

    def __init__(self, num_samples: int, codebook_size: int, min_steps: int = 100, max_codes: int = 2):
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 to tell a collapse, got {num_samples}.")
        if codebook_size < 1 or min_steps < 1 or max_codes < 1:
            raise ValueError("codebook_size, min_steps and max_codes must be positive.")
        self.num_samples, self.codebook_size = num_samples, codebook_size
        self.min_steps, self.max_codes = min_steps, max_codes
        self.since: int | None = None      # first step of the current collapsed stretch
        self.rows = 0                      # logged rows in it
        self.collapsed_at: int | None = None  # the step the first reported stretch began

    def is_collapsed_row(self, row: dict) -> bool:
        ess, usage = row.get("ess"), row.get("code_usage")
        if ess is None or usage is None or not (math.isfinite(ess) and math.isfinite(usage)):
            return False
        return ess >= 0.99 * self.num_samples and round(usage * self.codebook_size) <= self.max_codes

    def update(self, row: dict) -> str | None:
        """Take one log row; return the warning text the first time a collapse has lasted `min_steps`, else None."""
        if not self.is_collapsed_row(row):
            self.since, self.rows = None, 0
            return None
        step = int(row["step"])
        if self.since is None:
            self.since = step
        self.rows += 1
        if self.collapsed_at is not None or self.rows < 2 or step - self.since < self.min_steps:
            return None
        self.collapsed_at = self.since
        return (f"The DAPS encoder has collapsed: since step {self.since} every sample of every image has been the "
                f"same code (ESS = K = {self.num_samples}, {round(row['code_usage'] * self.codebook_size)} of "
                f"{self.codebook_size} codes in use). Its loss has no gradient in this state and the run will end "
                "near the mean-image PSNR. Seen with wider encoders or decoders than the preset's, where restarting "
                "with the guard on the batch's code use, `--usage_weight 0.3 --usage_mutual_information false "
                "--usage_margin 2.77`, rescued it (benchmarks/RESULTS.md, 'Eighteenth and nineteenth sessions'), and "
                "with `--proposal_temperature` 0.5 ('Twenty-first session').")
