"""Triton's own client (``tritonclient.grpc`` 2.71) against a xylen server, in its own process.

tritonclient registers its own ``inference`` protobuf package (grpc_service.proto), and so does
the server (the vendored grpc_predict_v2.proto): one Python process cannot import both (the
protobuf descriptor pool refuses the duplicate symbols), so the tests run this script as a real
client process. Usage: ``python triton_probe.py ADDRESS ROWS.npy [TOKEN]``; prints one JSON
object with what each call answered (values, or the status code and message of a refusal).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

MODEL = "model_1"


def _infer(
    client: Any, rows: np.ndarray, datatype: str = "FP32", model: str = MODEL, **kwargs: Any
) -> Any:
    tensor = triton.InferInput("features", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)  # raw_input_contents
    return client.infer(model, [tensor], **kwargs)


def _refusal(call: Any) -> dict[str, Any]:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": "OK"}


def main() -> None:
    address, rows_file = sys.argv[1], sys.argv[2]
    headers = {"authorization": f"Bearer {sys.argv[3]}"} if len(sys.argv) > 3 else None
    rows = np.load(rows_file).astype(np.float32)
    client = triton.InferenceServerClient(address)
    out: dict[str, Any] = {}
    out["live"] = client.is_server_live()
    out["ready"] = client.is_server_ready()
    if headers is not None:
        out["model_ready_without_token"] = _refusal(lambda: client.is_model_ready(MODEL))
        out["infer_without_token"] = _refusal(lambda: _infer(client, rows))
    out["model_ready"] = client.is_model_ready(MODEL, headers=headers)
    out["other_model_ready"] = client.is_model_ready("model_9", headers=headers)
    out["metadata"] = client.get_model_metadata(MODEL, headers=headers, as_json=True)
    result = _infer(client, rows, headers=headers, request_id="req-7")
    response = result.get_response()
    out["infer"] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "probability_up": result.as_numpy("probability_up").tolist(),
        "signal": result.as_numpy("signal").tolist(),
        "prediction_id": [b.decode() for b in result.as_numpy("prediction_id").tolist()],
        "shape": list(result.as_numpy("probability_up").shape),
    }
    only = _infer(
        client, rows, headers=headers, outputs=[triton.InferRequestedOutput("probability_up")]
    )
    out["only_probability"] = {
        "outputs": [o.name for o in only.get_response().outputs],
        "probability_up": only.as_numpy("probability_up").tolist(),
    }
    bad = rows.copy()
    bad[1, 3] = np.nan
    out["nan"] = _refusal(lambda: _infer(client, bad, headers=headers))
    out["fp64"] = _refusal(lambda: _infer(client, rows.astype(np.float64), "FP64", headers=headers))
    out["narrow"] = _refusal(
        lambda: _infer(client, np.ascontiguousarray(rows[:, :-1]), headers=headers)
    )
    out["rank3"] = _refusal(lambda: _infer(client, rows.reshape(1, *rows.shape), headers=headers))
    out["other_version"] = _refusal(
        lambda: _infer(client, rows, headers=headers, model_version="99")
    )
    out["other_model"] = _refusal(lambda: _infer(client, rows, model="model_9", headers=headers))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
