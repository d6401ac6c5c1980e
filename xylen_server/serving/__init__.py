"""Serving one model: from a request's inputs to probabilities, fast and exactly.

``inputs``        PredictRequest inputs to the validated float32 matrix the model runs on
``session_pool``  ONNX Runtime sessions, one per worker thread plus one for the event loop
``native``        LightGBM, XGBoost and CatBoost boosters behind the same interface
``parity``        the ONNX-vs-native check a model passes before it serves
``model_store``   loading a model directory: metadata, checksums, conversion, parity, warm-up
``pacing``        a hot swap's load kept to a share of one core (MODEL_LOAD_CPU_SHARE)
``predictor``     the served model, where each batch runs, signals and prediction ids
"""
