"""VLM engines behind the `Engine` protocol.

- `base.py`: the `Engine` protocol, `RunHooks`, `EngineInfo`.
- `config.py`: `EngineConfig`.
- `factory.py`: engine registry (`create_engine`), demo-model resolution, cache directory.
- `transformers_engine.py`: the embedded engine (CPU/CUDA), one request at a time.
- `adapters.py` + `idefics3.py`, `llava.py`, `qwen2_vl.py` (Qwen2-VL, Qwen2.5-VL), `qwen3_vl.py`,
  `gemma3.py`, `internvl.py` (InternVL3): per-family visual-token placement, image encoding,
  splicing, and LM inputs that follow the kept tokens (M-RoPE positions, deepstack features,
  Gemma-3's token types).
- `processors.py`: the one processor loader (images only, no torchvision needed).
- `decoding.py`: greedy / seeded top-p token choice and streaming detokenisation.
- `vllm_engine.py`, `worklog.py`: the vLLM engine and per-request energy under batching; its parts
  `vllm_native.py` (native-path prepare), `vllm_encode.py` (batched pruned-path encode),
  `vllm_stream.py` (streaming vLLM's outputs) and `vllm_families.py` (families it cannot prune).
"""
