"""Critical sets for many texts and for prefixes of growing length (Fig. 7, Table 19)."""

from __future__ import annotations

from typing import Sequence

from achilles_guard.engine.scan import tokenize_probe
from achilles_guard.errors import UsageError
from achilles_guard.research.studies.base import PlotSpec, Series, StudyContext, StudyResult

__all__ = ["STUDY_TEXTS", "texts_study"]

# (name, genre, language, text): short paragraphs written for this project in the paper's genres.
STUDY_TEXTS: tuple[tuple[str, str, str, str], ...] = (
    ("wiki-en", "encyclopedia", "English",
     "The snow leopard is a large cat native to the mountain ranges of Central and South Asia. It hunts wild sheep "
     "and goats on steep, rocky slopes."),
    ("news-en", "news", "English",
     "The city council approved a new budget on Tuesday, adding funds for bus routes and school repairs. The vote "
     "followed three weeks of public hearings."),
    ("bio-en", "biography", "English",
     "Marie Curie, born in Warsaw in 1867, studied physics in Paris and discovered polonium and radium. She "
     "received two Nobel Prizes in different sciences."),
    ("media-en", "media", "English",
     "The film follows a lighthouse keeper who finds a stranded whale on the shore. Critics praised its quiet score "
     "and the long, patient shots of the sea."),
    ("wiki-fr", "encyclopedia", "French",
     "Le léopard des neiges est un grand félin des montagnes d'Asie centrale. Il chasse les moutons sauvages sur "
     "des pentes raides et rocheuses."),
    ("news-de", "news", "German",
     "Der Stadtrat hat am Dienstag einen neuen Haushalt beschlossen und mehr Geld für Buslinien und Schulen "
     "bereitgestellt."),
    ("bio-es", "biography", "Spanish",
     "Marie Curie nació en Varsovia en 1867, estudió física en París y descubrió el polonio y el radio. Recibió dos "
     "premios Nobel."),
    ("wiki-zh", "encyclopedia", "Chinese",
     "雪豹是一种生活在中亚和南亚高山地区的大型猫科动物。它在陡峭的岩石山坡上捕猎野羊和山羊。"),
)


def texts_study(ctx: StudyContext, *, lengths: Sequence[int], texts: Sequence[tuple[str, str]] = ()) -> StudyResult:
    """A scan per text and per prefix length of the probe; agreement with the probe's own set."""
    if any(n < 2 for n in lengths):
        raise UsageError("--lengths: every length must be >= 2 tokens (a loss needs one target)")
    reference_result = ctx.search(ctx.rank(label="probe"))
    reference = frozenset(reference_result.critical_set) if reference_result.converged else None
    rows = []
    corpus = [(name, "user", "?", body) for name, body in texts] or list(STUDY_TEXTS)
    for name, genre, language, body in corpus:
        probe = tokenize_probe(ctx.lm, name, body, allow_short=True)
        rows.append(_row(ctx, name, genre, language, probe.input_ids, reference))
    probe_ids = ctx.probe.input_ids
    usable = sorted({n for n in lengths if n <= probe_ids.shape[1]})
    for n in usable:
        rows.append(_row(ctx, f"{ctx.probe.name}[:{n}]", "prefix", "probe", probe_ids[:, :n], reference))
    prefix_rows = [r for r in rows if r[1] == "prefix"]
    min_length = _agreeing_from(prefix_rows)
    title = "Fig. 7 / Table 19: critical sets across texts, genres, languages and input lengths"
    plot = PlotSpec(
        "line",
        "Fig. 7: critical-set size n* against input length",
        "input tokens",
        "critical neurons n*",
        (
            Series(
                "n*",
                tuple(r[3] for r in prefix_rows),
                tuple(r[4] if isinstance(r[4], int) else None for r in prefix_rows),
            ),
        ),
        hline=len(reference) if reference else None,
        hline_label="n* on the full probe",
    )
    agree = sum(1 for r in rows if r[1] != "prefix" and r[5])
    notes = (
        f"reference: the probe text {ctx.probe.name!r} ({ctx.probe.tokens} tokens), n* = {reference_result.n_star}",
        f"{agree}/{len(corpus)} texts give the reference set",
        f"prefixes agree with the reference from {min_length} tokens on"
        if min_length
        else "no prefix length agrees with the reference from there on",
    )
    skipped = [n for n in lengths if n > probe_ids.shape[1]]
    if skipped:
        notes += (f"lengths {skipped} exceed the probe's {probe_ids.shape[1]} tokens and were skipped",)
    return StudyResult(
        "texts",
        title,
        ("text", "genre", "language", "tokens", "n_star", "same_set", "jaccard"),
        tuple(rows),
        {
            **ctx.params.as_dict(),
            "lengths": list(lengths),
            "min_agreeing_length": min_length,
            "reference_set": sorted(str(n) for n in reference or ()),
        },
        plot,
        notes,
    )


def _row(ctx, name, genre, language, input_ids, reference):
    result = ctx.search(ctx.rank(input_ids=input_ids, label=name), input_ids=input_ids)
    found = frozenset(result.critical_set) if result.converged else None
    same = found is not None and found == reference
    jaccard = len(found & reference) / len(found | reference) if found is not None and reference else None
    return (
        name,
        genre,
        language,
        int(input_ids.shape[1]),
        result.n_star if result.converged else "not converged",
        same,
        jaccard,
    )


def _agreeing_from(prefix_rows) -> int | None:
    """The smallest length L such that every prefix of length >= L gives the reference set."""
    answer = None
    for row in reversed(prefix_rows):
        if not row[5]:
            break
        answer = row[3]
    return answer
