"""gptoss-stream: run gpt-oss MoE models on low-RAM CPU machines by streaming only the routed experts."""

__version__ = "0.1.0"
