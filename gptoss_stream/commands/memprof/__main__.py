"""`python -m gptoss_stream.commands.memprof --child ARGS.json CGROUP_DIR`: the workload process that
`gptoss memprof --limit` starts inside the memory cgroup (command._run_limited)."""

import sys

from gptoss_stream.commands.memprof.command import _child_main

if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
