FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PORT=8080
WORKDIR /app

COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY config ./config
RUN pip install . && useradd --create-home --uid 10001 gateway \
    && mkdir -p /app/data && chown gateway:gateway /app/data

USER gateway
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8080\")}/health', timeout=2)" || exit 1

CMD ["python", "-m", "gateway"]
