"""Fields and map pairs: identity start, batched evaluation equals one-by-one evaluation."""

import pytest
import torch

from neuralfield_reg.encoders import HashGridConfig
from neuralfield_reg.transforms.fields import DisplacementFields, MapPair

SMALL = HashGridConfig(n_levels=4, log2_hashmap_size=8, base_resolution=4, per_level_scale=1.5)


def randomised_pair(dim=2, **kwargs):
    pair = MapPair(dim, encoding=SMALL, hidden_widths=(16, 16), **kwargs).double()
    with torch.no_grad():
        for parameter in pair.parameters():
            parameter.normal_(0, 0.3)
    return pair


@pytest.mark.parametrize("dim", [2, 3])
def test_maps_start_as_the_identity_plus_affine(dim):
    matrix = torch.eye(dim) * 1.1
    offset = torch.full((dim,), -0.05)
    pair = MapPair(dim, encoding=SMALL, affine_AB=(matrix, offset))
    points = torch.rand(50, dim)
    with torch.no_grad():
        torch.testing.assert_close(pair.phi_AB(points), points * 1.1 - 0.05)
        torch.testing.assert_close(pair.phi_BA(points), points)


def test_batched_evaluation_equals_one_direction_at_a_time():
    pair = randomised_pair()
    a, b = torch.rand(30, 2, dtype=torch.float64), torch.rand(30, 2, dtype=torch.float64)
    c = torch.rand(11, 2, dtype=torch.float64)
    both = pair(a, b)
    torch.testing.assert_close(both[0], pair.phi_AB(a))
    torch.testing.assert_close(both[1], pair.phi_BA(b))
    uneven = pair(a, c)                          # different sizes take the per-field path
    torch.testing.assert_close(uneven[1], pair.phi_BA(c))
    assert pair(None, None) == (None, None)


def test_the_two_fields_are_independent():
    pair = randomised_pair()
    points = torch.rand(20, 2, dtype=torch.float64)
    before = pair.phi_BA(points)
    with torch.no_grad():
        pair.fields.encoding.params[0].normal_()
        pair.fields.weights[0][0].normal_()
    torch.testing.assert_close(pair.phi_BA(points), before)


def test_field_is_continued_constantly_outside_the_domain():
    fields = DisplacementFields(2, 1, SMALL, (16,)).double()
    with torch.no_grad():
        for parameter in fields.parameters():
            parameter.normal_()
    inside = torch.tensor([[1.0, 0.3], [0.0, 0.7]], dtype=torch.float64)
    outside = torch.tensor([[1.2, 0.3], [-0.4, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(fields([outside])[0], fields([inside])[0])


def test_level_weights_switch_levels_off():
    fields = DisplacementFields(2, 1, SMALL, (16,)).double()
    with torch.no_grad():
        for parameter in fields.parameters():
            parameter.normal_()
    points = torch.rand(10, 2, dtype=torch.float64)
    constant = fields([points], torch.zeros(SMALL.n_levels))[0]
    torch.testing.assert_close(constant, constant[:1].expand_as(constant))
    full = fields([points], torch.ones(SMALL.n_levels))[0]
    torch.testing.assert_close(full, fields([points])[0])


def test_wrong_number_of_point_sets():
    fields = DisplacementFields(2, 2, SMALL)
    with pytest.raises(ValueError, match="one per field"):
        fields([torch.rand(3, 2)])
