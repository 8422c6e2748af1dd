"""Label formats: LLD sparse YOLO, COCO with attributes, plain YOLO; `load_records` loads any."""

from lld_lightning.data.formats.coco import read_coco, write_coco
from lld_lightning.data.formats.lld import (
    format_lld_rows,
    parse_lld_label_file,
    write_lld_label_file,
)
from lld_lightning.data.formats.load import load_records, summarize_records
from lld_lightning.data.formats.options import FormatOptions
from lld_lightning.data.formats.yolo import parse_yolo_label_file, read_attribute_csv

__all__ = [
    "FormatOptions",
    "format_lld_rows",
    "load_records",
    "parse_lld_label_file",
    "parse_yolo_label_file",
    "read_attribute_csv",
    "read_coco",
    "summarize_records",
    "write_coco",
    "write_lld_label_file",
]
