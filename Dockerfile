# The trilemma operator image; the `trilemma` CLI works in it too (without the demo's KMock).
#
#   docker run IMAGE                                 # the operator, all namespaces, standalone
#   docker run IMAGE trilemma optimize /specs/x.yaml # the CLI: the command replaces CMD
#
# No ENTRYPOINT: the whole default command is CMD, so any command given to `docker run` (or a
# pod's `command`/`args`, as the Helm chart sets them) replaces it cleanly.
FROM python:3.11-slim AS build
WORKDIR /src
# Only what the wheel is built from (pyproject's package-dir folders and its readme/licence);
# tests/unit/test_dockerfile.py checks this list against pyproject.toml.
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY optimizer ./optimizer
COPY operator ./operator
COPY simfleet ./simfleet
COPY tools ./tools
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="trilemma" \
      org.opencontainers.image.description="Autotuning operator for LLM inference endpoints" \
      org.opencontainers.image.licenses="Apache-2.0"
# A plain (non-editable) install with its dependencies from the index; pip compiles the
# bytecode now, because at run time the root filesystem is read-only. No compilers, no caches.
# No extras: the image ships no KMock (the `demo` extra). trilemma.tools comes with the wheel
# because the `trilemma` console script lives there; its `optimize` and `crds` commands need
# no KMock, and `trilemma demo` says to install trilemma[demo] (tests/unit/test_dockerfile.py).
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --disable-pip-version-check /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --gid 10001 trilemma \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin trilemma
# Nothing writes outside /tmp (mount an emptyDir or tmpfs there with a read-only root): HOME,
# the operator's cache and Python's bytecode (not written at all).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TRILEMMA_CACHE_DIR=/tmp/trilemma
USER 10001:10001
WORKDIR /tmp
# Kopf's liveness endpoint and the operator's Prometheus metrics.
EXPOSE 8080 9090
# --standalone: without it Kopf joins a peering named "default" whenever Kopf's peering CRDs
# exist, i.e. pauses for any other Kopf operator in the cluster. The chart picks its own flags.
CMD ["kopf", "run", "--module=trilemma.operator.handlers", \
     "--liveness=http://0.0.0.0:8080/healthz", "--all-namespaces", "--standalone"]
