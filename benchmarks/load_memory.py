"""Peak memory and load time of model loading on CPU: mistralpy vs transformers vs mistral.rs.

    PYTHONPATH=. python benchmarks/load_memory.py [--json out.json] [--quick]

Every row is one fresh subprocess that imports its library, notes its resident set, loads the
model, and reports
  load_s       wall time of the load call alone (imports excluded);
  peak_mib     VmHWM of the process (its lifetime peak RSS, imports included);
  load_peak    VmHWM minus the RSS just before loading: what loading added at its peak;
  touched_peak the same after reading every weight once: transformers 5 maps safetensors
               lazily, so its weights become resident only when first used;
  anon_peak    the largest RssAnon sampled every 2 ms during the load minus the one before:
               private memory only, without the checkpoint's memory-mapped (reclaimable) pages;
  x_model      touched_peak / model bytes (1.0 = exactly one resident copy of the weights,
               mapped file pages included);
  anon_x_model anon_peak / model bytes (private copies only; ~0 for transformers, whose
               weights stay file-backed pages of the page cache);
  vs_ours      load_s and load_peak relative to mistralpy's row of the same preset and dtype.
Checkpoints are random `mistralpy.testing.tiny_checkpoint` presets stored in the load dtype.

Two rows check the 24B shape without its 48 GB: `meta-24b` builds Mistral Small 3.1 with dummy
weights on the `meta` device (parameter count and bytes, no memory), and `dummy-24b-wide` loads
dummy weights of the real widths with only `--scaled-layers` text and vision layers on the CPU,
where x_model shows that a dummy load allocates the weights once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    ensure_checkpoint,
    format_table,
    hardware,
    package_version,
    proc_status_kib,
    run_worker,
    worker_main,
    write_json,
)

IMPLS = ("mistralpy", "transformers", "mistral.rs")
COLUMNS = (
    "case",
    "impl",
    "dtype",
    "load_s",
    "peak_mib",
    "load_peak_mib",
    "touched_peak_mib",
    "anon_peak_mib",
    "model_mib",
    "params",
    "x_model",
    "anon_x_model",
    "load_s_vs_ours",
    "load_peak_vs_ours",
    "note",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="tiny preset, float32, no 24B rows")
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--scaled-layers", type=int, default=1, help="0 skips the dummy-24b-wide row")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint cache (default: tmp)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in workers")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.presets, args.dtypes, args.scaled_layers = ["tiny"], ["float32"], 0
    with tempfile.TemporaryDirectory(prefix="mistralpy-bench-") as tmp:
        ckpt_root = args.ckpt_dir or Path(tmp) / "ckpt"
        ckpt_root.mkdir(parents=True, exist_ok=True)
        rows = collect_rows(args, ckpt_root, Path(tmp) / "work")
    add_ratios(rows)
    info = hardware()
    print(f"# load_memory on {info['cpu']}, {info['memory_gib']} GiB, {info['date']}")
    print(format_table(rows, COLUMNS))
    write_json(args.json, {"hardware": info, "command": " ".join(sys.argv), "rows": rows})


def collect_rows(args: argparse.Namespace, ckpt_root: Path, work: Path) -> list[dict[str, Any]]:
    """One worker per (preset, dtype, impl), then the 24B-shaped rows."""
    rows = []
    for preset in args.presets:
        for dtype in args.dtypes:
            path = ensure_checkpoint(ckpt_root, preset, dtype)
            for impl in args.impls:
                if impl != "mistralpy" and not _installed(impl):
                    continue
                spec = {"impl": impl, "path": str(path), "dtype": dtype, "threads": args.threads}
                rows.append(_row(preset, impl, dtype, spec, work))
    if not args.quick:
        spec = {"impl": "meta-24b", "dtype": "bfloat16", "threads": args.threads}
        rows.append(_row("meta-24b", "mistralpy", "bfloat16", spec, work))
    if args.scaled_layers > 0:
        spec = {
            "impl": "dummy-24b-wide",
            "dtype": "bfloat16",
            "layers": args.scaled_layers,
            "threads": args.threads,
        }
        case = f"dummy-24b-wide-{args.scaled_layers}L"
        rows.append(_row(case, "mistralpy", "bfloat16", spec, work))
    return rows


def _installed(impl: str) -> bool:
    return (
        package_version({"transformers": "transformers", "mistral.rs": "mistralrs"}[impl])
        is not None
    )


def _row(case: str, impl: str, dtype: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    result = run_worker(Path(__file__), spec, work, timeout=600)
    row: dict[str, Any] = {"case": case, "impl": impl, "dtype": dtype}
    if not result.ok:
        return row | {"note": f"error: {result.error}"}
    return row | result.data


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """x_model for every row with a model size; peers relative to mistralpy's matching row."""
    ours = {(r["case"], r["dtype"]): r for r in rows if r["impl"] == "mistralpy"}
    for r in rows:
        base = ours.get((r["case"], r["dtype"]))
        model = r.get("model_mib") or (base or {}).get("model_mib")
        if r.get("touched_peak_mib") is not None and model:
            r["x_model"] = r["touched_peak_mib"] / model
            r["anon_x_model"] = r["anon_peak_mib"] / model
        if base is None or r is base or r.get("load_s") is None or not base.get("load_s"):
            continue
        r["load_s_vs_ours"] = r["load_s"] / base["load_s"]
        if base.get("load_peak_mib"):
            r["load_peak_vs_ours"] = r["load_peak_mib"] / base["load_peak_mib"]


