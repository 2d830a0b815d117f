"""Tensor parallelism launched from outside (torchrun's variables, one process per rank, as
on two nodes) and the decode-graph protocol between rank 0 and its workers, on CPU (gloo).

Oracle: the single-device engine on the same fresh random checkpoint in the same run."""

from __future__ import annotations

import datetime
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistralpy.engine.engine import LLMEngine
from mistralpy.params import SamplingParams
from mistralpy.runner import distributed
from mistralpy.runner.distributed import Rendezvous, TensorParallelSizeError
from mistralpy.testing import tiny_checkpoint
from tests.engine.test_engine_tiny import make_prompt
from tests.engine.test_tensor_parallel import assert_same_greedy, engine_config, run_requests
from tests.rerun_graphs import attach_graphs
from tests.seeds import fresh_seeds

# a rank stuck in a gloo wait holds the GIL-free C call: only the thread method ends it
pytestmark = pytest.mark.timeout(240, method="thread")

SEED = fresh_seeds(1, "tp-launch")[0]
ROOT = Path(__file__).resolve().parents[2]
PARAMS = SamplingParams(
    max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("tiny-tp-launch"), seed=SEED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int) -> dict[str, str]:
    """What `torchrun --nnodes 2 --nproc-per-node 1 --node-rank R` gives each process."""
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "GROUP_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def start_rank0(ckpt, port: int, monkeypatch) -> LLMEngine:
    """This process's engine as rank 0 of the launcher's group (its variables set meanwhile)."""
    with monkeypatch.context() as m:
        for key, value in rank_env(0, port).items():
            m.setenv(key, value)
        return LLMEngine.from_config(engine_config(ckpt, tensor_parallel_size=2))


def requests(seed: int):
    rng = random.Random(seed)
    return [(f"r{i}", make_prompt(rng, rng.randrange(4, 30)), PARAMS) for i in range(3)]


def test_rendezvous_reads_torchrun_variables():
    env = {**rank_env(1, 29500), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert Rendezvous.from_env(env) == Rendezvous(1, 2, 0, "127.0.0.1", 29500, agent_store=True)
    assert Rendezvous.from_env({}) is None
    with pytest.raises(TensorParallelSizeError, match="MASTER_ADDR"):
        Rendezvous.from_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(TensorParallelSizeError, match="RANK 2"):
        Rendezvous.from_env(rank_env(2, 1))
    assert Rendezvous.from_env(rank_env(1, 1)).device(torch.device("cuda")) == torch.device(
        "cuda", 0
    )


def test_two_node_launch_matches_tp1(ckpt, monkeypatch):
    """Rank 1 is `mistralpy serve` in its own process (as on a second node): it serves no
    HTTP, only its shard; rank 0 is this process's engine. Greedy tokens equal tp=1's."""
    port = free_port()
    env = {**os.environ, **rank_env(1, port), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mistralpy.server.cli", "serve", str(ckpt), "--device", "cpu",
           "--dtype", "f32", "--tensor-parallel-size", "2", "--max-model-len", "160"]  # fmt: skip
    node1 = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        tp2 = start_rank0(ckpt, port, monkeypatch)
        try:
            assert tp2.runner.workers.procs == []  # nothing spawned: the launcher made rank 1
            got = run_requests(tp2, requests(SEED))
        finally:
            tp2.shutdown()  # STOP: rank 1 returns and its command exits 0
        want = run_requests(LLMEngine.from_config(engine_config(ckpt)), requests(SEED))
        for rid in want:
            assert_same_greedy(want[rid].outputs[0], got[rid].outputs[0])
        assert node1.wait(timeout=60) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
        print(node1.communicate()[0].decode()[-3000:])  # rank 1's log, shown on failure
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------- decode graphs


def graph_worker(port: int, path: str) -> None:
    """Rank 1 with stand-in graphs, serving rank 0's messages (spawned process)."""
    from mistralpy.checkpoint.loader import load_model

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    rdzv = Rendezvous.from_env(rank_env(1, port))
    channel = distributed._join_group(
        1, 2, rdzv.store(datetime.timedelta(seconds=120)), cpu, datetime.timedelta(seconds=120)
    )
    box = [None]  # rank 0's (runner config, dtype, isq, load format): see join_external
    channel.objects(box)
    cfg, dtype = box[0][:2]
    model = load_model(Path(path), dtype, cpu, parallel=channel.parallel).eval()
    runner = distributed.ShardRunner(model, cfg, cpu, dtype)
    attach_graphs(runner, model)
    distributed._serve(runner, channel)
    torch.distributed.destroy_process_group()


def test_decode_graph_messages_keep_workers_in_step(ckpt, monkeypatch):
    """Rank 0 decodes through its graphs (load, replay, launch-ahead advance + replay); each
    call reaches the worker as plain data and the worker replays its own graph: the
    all-reduces inside meet, and greedy tokens equal tp=1's."""
    port = free_port()
    worker = torch.multiprocessing.get_context("spawn").Process(
        target=graph_worker, args=(port, str(ckpt)), daemon=True
    )
    worker.start()
    try:
        tp2 = start_rank0(ckpt, port, monkeypatch)
        try:
            runner = tp2.runner
            graphs = attach_graphs(runner, runner.model.inner)
            runner.decode_graphs = distributed._DriverGraphs(graphs, runner.workers)
            got = run_requests(tp2, requests(SEED + 1))
            assert graphs.replays >= PARAMS.max_tokens - 2  # decode steps took the graph path
        finally:
            tp2.shutdown()
        want = run_requests(LLMEngine.from_config(engine_config(ckpt)), requests(SEED + 1))
        for rid in want:
            assert_same_greedy(want[rid].outputs[0], got[rid].outputs[0])
        worker.join(30)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
