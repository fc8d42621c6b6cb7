"""Getting the routed experts into RAM: the memory plan (budget.py), the expert stores (experts.py: the plain
mapping; expert_cache.py: the budgeted cache with prefetch), the O_DIRECT reads on an I/O thread (reader.py) and
the run statistics (runstats.py)."""
