"""LightGBM (default), XGBoost and CatBoost behind one interface.

Each model: binary objective, fit with early stopping on the validation set, fixed seeds and a
fixed thread count (same data, same params -> byte-identical native file), saved in its native
format under the name in :data:`training.metadata.NATIVE_FILES`, loaded back, and
``predict_proba`` returning P(up) as float64. Features are float32 everywhere (see
:mod:`training.onnx_export`): the models are fitted on float32 inputs and predict on them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from training.metadata import (
    FEATURE_IMPORTANCE_FILE,
    NATIVE_FILES,
    PARITY_PROBE_ROWS,
    ModelMetadata,
    atomic_directory,
    sha256_file,
    write_feature_importance,
)

#: Fewest rows any model is fitted on: a training run, and a retrain's new samples.
MIN_TRAINING_SAMPLES = 100

#: Hyper-parameters per model type; ``n_estimators`` and ``early_stopping_rounds`` are shared keys.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "lightgbm": {
        "n_estimators": 300,
        "early_stopping_rounds": 30,
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 100,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
    },
    "xgboost": {
        "n_estimators": 300,
        "early_stopping_rounds": 30,
        "learning_rate": 0.05,
        "max_depth": 5,
        "min_child_weight": 20,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "lambda": 1.0,
    },
    "catboost": {
        "n_estimators": 300,
        "early_stopping_rounds": 30,
        "learning_rate": 0.08,
        "depth": 6,
        "l2_leaf_reg": 3.0,
    },
}


def as_features(x: np.ndarray) -> np.ndarray:
    """The model input dtype: C-contiguous float32."""
    return np.ascontiguousarray(x, dtype=np.float32)


class TreeModel(ABC):
    """A binary tree-ensemble classifier with a native file format.

    :meth:`fit` trains from scratch; :meth:`finetune` continues training the trees it holds
    (a loaded model) on new rows, where its library supports that (:attr:`can_finetune`).
    """

    model_type: ClassVar[str]
    can_finetune: ClassVar[bool] = False

    def __init__(
        self,
        params: dict[str, Any] | None = None,
        *,
        feature_names: list[str],
        seed: int = 42,
        num_threads: int = 2,
    ) -> None:
        self.params = {**DEFAULT_PARAMS[self.model_type], **(params or {})}
        self.feature_names = list(feature_names)
        self.seed = seed
        self.num_threads = num_threads
        self.best_iteration: int | None = None

    @property
    def native_file(self) -> str:
        return NATIVE_FILES[self.model_type]

    def fit(self, x: np.ndarray, y: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray) -> None:
        """Fit on (x, y), stopping early on the validation log loss."""
        self._train(x, y, x_valid, y_valid, *self._rounds())

    def finetune(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_valid: np.ndarray | None = None,
        y_valid: np.ndarray | None = None,
        *,
        rounds: int = 100,
        patience: int = 20,
    ) -> None:
        """Add up to ``rounds`` trees fitted on (x, y) to the trees this model holds, stopping
        early after ``patience`` rounds without a better validation log loss (when a validation
        set is given)."""
        if not self.can_finetune:
            raise NotImplementedError(f"{self.model_type} models have no continued training here")
        self._train(x, y, x_valid, y_valid, rounds, patience, start=self._fitted())

    @abstractmethod
    def _train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_valid: np.ndarray | None,
        y_valid: np.ndarray | None,
        rounds: int,
        patience: int,
        start: Any = None,
    ) -> None:
        """Up to ``rounds`` boosting rounds on (x, y), after the trees of ``start`` (the
        library's own model object, :meth:`_fitted`) when given, early-stopped after
        ``patience`` rounds on the validation set when there is one."""

    @abstractmethod
    def _fitted(self) -> Any:
        """The library's model object holding the trees (what :meth:`finetune` continues)."""

    @abstractmethod
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(up) per row, float64."""

    @abstractmethod
    def feature_importance(self) -> dict[str, float]:
        """Total gain per feature (CatBoost: its PredictionValuesChange, the gain analogue)."""

    @abstractmethod
    def _save(self, path: Path) -> None: ...

    @abstractmethod
    def _load(self, path: Path) -> None: ...

    def save(self, model_dir: Path) -> Path:
        """Write the native file into ``model_dir``; returns its path."""
        path = Path(model_dir) / self.native_file
        self._save(path)
        return path

    @classmethod
    def load(cls, model_dir: Path, feature_names: list[str]) -> TreeModel:
        model = cls(feature_names=feature_names)
        model._load(Path(model_dir) / model.native_file)
        return model

    def _rounds(self) -> tuple[int, int]:
        return int(self.params["n_estimators"]), int(self.params["early_stopping_rounds"])

    def _native_params(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.params.items()
            if k not in {"n_estimators", "early_stopping_rounds"}
        }


class LightGBMModel(TreeModel):
    model_type = "lightgbm"
    can_finetune = True

    def _train_params(self) -> dict[str, Any]:
        return {
            **self._native_params(),
            "objective": "binary",
            "metric": "binary_logloss",
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }

    def _train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_valid: np.ndarray | None,
        y_valid: np.ndarray | None,
        rounds: int,
        patience: int,
        start: Any = None,
    ) -> None:
        import lightgbm as lgb

        train = lgb.Dataset(as_features(x), y, feature_name=self.feature_names, free_raw_data=True)
        valid_sets: list[Any] = []
        callbacks: list[Any] = []
        if x_valid is not None and len(x_valid):
            valid_sets = [lgb.Dataset(as_features(x_valid), y_valid, reference=train)]
            callbacks = [lgb.early_stopping(patience, verbose=False)]
        booster = lgb.train(
            self._train_params(),
            train,
            num_boost_round=rounds,
            init_model=start,
            valid_sets=valid_sets,
            callbacks=callbacks,
        )
        self.best_iteration = booster.best_iteration or booster.current_iteration()
        # Keep only the trees up to the best iteration, so the file, ONNX and server agree.
        best = booster.model_to_string(num_iteration=self.best_iteration)
        self.booster = lgb.Booster(model_str=best)

    def _fitted(self) -> Any:
        return self.booster

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(as_features(x)), dtype=np.float64)

    def feature_importance(self) -> dict[str, float]:
        gains = self.booster.feature_importance(importance_type="gain")
        return dict(zip(self.booster.feature_name(), map(float, gains), strict=True))

    def _save(self, path: Path) -> None:
        self.booster.save_model(str(path))

    def _load(self, path: Path) -> None:
        import lightgbm as lgb

        self.booster = lgb.Booster(model_file=str(path))
        self.best_iteration = self.booster.current_iteration()


class XGBoostModel(TreeModel):
    model_type = "xgboost"
    can_finetune = True

    def _train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_valid: np.ndarray | None,
        y_valid: np.ndarray | None,
        rounds: int,
        patience: int,
        start: Any = None,
    ) -> None:
        """``rounds`` boosting rounds on (x, y), after the trees of ``start`` when given
        (XGBoost's continued training), early-stopped on the validation set when there is one."""
        import xgboost as xgb

        params = {
            **self._native_params(),
            "objective": "binary:logistic",
            "eval_metric": "logloss",
            "tree_method": "hist",
            "seed": self.seed,
            "nthread": self.num_threads,
            "verbosity": 0,
        }
        names = self.feature_names
        train = xgb.DMatrix(as_features(x), label=y, feature_names=names)
        evals = []
        if x_valid is not None and len(x_valid):
            evals = [(xgb.DMatrix(as_features(x_valid), label=y_valid, feature_names=names), "v")]
        booster = xgb.train(
            params,
            train,
            num_boost_round=rounds,
            evals=evals,
            early_stopping_rounds=patience if evals else None,
            verbose_eval=False,
            xgb_model=start,
        )
        # best_iteration counts the trees of start too; keep the trees up to it, so the
        # file, ONNX and server agree.
        if evals:
            self.best_iteration = int(booster.best_iteration) + 1
            self.booster = booster[: self.best_iteration]
        else:
            self.best_iteration = booster.num_boosted_rounds()
            self.booster = booster

    def _fitted(self) -> Any:
        return self.booster

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        matrix = xgb.DMatrix(as_features(x), feature_names=self.feature_names)
        return np.asarray(self.booster.predict(matrix), dtype=np.float64)

    def feature_importance(self) -> dict[str, float]:
        scores = self.booster.get_score(importance_type="total_gain")
        return {name: float(scores.get(name, 0.0)) for name in self.feature_names}  # type: ignore[arg-type]

    def _save(self, path: Path) -> None:
        self.booster.save_model(str(path))

    def _load(self, path: Path) -> None:
        import xgboost as xgb

        self.booster = xgb.Booster(model_file=str(path))
        self.booster.set_param({"nthread": self.num_threads})
        self.best_iteration = self.booster.num_boosted_rounds()


class CatBoostModel(TreeModel):
    model_type = "catboost"
    can_finetune = True

    def _train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_valid: np.ndarray | None,
        y_valid: np.ndarray | None,
        rounds: int,
        patience: int,
        start: Any = None,
    ) -> None:
        """``rounds`` iterations on (x, y), after the trees of ``start`` when given
        (CatBoost's continued training), keeping the best iteration on the validation set
        when there is one."""
        from catboost import CatBoostClassifier, Pool

        validated = x_valid is not None and len(x_valid) > 0
        model = CatBoostClassifier(
            **self._native_params(),
            iterations=rounds,
            early_stopping_rounds=patience if validated else None,
            loss_function="Logloss",
            random_seed=self.seed,
            thread_count=self.num_threads,
            use_best_model=validated,
            allow_writing_files=False,
            verbose=False,
        )
        names = self.feature_names
        # Integer labels: CatBoost's ONNX export refuses a model trained on float labels.
        eval_set = None
        if x_valid is not None and validated:
            eval_set = Pool(
                as_features(x_valid), np.asarray(y_valid, dtype=np.int64), feature_names=names
            )
        model.fit(
            Pool(as_features(x), np.asarray(y, dtype=np.int64), feature_names=names),
            eval_set=eval_set,
            init_model=start,
        )
        self.model = model
        self.best_iteration = int(model.tree_count_)

    def _fitted(self) -> Any:
        return self.model

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        proba = self.model.predict_proba(as_features(x), thread_count=self.num_threads)
        return np.asarray(proba[:, 1], dtype=np.float64)

    def feature_importance(self) -> dict[str, float]:
        values = self.model.get_feature_importance()
        return dict(zip(self.feature_names, map(float, values), strict=True))

    def _save(self, path: Path) -> None:
        # CatBoost stamps a random GUID and the finish time into the file; both would make two
        # identical trainings differ byte for byte, so pin the one and drop the other.
        info = self.model.get_metadata()
        if "train_finish_time" in info:
            del info["train_finish_time"]
        info["model_guid"] = f"xylen-catboost-seed-{self.seed}"
        self.model.save_model(str(path), format="cbm")

    def _load(self, path: Path) -> None:
        from catboost import CatBoostClassifier

        self.model = CatBoostClassifier()
        self.model.load_model(str(path), format="cbm")
        self.best_iteration = self.model.tree_count_


MODEL_CLASSES: dict[str, type[TreeModel]] = {
    cls.model_type: cls for cls in (LightGBMModel, XGBoostModel, CatBoostModel)
}


def make_model(
    model_type: str,
    params: dict[str, Any] | None = None,
    *,
    feature_names: list[str],
    seed: int = 42,
    num_threads: int = 2,
) -> TreeModel:
    """A fresh model of ``model_type`` (one of :data:`training.metadata.MODEL_TYPES`)."""
    try:
        cls = MODEL_CLASSES[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model type {model_type!r}; use one of {', '.join(MODEL_CLASSES)}"
        ) from None
    return cls(params, feature_names=feature_names, seed=seed, num_threads=num_threads)


def write_model_dir(target: Path, model: TreeModel, meta: ModelMetadata) -> ModelMetadata:
    """Write a complete model directory at ``target``, atomically (a failure leaves what was
    there): the native file, ``feature_importance.csv``, ``metadata.json`` with the native
    file's sha256 (the server verifies it before loading), ``model.onnx`` and ``parity.npz``
    (the native side of the server's parity check, :mod:`training.parity`, so a server loading
    this model starts no reference child). The one writer of model directories: ``make
    train``, the retrain job and the importer all use it."""
    import onnx

    from training.onnx_export import export_onnx
    from training.parity import keep_reference, native_reference

    with atomic_directory(Path(target)) as tmp:
        native = model.save(tmp)
        write_feature_importance(tmp / FEATURE_IMPORTANCE_FILE, model.feature_importance())
        native_sha256 = sha256_file(native)
        meta = replace(meta, checksums={native.name: native_sha256})
        meta.write(tmp)
        onnx_bytes = export_onnx(tmp).read_bytes()
        # The reference comes from the native file as written (read back, as a server's child
        # reads it), not from the booster in memory.
        saved = type(model).load(tmp, meta.feature_names)
        rows, reference = native_reference(
            meta, onnx.load_from_string(onnx_bytes), PARITY_PROBE_ROWS, saved.predict_proba
        )
        keep_reference(tmp, meta, native_sha256, onnx_bytes, rows, reference)
    return meta
