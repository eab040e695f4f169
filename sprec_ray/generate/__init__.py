"""Self-play generation: engines (backends.py: vLLM or transformers), the Ray actor pool (pool.py),
the adapter probe check (adapter_check.py) and the negatives builder (negatives.py).

Nothing here imports vLLM at import time: the vLLM engine is only built inside a pool actor.
"""
