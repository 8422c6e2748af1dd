"""Tests for lld_lightning.metrics: matching, attribute metrics, per-domain mAP, tables."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from rich.console import Console
from torch import Tensor

from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.metrics import (
    UNDEFINED_METRIC,
    UNMATCHED,
    AttributeMetrics,
    DomainMetrics,
    UnevenMeanAveragePrecision,
    attribute_report_table,
    class_ap_table,
    match_detections,
    render_metrics_table,
)
from lld_lightning.metrics import detection as detection_module

SPEC = {"size": 3, "flag": 2}
CLASSES = ["None", "Blast", "Lympho"]
M = IGNORE_INDEX


def boxes(*rows: list[float]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def target(box: Tensor, labels: list[int], attributes: list[list[int]]) -> dict[str, Tensor]:
    return {
        "boxes": box,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "attributes": torch.tensor(attributes, dtype=torch.int64).reshape(len(labels), -1),
    }


def pred(
    box: Tensor, scores: list[float], labels: list[int], attributes: list[list[int]]
) -> dict[str, Tensor]:
    attrs = (
        torch.tensor(attributes, dtype=torch.int64)
        if labels
        else torch.zeros((0, len(SPEC)), dtype=torch.int64)
    )
    return {
        "boxes": box,
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "attributes": attrs,
        "attribute_scores": torch.ones(attrs.shape),
    }


def perfect(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """Predictions equal to the target, missing attributes predicted as 0."""
    n = len(t["labels"])
    return pred(
        t["boxes"].clone(),
        [0.9] * n,
        t["labels"].tolist(),
        t["attributes"].clamp(min=0).tolist(),
    )


def assert_no_nan(results: dict) -> None:
    values = [float(v) for v in results.values()]
    assert all(math.isfinite(v) for v in values), results


TWO_CELLS = target(boxes([10, 10, 50, 50], [100, 100, 160, 150]), [1, 2], [[0, 1], [2, M]])
THREE_CELLS = target(
    boxes([0, 0, 30, 30], [40, 40, 90, 80], [120, 20, 170, 70]), [0, 1, 2], [[1, 0], [2, 1], [0, 0]]
)


# --- matching ---------------------------------------------------------------------------------


def test_matching_is_greedy_by_score_and_class_agnostic() -> None:
    gt = boxes([0, 0, 10, 10], [20, 0, 30, 10])
    det = boxes(
        [0, 0, 10, 10],  # perfect on cell 0, low score
        [1, 0, 11, 10],  # IoU 0.82 with cell 0, highest score: wins cell 0
        [20, 0, 30, 12],  # IoU 0.83 with cell 1
        [50, 50, 60, 60],  # overlaps nothing
    )
    matched = match_detections(det, torch.tensor([0.3, 0.9, 0.5, 0.99]), gt)
    assert matched.tolist() == [1, 2]


def test_matching_takes_best_iou_cell_and_respects_threshold() -> None:
    gt = boxes([0, 0, 10, 10], [2, 0, 12, 10], [100, 100, 110, 110])
    det = boxes([2, 0, 12, 10], [0, 0, 10, 10], [104, 100, 114, 110])  # last: IoU 6/14 < 0.5
    matched = match_detections(det, torch.tensor([0.9, 0.8, 0.95]), gt)
    assert matched.tolist() == [1, 0, UNMATCHED]
    assert match_detections(boxes(), torch.zeros(0), gt).tolist() == [UNMATCHED] * 3
    assert match_detections(det, torch.ones(3), boxes()).shape == (0,)


# --- attribute metrics ------------------------------------------------------------------------


def test_attribute_metrics_hand_computed_confusion() -> None:
    spec = {"size": 3, "flag": 2, "vac": 3}
    # 4 matched cells over two images (detections listed in another order than the cells).
    t1 = target(boxes([0, 0, 10, 10], [20, 20, 30, 30]), [0, 0], [[0, 1, 0], [0, 1, 0]])
    p1 = pred(boxes([20, 20, 30, 30], [0, 0, 10, 10]), [0.8, 0.9], [0, 0], [[1, 0, 0], [0, 1, 0]])
    t2 = target(boxes([0, 0, 10, 10], [20, 20, 30, 30]), [0, 0], [[1, 0, 0], [2, M, 0]])
    p2 = pred(boxes([0, 0, 10, 10], [20, 20, 30, 30]), [0.8, 0.9], [1, 1], [[1, 0, 0], [1, 1, 1]])
    # size: true (0,0,1,2) pred (0,1,1,1); flag: true (1,1,0,-) pred (1,0,0,.);
    # vac: true (0,0,0,0) pred (0,0,0,1), value 2 never occurs.
    metric = AttributeMetrics(spec)
    metric.update([p1, p2], [t1, t2])
    out = {k: float(v) for k, v in metric.compute().items()}
    assert metric.confusion[0, :3, :3].tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    size_f1 = (2 / 3 + 2 / 4 + 0) / 3  # per value 2TP/(2TP+FP+FN)
    flag_f1 = (2 / 3 + 2 / 3) / 2
    vac_f1 = (6 / 7 + 0) / 2  # value 2 in neither targets nor predictions: left out
    expected = {
        "size/accuracy": 0.5,
        "size/f1": size_f1,
        "flag/accuracy": 2 / 3,
        "flag/f1": flag_f1,
        "vac/accuracy": 0.75,
        "vac/f1": vac_f1,
        "mean_accuracy": (0.5 + 2 / 3 + 0.75) / 3,
        "mean_f1": (size_f1 + flag_f1 + vac_f1) / 3,
        "matched_fraction": 1.0,
    }
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key


def test_unmatched_cell_is_excluded_from_attribute_metrics() -> None:
    t = target(boxes([0, 0, 10, 10], [50, 50, 60, 60]), [0, 0], [[1, 1], [1, 1]])
    # Second detection is wrong on every attribute but overlaps its cell with IoU 6/14 < 0.5.
    p = pred(boxes([0, 0, 10, 10], [54, 50, 64, 60]), [0.9, 0.9], [0, 0], [[1, 1], [0, 0]])
    metric = AttributeMetrics(SPEC)
    metric.update([p], [t])
    out = metric.compute()
    assert float(out["mean_accuracy"]) == 1.0
    assert float(out["mean_f1"]) == 1.0
    assert float(out["matched_fraction"]) == 0.5
    assert int(metric.confusion.sum()) == 2


def test_missing_values_are_skipped_and_no_data_is_undefined_not_nan() -> None:
    t = target(boxes([0, 0, 10, 10], [20, 20, 30, 30]), [0, 0], [[2, M], [M, M]])
    p = pred(boxes([0, 0, 10, 10], [20, 20, 30, 30]), [0.9, 0.9], [0, 0], [[2, 0], [0, 1]])
    metric = AttributeMetrics(SPEC)
    metric.update([p], [t])
    out = {k: float(v) for k, v in metric.compute().items()}
    assert_no_nan(out)
    assert out["size/accuracy"] == 1.0  # the second cell's wrong size prediction is skipped
    assert out["flag/accuracy"] == UNDEFINED_METRIC
    assert out["flag/f1"] == UNDEFINED_METRIC
    assert out["mean_accuracy"] == 1.0  # the flag attribute is left out of the mean
    assert out["mean_f1"] == 1.0


@pytest.mark.filterwarnings("ignore:.*before the ``update``")
def test_fresh_attribute_metric_is_all_undefined() -> None:
    out = AttributeMetrics(SPEC).compute()
    assert {float(v) for v in out.values()} == {UNDEFINED_METRIC}


def test_attribute_value_out_of_range_names_the_attribute() -> None:
    t = target(boxes([0, 0, 10, 10]), [0], [[0, 5]])
    with pytest.raises(ValueError, match="flag"):
        AttributeMetrics(SPEC).update([perfect(t)], [t])


# --- domain metrics ---------------------------------------------------------------------------


def domain_metrics(**kwargs) -> DomainMetrics:
    return DomainMetrics(["H_100x_C1", "L.40x/C2"], 3, CLASSES, SPEC, **kwargs)


def test_perfect_predictions_score_one_everywhere() -> None:
    metrics = domain_metrics()
    metrics.update(
        [perfect(TWO_CELLS), perfect(THREE_CELLS)],
        [TWO_CELLS, THREE_CELLS],
        ["H_100x_C1", "H_100x_C1"],
    )
    out = metrics.compute()
    assert_no_nan(out)
    for scope in ("all", "H_100x_C1"):
        assert out[f"{scope}/num_images"] == 2
        for key in (
            "map",
            "map_50",
            "map_75",
            "ap/None",
            "ap/Blast",
            "ap/Lympho",
            "attr/mean_f1",
            "attr/mean_accuracy",
            "attr/size/f1",
            "attr/flag/accuracy",
        ):
            assert out[f"{scope}/{key}"] == pytest.approx(1.0), key
    assert not any(k.startswith("L.40x/C2/") for k in out)  # no image: left out


def test_per_domain_separation() -> None:
    metrics = domain_metrics()
    bad = perfect(THREE_CELLS)
    bad["labels"] = torch.tensor([1, 2, 0])  # every class wrong
    bad["attributes"] = 1 - THREE_CELLS["attributes"].clamp(max=1)  # every attribute wrong
    metrics.update([perfect(TWO_CELLS), bad], [TWO_CELLS, THREE_CELLS], ["H_100x_C1", "L.40x/C2"])
    out = metrics.compute()
    assert_no_nan(out)
    assert out["H_100x_C1/map"] == pytest.approx(1.0)
    assert out["L.40x/C2/map"] == pytest.approx(0.0)
    assert out["L.40x/C2/map"] < out["all/map"] < out["H_100x_C1/map"]
    assert out["H_100x_C1/attr/mean_accuracy"] == 1.0
    assert out["L.40x/C2/attr/mean_accuracy"] == 0.0
    assert out["all/attr/size/accuracy"] == pytest.approx(2 / 5)  # 2 of 2 right, 0 of 3
    assert out["all/ap/None"] == pytest.approx(0.0)  # "None" only on the bad domain
    # "None" has no cell in H_100x_C1: no AP there, left out rather than torchmetrics' -1.
    assert "H_100x_C1/ap/None" not in out
    assert not any(v == -1.0 for k, v in out.items() if "/ap/" in k or "/attr/" in k)


def test_empty_predictions_give_zero_map() -> None:
    empty = pred(boxes(), [], [], [])
    metrics = domain_metrics()
    metrics.update([empty], [TWO_CELLS], ["H_100x_C1"])
    out = metrics.compute()
    assert_no_nan(out)
    assert out["all/map"] == 0.0
    assert out["all/map_50"] == 0.0
    assert out["all/attr/matched_fraction"] == 0.0
    # No matched cell: the attribute metrics are undefined (-1 in AttributeMetrics), left out.
    assert "all/attr/mean_f1" not in out and "all/attr/size/f1" not in out
    assert UNDEFINED_METRIC not in out.values()


def random_case(seed: int, num_images: int = 6) -> tuple[list[dict], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(num_images):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * 500
        wh = 20 + torch.rand(n, 2, generator=gen) * 80
        gt_boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, 3, (n,), generator=gen)
        attrs = torch.randint(-1, 2, (n, 2), generator=gen)
        targets.append(target(gt_boxes, labels.tolist(), attrs.tolist()))
        jitter = torch.randn(n, 4, generator=gen) * 8
        extra = torch.rand(2, 4, generator=gen).sort(dim=1).values * 600  # false positives
        det_labels = torch.where(torch.rand(n, generator=gen) < 0.8, labels, (labels + 1) % 3)
        preds.append(
            pred(
                torch.cat([gt_boxes + jitter, extra]),
                torch.rand(n + 2, generator=gen).tolist(),
                torch.cat([det_labels, torch.randint(0, 3, (2,), generator=gen)]).tolist(),
                torch.randint(0, 2, (n + 2, 2), generator=gen).tolist(),
            )
        )
    return preds, targets


def test_faster_coco_eval_matches_pycocotools() -> None:
    pytest.importorskip("faster_coco_eval")
    preds, targets = random_case(seed=3)
    domains = ["H_100x_C1", "L.40x/C2"] * 3
    results = []
    for backend in ("pycocotools", "faster_coco_eval"):
        metrics = domain_metrics(backend=backend)
        metrics.update(preds, targets, domains)
        results.append(metrics.compute())
    reference, fast = results
    assert 0.05 < reference["all/map"] < 0.95  # a non-trivial case
    assert reference.keys() == fast.keys()
    for key, value in reference.items():
        assert fast[key] == pytest.approx(value, abs=1e-6), key


def test_unknown_domain_and_reserved_name() -> None:
    metrics = domain_metrics()
    with pytest.raises(ValueError, match="H_10x_C9"):
        metrics.update([perfect(TWO_CELLS)], [TWO_CELLS], ["H_10x_C9"])
    with pytest.raises(ValueError, match="reserved"):
        DomainMetrics(["all"], 3, CLASSES, SPEC)


def test_reset_and_fresh_compute() -> None:
    metrics = domain_metrics()
    assert metrics.compute() == {}
    bad = perfect(TWO_CELLS)
    bad["boxes"] = bad["boxes"] + 30
    metrics.update([bad], [TWO_CELLS], ["L.40x/C2"])
    assert metrics.compute()["all/map"] < 1.0
    metrics.reset()
    assert metrics.compute() == {}
    metrics.update([perfect(TWO_CELLS)], [TWO_CELLS], ["H_100x_C1"])
    out = metrics.compute()
    assert out["all/map"] == pytest.approx(1.0)
    assert out["all/num_images"] == 1
    assert "L.40x/C2/map" not in out


def test_empty_attribute_spec_skips_attribute_metrics() -> None:
    metrics = DomainMetrics(["A"], 3, CLASSES, {}, class_metrics=False)
    plain = {k: v for k, v in perfect(TWO_CELLS).items() if k != "attributes"}
    metrics.update([plain], [TWO_CELLS], ["A"])
    out = metrics.compute()
    assert not any("/attr/" in k or "/ap/" in k for k in out)
    assert out["A/map"] == pytest.approx(1.0)


# --- distributed ------------------------------------------------------------------------------


def test_uneven_map_sync_merges_ranks_with_different_image_counts(monkeypatch) -> None:
    preds, targets = random_case(seed=5, num_images=3)
    det_preds = [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds]
    det_targets = [{k: t[k] for k in ("boxes", "labels")} for t in targets]
    reference = UnevenMeanAveragePrecision(class_metrics=True)
    reference.update(det_preds, det_targets)
    expected = reference.compute()

    # This rank saw image 0, the other rank images 1 and 2; then a rank that saw none.
    other_rank = UnevenMeanAveragePrecision()
    other_rank.update(det_preds[1:], det_targets[1:])
    other_states = {a: list(getattr(other_rank, a)) for a in other_rank._reductions}
    monkeypatch.setattr(
        detection_module, "all_gather_objects", lambda obj, group: [obj, other_states]
    )
    for local in (slice(0, 1), slice(0, 0)):
        metric = UnevenMeanAveragePrecision(
            class_metrics=True, distributed_available_fn=lambda: True
        )
        metric.update(det_preds[local], det_targets[local])
        got = metric.compute()
        if local.stop == 0:
            assert got["map"] == pytest.approx(other_rank.compute()["map"])
        else:
            for key in ("map", "map_50", "map_75", "map_per_class"):
                torch.testing.assert_close(got[key], expected[key])
        assert len(metric.detection_box) == local.stop  # local states restored after sync


def test_domain_metrics_under_single_process_gloo_group(tmp_path) -> None:
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    preds, targets = random_case(seed=7, num_images=4)
    domains = ["H_100x_C1", "H_100x_C1", "L.40x/C2", "H_100x_C1"]
    local = domain_metrics()
    local.update(preds, targets, domains)
    expected = local.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        synced = domain_metrics()
        synced.update(preds, targets, domains)
        got, got_details = synced.compute_with_details()
    finally:
        dist.destroy_process_group()
    assert got_details == local.compute_with_details()[1]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# --- tables -----------------------------------------------------------------------------------


def table_cells(table) -> list[list[str]]:
    """The rendered table's header and body rows as lists of stripped cell texts."""
    console = Console(record=True, width=240)
    console.print(table)
    text = console.export_text().replace("┃", "│")
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]


