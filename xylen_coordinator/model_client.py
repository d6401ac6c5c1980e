""":class:`ModelClient`: a small blocking client of one model server (no ensemble).

::

    from xylen_coordinator import ModelClient

    with ModelClient("127.0.0.1:8001") as model:
        info = model.info()                       # xylen.v1.ModelInfo
        (p,) = model.predict([[0.0] * len(info.feature_names)])
        print(p.model_name, p.model_version, p.probability_up, p.signal)
        model.feedback(p.prediction_id, underlying_log_return=0.004)  # admin: needs the token

Rows are feature vectors in ``info().feature_names`` order, or ready ``PredictInput`` messages
(a candle window: :func:`xylen_server.candles.window_input`). A refused call raises
:class:`ModelCallError` with the gRPC code, the ErrorInfo reason and the server's message.
TLS and tokens as for the coordinator: ``tls=ClientTls(ca=..., cert=..., key=...)``,
``token=`` the admin (or predict) token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xylen.v1 import model_service_pb2 as pb
from xylen.v1 import model_service_pb2_grpc as pb_grpc
from xylen.v1 import types_pb2
from xylen_server.auth import with_token
from xylen_server.tls import ClientTls, open_channel


class ModelCallError(Exception):
    """A call the server refused or could not answer: ``code``, ``reason`` (ErrorInfo), message."""

    def __init__(self, method: str, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{method}: {code.name} {reason}: {message}".replace(" :", ":"))
        self.code, self.reason, self.message = code, reason, message


def _reason(error: grpc.RpcError) -> str:
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except Exception:
        return ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


class ModelClient:
    """One long-lived channel to one model server; every method takes ``timeout`` seconds."""

    def __init__(
        self,
        address: str,
        *,
        tls: ClientTls | None = None,
        token: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._raw = open_channel(address, tls)
        self._channel = with_token(self._raw, token)
        self._stub = pb_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._raw)

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            raise ModelCallError(method, code, _reason(error), details or "") from None

    def serving(self, timeout: float | None = None) -> bool:
        """Whether grpc.health.v1 says SERVING (False when it does not answer)."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout or self.timeout
            )
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def info(self, timeout: float | None = None) -> pb.ModelInfo:
        """GetModelInfo: name, version, feature names, lookback, thresholds, training status."""
        response = self._call("GetModelInfo", pb.GetModelInfoRequest(), timeout)
        return response.model_info

    def predict(
        self,
        rows: Iterable[Sequence[float] | pb.PredictInput],
        timeout: float | None = None,
    ) -> list[pb.Prediction]:
        """Predict: one :class:`xylen.v1.Prediction` per row, in order."""
        inputs = [
            row
            if isinstance(row, pb.PredictInput)
            else pb.PredictInput(features=types_pb2.FeatureVector(values=[float(v) for v in row]))
            for row in rows
        ]
        response = self._call("Predict", pb.PredictRequest(inputs=inputs), timeout)
        return list(response.predictions)

    def feedback(
        self,
        prediction_id: str,
        *,
        underlying_log_return: float | None = None,
        side: pb.TradeSide.ValueType = pb.TRADE_SIDE_UNSPECIFIED,
        realized_return: float = 0.0,
        pnl: float = 0.0,
        close_time: datetime | None = None,
        timeout: float | None = None,
    ) -> pb.FeedbackResponse:
        """Feedback: the outcome of a prediction, closed at ``close_time`` (default now); an admin
        RPC where credentials are set. The server labels it from the underlying's move over the
        model's horizon: ``underlying_log_return``, or ``side`` with the trade's
        ``realized_return`` (see ``TradeOutcome`` in the contract)."""
        outcome = pb.TradeOutcome(pnl=pnl, realized_return=realized_return, side=side)
        if underlying_log_return is not None:
            outcome.underlying_log_return = underlying_log_return
        outcome.close_time.FromDatetime(close_time or datetime.now(UTC))
        request = pb.FeedbackRequest(prediction_id=prediction_id, outcome=outcome)
        return self._call("Feedback", request, timeout)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
