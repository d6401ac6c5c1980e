"""The gRPC face of the model server.

``servicer``      ModelService: protobuf in, one domain call, protobuf out
``messages``      domain results to protobuf messages, in one place
``interceptors``  cross-cutting concerns on every call (metrics)
``metrics``       the Recorder the metrics interceptor writes to, and its RPC instruments
``telemetry``     the server's series for ``/metrics`` and its ``/health`` JSON
"""
