"""Candle windows turned into feature vectors once, in the coordinator, instead of once per
server.

Every server computes a window's features with the same code (``training.features``) and
answers a feature vector exactly as it answers the window it came from. When a server reports
the feature definitions this coordinator runs (``ModelInfo.features_hash``), the coordinator
sends it the features: one computation per request instead of one per server, which is most of a
window request's CPU on a machine that runs several servers. Servers that report other
definitions, or none yet, get the candles as sent.
"""

from __future__ import annotations

from training import features
from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import types_pb2
from xylen_server.candles import window_columns

#: The feature definitions this coordinator computes.
FEATURES_HASH = features.feature_definitions_hash()


def featurized(request: pb.PredictRequest) -> pb.PredictRequest | None:
    """``request`` with every candle window replaced by its features, or None when it has no
    window. Raises :class:`~xylen_server.errors.InvalidArgument` for a bad window, with the
    reason a server would give (WINDOW_TOO_SHORT, CANDLES_OUT_OF_ORDER, ...)."""
    if not any(item.HasField("candles") for item in request.inputs):
        return None
    out = pb.PredictRequest(model_name=request.model_name)
    for index, item in enumerate(request.inputs):
        if item.HasField("candles"):
            columns = window_columns(item.candles.candles, features.LOOKBACK_PERIODS, index)
            values = features.window_features(columns)
            out.inputs.add(features=types_pb2.FeatureVector(values=values.tolist()))
        else:
            out.inputs.append(item)
    return out
