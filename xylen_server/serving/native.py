"""The native boosters (LightGBM, XGBoost, CatBoost) behind one ``predict_proba``.

Used to serve when ``ONNX_ENABLED=false`` and, always, as the reference the ONNX conversion is
checked against. LightGBM single rows go through its C fast-predict API (``FastConfig``, one per
thread), about 3x quicker than ``Booster.predict`` for one row.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from training.metadata import ModelMetadata

_FAST_ROWS = 16  # up to this many rows, LightGBM rows go one by one through the fast API


def import_lightgbm() -> Any:
    """The ``lightgbm`` module, imported without scikit-learn.

    LightGBM imports scikit-learn at import time when it is installed (about a second and tens
    of MB), only for its scikit-learn estimator classes, which serving never uses; so the first
    import hides it. Its own console output is routed through logging (DEBUG), so a corrupt
    model file ends the process with the server's one clear line rather than pages of library
    output.
    """
    if "lightgbm" in sys.modules:
        return sys.modules["lightgbm"]
    hide = "sklearn" not in sys.modules
    if hide:
        sys.modules["sklearn"] = None  # type: ignore[assignment]  # import sklearn -> ImportError
    try:
        import lightgbm
    finally:
        if hide:
            del sys.modules["sklearn"]
    library_logger = logging.getLogger("lightgbm")
    lightgbm.register_logger(library_logger, info_method_name="debug", warning_method_name="debug")
    return lightgbm


class Engine(Protocol):
    """What a model server runs inference on."""

    engine: str
    executor: ThreadPoolExecutor

    def predict_proba(self, rows: np.ndarray) -> np.ndarray: ...

    def predict_on_loop(self, rows: np.ndarray) -> np.ndarray: ...

    @property
    def takes_values(self) -> bool:
        """The engine answers :meth:`predict_value` (one row as a list of floats)."""
        ...

    def predict_value(self, values: list[float]) -> float: ...

    def close(self) -> None: ...


class _Native(Protocol):
    def predict_proba(self, rows: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class _LightGBM:
    def __init__(self, path: Path, n_features: int) -> None:
        lgb = import_lightgbm()
        self._lgb = lgb
        text = path.read_text()
        # LightGBM can crash the process on a truncated text model; refuse one before parsing.
        if "end of trees" not in text:
            raise ValueError("the file is truncated or not a LightGBM model (no 'end of trees')")
        self.booster = lgb.Booster(model_str=text)
        if self.booster.num_feature() != n_features:
            raise ValueError(
                f"model has {self.booster.num_feature()} features, metadata lists {n_features}"
            )
        self._n_features = n_features
        self._local = threading.local()
        self._configs: list[ctypes.c_void_p] = []
        self._lock = threading.Lock()  # guards _configs only, never a prediction

    def _fast_config(self) -> ctypes.c_void_p:
        config = getattr(self._local, "config", None)
        if config is None:
            config = ctypes.c_void_p()
            self._check(
                self._lgb.basic._LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                    self.booster._handle,
                    ctypes.c_int(0),  # C_API_PREDICT_NORMAL
                    ctypes.c_int(0),  # start iteration
                    ctypes.c_int(-1),  # all iterations (the best one, when early-stopped)
                    ctypes.c_int(0),  # C_API_DTYPE_FLOAT32
                    ctypes.c_int32(self._n_features),
                    ctypes.c_char_p(b"num_threads=1"),
                    ctypes.byref(config),
                )
            )
            self._local.config = config
            with self._lock:
                self._configs.append(config)
        return config

    def _check(self, ret: int) -> None:
        if ret != 0:
            raise RuntimeError(self._lgb.basic._LIB.LGBM_GetLastError().decode())

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) > _FAST_ROWS:
            return np.asarray(self.booster.predict(rows, num_threads=1), dtype=np.float64)
        config = self._fast_config()
        out = np.empty(len(rows), dtype=np.float64)
        out_len = ctypes.c_int64()
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        fast_predict = self._lgb.basic._LIB.LGBM_BoosterPredictForMatSingleRowFast
        for i in range(len(rows)):
            self._check(
                fast_predict(
                    config,
                    rows[i].ctypes.data_as(ctypes.c_void_p),
                    ctypes.byref(out_len),
                    out[i:].ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
                )
            )
        return out

    def close(self) -> None:
        with self._lock:
            for config in self._configs:
                self._lgb.basic._LIB.LGBM_FastConfigFree(config)
            self._configs.clear()


class _XGBoost:
    def __init__(self, path: Path, n_features: int) -> None:
        import xgboost as xgb

        self.booster = xgb.Booster()
        self.booster.load_model(str(path))
        self.booster.set_param({"nthread": 1})
        if self.booster.num_features() != n_features:
            raise ValueError(
                f"model has {self.booster.num_features()} features, metadata lists {n_features}"
            )

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        out = self.booster.inplace_predict(rows, validate_features=False)
        return np.asarray(out, dtype=np.float64).reshape(len(rows))

    def close(self) -> None:
        pass


class _CatBoost:
    def __init__(self, path: Path, n_features: int) -> None:
        from catboost import CatBoostClassifier

        self.model: Any = CatBoostClassifier()
        self.model.load_model(str(path))
        if len(self.model.feature_names_) != n_features:
            raise ValueError(
                f"model has {len(self.model.feature_names_)} features, metadata lists {n_features}"
            )

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        out = self.model.predict(rows, prediction_type="Probability", thread_count=1)
        return np.asarray(out[:, 1], dtype=np.float64)

    def close(self) -> None:
        pass


_LOADERS: dict[str, Callable[[Path, int], _Native]] = {
    "lightgbm": _LightGBM,
    "xgboost": _XGBoost,
    "catboost": _CatBoost,
}


class NativeModel:
    """A native booster with the thread pool that runs it."""

    engine = "native"

    def __init__(self, meta: ModelMetadata, model_dir: Path, workers: int) -> None:
        self._impl = _LOADERS[meta.model_type](
            model_dir / meta.native_file, len(meta.feature_names)
        )
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="native")

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        return self._impl.predict_proba(rows)

    # Native boosters keep per-thread state only, so the loop thread may call them directly.
    predict_on_loop = predict_proba

    takes_values = False
    """A native booster takes the matrix path for a lone row too."""

    def predict_value(self, values: list[float]) -> float:
        raise NotImplementedError("a native booster has no one-value path (takes_values)")

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self._impl.close()
