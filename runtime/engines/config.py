"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EngineConfig:
    """Which model runs, where, and how."""

    engine: Literal["transformers", "vllm"] = "transformers"
    """Engine backend: `transformers` (embedded, CPU/CUDA) or `vllm` (servers, batching)."""
    model: str | None = None
    """Local model directory or hub id; None serves the built-in demo model."""
    served_model_name: str | None = None
    """Name clients use in `model`; defaults to the model directory's name."""
    device: str = "auto"
    """Torch device (`cpu`, `cuda`, `cuda:1`); `auto` picks CUDA when present."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights dtype; `auto` is bfloat16 on CUDA and float32 on CPU."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs each layer is split across (tensor parallelism); the meters must cover all of them."""
    pipeline_parallel_size: int = 1
    """vLLM: pipeline stages the layers are split into (GPUs or nodes)."""
    distributed_executor_backend: Literal["auto", "mp", "ray", "uni"] = "auto"
    """vLLM: how workers run: `mp` (one node), `ray` (multi-node, needs a Ray cluster), `uni`, or `auto`."""
    max_concurrency: int = 16
    """vLLM: requests decoded together by continuous batching (vLLM's `max_num_seqs`)."""
    gpu_memory_utilization: float = 0.85
    """vLLM: fraction of accelerator memory vLLM may take (the rest holds joulecap's vision tower)."""
    kv_cache_gib: float | None = None
    """vLLM: KV cache size in GiB; unset sizes it from `gpu_memory_utilization` (1 GiB on CPU)."""
    max_model_len: int | None = None
    """vLLM: context length to serve (less KV memory); unset uses the model's."""
    enforce_eager: bool = False
    """vLLM: skip torch.compile and CUDA graphs (faster start, slower steps)."""
    torch_threads: int | None = None
    """CPU threads for PyTorch's intra-op pool (process-wide); unset keeps PyTorch's default. On a
    shared CPU, 1 makes per-request energy far more repeatable (see benchmarks/results/scheduler_cpu.json)."""
    leverage_basis: bool = True
    """Decompose each image's visual features while preparing the request (an exact eigh when
    the short side is at most 256), so leverage token selection during the run is a top-k. The
    decomposition's energy is then measured with the image encode, before planning, instead of
    inside the run, where the predictor does not model it (about one decode step per pruned image
    on a 2-core CPU). Planning reads the E-AdaPrune budget off the same exact spectrum
    (`PreparedRequest.bases`) instead of decomposing again. The runtime turns it off when the
    scheduler selects tokens another way, and skips it for requests whose policy keeps every
    visual token (`Policy.prunes_visual`)."""
    warmup: bool = True
    """Run one short generation at start-up (not recorded, not learned from): the first, cold request
    otherwise costs several times a normal one and can overshoot its budget."""
