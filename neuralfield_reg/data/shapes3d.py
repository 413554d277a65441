"""Synthetic labelled 3D volumes: a deformed ellipsoid "body" with two inner structures.

Each volume holds an ellipsoid with semi-axes ~ U[0.25, 0.36] (unit cube), centre ~ U[0.45, 0.55]^3
and a random rotation, whose surface is bent by a smooth random displacement (a few low-frequency
sines, amplitude up to 0.04). Inside it sit two spheres of radius ~ U[0.07, 0.11] at random
positions well inside the body (fractions of the semi-axes along roughly opposite random
directions, so they do not overlap). Labels:
1 = body (outside the spheres), 2 and 3 = the spheres. Intensities: background 0, body 0.5,
sphere 2 bright (1.0), sphere 3 dark (0.2), with tanh edges (10-90 % over ~3 voxels at 64^3). Every
structure has a counterpart in every other volume, so any two volumes make a registrable pair.
Coordinates follow the library convention (unit cube, axis 0 first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import ShapePair

_INTENSITY = (0.0, 0.5, 1.0, 0.2)        # background, body, sphere 2, sphere 3


@dataclass(frozen=True)
class Body:
    center: np.ndarray                   # (3,)
    semi_axes: np.ndarray                # (3,)
    rotation: np.ndarray                 # (3, 3), columns are the ellipsoid's axes
    wobble: np.ndarray                   # (4, 3 + 1 + 3): per surface sine, frequency vector, phase, amplitude
    spheres: np.ndarray                  # (2, 4): centre (3) and radius

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Body":
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                             [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                             [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        semi_axes = rng.uniform(0.25, 0.36, size=3)
        center = rng.uniform(0.45, 0.55, size=3)
        wobble = np.concatenate([rng.normal(scale=2 * np.pi * 1.5, size=(4, 3)),   # frequencies
                                 rng.uniform(0, 2 * np.pi, size=(4, 1)),           # phases
                                 rng.uniform(-0.01, 0.01, size=(4, 3))], axis=1)   # amplitudes
        spheres = []
        first = rng.normal(size=3)
        for k in range(2):           # the second sphere roughly opposite the first: no overlap
            direction = first if k == 0 else -first / np.linalg.norm(first) + 0.3 * rng.normal(size=3)
            direction = direction / np.linalg.norm(direction)
            local = direction * rng.uniform(0.25, 0.45) * semi_axes
            spheres.append(np.concatenate([center + rotation @ local, [rng.uniform(0.07, 0.11)]]))
        return cls(center, semi_axes, rotation, wobble, np.array(spheres))

    def render(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(size,)*3`` float32 in [0, 1] and its label map (uint8, 0..3)."""
        axis = np.linspace(0.0, 1.0, size)
        points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)       # (S, S, S, 3)
        bent = points.copy()
        for frequency_phase_amplitude in self.wobble:
            frequency, phase, amplitude = (frequency_phase_amplitude[:3], frequency_phase_amplitude[3],
                                           frequency_phase_amplitude[4:])
            bent = bent + amplitude * np.sin(points @ frequency + phase)[..., None]
        local = (bent - self.center) @ self.rotation / self.semi_axes
        # Distance-like: (|local| - 1) scaled by the smallest semi-axis, negative inside.
        body = (np.linalg.norm(local, axis=-1) - 1.0) * self.semi_axes.min()
        spheres = [np.linalg.norm(bent - s[:3], axis=-1) - s[3] for s in self.spheres]
        sharpness = 0.75 * size
        inside = [0.5 * (1.0 - np.tanh(sharpness * d)) for d in (body, *spheres)]
        image = _INTENSITY[1] * inside[0]
        for k, fraction in ((2, inside[1]), (3, inside[2])):
            image = image + (_INTENSITY[k] - image) * fraction * inside[0]
        labels = np.where(body < 0, 1, 0)
        labels = np.where((spheres[0] < 0) & (body < 0), 2, labels)
        labels = np.where((spheres[1] < 0) & (body < 0) & (spheres[0] >= 0), 3, labels)
        return image.astype(np.float32), labels.astype(np.uint8)


def body_pairs(n: int, size: int = 64, seed: int = 0) -> list[ShapePair]:
    """``n`` reproducible pairs of independent random bodies (same ``seed`` -> same pairs)."""
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n!r}")
    if size < 8:
        raise ValueError(f"size: expected at least 8 voxels per axis, got {size!r}")
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        moving, moving_labels = Body.random(rng).render(size)
        fixed, fixed_labels = Body.random(rng).render(size)
        pairs.append(ShapePair(moving, fixed, moving_labels, fixed_labels))
    return pairs
