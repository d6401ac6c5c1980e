"""xylen model server: one tree model behind a typed gRPC contract, served from ONNX sessions.

Rooms by job; imports run one way only, left to right::

    root  <-  serving  <-  versions  <-  learning  <-  api  <-  server.py, __main__

Root (import-light, shared with the coordinator):
    ``settings``   the one Settings object, read from the environment
    ``errors``     the error tree and the interceptor that maps it to status + ErrorInfo
    ``candles``    candle windows: protobuf to validated columns and back
    ``signals``    BUY/SELL/HOLD and the one threshold rule
    ``health``     server options, grpc.health.v1, reflection, binding a port
    ``durable``    SQLite opened in WAL mode with synchronous=FULL (the feedback store, and
                   the coordinator's outbox)
    ``tls``        TLS credentials from PEM files; one way to dial for every client
    ``auth``       who may call what: tokens, mTLS identities, the interceptor, the loopback rule
    ``telemetry``  meters, the ``/metrics`` and ``/health`` endpoint, process series, tracing
    ``loops``      the running event loop, found without a system call per ask
``serving/``       inputs, the session pool, native engines, parity, the model store, the predictor
``versions/``      the hot swap, the history of kept versions, the ``model`` CLI
``learning/``      feedback samples and their store, the prediction log, feedback validation,
                   replay, the retrainer, the gate, the retrain job (a subprocess)
``api/``           the servicer, its messages, interceptors, metrics
``server``         the composition root: builds, starts and stops a server
``__main__``       ``xylen-server``: serve, ``model ...``, ``replay``
``devtools/``      drives a server from outside (launcher, demos); nothing here imports it
"""