def test_tables_show_domains_then_all() -> None:
    metrics = domain_metrics()
    metrics.update([perfect(TWO_CELLS)], [TWO_CELLS], ["H_100x_C1"])
    out = metrics.compute()
    rows = table_cells(render_metrics_table(out, metrics.domains, "test"))
    assert rows == [
        ["domain", "images", "mAP", "mAP@.5", "attr F1"],
        ["H_100x_C1", "1", "1.000", "1.000", "1.000"],
        ["L.40x/C2", "-", "-", "-", "-"],  # no image
        ["all", "1", "1.000", "1.000", "1.000"],
    ]
    report = table_cells(attribute_report_table(out, SPEC))
    assert report == [
        ["attribute", "H_100x_C1", "all"],  # domains default to those in the results
        ["size", "1.000 / 1.000", "1.000 / 1.000"],
        ["flag", "1.000 / 1.000", "1.000 / 1.000"],
        ["mean", "1.000 / 1.000", "1.000 / 1.000"],
    ]


def test_attribute_table_reads_domain_names_with_slashes_and_undefined() -> None:
    metrics = domain_metrics()
    t = target(boxes([0, 0, 10, 10]), [0], [[1, M]])
    metrics.update([perfect(t)], [t], ["L.40x/C2"])
    report = table_cells(attribute_report_table(metrics.compute(), SPEC))
    assert report[0] == ["attribute", "L.40x/C2", "all"]
    assert report[2] == ["flag", "- / -", "- / -"]  # no flag value: undefined, shown as "-"


