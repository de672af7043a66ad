"""Studies: method x concept set x seed grids run to the paper's operating point, locally or on Ray.

A study is a TOML spec (:mod:`erasekit.study.spec`); every cell is a run directory
(:mod:`erasekit.study.grid`, :mod:`erasekit.rundir`) that reaches its operating point on
selection images and is evaluated on test images (:mod:`erasekit.study.operating`); executors run the
cells in this process, a process pool or Ray (:mod:`erasekit.study.executors`); tables and plots
carry 95% intervals (:mod:`erasekit.study.stats`, :mod:`erasekit.study.tables`,
:mod:`erasekit.study.plots`). ``erasekit study run|status|table|plot SPEC`` is the command line
(docs/studies.md).

Example::

    from erasekit.study import run_study
    run_study("bench/studies/table1.toml")          # resumable: run it again to continue
"""

from erasekit.study.api import open_study, run_study, status, write_outputs
from erasekit.study.spec import SpecError, StudySpec, load_spec

__all__ = ["SpecError", "StudySpec", "load_spec", "open_study", "run_study", "status", "write_outputs"]
