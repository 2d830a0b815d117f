"""Tensor-parallel model runner over torch.distributed: the driver (rank 0) lives in the
engine's process, N-1 workers are spawned processes, one per further device.

Per step, the driver's model announces each decoder call to the workers before running it:
the call's plain values (shapes, host-side lengths) go by `broadcast_object_list` on a gloo
group, its tensors by one broadcast per dtype on the device group (NCCL on CUDA, the same gloo
group on CPU). Every rank then runs its shard and meets the others in the all-reduces and the
logits all-gather (see model.parallel); rank 0 samples. Images are encoded on rank 0 only (the
vision tower is loaded, replicated, on every rank, but workers never run it after the memory
profile) and their embeddings travel with the forward call.

Failures: workers report their traceback over a pipe; the launch waits on those pipes and the
process sentinels, so a worker that cannot start or load fails the launch at once. Afterwards a
monitor thread watches the workers; when one dies the runner is broken: the step in flight fails
(gloo: the peer's socket closes; NCCL: the group is aborted) and every later step raises
`TensorParallelError` at once. Workers exit when their parent disappears. `shutdown()` stops
them (stop message, join, then terminate/kill) and destroys the process group.

Decode CUDA graphs: every rank captures its own per bucket at start-up, in lockstep (the
captured all-reduces meet in NCCL), kept only if all ranks have them; rank 0's graph calls
(load rows, advance on the device, replay) go to the workers as messages first (_DriverGraphs).

Launched from outside (torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, one process
per rank, possibly on several hosts): rank 0 joins without spawning and sends its settings; the
other ranks run `run_external_worker`. Their death shows as a failed collective only.

Metadata waits on the gloo group with a very long timeout, so an idle server's workers can wait
for the next step indefinitely; liveness comes from the monitor, not from timeouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import logging
import math
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mistralpy.model.parallel import ParallelConfig, TensorParallelSizeError, check_tensor_parallel
from mistralpy.runner.errors import RunnerDeadError
from mistralpy.runner.kv_cache import KVCacheTooSmallError
from mistralpy.runner.model_runner import ModelRunner, RunnerConfig

if TYPE_CHECKING:
    from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration
    from mistralpy.runner.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait this long for the next step
_DEVICE_TIMEOUT = datetime.timedelta(minutes=10)  # one NCCL collective (watchdog)
_HOST = "127.0.0.1"  # workers are processes of this host


class TensorParallelError(RunnerDeadError):
    """A tensor-parallel worker failed or died; the runner cannot step any more."""


@dataclass(frozen=True)
class Rendezvous:
    """This process's place in a group launched from outside (torchrun, or the same variables
    set by hand on each node): one process per rank, rank 0 serves, the others are workers."""

    rank: int  # global rank (RANK)
    world_size: int  # ranks over all nodes (WORLD_SIZE)
    local_rank: int  # rank on this node: picks the GPU (LOCAL_RANK)
    master_addr: str  # host of rank 0's store (MASTER_ADDR)
    master_port: int  # its port (MASTER_PORT)
    agent_store: bool = False  # torchrun's agent already serves the store on that port

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Rendezvous | None:
        """The group torchrun describes in `env`; None when no launcher set RANK/WORLD_SIZE.
        Raises TensorParallelSizeError for an incomplete or inconsistent set."""
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return None
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise TensorParallelSizeError(f"multi-node launch: {', '.join(missing)} not set")
        try:
            rdzv = cls(
                int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            )  # fmt: skip
        except ValueError as exc:
            raise TensorParallelSizeError(f"multi-node launch: {exc}") from None
        if not 0 <= rdzv.rank < rdzv.world_size:
            raise TensorParallelSizeError(f"RANK {rdzv.rank} not in 0..WORLD_SIZE-1")
        return rdzv

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK on GPUs, else `device` (the CPU)."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def store(self, timeout: datetime.timedelta) -> Any:
        """The rendezvous store: rank 0 hosts it unless torchrun's agent already does."""
        host = self.rank == 0 and not self.agent_store
        return dist.TCPStore(
            self.master_addr, self.master_port, self.world_size, is_master=host,
            timeout=timeout, wait_for_workers=False,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Validation and devices


def tp_devices(device: torch.device, world_size: int) -> list[torch.device]:
    """Device of each rank: the CPU for all, or cuda:i, cuda:i+1, ... from `device`'s index.
    Raises TensorParallelSizeError when fewer GPUs are visible than ranks need."""
    if device.type != "cuda":
        return [device] * world_size
    base = device.index or 0
    visible = torch.cuda.device_count()
    if base + world_size > visible:
        raise TensorParallelSizeError(
            f"tensor_parallel_size {world_size} needs GPUs cuda:{base}..cuda:{base + world_size - 1}"
            f" but {visible} are visible"
        )
    return [torch.device("cuda", base + r) for r in range(world_size)]


def _join_group(
    rank: int, world_size: int, store: Any, device: torch.device, startup: datetime.timedelta
) -> _Channel:
    """Join the process group as `rank`; the channel holds the model's ParallelConfig (on the
    device group) and the gloo group that carries step metadata and may wait idle for a long
    time."""
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=startup)
    ranks = list(range(world_size))
    cpu_group = dist.new_group(ranks, backend="gloo", timeout=_IDLE_TIMEOUT)
    device_group = cpu_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device_group = dist.new_group(ranks, backend="nccl", timeout=_DEVICE_TIMEOUT)
    return _Channel(ParallelConfig(rank, world_size, device_group), cpu_group, device)


