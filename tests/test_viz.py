import numpy as np
import torch

from neuralfield_reg import FitConfig, RegistrationResult
from neuralfield_reg.transforms.fields import MapPair
from neuralfield_reg.app.viz import overview_figure, plot_loss_terms


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


def test_negative_terms_go_to_a_linear_twin_axis():
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    history = {"loss": [0.0, -1.0, -1.5], "similarity": [0.0, -1.1, -1.6], "gradient_icon": [0.0, 1e-3, 2e-3]}
    twin = plot_loss_terms(ax, history)
    assert ax.get_yscale() == "log" and twin.get_yscale() == "linear"
    assert [line.get_label() for line in ax.get_lines()] == ["gradient_icon"]
    assert [line.get_label() for line in twin.get_lines()] == ["loss", "similarity"]
    np.testing.assert_array_equal(twin.get_lines()[1].get_ydata(), [-1.1, -1.6])     # from iteration 1
    assert plot_loss_terms(Figure().subplots(), {"loss": [1.0, 0.5], "similarity": [1.0, 0.4]}) is None
