import pytest
import torch

from neuralfield_reg.geometry.filters import gaussian_blur, gaussian_kernel1d, resample


def test_kernel_is_normalised_with_the_right_variance():
    kernel = gaussian_kernel1d(2.0, dtype=torch.float64)
    x = torch.arange(kernel.numel(), dtype=torch.float64) - kernel.numel() // 2
    assert float(kernel.sum()) == pytest.approx(1.0)
    assert float((kernel * x * x).sum()) == pytest.approx(4.0, rel=0.02)


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)])
def test_blur_keeps_constants_and_mass_of_a_centred_impulse(shape):
    constant = torch.full(shape, 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 1.5), constant)
    impulse = torch.zeros(shape)
    impulse[tuple(n // 2 for n in shape)] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    assert float(blurred.sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(blurred.max()) < 0.5
    torch.testing.assert_close(gaussian_blur(impulse, 0.0), impulse)


def test_blur_per_axis_sigma():
    impulse = torch.zeros(15, 15)
    impulse[7, 7] = 1.0
    blurred = gaussian_blur(impulse, (2.0, 0.0))
    assert float(blurred[:, 6].abs().sum()) == 0.0       # nothing spread along axis 1
    assert float(blurred[5, 7]) > 0.0                    # spread along axis 0


def test_resample_keeps_the_unit_domain():
    grid = torch.linspace(0, 1, 9)[:, None] + 2 * torch.linspace(0, 1, 5)[None, :]
    small = resample(grid, (5, 3))
    expected = torch.linspace(0, 1, 5)[:, None] + 2 * torch.linspace(0, 1, 3)[None, :]
    torch.testing.assert_close(small, expected)


@pytest.mark.parametrize("shape,sigma", [((9, 31), (0.7, 2.5)), ((6, 11, 8), (1.0, 0.0, 3.0)), ((3, 5, 4), 2.0)])
def test_blur_is_the_separable_convolution_with_replicated_edges(shape, sigma):
    """Against numpy: edge-padded np.convolve along every axis (axes shorter than the kernel
    included)."""
    import numpy as np

    image = torch.rand(shape, dtype=torch.float64)
    expected = image.numpy()
    sigmas = [sigma] * len(shape) if isinstance(sigma, float) else sigma
    for axis, s in enumerate(sigmas):
        if s == 0:
            continue
        kernel = gaussian_kernel1d(s, dtype=torch.float64).numpy()
        radius = len(kernel) // 2
        expected = np.apply_along_axis(
            lambda row: np.convolve(np.pad(row, radius, mode="edge"), kernel[::-1], mode="valid"), axis, expected)
    np.testing.assert_allclose(gaussian_blur(image, sigma).numpy(), expected, rtol=1e-12, atol=1e-12)
