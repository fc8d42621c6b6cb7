"""Text in and out: the o200k_harmony tokenizer (tokenizer.py) and the harmony chat format (harmony.py)."""
