"""Training: from Binance Vision klines to a model directory the server can load.

``klines``       the one loader of kline files (zip or CSV, checksums, anomaly policy)
``generator``    the deterministic offline dataset, in the same format
``download``     monthly files from data.binance.vision (or a mirror), checksum-verified
``features``     the feature definitions, backward-looking only, shared with the server
``labels``       the labels, the only forward-looking code
``split``        splits by time with a gap; walk-forward folds
``trainers``     LightGBM, XGBoost and CatBoost behind one interface (fit, finetune), and the
                 one writer of model directories
``evaluate``     metrics beside baselines, the one log loss, leakage checks
``onnx_export``  exact conversion to ONNX
``metadata``     the model directory: metadata.json, file names, the engines' input convention
``config``       training settings (``default.yaml`` and overrides)
``pipeline``     load, featurise, label, split, fit, evaluate, write
``__main__``     ``python -m training``: generate, data, train
"""