# ---------------------------------------------------------------------------------------------
# Worker side (a fresh process per row)


class AnonSampler:
    """Polls RssAnon every `period` seconds on a thread; `peak` is the largest seen (KiB)."""

    def __init__(self, period: float = 0.002):
        self.period = period
        self.peak = proc_status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status_kib("RssAnon"))
            time.sleep(self.period)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status_kib("RssAnon"))


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Import the library, load once while measuring; the row's measured fields."""
    import torch

    torch.set_num_threads(spec["threads"])
    impl = spec["impl"]
    loader = {
        "mistralpy": _load_ours,
        "transformers": _load_hf,
        "mistral.rs": _load_mistralrs,
        "meta-24b": _load_meta_24b,
        "dummy-24b-wide": _load_scaled_24b,
    }[impl]
    prepare, note = loader(spec)  # imports done here; prepare() does the load itself
    rss_before, anon_before = proc_status_kib("VmRSS"), proc_status_kib("RssAnon")
    with AnonSampler() as sampler:
        start = time.perf_counter()
        model = prepare()
        load_s = time.perf_counter() - start
    model_bytes = _model_bytes(model)
    hwm_loaded = proc_status_kib("VmHWM")
    _touch(model)
    out = {
        "load_s": load_s,
        "peak_mib": proc_status_kib("VmHWM") / 1024,
        "load_peak_mib": (hwm_loaded - rss_before) / 1024,
        "touched_peak_mib": (proc_status_kib("VmHWM") - rss_before) / 1024,
        "anon_peak_mib": (sampler.peak - anon_before) / 1024,
        "model_mib": model_bytes / 2**20 if model_bytes else None,
        "params": _param_count(model),
        "note": note,
    }
    if impl == "meta-24b":  # nothing is allocated on meta: memory columns say nothing
        out |= dict.fromkeys(("load_peak_mib", "touched_peak_mib", "anon_peak_mib", "peak_mib"))
    return out


def _touch(model: Any) -> None:
    """Read every weight once, so lazily mapped files (transformers) become resident too."""
    import torch

    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type != "meta":
                t.sum()


def _param_count(model: Any) -> int | None:
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    return sum(p.numel() for p in model.parameters())


def _model_bytes(model: Any) -> int | None:
    """Bytes of the parameters and buffers of a torch module (None for mistral.rs)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    tensors = list(model.parameters()) + list(model.buffers())
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _load_ours(spec: dict[str, Any]) -> tuple[Any, str]:
    from mistralpy.checkpoint.loader import load_model

    dtype = _torch_dtype(spec["dtype"])
    return lambda: load_model(Path(spec["path"]), dtype, "cpu"), "load_model (weights only)"


def _load_hf(spec: dict[str, Any]) -> tuple[Any, str]:
    from transformers import Mistral3ForConditionalGeneration

    dtype = _torch_dtype(spec["dtype"])
    return (
        lambda: Mistral3ForConditionalGeneration.from_pretrained(spec["path"], dtype=dtype),
        "from_pretrained",
    )


def _load_mistralrs(spec: dict[str, Any]) -> tuple[Any, str]:
    from mistralrs import ModelDType, MultimodalArchitecture, Runner, Which

    mdtype = {"float32": ModelDType.F32, "bfloat16": ModelDType.BF16}[spec["dtype"]]
    which = Which.MultimodalPlain(
        model_id=spec["path"], arch=MultimodalArchitecture.Mistral3, dtype=mdtype
    )
    return lambda: Runner(which=which), "Runner(): weights + tokenizer + engine thread"


def _load_meta_24b(spec: dict[str, Any]) -> tuple[Any, str]:
    from mistralpy.checkpoint.loader import load_dummy_model
    from mistralpy.model.config import mistral_small_3_1_config

    config = mistral_small_3_1_config()
    dtype = _torch_dtype(spec["dtype"])
    return lambda: load_dummy_model(config, dtype, "meta"), "dummy on meta: shapes only"


def _load_scaled_24b(spec: dict[str, Any]) -> tuple[Any, str]:
    from dataclasses import replace

    from mistralpy.checkpoint.loader import load_dummy_model
    from mistralpy.model.config import mistral_small_3_1_config

    full = mistral_small_3_1_config()
    layers = spec["layers"]
    config = replace(
        full,
        text_config=replace(full.text_config, num_hidden_layers=layers),
        vision_config=replace(full.vision_config, num_hidden_layers=layers),
    )
    dtype = _torch_dtype(spec["dtype"])
    note = f"24B widths, {layers} text + {layers} vision layers, dummy weights on cpu"
    return lambda: load_dummy_model(config, dtype, "cpu"), note


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(run_spec)
    else:
        main()
