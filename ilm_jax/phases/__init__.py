"""One module per phase (`cf`, `qformer`, `ilm`, `eval`, `export`).

Each exposes `run(config, workdir, mesh) -> dict` (a summary for the results
table). Phases hand their outputs to the next through exports in the workdir
(`WORKDIR/<phase>/export`), so any phase can be rerun on its own.
"""
