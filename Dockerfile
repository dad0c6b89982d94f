# inferlane worker image: slim Python, non-root, the committed models included.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY agents ./agents
COPY schemas ./schemas
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 inferlane
COPY --from=build /install /usr/local
COPY models /app/models
WORKDIR /app
ENV INFERLANE_FRAUD_MODEL_DIR=/app/models/fraud \
    INFERLANE_STATE_DIR=/tmp/inferlane \
    PYTHONUNBUFFERED=1
USER inferlane
EXPOSE 6066
CMD ["faust", "-A", "agents", "worker", "-l", "info"]
