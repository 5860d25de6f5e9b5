"""Tensor-parallel process groups and the collectives the sharded layers use."""

from inferneo.distributed.parallel_state import (
    TensorParallelGroup,
    destroy_tensor_parallel,
    get_tp_group,
    init_tensor_parallel,
)

__all__ = ["TensorParallelGroup", "destroy_tensor_parallel", "get_tp_group", "init_tensor_parallel"]
