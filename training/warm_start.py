"""A k-means warm start for a categorical encoder: informative codes from the first step.

A freshly initialised encoder emits codes that say almost nothing about the image, and DAPS can only improve them
by comparing a few sampled codes per image. Patch k-means gives, for nothing but a few seconds of arithmetic, a
code per token that already reconstructs well: each token owns one block of pixels (its cell of the code grid), the
V centroids are a codebook of such blocks, and the code of a cell is its nearest centroid. With the k-means option
of `DapsMethod`, the first `warm_start_steps` steps fit the encoder to those codes by maximum likelihood (teacher
forcing) and the decoder to reconstruct from them, so that DAPS starts from codes that mean something. Nothing here
backpropagates through a code: the codes are targets, as the sampled codes are in a DAPS step.
"""

from __future__ import annotations

import torch

from tokenizer.configuration_daps import code_grid_shape as _grid_shape


def token_cells(images: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Cut images into one block of pixels per code token: (N, C, H, W) → (N, L, C·(H/rows)·(W/columns)).

    The blocks tile the image on the `rows × columns` grid the conv decoder lays the codes on (the most nearly square
    factorisation of L), in raster order, so block t sits under token t.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    n, channels, height, width = images.shape
    rows, columns = _grid_shape(num_tokens)
    if height % rows or width % columns:
        raise ValueError(f"The k-means warm start cuts the image into a {rows} × {columns} grid of cells, one per "
                         f"token (L = {num_tokens}); the image ({height} × {width}) must be a multiple of it.")
    blocks = images.reshape(n, channels, rows, height // rows, columns, width // columns)
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * columns, -1)


def nearest_codes(cells: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """The index of each cell's nearest centroid (squared Euclidean): cells (..., D), centroids (V, D) → (...) int64."""
    flat = cells.reshape(-1, cells.shape[-1]).float()
    centroids = centroids.float()
    squared = (centroids * centroids).sum(-1)
    codes = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk]
        # ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖²; ‖x‖² is the same for every c.
        codes[start:start + chunk] = (squared - 2 * part @ centroids.T).argmin(-1)
    return codes.reshape(cells.shape[:-1])


def _kmeans_plus_plus(points: torch.Tensor, num_centroids: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid is a point drawn with probability ∝ its squared distance to the nearest
    centroid so far (a point already chosen has weight 0; if every point is taken, a uniform draw)."""
    n = points.shape[0]
    centroids = torch.empty(num_centroids, points.shape[1])
    centroids[0] = points[torch.randint(n, (1,), generator=generator)]
    nearest = ((points - centroids[0]) ** 2).sum(-1)
    for index in range(1, num_centroids):
        total = float(nearest.sum())
        if total > 0:
            pick = torch.multinomial(nearest / total, 1, generator=generator)
        else:
            pick = torch.randint(n, (1,), generator=generator)
        centroids[index] = points[pick]
        nearest = torch.minimum(nearest, ((points - centroids[index]) ** 2).sum(-1))
    return centroids


def fit_kmeans(cells: torch.Tensor, num_centroids: int, iterations: int = 15, max_points: int = 200_000,
               seeding_points: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on the rows of `cells` (N, D) → centroids (num_centroids, D) float32.

    Deterministic for a seed. At most `max_points` rows (a seeded random subset) are used, and
    `seeding_points` of those for the k-means++ seeding. A centroid left without points is moved to a random row, so
    every code stays in use.
    """
    if cells.dim() != 2 or cells.shape[0] == 0:
        raise ValueError(f"cells must be a non-empty (N, D) tensor, got shape {tuple(cells.shape)}.")
    if num_centroids < 1 or iterations < 0:
        raise ValueError(f"need num_centroids >= 1 and iterations >= 0, got {num_centroids}, {iterations}.")
    generator = torch.Generator().manual_seed(seed)
    points = cells.float().cpu()
    points = points[torch.randperm(points.shape[0], generator=generator)[:max_points]]
    n = points.shape[0]
    centroids = _kmeans_plus_plus(points[:seeding_points], num_centroids, generator)
    for _ in range(iterations):
        assignment = nearest_codes(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=num_centroids)
        used = counts > 0
        centroids[used] = sums[used] / counts[used, None].float()
        empty = (~used).nonzero().flatten()
        if empty.numel():
            centroids[empty] = points[torch.randint(n, (empty.numel(),), generator=generator)]
    return centroids


__all__ = ["fit_kmeans", "nearest_codes", "token_cells"]
