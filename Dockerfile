# xylen model server (and coordinator) image. Multi-stage: the build stage installs the package
# into a virtualenv, generating the gRPC stubs from protos/ on the way (setup.py's build hook),
# and byte-compiles it; the runtime stage is python:3.11-slim with that virtualenv, a non-root
# user and nothing else. Read-only-root friendly: nothing is written outside /models (the model
# directory and its kept versions), /data (feedback and prediction logs) and /tmp (mount a tmpfs).
#
#   docker build -t xylen .
#   docker run --read-only --tmpfs /tmp -v "$PWD/models:/models" -v xylen-data:/data \
#     -v "$PWD/run/secrets/admin.token:/run/secrets/admin_token:ro" \
#     -e ADMIN_TOKEN_FILE=/run/secrets/admin_token -p 127.0.0.1:8001:8001 xylen
#
# The image listens on 0.0.0.0 (GRPC_HOST), so the server refuses to start unless the admin RPCs
# are protected: pass -e ADMIN_TOKEN_FILE=/run/secrets/admin_token (compose does, from a secret).
# compose.yaml runs it four times plus the coordinator (`make deploy`).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/xylen
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY xylen_server/ xylen_server/
COPY xylen_coordinator/ xylen_coordinator/
COPY training/ training/
# setup.py runs grpc_tools.protoc: the wheel carries xylen/v1/*_pb2*.py from these protos.
RUN /opt/xylen/bin/pip install --no-compile . \
    && /opt/xylen/bin/python -c "import xylen.v1.model_service_pb2_grpc, xylen_server.server" \
    && /opt/xylen/bin/python -m compileall -q -j 0 /opt/xylen

FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="xylen" \
      org.opencontainers.image.description="gRPC inference for trading-signal tree models"
RUN groupadd --system --gid 10001 xylen \
    && useradd --system --uid 10001 --gid xylen --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin xylen \
    && mkdir -p /models /data \
    && chown xylen:xylen /models /data
COPY --from=build /opt/xylen /opt/xylen
# The seed's settings with their defaults (xylen_server/settings.py has every one); the
# container-specific ones: listen on all interfaces, models and data on volumes. No admin
# credential is built in: give one (compose sets ADMIN_TOKEN_FILE to its secret) or the server,
# listening beyond loopback with open admin RPCs, stops at start with one line and exit code 2.
# WORKERS=auto: one server process per CPU the container is given (its cgroup quota, rounded
# down, at least 1: `cpus: '0.5'` is one process, `cpus: '4'` four on one port).
ENV PATH=/opt/xylen/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MODEL_NAME=model_1 \
    MODEL_PATH=/models \
    ONNX_ENABLED=true \
    LOG_LEVEL=INFO \
    GRPC_HOST=0.0.0.0 \
    GRPC_PORT=8001 \
    METRICS_PORT=9001 \
    SESSION_POOL_SIZE=2 \
    SESSION_THREADS=1 \
    SHUTDOWN_GRACE_SECONDS=10 \
    FEEDBACK_DATA_DIR=/data \
    WORKERS=auto
VOLUME ["/models", "/data"]
USER 10001:10001
WORKDIR /data
EXPOSE 8001 9001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "xylen_server.probe"]
ENTRYPOINT ["xylen-server"]
