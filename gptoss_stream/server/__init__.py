"""`gptoss serve`: an OpenAI-compatible HTTP server over one loaded model.

protocol.py validates requests and builds OpenAI error objects; harmony_bridge.py turns chat messages and
tools into harmony prompts and generated tokens back into content, reasoning and tool calls; prompt_cache.py
reuses the previous request's KV cache; worker.py runs the model on one thread behind a FIFO queue; app.py
holds the HTTP routes (FastAPI). Needs the `server` extra: pip install '.[server]'.
"""
