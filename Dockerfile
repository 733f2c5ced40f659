FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tracker ./tracker
RUN pip install --no-cache-dir . && useradd --system tracker
USER tracker
ENV TRACKER_HOST=0.0.0.0 TRACKER_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
CMD ["tracker", "serve"]
