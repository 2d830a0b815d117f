"""CPU stand-ins for the runner's captured decode graphs and their host sync, so the graph
path of `ModelRunner` (load, replay, launch-ahead, verify rows) runs in CPU tests."""

from __future__ import annotations

import torch

from mistralpy.kernels.attention import AttentionMetadata
from mistralpy.runner.cuda_graphs import DecodeGraphs


class RerunGraphs(DecodeGraphs):
    """CPU stand-in for captured decode graphs: a replay reruns the forward over the stable
    buffers' current contents (the loaded rows; padding rows are left out, CPU attention
    needs real lengths), as a CUDA graph replays its kernels over them."""

    replays = 0

    def capture(self) -> None:  # nothing to capture: every replay runs the forward
        pass

    def replay(self, batch: int) -> torch.Tensor:
        dev = self.inputs
        n = int((dev.seq_lens[:batch] > 0).sum())
        lens = dev.seq_lens[:n]
        attn = AttentionMetadata(
            dev.query_start_loc[: n + 1], lens, dev.block_tables[:n], dev.tokens[2, :n],
            1, int(lens.max()), [1] * n, lens.tolist(),
        )  # fmt: skip
        logits = self.forward(dev.tokens[0, :n], dev.tokens[1, :n], attn)
        out = torch.zeros(batch, logits.shape[1])
        out[:n] = logits
        self.outputs[batch] = out
        self.replays += 1
        return out


class HostEvent:
    """A CUDA event's record/synchronize for CPU tensors (nothing to wait for)."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def attach_graphs(runner, model, width: int = 8) -> RerunGraphs:
    """Give `runner` stand-in decode graphs over `model` (the local shard, no messages) with
    block tables up to `width` blocks, and the host buffers a CUDA runner syncs through."""
    graphs = RerunGraphs(
        lambda ids, pos, attn: model.compute_logits(model(ids, pos, attn, runner.kv_caches)),
        runner.cfg.max_decode_rows, width, runner.cfg.block_size, runner.device,
    )  # fmt: skip
    runner.decode_graphs = graphs
    runner._sampled_host = torch.empty(runner.cfg.max_num_seqs, dtype=torch.int64)
    runner._sampled_event = HostEvent()
    return graphs
