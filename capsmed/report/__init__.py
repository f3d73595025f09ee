"""HTML reports from the evaluation files (knows no torch, no MONAI, no model code).

Pages are self-contained HTML (Jinja2 with autoescaping; figures embedded as PNG data URIs; no
external CSS or fonts) and open from ``file://``. Segmentation study pages also run the interactive
viewer: NiiVue and its glue script from the one shared copy under ``results/assets/`` (see
:mod:`capsmed.report.viewer`), the only scripts their Content-Security-Policy admits. Paths follow
PLAN.md's "Evaluation files":

- :func:`write_stage_report`: ``results/{ds}/reports/{model}/{stage}.html``
- :func:`write_study_reports`: ``results/{ds}/reports/{model}/studies/{case}.html`` per case
- :func:`write_study_report`: one study from a :class:`StudyInput` dict (``capsmed predict``)
- :func:`write_comparison_report`: ``results/{ds}/reports/comparison.html``
- :func:`write_qc_report`: ``results/{ds}/reports/qc.html``
- :func:`write_generalisation_report`: ``results/{ds}/reports/generalisation.html``
- :func:`write_index`: ``results/index.html``
"""

from capsmed.report.comparison import model_family, write_comparison_report
from capsmed.report.generalisation import write_generalisation_report
from capsmed.report.index import write_index
from capsmed.report.qc import write_qc_report
from capsmed.report.render import RESEARCH_NOTE, study_filename
from capsmed.report.stage import write_stage_report
from capsmed.report.study import StudyInput, write_study_report, write_study_reports

__all__ = [
    "RESEARCH_NOTE",
    "StudyInput",
    "model_family",
    "study_filename",
    "write_comparison_report",
    "write_generalisation_report",
    "write_index",
    "write_qc_report",
    "write_stage_report",
    "write_study_report",
    "write_study_reports",
]
