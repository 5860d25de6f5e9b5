"""Tensor-parallel and pipeline process groups, and the collectives and transfers the model runner uses."""

from inferneo.distributed.parallel_state import (
    PipelineGroup,
    TensorParallelGroup,
    destroy_tensor_parallel,
    get_pp_group,
    get_tp_group,
    init_parallel,
    init_tensor_parallel,
)

__all__ = ["PipelineGroup", "TensorParallelGroup", "destroy_tensor_parallel", "get_pp_group", "get_tp_group",
           "init_parallel", "init_tensor_parallel"]
