# trilemma: the optimizer CLI today; the operator's `kopf run` entrypoint joins it later.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY optimizer ./optimizer
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
# No compilers or caches in the final image; runs as an unprivileged user and writes nothing
# to its own filesystem, so it works with readOnlyRootFilesystem.
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin trilemma
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001
ENTRYPOINT ["trilemma"]
CMD ["--help"]
