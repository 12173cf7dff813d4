"""The image-text pair aligner: joins image files and texts (captions, reports) by key, checks every
pair, optionally scrubs personal data, splits by group and writes a `datasets` DatasetDict plus a JSON
report. It sits before the readers: its output feeds the image-text data modules.

    from mmtune.data.align import AlignSpec, align_pairs, save_aligned

    dataset, report = align_pairs(AlignSpec(images="scans/", texts="reports.csv", key_column="image"))
    save_aligned(dataset, report, "data/aligned")

The command line is the same spec: `mmtune data align --images scans/ --texts reports.csv --out DIR`.
"""

from mmtune.data.align.pii import PIIScrubber
from mmtune.data.align.pipeline import align_pairs, align_to_disk, save_aligned
from mmtune.data.align.report import REPORT_FILE, format_summary
from mmtune.data.align.spec import PROBLEMS, AlignSpec, PIISpec, ProblemPolicy

__all__ = ["PROBLEMS", "REPORT_FILE", "AlignSpec", "PIIScrubber", "PIISpec", "ProblemPolicy", "align_pairs",
           "align_to_disk", "format_summary", "save_aligned"]
