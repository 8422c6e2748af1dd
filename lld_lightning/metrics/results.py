"""`lld test`'s saved results: ``results.json`` (structured) and PNG plots, in the run folder."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lld_lightning.metrics.domains import ALL_DOMAINS, EvaluationDetails
from lld_lightning.metrics.plots import confusion_matrix_plot, domain_bars_plot, pr_curves_plot
from lld_lightning.predictor import attribute_value_names

#: The structured test results, next to the flat ``test_results.json``.
RESULTS_JSON = "results.json"
#: Folder of the PNG plots inside the run folder.
PLOTS_DIR = "plots"
#: Version of the ``results.json`` layout; bumped when a key changes meaning.
SCHEMA_VERSION = 1
#: Folder of the run folder where the results of a test on other data are kept when a new test
#: replaces them (``tests/<date of that test>/``).
EARLIER_TESTS_DIR = "tests"

#: ``results.json`` key of each flat ``<scope>/<key>`` metric (besides ``ap/``, ``ap50/`` and
#: ``attr/<name>/``).
_SCALARS = {
    "num_images": "num_images",
    "map": "map",
    "map_50": "map_50",
    "map_75": "map_75",
    "attr/mean_accuracy": "attribute_mean_accuracy",
    "attr/mean_f1": "attribute_mean_f1",
    "attr/matched_fraction": "matched_fraction",
}


def _scope_results(
    flat: dict[str, float],
    scope: str,
    class_names: list[str],
    attribute_spec: dict[str, int],
    confusion: dict[str, list[list[int]]],
) -> dict:
    prefix = f"{scope}/"
    out: dict = {}
    for key, name in _SCALARS.items():
        if prefix + key in flat:
            value = flat[prefix + key]
            out[name] = int(value) if key == "num_images" else value
    for group, key in (("ap_per_class", "ap"), ("ap50_per_class", "ap50")):
        out[group] = {
            c: flat[f"{prefix}{key}/{c}"] for c in class_names if f"{prefix}{key}/{c}" in flat
        }
    attributes = {}
    for name in attribute_spec:
        entry = {
            metric: flat[f"{prefix}attr/{name}/{metric}"]
            for metric in ("accuracy", "f1")
            if f"{prefix}attr/{name}/{metric}" in flat
        }
        if name in confusion:
            entry["confusion"] = confusion[name]
        if entry:
            attributes[name] = entry
    out["attributes"] = attributes
    return out


def results_document(
    flat: dict[str, float],
    details: EvaluationDetails,
    class_names: list[str],
    attribute_spec: dict[str, int],
    checkpoint: str | None,
    date: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> dict:
    """The ``results.json`` content.

    Layout: ``schema_version``, ``checkpoint``, ``date`` (ISO 8601, UTC), ``data`` (what was
    tested: ``root``, ``split``, ``domains``; absent when not given), ``classes``,
    ``attributes`` (``{name: [value names]}``), ``overall`` and ``domains`` (``{domain: ...}``),
    each scope holding ``num_images``, ``map``, ``map_50``, ``map_75``, ``ap_per_class``
    (``{class: AP@[.5:.95]}``, classes with ground truth only), ``ap50_per_class`` (``{class:
    AP@.5}``, the same classes), ``attributes`` (``{name: {accuracy, f1,
    confusion}}``, confusion rows = true value, columns = predicted), ``attribute_mean_accuracy``,
    ``attribute_mean_f1``, ``matched_fraction``; an undefined metric is absent, as in the logs.

    Args:
        flat: `DomainMetrics.compute` output (what was logged).
        details: the matching `EvaluationDetails`.
        class_names: class names, index = class id.
        attribute_spec: ``{name: number of values}``.
        checkpoint: the tested checkpoint's path.
        date: when the test ran; now by default.
        data: the tested data (`tested_data`).
    """
    suffix = "/num_images"
    scopes = [key.removesuffix(suffix) for key in flat if key.endswith(suffix)]
    document = {
        "schema_version": SCHEMA_VERSION,
        "checkpoint": checkpoint,
        "date": (date or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        **({"data": data} if data is not None else {}),
        "classes": list(class_names),
        "attributes": attribute_value_names(attribute_spec),
    }

    def scope(name: str) -> dict:
        return _scope_results(
            flat, name, class_names, attribute_spec, details.confusion.get(name, {})
        )

    document["overall"] = scope(ALL_DOMAINS) if ALL_DOMAINS in scopes else {}
    document["domains"] = {name: scope(name) for name in scopes if name != ALL_DOMAINS}
    return document


def tested_data(root: str | os.PathLike, split: str, domains: list[str] | None) -> dict[str, Any]:
    """``results.json``'s ``data``: the absolute data root, the split and the tested domains
    (None = all)."""
    return {
        "root": os.path.realpath(root),
        "split": split,
        "domains": None if domains is None else list(domains),
    }


def keep_earlier_test(run_dir: Path, data: dict[str, Any], files: list[str]) -> Path | None:
    """Before a test writes into ``run_dir``: when it holds the results of a test on other data
    (or of unknown data), move them (``results.json``, the other ``files`` and ``plots/``) into
    ``tests/<that test's date>/`` so that the new test does not replace them.

    Returns:
        The folder they were moved to; None when there was nothing to keep (no earlier test, or
        one of the same data, which the new test repeats).
    """
    previous = run_dir / RESULTS_JSON
    if not previous.is_file():
        return None
    try:
        document = json.loads(previous.read_text())
    except (OSError, ValueError):
        document = {}
    if document.get("data") == data:
        return None
    stamp = re.sub(r"[^\w-]", "", str(document.get("date") or "undated").replace(":", "-"))
    target = run_dir / EARLIER_TESTS_DIR / stamp
    index = 1
    while target.exists():
        index += 1
        target = run_dir / EARLIER_TESTS_DIR / f"{stamp}_{index}"
    target.mkdir(parents=True)
    for name in [RESULTS_JSON, *files, PLOTS_DIR]:
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(target / name))
    return target


def _write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def write_test_outputs(
    run_dir: Path,
    flat: dict[str, float],
    details: EvaluationDetails,
    class_names: list[str],
    attribute_spec: dict[str, int],
    checkpoint: str | None,
    data: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``results.json`` and the plots into ``run_dir``: ``plots/pr_curves.png`` (per class,
    IoU 0.5, all domains), ``plots/confusion_<attribute>.png`` (all domains) and
    ``plots/domain_map.png`` (mAP and mAP@.5 per domain).

    Returns:
        The files written.
    """
    document = results_document(flat, details, class_names, attribute_spec, checkpoint, data=data)
    written = [run_dir / RESULTS_JSON]
    _write_bytes(written[0], (json.dumps(document, indent=2) + "\n").encode())
    plots = run_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    images = {}
    curves = details.pr_curves.get(ALL_DOMAINS)
    if curves:
        aps = document["overall"].get("ap_per_class", {})
        images["pr_curves.png"] = pr_curves_plot(
            details.recall_thresholds,
            curves,
            aps,
            "Precision-recall per class (IoU 0.5, all domains)",
        )
    names = document["attributes"]
    for name, matrix in details.confusion.get(ALL_DOMAINS, {}).items():
        images[f"confusion_{_file_stem(name)}.png"] = confusion_matrix_plot(
            matrix, names[name], f"{name} (all domains, matched cells)"
        )
    bars = {
        scope: {"mAP": entry["map"], "mAP@.5": entry["map_50"]}
        for scope, entry in [*document["domains"].items(), (ALL_DOMAINS, document["overall"])]
        if "map" in entry and "map_50" in entry
    }
    if bars:
        images["domain_map.png"] = domain_bars_plot(bars, "mAP per domain")
    for file_name, image in images.items():
        _write_bytes(plots / file_name, _png(image))
        written.append(plots / file_name)
    return written
