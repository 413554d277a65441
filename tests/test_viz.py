import numpy as np
import torch

from neuralfield_reg import FitConfig, RegistrationResult
from neuralfield_reg.transforms.fields import MapPair
from neuralfield_reg.app.viz import overview_figure


def test_overview_figure_writes_a_png_for_2d_and_3d(tmp_path):
    for shape in [(24, 20), (6, 12, 10)]:
        dim = len(shape)
        maps = MapPair(dim, affine_AB=(torch.eye(dim) * 0.9, torch.full((dim,), 0.05)))
        result = RegistrationResult(maps, moving_shape=shape, fixed_shape=shape, moving_spacing=(1.0,) * dim,
                                    fixed_spacing=(1.0,) * dim, config=FitConfig(), backend="torch",
                                    history={"loss": [1.0, 0.5, 0.25], "similarity": [1.0, 0.4, 0.2]})
        image = np.random.rand(*shape).astype(np.float32)
        path = overview_figure(result, image, image, tmp_path / f"overview_{dim}d.png", title="t")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
