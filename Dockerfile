# Tally worker image: exactly the locked dependencies (uv.lock), no dev or bench groups.
FROM python:3.11-slim
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY schemas schemas
COPY pipeline pipeline
COPY agents agents
COPY sinks sinks
RUN uv sync --frozen --no-dev --no-group bench && ln -s /app/.venv/bin/tally /usr/local/bin/tally
USER nobody
CMD ["tally", "worker"]
