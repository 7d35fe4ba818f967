# Tally worker image: exactly the locked dependencies (uv.lock), no dev or bench groups.
# Two stages: the compiled meter core (native/, Rust) is built with a toolchain the image then
# leaves behind; both stages share the base image, so the virtualenv's python links hold.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY native native
COPY schemas schemas
COPY pipeline pipeline
COPY agents agents
COPY sinks sinks
RUN uv sync --frozen --no-dev --no-group bench

FROM python:3.11-slim
WORKDIR /app
COPY --from=build /app /app
RUN ln -s /app/.venv/bin/tally /usr/local/bin/tally
USER nobody
CMD ["tally", "worker"]
