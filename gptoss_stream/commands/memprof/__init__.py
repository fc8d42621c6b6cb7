"""`gptoss memprof`, the memory profiler (command.py), in parts: proc.py reads /proc, cgroup.py runs the workload
under --limit, sampling.py samples it, report.py summarises and prints, plot.py draws, residency.py asks the
kernel which checkpoint pages are cached.

The names below are the profiler's API in one namespace (`from gptoss_stream.commands import memprof`).
"""

from gptoss_stream.commands.memprof.cgroup import CGROUP_NAME_PREFIX, MemoryCgroup, _memory_cgroup_mount, \
    _own_memory_cgroup, drop_page_cache
from gptoss_stream.commands.memprof.command import add_parser, profile, run_memprof
from gptoss_stream.commands.memprof.plot import MATPLOTLIB_MISSING, plot_report
from gptoss_stream.commands.memprof.report import COUNTER_KEYS, PEAK_KEYS, PHASE_ROWS, REPORT_KEYS, SCHEMA, \
    TOKEN_ROWS, VERSION, format_bytes, format_compare, format_summary, load_report, summarize, token_records
from gptoss_stream.commands.memprof.sampling import DEFAULT_INTERVAL, PHASES, SAMPLE_KEYS, SLOW_SHARE, Profiler

__all__ = [
    "CGROUP_NAME_PREFIX", "COUNTER_KEYS", "DEFAULT_INTERVAL", "MATPLOTLIB_MISSING", "PEAK_KEYS", "PHASES", "PHASE_ROWS",
    "REPORT_KEYS", "SAMPLE_KEYS", "SCHEMA", "SLOW_SHARE", "TOKEN_ROWS", "VERSION", "MemoryCgroup", "Profiler",
    "_memory_cgroup_mount", "_own_memory_cgroup", "add_parser", "drop_page_cache", "format_bytes", "format_compare",
    "format_summary", "load_report", "plot_report", "profile", "run_memprof", "summarize", "token_records",
]
