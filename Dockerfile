# etl: the Batches API pipeline as a container. Build: docker build -t etl .
# Run: docker run -e ETL_DATABASE_URL=postgresql://etl_svc@db/etl etl, with the API key (and the database
# password) as Docker secrets: files in /run/secrets named anthropic_api_key and database_password
# (docs/deploy.md); or mount a volume on /var/lib/etl for the default SQLite file, made 0600 there.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ETL_CONFIG=/etc/etl/etl.toml \
    ETL_DATABASE_URL=sqlite:////var/lib/etl/etl.db \
    CREDENTIALS_DIRECTORY=/run/secrets \
    ETL_METRICS_LISTEN=0.0.0.0:9464

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/run.txt ./requirements/run.txt
COPY etl ./etl
# Exactly the tested versions: the lock (hashes required), then the project without resolving anything.
RUN pip install --require-hashes --no-deps -r requirements/run.txt \
    && pip install --no-deps --no-build-isolation . \
    && pip check \
    && groupadd --system --gid 10001 etl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/etl --shell /usr/sbin/nologin etl \
    && mkdir -p /var/lib/etl /etc/etl \
    && chown etl:etl /var/lib/etl \
    && chmod 0700 /var/lib/etl

COPY config/etl.toml /etc/etl/etl.toml

WORKDIR /var/lib/etl
USER 10001:10001
VOLUME ["/var/lib/etl"]
# Prometheus metrics of `etl run` (docs/deploy.md "Monitoring"): publish with -p 127.0.0.1:9464:9464.
# Inside the container it listens on every interface, since loopback there is the container's own.
EXPOSE 9464

# Unhealthy when the last runs failed, a batch deadline is near, or submission is paused.
HEALTHCHECK --interval=5m --timeout=60s --start-period=2m --retries=2 CMD ["etl", "status", "--check"]

# SIGTERM stops the daemon between batches; it exits well within docker's stop timeout if given
# --stop-timeout 90 (the default 10 s is enough unless a batch create is in flight).
STOPSIGNAL SIGTERM
ENTRYPOINT ["etl"]
CMD ["run"]
