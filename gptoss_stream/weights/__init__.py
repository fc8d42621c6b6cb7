"""The checkpoint on disk: its config, its safetensors files, one module per layout (layouts/), the opener that
picks the layout (checkpoint.py: `Checkpoint.open`), and the writers (repack.py, synthetic.py).
The bottom of the package: nothing here imports streaming/, engine/, chat/ or commands/."""
