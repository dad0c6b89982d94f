# inferlane image: workers, consumer services and `inferlane topics create`.
# Slim Python (pinned patch release), the package without extras (no local stack, no training),
# the committed models, a non-root user. docker-compose.yml builds and runs it; docs/deploy.md.
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY agents ./agents
COPY schemas ./schemas
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11.14-slim-bookworm
RUN useradd --create-home --uid 10001 inferlane
COPY --from=build /install /usr/local
COPY models /app/models
WORKDIR /app
# The installed package cannot find models/ next to itself: point the registry at the copy.
ENV INFERLANE_MODEL_REGISTRY=/app/models \
    INFERLANE_STATE_DIR=/tmp/inferlane \
    INFERLANE_WEB_PORT=6066 \
    PYTHONUNBUFFERED=1
USER inferlane
EXPOSE 6066
# The worker's /metrics (faust web); services and one-shots override it in docker-compose.yml.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('INFERLANE_WEB_PORT', '6066'), timeout=3)"]
CMD ["inferlane", "worker"]
