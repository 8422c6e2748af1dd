"""Rich tables of `DomainMetrics` results for the console."""

from __future__ import annotations

from rich.table import Table

from lld_lightning.metrics.attributes import UNDEFINED_METRIC
from lld_lightning.metrics.domains import ALL_DOMAINS

#: Shown for a metric that is absent or undefined.
NOT_AVAILABLE: str = "-"


def _fmt(value: float | None) -> str:
    if value is None or value == UNDEFINED_METRIC:
        return NOT_AVAILABLE
    return f"{value:.3f}"


def _scopes(results: dict[str, float], domains: list[str] | None) -> list[str]:
    """The given domains (or those found in ``results``, in order), then ``"all"``."""
    if domains is None:
        # Domain names may contain "/", so read them off the one key every scope has.
        suffix = "/num_images"
        found = [key.removesuffix(suffix) for key in results if key.endswith(suffix)]
        domains = [d for d in found if d != ALL_DOMAINS]
    return [*domains, ALL_DOMAINS]


def render_metrics_table(results: dict[str, float], domains: list[str], title: str) -> Table:
    """Summary table: one row per domain, then ``all``.

    Args:
        results: `DomainMetrics.compute` output.
        domains: the domains to show, in row order (a domain absent from ``results`` shows
            ``-`` everywhere).
        title: table title.

    Returns:
        Columns: domain, images, mAP, mAP@.5, mean attribute F1.
    """
    table = Table(title=title)
    table.add_column("domain")
    for name in ("images", "mAP", "mAP@.5", "attr F1"):
        table.add_column(name, justify="right")
    for scope in _scopes(results, domains):
        images = results.get(f"{scope}/num_images")
        table.add_row(
            scope,
            NOT_AVAILABLE if images is None else str(int(images)),
            _fmt(results.get(f"{scope}/map")),
            _fmt(results.get(f"{scope}/map_50")),
            _fmt(results.get(f"{scope}/attr/mean_f1")),
            end_section=scope == ALL_DOMAINS,
        )
    return table


def attribute_report_table(
    results: dict[str, float],
    attribute_spec: dict[str, int],
    domains: list[str] | None = None,
    title: str = "Attributes (accuracy / macro-F1)",
) -> Table:
    """Per-attribute accuracy and F1, one column per domain then ``all``.

    Args:
        results: `DomainMetrics.compute` output.
        attribute_spec: ``{name: number of values}``; one row per attribute, then the mean.
        domains: columns in order; by default the domains found in ``results``.
        title: table title.

    Returns:
        Cells read ``accuracy / F1``; ``-`` where undefined.
    """
    scopes = _scopes(results, domains)
    table = Table(title=title)
    table.add_column("attribute")
    for scope in scopes:
        table.add_column(scope, justify="right")

    def cell(scope: str, stem: str, acc: str, f1: str) -> str:
        prefix = f"{scope}/attr/{stem}"
        return f"{_fmt(results.get(prefix + acc))} / {_fmt(results.get(prefix + f1))}"

    for name in attribute_spec:
        table.add_row(name, *(cell(s, f"{name}/", "accuracy", "f1") for s in scopes))
    table.add_section()
    table.add_row("mean", *(cell(s, "", "mean_accuracy", "mean_f1") for s in scopes))
    return table


def class_ap_table(
    results: dict[str, float],
    class_names: list[str],
    domains: list[str] | None = None,
    title: str = "AP per class (IoU .5:.95)",
) -> Table:
    """Per-class AP, one row per class, one column per domain then ``all``.

    Args:
        results: `DomainMetrics.compute` output (``<scope>/ap/<class>`` keys).
        class_names: rows in order; a class with no AP anywhere (no ground-truth cell) is left
            out.
        domains: columns in order; by default the domains found in ``results``.
        title: table title.

    Returns:
        Cells hold the AP; ``-`` where the class has no ground-truth cell in that scope.
    """
    scopes = _scopes(results, domains)
    table = Table(title=title)
    table.add_column("class")
    for scope in scopes:
        table.add_column(scope, justify="right")
    for name in class_names:
        cells = [results.get(f"{scope}/ap/{name}") for scope in scopes]
        if all(cell is None for cell in cells):
            continue
        table.add_row(name, *(_fmt(cell) for cell in cells))
    return table
