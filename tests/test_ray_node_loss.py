"""A whole Ray node lost mid-job: a third node is added to the session's local cluster, an engine replica is
placed on it, and the node's processes are killed (``cluster.remove_node(node, allow_graceful=False)``).
The batch replica goes there by a custom resource only the added nodes have; after the loss a node with that
resource joins (as an autoscaler brings one), where Ray restarts the replica or the driver's retry round runs.

- ``inferneo batch --ray``'s runner (through the Ray Dataset processor): Ray restarts the lost replica on a node
  that is left and runs its batches again, so every ``custom_id`` is written once with the single-machine runner's
  (greedy) answer; with Ray's retries turned off, a second round with fresh replicas answers the rest; with that
  round turned off too, the lines the lost replica held are written with the error ``replica_failed`` and the job
  still finishes with every ``custom_id`` once.
- ``inferneo serve --data-parallel-size 2 --data-parallel-backend ray``: the replica whose node is lost is taken
  out of rotation, ``/health`` reports 1 of 2 replicas (``degraded``) and the other one answers, greedy as one
  engine.

Why a node added here rather than one of the shared fixture's: the tests after these still need the fixture's two
nodes, and its head cannot be removed at all (this process is connected through it).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import httpx
import pytest

from inferneo import LLM, SamplingParams
from inferneo.batch import BatchJob
from inferneo.batch.on_ray import REPLICA_FAILED, run_on_ray
from inferneo.integrations.ray import EngineProcessorConfig, ReplicaResources
from inferneo.testing.server import RemoteServer
from tests.test_batch_ray import NUM_LINES, answers, job_input, reference, server  # noqa: F401 (fixtures)

ENGINE = {"kv_cache_memory": "16MiB", "num_threads": 1, "max_num_seqs": 8}


SLOT = {"inferneo_test_replica_slot": 1.0}  # what a replica asks: a custom resource only the added nodes have
SLOTS = {"inferneo_test_replica_slot": 8.0}  # what an added node has (room for a restarted pool's replica too)


@contextlib.contextmanager
def extra_node(cluster, **resources):
    """A one-CPU node added to ``cluster`` for the test, removed at the end if the test has not removed it; on the
    way out, waits until Ray counts it dead, so that the next test's actors, asking for the same custom resource,
    are not placed on it (a killed node stays alive to the scheduler for a few seconds: seen as an actor dying at
    the start of the next test)."""
    import ray

    node = cluster.add_node(num_cpus=1, resources=resources or None)
    try:
        yield node
    finally:
        if node in cluster.worker_nodes:
            cluster.remove_node(node, allow_graceful=False)
        wait_until(lambda: not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()), 120,
                   "Ray to count the removed node dead")


def alive_actors(class_name: str) -> dict[int, str]:
    """Process id -> node id of the live actors whose class name contains ``class_name``."""
    import ray._private.state

    return {a["Pid"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if class_name in a["ActorClassName"] and a["State"] == "ALIVE"}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.ray
@pytest.mark.slow  # a node started and lost, a replica loaded twice: 30-80 s each on the loaded 2-core host
@pytest.mark.parametrize("bounds", ["ray_restarts", "driver_round", "none"])
def test_batch_on_ray_survives_a_lost_node(bounds, ray_cluster, tiny_llama_dir, job_input, reference,  # noqa: F811
                                           tmp_path):
    """``bounds``: what answers the lost replica's lines: Ray's restart of the replica on another node (the
    default), the driver's second round with a fresh replica (Ray's restarts and retries off), or nothing (the
    lines are written with the error ``replica_failed``)."""
    out = tmp_path / "out.jsonl"
    with contextlib.ExitStack() as nodes:
        node = nodes.enter_context(extra_node(ray_cluster, **SLOTS))
        # zero CPUs a replica (the fixture's nodes have one CPU each, for Ray Data's own tasks) and the custom
        # resource that only the added node has: the replica is there
        ray_bounds = {} if bounds == "ray_restarts" else {"max_restarts": 0, "max_task_retries": 0}
        config = EngineProcessorConfig(
            model=str(tiny_llama_dir), engine_options=ENGINE, served_model_name="tiny", batch_size=2,
            batches_per_replica=2, replicas=1, resources=ReplicaResources(num_cpus=0),
            actor_options={"resources": SLOT}, **ray_bounds)
        summaries = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with BatchJob(job_input, out) as job:
                    summaries.append(run_on_ray(job, config, progress=False,
                                                retry_rounds=0 if bounds == "none" else 1))
            except BaseException as exc:
                errors.append(exc)

        driver = threading.Thread(target=run)
        driver.start()
        try:
            # the invalid line's record comes first, written by the driver; then two answers from the replica
            wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 3 or not driver.is_alive(),
                       240, "the first answers")
            assert not errors, errors
            assert node.node_id in alive_actors("EngineReplica").values(), "the replica is not on the new node"
            ray_cluster.remove_node(node, allow_graceful=False)
            at_loss = out.read_bytes().count(b"\n")
            assert at_loss < NUM_LINES, "the node was lost after the job was done"
            if bounds != "none":  # a node with the resource joins, as an autoscaler would bring one
                replacement = nodes.enter_context(extra_node(ray_cluster, **SLOTS))
        finally:
            driver.join(timeout=300)
        assert not driver.is_alive() and not errors, errors
        if bounds == "ray_restarts":  # restarted by Ray on the replacement (the pool may be gone by now)
            assert set(alive_actors("EngineReplica").values()) <= {replacement.node_id}
    (summary,) = summaries
    assert summary.complete
    got = answers(out)  # fails on a custom_id written twice
    assert sorted(got, key=str) == sorted(reference, key=str), "every custom_id exactly once"
    lost = {cid for cid, answer in got.items() if answer[1] == REPLICA_FAILED}
    assert {cid: got[cid] for cid in got if cid not in lost} == {cid: reference[cid] for cid in got
                                                                  if cid not in lost}
    if bounds == "none":
        assert lost and summary.failed >= len(lost)
    else:
        assert not lost


@pytest.mark.ray
@pytest.mark.slow  # a node started and lost, a server with two Ray replicas: 30-50 s on the loaded 2-core host
def test_dp_serving_on_ray_loses_a_node_and_serves_on(ray_cluster, tiny_llama_dir):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    prompts = ["The capital of France is", "Once upon a time", "A node was lost and"]
    llm = LLM(str(tiny_llama_dir), num_threads=1, kv_cache_memory="16MiB", max_model_len=256)
    try:
        expected = [o.outputs[0].text for o in llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]
    finally:
        llm.shutdown()

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    (shared_worker,) = ray_cluster.worker_nodes
    with extra_node(ray_cluster) as node:
        # the fixture's worker node's CPU is held, so the two replicas (one CPU each) go to the head and the new
        # node
        holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(shared_worker.node_id,
                                                                                   soft=False)).remote()
        try:
            ray.get(holder.ready.remote(), timeout=120)
            env = {"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
            with RemoteServer(tiny_llama_dir, "--data-parallel-size", "2", "--data-parallel-backend", "ray",
                              "--kv-cache-memory", "16MiB", "--num-threads", "1", "--max-model-len", "256",
                              "--disable-access-log", env=env, startup_timeout=300) as srv, \
                    httpx.Client(timeout=60) as http:
                placed = alive_actors("EngineCoreActor")
                assert sorted(placed.values()) == sorted([ray_cluster.head_node.node_id, node.node_id])
                assert http.get(srv.url("/health")).json()["live_replicas"] == 2
                ray_cluster.remove_node(node, allow_graceful=False)

                def one_left() -> bool:
                    return http.get(srv.url("/health")).json()["live_replicas"] == 1

                wait_until(one_left, 120, "/health to report one live replica")
                health = http.get(srv.url("/health"))
                body = health.json()
                assert health.status_code == 200 and body["status"] == "degraded" and body["replicas"] == 2, body
                (dead,) = [s for s in body["replica_states"] if not s["live"]]
                assert placed[dead["pid"]] == node.node_id and "error" in dead  # the lost node's replica
                for prompt, want in zip(prompts, expected, strict=True):
                    r = http.post(srv.url("/v1/completions"), json={
                        "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
                    assert r.status_code == 200, r.text
                    assert r.json()["choices"][0]["text"] == want
                live = [line for line in http.get(srv.url("/metrics")).text.splitlines()
                        if line.startswith("inferneo:replica_live{")]
                assert sorted(float(line.rsplit(" ", 1)[1]) for line in live) == [0.0, 1.0], live
        finally:
            ray.kill(holder)


def test_retry_rounds_must_be_a_non_negative_integer(job_input, tmp_path):  # noqa: F811
    pytest.importorskip("ray")
    with BatchJob(job_input, tmp_path / "o.jsonl") as job, pytest.raises(ValueError, match="retry_rounds"):
        run_on_ray(job, EngineProcessorConfig(), progress=False, retry_rounds=-1)


def test_actor_options_cannot_repeat_the_configs_own_fields():
    with pytest.raises(ValueError, match="actor_options must not set max_restarts, num_cpus"):
        EngineProcessorConfig(actor_options={"num_cpus": 2, "max_restarts": 5})


def test_engine_in_process_must_be_a_bool():
    with pytest.raises(TypeError, match="engine_in_process must be a bool, got 'yes'"):
        EngineProcessorConfig(engine_in_process="yes")

