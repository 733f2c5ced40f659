FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tracker ./tracker
# The data folder is the tracker user's own (/app is root's): with DATABASE_URL set no key is ever
# generated there (the shared keys are required settings), but what the service keeps on disk
# (custody checkpoints, a volume in docker-compose.yml) goes there, not under /app.
RUN pip install --no-cache-dir . && useradd --system tracker \
    && mkdir -p /var/lib/tracker/checkpoints && chown -R tracker /var/lib/tracker
USER tracker
ENV TRACKER_HOST=0.0.0.0 TRACKER_PORT=8080 TRACKER_DATA_DIR=/var/lib/tracker
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
CMD ["tracker", "serve"]
