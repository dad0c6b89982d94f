"""The model runtime.

* :mod:`~pipeline.inference.model` - model folders, cards, verified ONNX sessions, the fraud scorer.
* :mod:`~pipeline.inference.registry` - versions published to S3.
* :mod:`~pipeline.inference.serving` - which version a lane serves; hot swap.
* :mod:`~pipeline.inference.fraudscore` - thresholds, decisions and score fields shared by every
  path that scores transactions.
* :mod:`~pipeline.inference.recomodel` - the reco top-k graph and its card.
"""

from pipeline import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "fraudscore": ["Features", "Thresholds", "decide", "encode_score", "score_default_history",
        "score_fields"],
    "model": ["CARD_FILE", "ORT_ERRORS", "ModelCard", "ModelFile", "OnnxScorer", "Precision",
        "SERVED_FEATURE_SETS", "load_card", "parse_files", "read_card_json", "require_field",
        "session_options", "verified_bytes", "verified_session"],
    "recomodel": ["CANDIDATES_INPUT", "GRAPH_IO", "ITEM_IDS", "ITEMS_OUTPUT", "PAD_ID",
        "PopularItem", "SCORES_OUTPUT", "USER_IDS", "USER_INPUT", "IdFormat", "RecoCard",
        "RecoScorer", "load_reco_card"],
    "registry": ["ModelRegistry", "RegistryEntry", "publish", "version_key"],
    "serving": ["ModelFollower", "Slot", "follower_for", "fraud_model_path", "model_path",
        "model_path_now"],
})
