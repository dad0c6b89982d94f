"""What the fraud model sees.

* :mod:`~pipeline.features.fastfeatures` - per-event features of a batch (no state).
* :mod:`~pipeline.features.cardhistory` - the per-card history state: arithmetic, wire form,
  history features.
* :mod:`~pipeline.features.historyview` - the fraud lane's read view of the history changelog.
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "cardhistory": ["DEFAULT_HISTORY_FEATURES", "FRAUD_V2_FEATURE_NAMES", "HISTORY_FEATURE_NAMES",
        "HISTORY_VERSION", "LABELS", "CardHistory", "from_bytes", "history_features", "to_bytes",
        "update_with_label", "update_with_transaction", "with_default_history"],
    "fastfeatures": ["FAST_FEATURE_NAMES", "RISKY_MCCS", "fast_features"],
    "historyview": ["CHANGELOG", "TABLE_NAME", "HistoryView", "PartitionClock"],
})
