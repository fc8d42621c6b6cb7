"""The `gptoss` command: cli.py dispatches, options.py holds what several commands share, and every command has
its own module (generate.py: generate and chat; make_checkpoint.py; repack.py; memprof/)."""
