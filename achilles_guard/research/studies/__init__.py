"""The paper's studies, one command each (`guard study NAME`). See docs/research.md.

    ctx = StudyContext(lm, probe, corpus, ScanParams(samples=100), report=ReportRanking.load(path, lm))
    result = lesion_study(ctx)          # StudyResult: table rows + PlotSpec
    plots.render_spec(result.plot, "lesion.png")
"""

from achilles_guard.research.studies.base import PlotSpec, Series, StudyContext, StudyResult
from achilles_guard.research.studies.compare import compare_study
from achilles_guard.research.studies.components import DEFAULT_PRESETS, components_study
from achilles_guard.research.studies.masking_studies import (
    MAX_LESION,
    lesion_study,
    precision_study,
    scale_study,
    subset_plan,
)
from achilles_guard.research.studies.sensitivity import alpha_study, epsilon_study, samples_study
from achilles_guard.research.studies.texts import STUDY_TEXTS, texts_study

__all__ = [
    "PlotSpec", "Series", "StudyContext", "StudyResult", "STUDIES", "DEFAULT_PRESETS", "MAX_LESION", "STUDY_TEXTS",
    "alpha_study", "samples_study", "epsilon_study", "scale_study", "precision_study", "lesion_study",
    "subset_plan", "texts_study", "components_study", "compare_study",
]

STUDIES = ("alpha", "samples", "epsilon", "scale", "precision", "texts", "lesion", "components", "compare")
