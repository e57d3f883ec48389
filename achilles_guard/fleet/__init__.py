"""`guard fleet`: run the single-model commands over a whole model registry.

    models = inventory.discover(root_or_list)          # model directories and .gguf files, stable ids
    job = worker.Job("scan", args=[...], out=OUT)       # the `guard scan` options every model gets
    for result in backends.run(models, job, ...):      # local, --jobs N threads, or one Ray task each
        ...                                            # each OUT/<id>/ published atomically when done
    summary.write(OUT, job, results)                   # OUT/fleet.json, OUT/fleet.sarif

Every model is scanned or verified by the single-model command itself (`python -m achilles_guard
scan|verify-checkpoint`) in a subprocess: the same code path as one `guard scan`, and one hostile or
crashing model is one failed row, never a dead fleet.
"""