# ---------------------------------------------------------------------------------------------
# The step channel: plain values by object broadcast, tensors packed one buffer per dtype


class _Op(enum.Enum):
    FORWARD = "forward"  # payload: (input_ids, positions, attn, image_embeds)
    LOGITS = "logits"  # payload: hidden rows (N, hidden) to compute logits for
    GRAPH_LOAD = "graph_load"  # payload: (token_ids, positions, block tables) plain lists
    GRAPH_ADVANCE = "graph_advance"  # payload: (rows, sampled token ids (rows,))
    GRAPH_REPLAY = "graph_replay"  # payload: the bucket to replay
    STOP = "stop"  # payload: None


@dataclass(frozen=True)
class _TensorRef:
    """Placeholder for tensor `index` of a message, rebuilt by the receiver."""

    index: int


TensorSpec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one message tensor


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """`obj` with every tensor (inside dataclasses, lists, tuples) replaced by a _TensorRef;
    the tensors are appended to `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorRef(len(tensors) - 1)
    return _map_fields(obj, lambda x: _strip(x, tensors))


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of _strip: every _TensorRef replaced by its tensor."""
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    return _map_fields(obj, lambda x: _fill(x, tensors))


def _map_fields(obj: Any, fn: Any) -> Any:
    """`obj` with `fn` applied to each field of a dataclass or item of a list/tuple."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        return dataclasses.replace(obj, **{f.name: fn(getattr(obj, f.name)) for f in fields})
    if isinstance(obj, (list, tuple)):
        return type(obj)(fn(x) for x in obj)
    return obj


def _packing(specs: list[TensorSpec]) -> list[list[int]]:
    """Message tensors grouped into one broadcast buffer per dtype: index lists, in an order
    every rank derives alike from `specs`; groups without elements are left out."""
    groups: dict[str, list[int]] = {}
    for i, (_, dtype) in enumerate(specs):
        groups.setdefault(str(dtype), []).append(i)
    return [
        idxs for _, idxs in sorted(groups.items()) if sum(math.prod(specs[i][0]) for i in idxs) > 0
    ]


class _Channel:
    """Rank 0 sends (op, payload) messages; the other ranks receive them in the same order."""

    def __init__(self, parallel: ParallelConfig, cpu_group: Any, device: torch.device):
        self.parallel = parallel
        self.cpu_group = cpu_group
        self.device = device

    def send(self, op: _Op, payload: Any) -> None:
        """Driver: broadcast one message (its tensors on this rank's device or the CPU)."""
        tensors: list[torch.Tensor] = []
        skeleton = _strip(payload, tensors)
        specs = [(tuple(t.shape), t.dtype) for t in tensors]
        self.objects([(op, skeleton, specs)])
        for idxs in _packing(specs):
            flat = torch.cat([tensors[i].to(self.device).reshape(-1) for i in idxs])
            dist.broadcast(flat, group_src=0, group=self.parallel.group)

    def receive(self) -> tuple[_Op, Any]:
        """Worker: the next message, its tensors rebuilt on this rank's device."""
        box: list[Any] = [None]
        self.objects(box)
        op, skeleton, specs = box[0]
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
        for idxs in _packing(specs):
            sizes = [math.prod(specs[i][0]) for i in idxs]
            flat = torch.empty(sum(sizes), dtype=specs[idxs[0]][1], device=self.device)
            dist.broadcast(flat, group_src=0, group=self.parallel.group)
            for i, part in zip(idxs, flat.split(sizes)):
                tensors[i] = part.view(specs[i][0])
        return op, _fill(skeleton, tensors)

    def objects(self, box: list[Any]) -> None:
        """Broadcast rank 0's picklable values in `box` into every rank's `box`."""
        dist.broadcast_object_list(
            box, group_src=0, group=self.cpu_group, device=torch.device("cpu")
        )


# ---------------------------------------------------------------------------------------------
# Runners


class ShardRunner(ModelRunner):
    """A ModelRunner on one tensor-parallel rank; all ranks settle on the same KV block count
    (the smallest any rank has room for). Ranks must construct it together (collectives)."""

    def __init__(
        self,
        model: Mistral3ForConditionalGeneration,
        cfg: RunnerConfig,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        # set first: super().__init__ sizes the KV cache through _count_blocks, which meets
        # the other ranks in this group
        self.parallel: ParallelConfig = model.parallel
        # Decode graphs (CUDA): every rank captures its own in the same order (the captures'
        # all-reduces meet in NCCL); they are kept only if every rank has them, so that a
        # replay on rank 0 always meets a replay on each worker.
        super().__init__(model, cfg, device, dtype)
        if not self.parallel.min_int(int(self.decode_graphs is not None), device):
            self.decode_graphs = None

    def _count_blocks(self) -> int:
        error: KVCacheTooSmallError | None = None
        try:
            blocks = super()._count_blocks()
        except KVCacheTooSmallError as exc:  # still meet the other ranks, then fail together
            blocks, error = 0, exc
        blocks = self.parallel.min_int(blocks, self.device)
        if blocks < 1:
            raise error or KVCacheTooSmallError(
                "another tensor-parallel rank has no memory left for even one KV block"
            )
        return blocks


class TensorParallelRunner(ShardRunner):
    """Rank 0 of a tensor-parallel group: the engine's runner. Its model announces every
    forward and logits call to the workers (see module doc); sampling happens here only."""

    def __init__(
        self,
        model: Mistral3ForConditionalGeneration,
        cfg: RunnerConfig,
        device: torch.device,
        dtype: torch.dtype,
        workers: _Workers,
    ) -> None:
        super().__init__(model, cfg, device, dtype)
        self.workers: _Workers = workers
        self.model = _DriverModel(model, workers, self)
        if self.decode_graphs is not None:
            self.decode_graphs = _DriverGraphs(self.decode_graphs, workers)  # type: ignore[assignment]
        # Workers stop politely even if nobody calls shutdown (garbage collection, exit).
        self._finalizer = weakref.finalize(self, workers.close)

    @classmethod
    def launch(
        cls,
        path: Path,
        cfg: RunnerConfig,
        device: torch.device,
        dtype: torch.dtype,
        world_size: int,
        isq: str | None = None,
        load_format: str = "auto",
        startup_timeout: float = 900.0,
    ) -> TensorParallelRunner:
        """Spawn world_size - 1 workers, load every rank's shard of the checkpoint at `path`,
        size the KV cache together. Raises TensorParallelSizeError for a tp size the model or
        the machine cannot split over, TensorParallelError if a worker fails to start."""
        from mistralpy.checkpoint.loader import load_model
        from mistralpy.model.config import read_config

        text = read_config(path).text_config
        check_tensor_parallel(
            text.num_attention_heads, text.num_key_value_heads, text.intermediate_size, world_size
        )
        rdzv = Rendezvous.from_env(os.environ)  # torchrun's contract: the group is in env
        if rdzv is None:
            devices = tp_devices(device, world_size)
            spec = _WorkerSpec(path, cfg, dtype, isq, load_format, tuple(map(str, devices)))
            workers = _Workers.start(spec, startup_timeout)
        else:
            _check_external(rdzv, world_size, driver=True)
            devices = [rdzv.device(device)] * world_size  # rank 0 only knows its own
            spec = _WorkerSpec(path, cfg, dtype, isq, load_format, tuple(map(str, devices)))
            workers = _Workers.join_external(spec, rdzv, startup_timeout)
        try:
            model = load_model(path, dtype, devices[0], isq, load_format, parallel=workers.parallel)
            workers.wait_for("loaded", startup_timeout)
            runner = cls(model.eval(), cfg, devices[0], dtype, workers)
        except BaseException as exc:
            # a TensorParallelError already tells the worker's story (wait_for read its
            # last words off the pipe: describing it again would lose them)
            dead = None if isinstance(exc, TensorParallelError) else workers.failed_worker(2.0)
            workers.close()
            if dead is not None:
                raise TensorParallelError(workers.describe(dead)) from exc
            raise
        workers.watch()
        return runner

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        self._finalizer()

    def check_alive(self) -> None:
        """Raise TensorParallelError once a worker has died or a step failed."""
        self.workers.check()


class _DriverModel:
    """Rank 0's model: each decoder call is sent to the workers, then run here. Everything
    else (encode_images, config, embeddings) is the local model's: workers need none of it."""

    def __init__(
        self, model: Mistral3ForConditionalGeneration, workers: _Workers, owner: ModelRunner
    ):
        self.inner = model
        self.workers = workers
        self.owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: Any,
        kv_caches: list[torch.Tensor],
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's forward on every rank: (T,) ids/positions -> hidden (T, hidden)."""
        # Workers use their own caches: only the runner's (one per rank, same blocks) exist.
        assert kv_caches is self.owner.kv_caches, "tensor-parallel steps use the runner's cache"
        with self.workers.guard():
            self.workers.send(_Op.FORWARD, (input_ids, positions, attn, image_embeds))
            return self.inner(input_ids, positions, attn, kv_caches, image_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden) -> logits (N, vocab) float32, the vocab gathered from all ranks."""
        with self.workers.guard():
            self.workers.send(_Op.LOGITS, hidden.contiguous())
            return self.inner.compute_logits(hidden)


class _DriverGraphs:
    """Rank 0's decode graphs: each load / advance / replay goes to the workers first, which
    do the same on their own graphs, then runs here. The scheduler still runs once, here; the
    workers get plain data (rows' tokens, positions, block tables) and replay in step."""

    def __init__(self, graphs: DecodeGraphs, workers: _Workers):
        self.inner = graphs
        self.workers = workers

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # buckets, width, outputs: rank 0's own

    def load(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> int:
        with self.workers.guard():
            self.workers.send(_Op.GRAPH_LOAD, (token_ids, positions, tables))
            return self.inner.load(token_ids, positions, tables)

    def advance(self, n: int, sampled: torch.Tensor) -> None:
        with self.workers.guard():
            self.workers.send(_Op.GRAPH_ADVANCE, (n, sampled))
            self.inner.advance(n, sampled)

    def replay(self, batch: int) -> torch.Tensor:
        with self.workers.guard():
            self.workers.send(_Op.GRAPH_REPLAY, batch)
            return self.inner.replay(batch)


def _serve_graph_op(graphs: DecodeGraphs, op: _Op, payload: Any) -> None:
    """A worker's side of one _DriverGraphs call."""
    if op is _Op.GRAPH_LOAD:
        if graphs.device.type == "cuda":  # its staging buffers may still feed the last replay
            torch.cuda.current_stream(graphs.device).synchronize()
        graphs.load(*payload)
    elif op is _Op.GRAPH_ADVANCE:
        graphs.advance(*payload)
    else:
        graphs.replay(payload)


# ---------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class _WorkerSpec:
    """What every worker needs to build its shard (picklable for spawn)."""

    path: Path
    cfg: RunnerConfig
    dtype: torch.dtype
    isq: str | None
    load_format: str
    devices: tuple[str, ...]  # device of each rank
    store_port: int = 0  # the driver's TCPStore, set once it listens
    num_threads: int = 0  # CPU: intra-op threads per worker (0: torch's default)
    startup_timeout: float = 900.0  # seconds for rendezvous and loading

    @property
    def world_size(self) -> int:
        return len(self.devices)


def _worker_main(rank: int, spec: _WorkerSpec, conn: Any) -> None:
    """Entry point of spawned worker `rank`: join, load the shard, serve steps until STOP."""
    _watch_parent(os.getppid())
    try:
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        conn.send(("joining", None))
        startup = datetime.timedelta(seconds=spec.startup_timeout)
        store = dist.TCPStore(_HOST, spec.store_port, is_master=False, timeout=startup)
        channel = _join_group(
            rank, spec.world_size, store, torch.device(spec.devices[rank]), startup
        )
        _load_and_serve(rank, spec, channel, lambda: conn.send(("loaded", None)))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        os._exit(1)  # not SystemExit: no cleanup that could block on a broken group


def run_external_worker(
    path: Path, device: torch.device, rdzv: Rendezvous, startup_timeout: float = 900.0
) -> None:
    """A worker rank launched from outside (torchrun, another node): join rank 0's group,
    take rank 0's settings, load this rank's shard of `path`, run steps until the driver
    stops. Raises on any failure (the driver sees the broken group: gloo at once, NCCL when
    its watchdog fires)."""
    _check_external(rdzv, rdzv.world_size, driver=False)
    startup = datetime.timedelta(seconds=startup_timeout)
    mine = rdzv.device(device)
    channel = _join_group(rdzv.rank, rdzv.world_size, rdzv.store(startup), mine, startup)
    # rank 0's runner config, dtype and quantization (`_Workers.join_external`): this node's
    # command line could differ, and ranks whose settings differ would wait for each other in
    # mismatched collectives
    box: list[Any] = [None]
    channel.objects(box)
    cfg, dtype, isq, load_format = box[0]
    devices = (str(mine),) * rdzv.world_size  # a rank uses only its own entry
    spec = _WorkerSpec(path, cfg, dtype, isq, load_format, devices, startup_timeout=startup_timeout)
    _load_and_serve(rdzv.rank, spec, channel, lambda: None)


def _check_no_group() -> None:
    if dist.is_initialized():
        raise TensorParallelError(
            "torch.distributed is already initialised in this process; tensor parallelism "
            "needs its own process group"
        )


def _check_external(rdzv: Rendezvous, world_size: int, driver: bool) -> None:
    """Refuse a launcher's group that is not this tensor-parallel group (or not this role)."""
    if rdzv.world_size != world_size:
        raise TensorParallelSizeError(
            f"WORLD_SIZE {rdzv.world_size} != tensor_parallel_size {world_size}: every rank "
            "of the launch is one tensor-parallel rank"
        )
    if driver and rdzv.rank != 0:
        raise TensorParallelSizeError(f"RANK {rdzv.rank} is a worker, not the serving rank 0")


def _load_and_serve(
    rank: int, spec: _WorkerSpec, channel: _Channel, on_loaded: Callable[[], None]
) -> None:
    """Load rank `rank`'s shard (then call `on_loaded`), serve steps until STOP, leave."""
    from mistralpy.checkpoint.loader import load_model

    device = torch.device(spec.devices[rank])
    model = load_model(
        spec.path, spec.dtype, device, spec.isq, spec.load_format, parallel=channel.parallel
    )
    on_loaded()
    runner = ShardRunner(model.eval(), spec.cfg, device, spec.dtype)
    _serve(runner, channel)
    dist.destroy_process_group()


@torch.inference_mode()
def _serve(runner: ModelRunner, channel: _Channel) -> None:
    """Worker loop: run each FORWARD / LOGITS the driver sends on this rank's shard."""
    while True:
        op, payload = channel.receive()
        if op is _Op.STOP:
            return
        if op is _Op.FORWARD:
            input_ids, positions, attn, image_embeds = payload
            runner.model(input_ids, positions, attn, runner.kv_caches, image_embeds)
        elif op is _Op.LOGITS:
            runner.model.compute_logits(payload)
        else:
            assert runner.decode_graphs is not None, "rank 0 replays graphs only if all have them"
            _serve_graph_op(runner.decode_graphs, op, payload)


def _watch_parent(parent: int) -> None:
    """Exit this worker once its parent (the driver) is gone, whatever it is blocked in."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="mistralpy-tp-parent", daemon=True).start()


class _Workers:
    """The driver's handle on the worker processes and the process group."""

    def __init__(self, spec: _WorkerSpec, procs: list[Any], conns: list[Any], store: Any):
        self.spec = spec
        self.procs = procs  # rank r's process at index r - 1
        self.conns = conns  # the driver's ends of the workers' pipes
        self.store = store
        self.channel: _Channel | None = None  # set once the group is formed
        self.failure: str | None = None  # why the group is unusable, once it is
        self._lock = threading.Lock()  # the monitor thread and the stepping thread both fail it
        self.closed = False

    @classmethod
    def start(cls, spec: _WorkerSpec, timeout: float) -> _Workers:
        """Spawn the workers and form the group with them (this process is rank 0)."""
        _check_no_group()
        startup = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False, timeout=startup)
        threads = spec.num_threads
        if torch.device(spec.devices[0]).type == "cpu":  # the ranks share the host's cores
            threads = max(1, torch.get_num_threads() // spec.world_size)
        spec = dataclasses.replace(
            spec, store_port=store.port, num_threads=threads, startup_timeout=timeout
        )
        ctx = torch.multiprocessing.get_context("spawn")
        procs, conns = [], []
        for rank in range(1, spec.world_size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, spec, theirs),
                name=f"mistralpy-tp{rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
        workers = cls(spec, procs, conns, store)
        try:
            workers.wait_for("joining", timeout)
            device = torch.device(spec.devices[0])
            workers.channel = _join_group(0, spec.world_size, store, device, startup)
        except BaseException:
            workers.close()
            raise
        return workers

    @classmethod
    def join_external(cls, spec: _WorkerSpec, rdzv: Rendezvous, timeout: float) -> _Workers:
        """Form the group with workers launched from outside (this process is rank 0). No
        process handles: a dead remote rank shows as a failed collective."""
        _check_no_group()
        startup = datetime.timedelta(seconds=timeout)
        store = rdzv.store(startup)
        workers = cls(spec, [], [], store)
        device = torch.device(spec.devices[0])
        workers.channel = _join_group(0, spec.world_size, store, device, startup)
        # rank 0's settings, which the workers take (run_external_worker)
        workers.channel.objects([(spec.cfg, spec.dtype, spec.isq, spec.load_format)])
        return workers

    @property
    def parallel(self) -> ParallelConfig:
        """The model's tensor-parallel group (this process is rank 0)."""
        assert self.channel is not None, "the group is formed before the model loads"
        return self.channel.parallel

    def send(self, op: _Op, payload: Any) -> None:
        """Announce step `op` to the workers (call inside `guard`)."""
        assert self.channel is not None, "the group is formed before any step"
        self.channel.send(op, payload)

    def wait_for(self, stage: str, timeout: float) -> None:
        """Block until every worker reported `stage`; raise at once if one fails or dies."""
        deadline = time.monotonic() + timeout
        pending = dict(zip(self.conns, self.procs))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TensorParallelError(f"tensor-parallel workers not {stage} after {timeout}s")
            exited = {p.sentinel: p for p in self.procs}
            for ready in multiprocessing.connection.wait([*pending, *exited], left):
                if ready in exited:  # no worker exits before STOP unless it failed
                    raise TensorParallelError(self.describe(exited[ready]))
                assert isinstance(ready, Connection)  # the rest are the pipes' ends
                kind, detail = ready.recv()
                if kind == "error":
                    raise TensorParallelError(self.describe(pending[ready], detail))
                del pending[ready]

    def watch(self) -> None:
        """Start the monitor thread that marks the group failed when a worker dies."""
        if not self.procs:  # external ranks: no process to watch
            return
        threading.Thread(target=self._monitor, name="mistralpy-tp-monitor", daemon=True).start()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run a collective step: refuse once failed; a failure inside breaks the group."""
        self.check()
        try:
            yield
        except BaseException as exc:
            dead = self.failed_worker(grace=2.0)  # the usual cause: give it time to show
            reason = f"tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}"
            raise TensorParallelError(self._fail(dead, reason)) from exc

    def check(self) -> None:
        """Raise TensorParallelError if the group can no longer step."""
        if self.closed:
            raise TensorParallelError("the tensor-parallel runner is shut down")
        dead = self.failed_worker()
        if dead is not None or self.failure is not None:
            raise TensorParallelError(self._fail(dead, "tensor-parallel worker failed"))

    def failed_worker(self, grace: float = 0.0) -> Any:
        """A worker process that has exited (waiting up to `grace` s for one), or None.
        Reads the process sentinels only (no reaping), so any thread may ask."""
        if not self.procs:
            return None
        exited = multiprocessing.connection.wait([p.sentinel for p in self.procs], grace)
        return next((p for p in self.procs if p.sentinel in exited), None)

    def describe(self, proc: Any, detail: str | None = None) -> str:
        """What happened to worker `proc`: its rank, exit code and the error it reported."""
        if detail is None:
            detail = self._last_words(proc)
        proc.join(1.0)  # it has exited: reap it for its exit code
        text = f"tensor-parallel worker rank {self.procs.index(proc) + 1} failed"
        if proc.exitcode is not None and proc.exitcode < 0:
            text += f" (killed by {signal.Signals(-proc.exitcode).name})"
        elif proc.exitcode is not None:
            text += f" (exit code {proc.exitcode})"
        return f"{text}:\n{detail}" if detail else text

    def _fail(self, dead: Any, reason: str) -> str:
        """Record the first failure (a dead worker's story, else `reason`) and return it."""
        with self._lock:
            if self.failure is None:
                self.failure = self.describe(dead) if dead is not None else reason
            return self.failure

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (politely if the group is healthy), then leave the group."""
        if self.closed:
            return
        self.closed = True
        if self.channel is not None and self.failure is None and self.failed_worker() is None:
            try:
                self.channel.send(_Op.STOP, None)
            except Exception:  # a worker died meanwhile: it is terminated below
                logger.warning("could not send stop to tensor-parallel workers", exc_info=True)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.store = None
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def _monitor(self) -> None:
        multiprocessing.connection.wait([p.sentinel for p in self.procs])
        if self.closed:
            return
        logger.error("%s", self._fail(self.failed_worker(), "tensor-parallel worker exited"))
        if torch.device(self.spec.devices[0]).type == "cuda":
            # NCCL would wait for the dead peer until its timeout: unblock the driver now.
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group(self.parallel.group)

    def _last_words(self, proc: Any) -> str:
        """The error a worker sent before dying, if any."""
        conn = self.conns[self.procs.index(proc)]
        with contextlib.suppress(Exception):
            while conn.poll():
                kind, detail = conn.recv()
                if kind == "error":
                    return detail
        return ""
