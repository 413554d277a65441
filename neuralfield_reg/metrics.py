"""Registration quality metrics. Inputs are numpy arrays or tensors; outputs are Python floats."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _numpy(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(value).__name__}")


def dice(labels_a, labels_b, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2 |A n B| / (|A| + |B|)`` per label.

    Args:
        labels_a, labels_b: integer label maps of equal shape; 0 is background.
        labels: the labels to score; by default every non-zero label present in either map.
            A label absent from both maps is left out.
    """
    a, b = _numpy("labels_a", labels_a), _numpy("labels_b", labels_b)
    if a.shape != b.shape:
        raise ValueError(f"labels_a and labels_b: expected equal shapes, got {a.shape} and {b.shape}")
    for name, value in (("labels_a", a), ("labels_b", b)):
        if np.iscomplexobj(value):
            raise TypeError(f"{name}: expected integer labels, got dtype {value.dtype}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"{name}: label maps must be finite, got NaN or Inf")
    if labels is None:
        labels = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()))
        labels = [label for label in labels if label != 0]
    scores = {}
    for label in labels:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        if total:
            scores[int(label)] = 2.0 * int((in_a & in_b).sum()) / total
    return scores


def mean_dice(labels_a, labels_b, labels: Sequence[int] | None = None) -> float:
    """Mean of :func:`dice` over labels (NaN when no label is present)."""
    scores = dice(labels_a, labels_b, labels)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def folding_fraction(jacobian_determinant) -> float:
    """Share of voxels whose Jacobian determinant is ``<= 0`` (the map folds there)."""
    det = _numpy("jacobian_determinant", jacobian_determinant)
    if det.size == 0:
        raise ValueError("jacobian_determinant: expected a non-empty array")
    return float((det <= 0).mean())


def inverse_consistency_error(residual, spacing: Sequence[float] | None = None) -> float:
    """Mean Euclidean norm of inverse-consistency residuals ``(N, d)``, e.g.
    ``phi_AB(phi_BA(x)) - x`` in voxels; with ``spacing`` the norm is in physical units."""
    r = _numpy("residual", residual).astype(np.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"residual: expected a non-empty (N, d) array, got shape {r.shape}")
    if spacing is not None:
        r = r * np.asarray(spacing, dtype=np.float64)
    return float(np.sqrt((r ** 2).sum(axis=1)).mean())


def target_registration_error(mapped_points, target_points, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Per-landmark distance between mapped and target points.

    Args:
        mapped_points: ``(K, d)`` fixed-image landmarks mapped into the moving image, in moving voxels.
        target_points: ``(K, d)`` the corresponding moving-image landmarks, in voxels.
        spacing: moving-image voxel size per axis (distances come out in its unit); default 1.
    Returns:
        ``(K,)`` distances.
    """
    mapped, target = _numpy("mapped_points", mapped_points), _numpy("target_points", target_points)
    if mapped.shape != target.shape or mapped.ndim != 2:
        raise ValueError(f"mapped_points and target_points: expected equal (K, d) shapes, "
                         f"got {mapped.shape} and {target.shape}")
    scale = np.ones(mapped.shape[1]) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return np.sqrt((((mapped - target) * scale) ** 2).sum(axis=1))
