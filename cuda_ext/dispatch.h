// Helpers shared by the CPU and CUDA entry points (they need PyTorch's headers; hashgrid.h does not).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace hashgrid {

// Calls function(scalar_t{}, std::integral_constant<int, D>{}) for the points' dtype and dimension.
template <typename Function>
void dispatch(const at::Tensor& points, Function&& function) {
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "hashgrid", [&] {
    if (points.size(1) == 2) {
      function(scalar_t(0), std::integral_constant<int, 2>());
    } else {
      function(scalar_t(0), std::integral_constant<int, 3>());
    }
  });
}

// The per-point table indices, or nullptr when every point uses the default table.
inline const int64_t* index_pointer(const at::Tensor& table_index) {
  return table_index.numel() > 0 ? table_index.data_ptr<int64_t>() : nullptr;
}

}  // namespace hashgrid
