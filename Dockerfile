# mailgate gateway image: SMTP listener (2525) and HTTP health/metrics (8025).
# Build: docker build -t mailgate .   Run: docker run -v mailgate-data:/data -p 2525:2525 mailgate
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY ingest ./ingest
COPY storage ./storage
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11.7-slim-bookworm
LABEL org.opencontainers.image.title="mailgate" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 mailgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home mailgate \
 && mkdir -p /data /etc/mailgate \
 && chown 10001:10001 /data
COPY --from=build /install /usr/local
COPY config.example.toml /etc/mailgate/config.toml
# In a container the listeners bind every interface and data lives in /data.
RUN sed -i -e 's|^host = "127.0.0.1"|host = "0.0.0.0"|' \
           -e 's|sqlite+aiosqlite:///./data/mailgate.db|sqlite+aiosqlite:////data/mailgate.db|' \
           -e 's|^data_dir = "./data"|data_dir = "/data"|' /etc/mailgate/config.toml
ENV MAILGATE_CONFIG=/etc/mailgate/config.toml \
    PYTHONUNBUFFERED=1
WORKDIR /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 2525 8025
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8025/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["mailgate"]
CMD ["serve"]
