"""``inferneo bench``: measure a server (``serve``, ``batch-sizes``) or the engine in this process
(``throughput``). Workloads come from :mod:`inferneo.bench.workload`."""

from inferneo.bench.workload import Workload, load_dataset, make_workload, parse_range, random_workload

__all__ = ["Workload", "load_dataset", "make_workload", "parse_range", "random_workload"]
