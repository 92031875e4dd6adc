# syntax=docker/dockerfile:1
# One image for every Valve component:
#   valve operator | valve device-plugin --backend nvml | valve runtime arbiter | valve runtime proxy
#
# Build (from the repository root):
#   docker build -t <registry>/valve:0.1.0 .
#   docker build --build-arg VALVE_EXTRAS=node,engine,cuda,torch -t <registry>/valve:0.1.0-torch .   # + Valve's engine
# The chart runs it as uid 65532 (operator, sidecars) and as root without capabilities (device plugin).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Extras of the valve package to install: "node" is what the four processes above import (README, "Install").
ARG VALVE_EXTRAS=node
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/valve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY valve ./valve
RUN /opt/valve/bin/pip install --no-compile ".${VALVE_EXTRAS:+[${VALVE_EXTRAS}]}" \
 && /opt/valve/bin/valve operator --help >/dev/null
# libvalvegate.so, the launch-level offline gate (valve/preload), at the path pods of gate "preload" mount from
# the node (valve.api.contract.PRELOAD_LIBRARY): copy it from the image onto each GPU node. Beside it
# libvalvebusguard.so, which keeps Valve's own processes alive when a control file is truncated under them.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
 && /opt/valve/bin/python -m valve.preload.build /opt/valve/lib \
 && /opt/valve/bin/python -m valve.runtime.busguard /opt/valve/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="valve" \
      org.opencontainers.image.description="Colocate online and offline LLM inference on one GPU" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 valve \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin valve
COPY --from=build /opt/valve /opt/valve
# No bytecode writes (the root filesystem is read-only in the chart).
ENV PATH=/opt/valve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
ENTRYPOINT ["valve"]
CMD ["--help"]
