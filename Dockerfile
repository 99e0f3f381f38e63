# syntax=docker/dockerfile:1
# Build stage: the project's own wheel, with its compiled head split (the full image has
# gcc; setup.py). Its dependencies come from requirements.lock, pinned with hashes
# (regenerate: see docs/operations.md).
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY mtlsproxy ./mtlsproxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Runtime: no compilers, no wheels left behind. The lock and the wheel are bind-mounted
# for the install only, so neither is part of any layer.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home mtlsproxy
RUN --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
    && pip install --no-cache-dir --no-deps /wheels/*.whl
USER 10001
EXPOSE 8443 9901
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["mtlsproxy"]
CMD ["run", "--config", "/etc/mtlsproxy/config.yaml"]
