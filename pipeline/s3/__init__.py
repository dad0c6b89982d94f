"""S3 through aioboto3: :mod:`~pipeline.s3.s3store` (put/get/list with retries and metrics) and
:mod:`~pipeline.s3.s3lines` (line-aligned ranged reads of big objects).
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "s3lines": ["iter_line_batches", "split_ranges"],
    "s3store": ["S3Store", "retry"],
})
