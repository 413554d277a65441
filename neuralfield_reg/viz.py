"""Matplotlib figures of a 2D registration (or the middle slice of a 3D one)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .result import RegistrationResult  # noqa: E402


def _middle_slice(array: np.ndarray) -> np.ndarray:
    """A 2D view: the array itself, or the middle slice along axis 0 of a volume."""
    return array if array.ndim == 2 else array[array.shape[0] // 2]


def plot_deformation_grid(ax, mapped_voxels: np.ndarray, step: int = 4, **style) -> None:
    """Draw the lines of a regular grid after mapping.

    Args:
        mapped_voxels: ``(2, H, W)``: for every target pixel, where it samples the source, in source
            pixel coordinates (axis 0, axis 1).
        step: draw every ``step``-th grid line.
    """
    style = {"color": "tab:orange", "linewidth": 0.6, **style}
    rows, cols = mapped_voxels
    for i in range(0, rows.shape[0], step):
        ax.plot(cols[i, :], rows[i, :], **style)
    for j in range(0, rows.shape[1], step):
        ax.plot(cols[:, j], rows[:, j], **style)


def overview_figure(result: RegistrationResult, moving, fixed, path, *, title: str | None = None):
    """Six panels: moving A, fixed B, the deformation grid of phi_AB, A warped onto B, the Jacobian
    determinant of phi_AB, and the loss curves. Saved as a PNG at ``path``; returns the path."""
    moving = np.asarray(moving, dtype=np.float32)
    fixed = np.asarray(fixed, dtype=np.float32)
    warped = np.asarray(result.warp(moving))
    determinant = result.jacobian_determinant()
    displacement = result.displacement()
    grid = np.indices(result.fixed_shape).astype(np.float32) + displacement

    figure, axes = plt.subplots(2, 3, figsize=(12, 8))
    panels = [("Image A (moving)", moving), ("Image B (fixed)", fixed), (r"A $\circ\ \phi_{AB}$ (warped)", warped)]
    for ax, (name, image) in zip([axes[0, 0], axes[0, 1], axes[1, 0]], panels):
        ax.imshow(_middle_slice(image), cmap="gray")
        ax.set_title(name)
    ax = axes[0, 2]
    ax.imshow(_middle_slice(fixed), cmap="gray", alpha=0.5)
    if result.dim == 2:
        plot_deformation_grid(ax, grid, step=max(1, result.fixed_shape[0] // 32))
    else:
        middle = result.fixed_shape[0] // 2
        plot_deformation_grid(ax, grid[1:, middle], step=max(1, result.fixed_shape[1] // 32))
    ax.set_xlim(-0.5, result.fixed_shape[-1] - 0.5)
    ax.set_ylim(result.fixed_shape[-2] - 0.5, -0.5)
    ax.set_title(r"deformation grid $\phi_{AB}$")

    ax = axes[1, 1]
    limit = max(1.0, float(np.abs(determinant - 1).max()))
    shown = ax.imshow(_middle_slice(determinant), cmap="RdBu_r", vmin=1 - limit, vmax=1 + limit)
    figure.colorbar(shown, ax=ax, fraction=0.046)
    folds = float((determinant <= 0).mean())
    ax.set_title(f"det J (folds {100 * folds:.3f}%)")

    ax = axes[1, 2]
    for name, values in result.history.items():
        if values and name != "loss":
            ax.semilogy(np.maximum(values, 1e-12), label=name)
    ax.semilogy(np.maximum(result.history.get("loss", [1e-12]), 1e-12), label="loss", color="black")
    ax.set_xlabel("iteration")
    ax.legend()
    ax.set_title("loss terms")
    for ax in axes.flat[:5]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
