"""Reproducible model builds.

* :mod:`pipeline.training.fraud_model` - :func:`build_fraud_model`, the end-to-end build of the
  fraud model folder (data, training, ONNX export, INT8 quantisation, card).
* :mod:`pipeline.training.onnx_export` - sklearn MLP to a lean ONNX graph, quantisation
  candidates and throughput measurement.
* :mod:`pipeline.training.model_card` - renders ``CARD.md`` from ``card.json``.

Run ``python -m pipeline.training.fraud_model --out models/fraud`` to rebuild the committed model.
"""

from __future__ import annotations
