"""PNG figures for training runs and benchmarks: reconstruction grids, training curves, PSNR against wall-clock time.

matplotlib is imported inside the functions (importing this module is cheap) and only through its object-oriented
API (`matplotlib.figure.Figure`, rendered by the Agg canvas): no pyplot, so no global backend is switched, no GUI
is needed and no figure is left open.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

MIN_TILE_PIXELS = 64  # small images are upscaled (nearest neighbour) to at least this many pixels a side
GAP = 2  # pixels between tiles


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=figure.dpi, bbox_inches="tight", facecolor="white")
    return path


def _as_images(name: str, images) -> Tensor:
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim == 3:  # (N, H, W): grey
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{name} must be images (N, C, H, W) with C in (1, 3) and N >= 1, got {tuple(images.shape)}.")
    return images.clamp(0, 1)


# ----------------------------------------------------------------------------------------------- reconstruction grid
def save_reconstruction_grid(originals, reconstructions, path, *, title: str | None = None,
                             extra_rows: dict[str, Tensor] | None = None,
                             reconstruction_label: str = "reconstruction") -> Path:
    """A PNG with the originals in the first row, the reconstructions in the second and each of `extra_rows`
    (name → images, e.g. another method's reconstructions) below. Images are (N, C, H, W) in [0, 1], grey for one
    channel; small images are enlarged by nearest neighbour so that 8 x 8 digits stay visible. Returns the path."""
    rows = {"original": _as_images("originals", originals),
            reconstruction_label: _as_images("reconstructions", reconstructions)}
    for name, images in (extra_rows or {}).items():
        rows[str(name)] = _as_images(f"extra_rows[{name!r}]", images)
    return _draw_rows(rows, path, title)


def save_image_grid(images, path, *, columns: int = 8, title: str | None = None) -> Path:
    """A PNG of `images` (N, C, H, W) in [0, 1], `columns` to a row (e.g. a prior's samples). Returns the path."""
    images = _as_images("images", images)
    rows = {f"{start}-{min(start + columns, len(images)) - 1}": images[start : start + columns]
            for start in range(0, len(images), columns)}
    return _draw_rows(rows, path, title)


def _draw_rows(rows: dict[str, Tensor], path, title: str | None) -> Path:
    """Named rows of images (each (N, C, H, W), equal C, H, W) tiled into one labelled PNG."""
    first = next(iter(rows))
    shape = rows[first].shape
    for name, images in rows.items():
        if images.shape[1:] != shape[1:]:
            raise ValueError(f"Row {name!r} has images of shape {tuple(images.shape[1:])}, the first row "
                             f"{tuple(shape[1:])}: every row must match.")
    columns = max(images.shape[0] for images in rows.values())
    channels, height, width = shape[1:]
    scale = max(1, math.ceil(MIN_TILE_PIXELS / max(height, width)))
    tile_h, tile_w = height * scale, width * scale

    canvas = torch.ones(3, len(rows) * (tile_h + GAP) - GAP, columns * (tile_w + GAP) - GAP)
    for r, images in enumerate(rows.values()):
        big = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).expand(-1, 3, -1, -1)
        for c, image in enumerate(big):
            top, left = r * (tile_h + GAP), c * (tile_w + GAP)
            canvas[:, top : top + tile_h, left : left + tile_w] = image

    label_width = 1.4
    figure = _new_figure(canvas.shape[2] / 100 + label_width, canvas.shape[1] / 100 + (0.4 if title else 0.1))
    axes = figure.add_axes((label_width / figure.get_figwidth(), 0, 1 - label_width / figure.get_figwidth(),
                            canvas.shape[1] / 100 / figure.get_figheight()))
    axes.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0, vmax=1)
    axes.set_xticks([])
    axes.set_yticks([r * (tile_h + GAP) + tile_h / 2 for r in range(len(rows))], list(rows))
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if title:
        axes.set_title(title)
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------- training curves
def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have a finite `key` and a step."""
    steps, values = [], []
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and step is not None:
            steps.append(float(step))
            values.append(float(value))
    return steps, values


# (title, [(key, label)], log scale, y label)
TRAINING_PANELS = (
    ("losses", [("loss", "loss"), ("encoder_loss", "encoder"), ("decoder_loss", "decoder")], False, "nats"),
    ("effective sample size", [("ess", "ESS"), ("ess_target", "target")], False, "ESS"),
    ("eta (trust region)", [("eta", "eta")], True, "eta"),
    ("beta (entropy weight)", [("beta", "beta")], True, "beta"),
    ("held-out PSNR", [("eval/psnr", "greedy"), ("eval/psnr_sampled", "sampled")], False, "dB"),
    ("code usage", [("code_usage", "train batch"), ("eval/code_usage", "held-out")], False, "fraction of codebook"),
)


def save_training_curves(records: list[dict], path) -> Path:
    """A 2 x 3 figure from training-log rows (JSONL dicts with "step" and any of loss, encoder_loss, decoder_loss,
    ess, ess_target, eta, beta, code_usage, and eval rows with "eval/psnr"): losses, ESS against its target, eta and
    beta (log scale), held-out PSNR and code usage against the step. Panels whose keys never occur are left blank
    (non-positive values are dropped from log-scale panels). Returns the path."""
    figure = _new_figure(15, 8)
    grid = figure.subplots(2, 3)
    drawn = 0
    for axes, (title, keys, log_scale, ylabel) in zip(grid.flat, TRAINING_PANELS):
        lines = 0
        for key, label in keys:
            steps, values = _series(records, key)
            if log_scale:
                kept = [i for i, v in enumerate(values) if v > 0]
                steps, values = [steps[i] for i in kept], [values[i] for i in kept]
            if not values:
                continue
            style = dict(linestyle="--", color="black") if key == "ess_target" else {}
            marker = "o" if key.startswith("eval/") or len(values) < 20 else None
            axes.plot(steps, values, label=label, marker=marker, markersize=3, **style)
            lines += 1
        if not lines:
            axes.set_axis_off()
            continue
        drawn += 1
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        if log_scale:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        if lines > 1:
            axes.legend(fontsize="small")
    if not drawn:
        figure.text(0.5, 0.5, "no training records to plot", ha="center", va="center")
    figure.tight_layout()
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------- PSNR against time
def save_psnr_vs_time(curves: dict[str, list[tuple[float, float]]], path, title: str) -> Path:
    """One line per method: held-out PSNR (dB) against wall-clock training time (s). Returns the path."""
    figure = _new_figure(7, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    for method, points in curves.items():
        points = sorted((float(t), float(p)) for t, p in points)
        if not points:
            continue
        seconds, values = zip(*points)
        axes.plot(seconds, values, marker="o", markersize=3, label=str(method))
    axes.set_xlabel("training time (s)")
    axes.set_ylabel("held-out PSNR (dB)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if curves:
        axes.legend()
    figure.tight_layout()
    return _save(figure, path)


__all__ = ["save_psnr_vs_time", "save_reconstruction_grid", "save_training_curves"]
