"""Matplotlib figures of a 2D registration (or the middle slice of a 3D one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # figures are files: no pyplot, no screen (and a faster import)

from ..io.files import atomic_write
from ..registration.result import RegistrationResult


def _middle_slice(array: np.ndarray) -> np.ndarray:
    """A 2D view: the array itself, or the middle slice along axis 0 of a volume."""
    return array if array.ndim == 2 else array[array.shape[0] // 2]


def plot_deformation_grid(ax, mapped_voxels: np.ndarray, step: float = 4.0, **style) -> None:
    """Draw a map as a deformed grid on its target grid: the lines where one mapped coordinate
    is a multiple of ``step`` (the source's regular grid, pulled back).

    Args:
        mapped_voxels: ``(2, H, W)``: for every target pixel, the source position it samples, in
            source pixel coordinates (axis 0, axis 1).
    """
    style = {"colors": "tab:orange", "linewidths": 0.7, **style}
    for component in mapped_voxels:
        low, high = np.floor(component.min() / step), np.ceil(component.max() / step)
        levels = np.arange(low, high + 1) * step
        if len(levels) > 1:
            ax.contour(component, levels=levels, **style)


def plot_loss_terms(ax, history: dict):
    """The loss terms of a fit's ``history`` from iteration 1 (the penalty starts at 0): terms that
    stay positive on ``ax`` on a log scale, the others (MI's similarity, and the loss with it, are
    negative) dashed on a linear scale on a twin axis at the right, which is returned (None when
    every term is positive)."""
    signed_axis = None
    for index, (name, values) in enumerate(history.items()):
        values = np.asarray(values[1:], dtype=float)
        style = {"label": name, "color": "black" if name == "loss" else f"C{index}"}
        if values.size and values.min() > 0:
            ax.semilogy(np.arange(1, values.size + 1), values, **style)
            continue
        signed_axis = signed_axis or ax.twinx()
        signed_axis.plot(np.arange(1, values.size + 1), values, linestyle="--", **style)
    handles, labels = ax.get_legend_handles_labels()
    if signed_axis is not None:
        signed_axis.set_ylabel("dashed: linear scale")
        more = signed_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    ax.set_xlabel("iteration")
    ax.set_title("loss terms")
    return signed_axis


def overview_figure(result: RegistrationResult, moving, fixed, path, *, title: str | None = None, warped=None):
    """Six panels: moving A, fixed B, the deformation grid of phi_AB, A warped onto B, the Jacobian
    determinant of phi_AB (log scale), and the loss curves. Saved as a PNG at ``path``; returns
    the path. A 3D result shows the middle slice along axis 0. ``warped``: A already warped onto
    B's grid (``result.warp(moving)``), when the caller has it."""
    moving = np.asarray(moving, dtype=np.float32)
    fixed = np.asarray(fixed, dtype=np.float32)
    warped = np.asarray(result.warp(moving) if warped is None else warped)
    determinant = result.jacobian_determinant()
    displacement = result.displacement()
    if result.dim == 2:                  # where each pixel of B samples A, in A's pixels (axis 0, axis 1)
        grid = np.indices(result.fixed_shape).astype(np.float32) + displacement
    else:                                # the same for the middle slice's in-plane axes
        grid = np.indices(result.fixed_shape[1:]).astype(np.float32) + displacement[1:, result.fixed_shape[0] // 2]

    figure = Figure(figsize=(12, 8))
    axes = figure.subplots(2, 3)
    panels = [("Image A (moving)", moving), ("Image B (fixed)", fixed), (r"A $\circ\ \phi_{AB}$ (warped)", warped)]
    for ax, (name, image) in zip([axes[0, 0], axes[0, 1], axes[1, 0]], panels):
        ax.imshow(_middle_slice(image), cmap="gray")
        ax.set_title(name)
    ax = axes[0, 2]
    ax.imshow(_middle_slice(warped), cmap="gray")
    source_step = max(1.0, result.moving_shape[-1] / 32)
    plot_deformation_grid(ax, grid, step=source_step)
    ax.set_title(r"deformation grid $\phi_{AB}$ on B")

    ax = axes[1, 1]
    log_det = np.log2(np.clip(_middle_slice(determinant), 1e-3, None))
    limit = max(1.0, float(np.percentile(np.abs(log_det), 99)))
    shown = ax.imshow(log_det, cmap="RdBu_r", vmin=-limit, vmax=limit)
    figure.colorbar(shown, ax=ax, fraction=0.046)
    folds = float((determinant <= 0).mean())
    ax.set_title(f"log2 det J (folds {100 * folds:.3f}%)")

    plot_loss_terms(axes[1, 2], result.history)
    for ax in axes.flat[:5]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title)
    # a fixed layout for the fixed panels (tight_layout measures every text: about a second)
    figure.subplots_adjust(left=0.02, right=0.93, bottom=0.07, top=0.9 if title else 0.95, wspace=0.45, hspace=0.15)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110), suffix=".png")
    return path