def test_class_ap_table_shows_ap_per_class_and_dash_where_absent() -> None:
    metrics = domain_metrics()
    metrics.update([perfect(TWO_CELLS), perfect(THREE_CELLS)], [TWO_CELLS, THREE_CELLS],
                   ["H_100x_C1", "L.40x/C2"])
    rows = table_cells(class_ap_table(metrics.compute(), CLASSES, metrics.domains))
    assert rows == [
        ["class", "H_100x_C1", "L.40x/C2", "all"],
        ["None", "-", "1.000", "1.000"],  # no "None" cell in H_100x_C1
        ["Blast", "1.000", "1.000", "1.000"],
        ["Lympho", "1.000", "1.000", "1.000"],
    ]


# --- details: PR curves, confusion matrices ---------------------------------------------------


def test_details_hold_pr_curves_of_present_classes_and_the_confusion_matrices() -> None:
    metrics = domain_metrics()
    bad = perfect(THREE_CELLS)
    bad["attributes"] = 1 - THREE_CELLS["attributes"].clamp(max=1)
    metrics.update([perfect(TWO_CELLS), bad], [TWO_CELLS, THREE_CELLS], ["H_100x_C1", "L.40x/C2"])
    flat, details = metrics.compute_with_details()
    assert flat == metrics.compute()  # the same numbers, with or without details
    assert len(details.recall_thresholds) == 101
    assert list(details.pr_curves["H_100x_C1"]) == ["Blast", "Lympho"]  # "None" has no cell
    assert list(details.pr_curves["all"]) == CLASSES
    for curve in details.pr_curves["all"].values():
        assert curve == pytest.approx([1.0] * 101)  # boxes and labels are perfect everywhere
    # size: H_100x_C1 has (0->0), (2->2); L.40x/C2 has true 1,2,0 predicted 0,0,1.
    assert details.confusion["H_100x_C1"]["size"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert details.confusion["all"]["size"] == [[1, 1, 0], [1, 0, 0], [1, 0, 1]]
    # flag: (1->1) in H_100x_C1 (its other cell has none); (0->1), (1->0), (0->1) in L.40x/C2.
    assert details.confusion["all"]["flag"] == [[0, 2], [1, 1]]
    assert sum(map(sum, details.confusion["all"]["size"])) == 5


def test_plots_are_images_of_sensible_size() -> None:
    from lld_lightning.metrics.plots import (
        confusion_matrix_plot,
        domain_bars_plot,
        pr_curves_plot,
    )

    recall = [i / 100 for i in range(101)]
    curves = {name: [1 - r * (i + 1) / 4 for r in recall] for i, name in enumerate(CLASSES)}
    images = [
        pr_curves_plot(recall, curves, {"Blast": 0.5}, "PR"),
        confusion_matrix_plot([[3, 1, 0], [0, 2, 0], [1, 0, 5]], ["small", "medium", "large"], "c"),
        domain_bars_plot({"A": {"mAP": 0.3, "mAP@.5": 0.6}, "all": {"mAP": 0.2}}, "bars"),
    ]
    for image in images:
        width, height = image.size
        assert 300 <= width <= 2000 and 300 <= height <= 2000
        assert len(image.getcolors(maxcolors=1 << 16) or []) > 3  # drawn, not blank
