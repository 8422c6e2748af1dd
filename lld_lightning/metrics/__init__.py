"""Detection mAP, attribute metrics and their per-domain breakdown (torchmetrics, no Lightning)."""

from lld_lightning.metrics.attributes import UNDEFINED_METRIC, AttributeMetrics
from lld_lightning.metrics.detection import UnevenMeanAveragePrecision
from lld_lightning.metrics.domains import ALL_DOMAINS, DomainMetrics, EvaluationDetails
from lld_lightning.metrics.matching import UNMATCHED, match_detections
from lld_lightning.metrics.regions import keep_inside_regions
from lld_lightning.metrics.tables import (
    attribute_report_table,
    class_ap_table,
    render_metrics_table,
)

__all__ = [
    "ALL_DOMAINS",
    "UNDEFINED_METRIC",
    "UNMATCHED",
    "AttributeMetrics",
    "DomainMetrics",
    "EvaluationDetails",
    "UnevenMeanAveragePrecision",
    "attribute_report_table",
    "class_ap_table",
    "keep_inside_regions",
    "match_detections",
    "render_metrics_table",
]
