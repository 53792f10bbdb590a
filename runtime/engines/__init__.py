"""VLM engines behind the `Engine` protocol.

- `base.py`: the `Engine` protocol, `RunHooks`, `EngineInfo`.
- `config.py`: `EngineConfig`.
- `factory.py`: engine registry (`create_engine`), demo-model resolution, cache directory.
- `transformers_engine.py`: the embedded engine (CPU/CUDA), one request at a time.
- `adapters.py` + `idefics3.py`, `llava.py`: per-family visual-token placement, image encoding, splicing.
- `decoding.py`: greedy / seeded top-p token choice and streaming detokenisation.
- `vllm_engine.py`, `worklog.py`: the vLLM engine and per-request energy under batching.
"""
