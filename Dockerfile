# Production image: `gateway serve` as a non-root user, with a health check.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway

USER gateway
WORKDIR /var/lib/gateway
ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml GATEWAY_SERVER_HOST=0.0.0.0
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_SERVER_PORT', '8080'), timeout=2)"
# Exec form: SIGTERM reaches the gateway, which lets running streams finish (shutdown_timeout).
CMD ["gateway", "serve"]
