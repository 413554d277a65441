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
    sizes_a, sizes_b, overlaps = _label_counts(a.reshape(-1), b.reshape(-1))
    if labels is None:
        labels = sorted(label for label in set(sizes_a) | set(sizes_b) if label != 0)
    scores = {}
    for label in labels:
        key = label.item() if isinstance(label, np.generic) else label
        total = sizes_a.get(key, 0) + sizes_b.get(key, 0)
        if total:
            scores[int(label)] = 2.0 * overlaps.get(key, 0) / total
    return scores


def _label_counts(a: np.ndarray, b: np.ndarray) -> tuple[dict, dict, dict]:
    """Voxels per label in ``a``, in ``b``, and where both hold that label: one pass of counting
    (``bincount`` for small non-negative integer labels, else over the sorted distinct values)
    instead of three comparisons per label."""
    same = a[a == b]
    if a.dtype.kind in "iub" and b.dtype.kind in "iub" and a.size and b.size \
            and min(a.min(), b.min()) >= 0 and max(a.max(), b.max()) < 1 << 20:
        counts = [np.bincount(values.astype(np.int64, copy=False)) for values in (a, b, same)]
        return tuple({int(label): int(count[label]) for label in np.flatnonzero(count)} for count in counts)
    out = []
    for values in (a, b, same):
        distinct, count = np.unique(values, return_counts=True)
        out.append({value.item(): int(n) for value, n in zip(distinct, count)})
    return tuple(out)


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
