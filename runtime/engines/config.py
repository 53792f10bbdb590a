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
    shared CPU, 1 makes per-request energy more repeatable."""
    leverage_basis: bool = True
    """Decompose each image's visual features while preparing the request, so leverage token
    selection during the run is a top-k and the decomposition's energy is measured with the encode
    (before planning) rather than inside the run. Skipped for policies that keep every token."""
    warmup: bool = True
    """Run the path of a real request at start-up (image decode, encode, decomposition, planning,
    prefill and decode under the governor; not recorded, not learned from), so that the first
    client request is not a cold one."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 when set, got {self.torch_threads}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0 when set, got {self.kv_cache_gib}")
