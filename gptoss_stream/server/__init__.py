"""`gptoss serve`: an OpenAI-compatible HTTP server over one loaded model.

protocol.py checks requests and builds OpenAI error objects; harmony_bridge.py renders chat messages and tools
as harmony prompts (openai-harmony); replies.py turns generated tokens into content, reasoning and tool calls;
prompt_cache.py reuses the previous request's KV cache; worker.py runs the model on one thread behind a FIFO
queue; app.py holds the HTTP routes (FastAPI); responses.py maps /v1/responses onto the chat core.
Needs the `server` extra: pip install '.[server]'.
"""
