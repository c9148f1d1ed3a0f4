"""Studies: a sweep's grid of ordinary experiments, grouped under one study id.

    matrix.py  the grid: matrix -> cells, a cell x repeat -> its validated Config (pure)
    spec.py    SWEEP.yaml -> the resolved spec with every experiment id; its stored JSON
    sweep.py   `asyncrunner sweep` and `sweep --resume`: the study row, the cells in turn

The study row is db/studies.py's; each cell's experiment is session.py's, as for `run`.
"""
